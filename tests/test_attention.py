import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statements as ref  # noqa: I001
from longreach.attention import METHODS, check_options
from longreach.attention.core import Positions
from longreach.attention.select_merge import SCORES
from longreach.positions import Rope, default, yarn

TOL = dict(atol=1e-5, rtol=0)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def shapes(draw, max_len=300):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * ratio
    k_len = draw(st.integers(1, max_len))
    q_len = draw(st.sampled_from([k_len, 1, max(1, k_len // 3)]))
    dim = draw(st.sampled_from([16, 64]))
    return batch, heads, kv_heads, q_len, k_len, dim


def tensors(shape, dtype=torch.float32, requires_grad=False):
    b, h, hk, lq, lk, d = shape
    make = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(b, h, lq, d), make(b, hk, lk, d), make(b, hk, lk, d)


def run(name, q, k, v, rope, **opts):
    pos = Positions.contiguous(q.shape[0], q.shape[2], k.shape[2])
    return METHODS[name].fn(q, k, v, positions=pos, rope=rope, **opts)


def rope_for(dim):
    return default(dim, 10000.0)


@SETTINGS
@given(shapes(), st.sampled_from([8, 16, 32]), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2),
       st.sampled_from(["selected", "absolute"]))
def test_select_merge_statement(shape, block, top_k, local, sink, mode):
    q, k, v = tensors(shape)
    rope = rope_for(q.shape[-1])
    opts = dict(block_size=block, top_k=top_k, local=local, sink=sink, position_mode=mode)
    out = run("select_merge", q, k, v, rope, **opts)
    expected = ref.select_merge(q, k, v, rope, q.shape[-1] ** -0.5, block, top_k, local, sink, mode)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(shapes(), st.sampled_from([8, 16]), st.integers(1, 3), st.sampled_from(SCORES),
       st.sampled_from([None, 1, 3]), st.booleans(), st.sampled_from([2, 4]), st.sampled_from(["mean", "softmax"]),
       st.sampled_from([None, 0, 40]), st.booleans(), st.integers(0, 3), st.sampled_from(["shared", "carry"]))
def test_select_merge_selection_options_statement(shape, block, top_k, score, query_rows, per_head, representatives,
                                                  vote, score_distance, value_norm, common, rule):
    q, k, v = tensors(shape)
    value_norm = value_norm and score == "max"
    picks = {rule: min(common, top_k)}
    rope = rope_for(q.shape[-1])
    opts = dict(block_size=block, top_k=top_k, local=0, sink=1, score=score, query_rows=query_rows, per_head=per_head,
                representatives=representatives, vote=vote, score_distance=score_distance, value_norm=value_norm,
                **picks)
    out = run("select_merge", q, k, v, rope, **opts)
    expected = ref.select_merge(q, k, v, rope, q.shape[-1] ** -0.5, block, top_k, 0, 1, "selected", score=score,
                                query_rows=query_rows, per_head=per_head, representatives=representatives, vote=vote,
                                score_distance=score_distance, value_norm=value_norm, **picks)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("train_length", [40, 64, 1000])
def test_select_merge_keeps_merged_positions_inside_the_trained_window(train_length):
    q, k, v = tensors((1, 4, 2, 70, 70, 16))
    rope = rope_for(16)
    opts = dict(block_size=8, top_k=4, local=2, sink=1)  # merged span (1 + 4 + 2 + 1) * 8 = 64 positions
    out = run("select_merge", q, k, v, rope, train_length=train_length, **opts)
    inside = Rope(rope.inv_freq * min(1.0, train_length / 64), rope.scaling)
    expected = ref.select_merge(q, k, v, inside, 16**-0.5, 8, 4, 2, 1, "selected")
    torch.testing.assert_close(out, expected, **TOL)
    if train_length < 64:
        unbounded = ref.select_merge(q, k, v, rope, 16**-0.5, 8, 4, 2, 1, "selected")
        assert (out - unbounded).abs().max() > 1e-3


@SETTINGS
@given(shapes(), st.integers(2, 80), st.booleans(), st.integers(0, 6), st.sampled_from(["s2", "sf"]))
def test_s2_sf_statement(shape, group, shift, sink, name):
    q, k, v = tensors(shape)
    rope = rope_for(q.shape[-1])
    opts = dict(group_size=group, shift=shift, block_size=16)
    if name == "sf":
        opts["sink"] = sink
    out = run(name, q, k, v, rope, **opts)
    expected = ref.s2_sf(q, k, v, rope, q.shape[-1] ** -0.5, group, shift, sink if name == "sf" else 0)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(shapes(), st.integers(8, 120), st.integers(0, 7))
def test_dca_statement(shape, chunk_size, local_window):
    q, k, v = tensors(shape)
    rope = rope_for(q.shape[-1])
    out = run("dca", q, k, v, rope, chunk_size=chunk_size, local_window=local_window, block_size=32)
    expected = ref.dca(q, k, v, rope, q.shape[-1] ** -0.5, chunk_size, local_window)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(shapes(), st.integers(1, 8), st.integers(1, 100))
def test_self_extend_statement(shape, group, window):
    q, k, v = tensors(shape)
    rope = rope_for(q.shape[-1])
    out = run("self_extend", q, k, v, rope, group_size=group, window=window, block_size=32)
    expected = ref.self_extend(q, k, v, rope, q.shape[-1] ** -0.5, group, window)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(shapes(), st.integers(0, 8), st.integers(1, 100), st.sampled_from([16, 64]))
def test_sinks_statement(shape, sink, window, block):
    q, k, v = tensors(shape)
    rope = rope_for(q.shape[-1])
    out = run("sinks", q, k, v, rope, sink=sink, window=window, block_size=block)
    expected = ref.sinks(q, k, v, rope, q.shape[-1] ** -0.5, sink, window)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(shapes(), st.sampled_from([64, 256]), st.sampled_from([1.0, 2.0, 3.0]))
def test_softplus_statement(shape, train_length, power):
    q, k, v = tensors(shape)
    rope = rope_for(q.shape[-1])
    out = run("softplus", q, k, v, rope, train_length=train_length, power=power, block_size=32)
    expected = ref.softplus(q, k, v, rope, q.shape[-1] ** -0.5, train_length, power)
    torch.testing.assert_close(out, expected, **TOL)


@SETTINGS
@given(shapes())
def test_dense_statement(shape):
    q, k, v = tensors(shape)
    rope = yarn(q.shape[-1], 10000.0, 4.0, 64)
    torch.testing.assert_close(run("dense", q, k, v, rope), ref.dense(q, k, v, rope, q.shape[-1] ** -0.5), **TOL)


DEGENERATE = {
    # train_length=300: the largest merged span (23 blocks of 16) exceeds it, the keys (at most 300) do not.
    "select_merge": [dict(top_k=19, block_size=16), dict(top_k=19, block_size=16, position_mode="absolute"),
                     dict(top_k=19, block_size=16, train_length=300)],
    "s2": [dict(group_size=300, shift=False)],
    "sf": [dict(group_size=300, shift=False, sink=4)],
    "dca": [dict(chunk_size=300, local_window=0), dict(chunk_size=310, local_window=10)],
    "self_extend": [dict(window=300, group_size=4)],
    "sinks": [dict(window=300, sink=4)],
}


@pytest.mark.parametrize("name,opts", [(n, o) for n, os in DEGENERATE.items() for o in os])
@pytest.mark.parametrize("lengths", [(300, 300), (1, 300), (77, 150)])
def test_degenerate_settings_equal_dense(name, opts, lengths):
    q, k, v = tensors((2, 4, 2, *lengths, 64))
    rope = rope_for(64)
    torch.testing.assert_close(run(name, q, k, v, rope, **opts), run("dense", q, k, v, rope), atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "dense"])
def test_decode_rows_follow_method(name):
    """The last Lq queries alone (decoding) attend as rows of the full prefill prescribe."""
    q, k, v = tensors((1, 4, 2, 200, 200, 16))
    rope = rope_for(16)
    opts = {"select_merge": dict(block_size=16, top_k=2), "s2": dict(group_size=40), "sf": dict(group_size=40),
            "dca": dict(chunk_size=60, local_window=8), "self_extend": dict(window=30, group_size=4),
            "sinks": dict(window=30), "softplus": dict(train_length=64)}[name]
    full = run(name, q, k, v, rope, **opts)
    if name == "select_merge":  # its block mean covers the rows present, so pass the whole last block
        torch.testing.assert_close(run(name, q[:, :, 192:], k, v, rope, **opts), full[:, :, 192:], **TOL)
        return
    for rows in (1, 5):
        torch.testing.assert_close(run(name, q[:, :, -rows:], k, v, rope, **opts), full[:, :, -rows:], **TOL)


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients(name):
    q, k, v = tensors((1, 2, 1, 9, 9, 4), dtype=torch.float64, requires_grad=True)
    rope = Rope(torch.tensor([1.0, 0.1], dtype=torch.float64))
    opts = {"dense": {}, "select_merge": dict(block_size=2, top_k=1, local=0, sink=1),
            "s2": dict(group_size=4, block_size=2), "sf": dict(group_size=4, sink=1, block_size=2),
            "dca": dict(chunk_size=5, local_window=1, block_size=2), "self_extend": dict(window=3, group_size=2),
            "sinks": dict(window=3, sink=1, block_size=2), "softplus": dict(train_length=8)}[name]
    assert torch.autograd.gradcheck(lambda a, b, c: run(name, a, b, c, rope, **opts), (q, k, v))


def test_bfloat16_runs_close_to_float32():
    q, k, v = tensors((1, 4, 2, 100, 100, 64))
    rope = rope_for(64)
    for name in METHODS:
        full = run(name, q, k, v, rope)
        half = run(name, q.bfloat16(), k.bfloat16(), v.bfloat16(), rope)
        assert half.dtype == torch.bfloat16
        assert (half.float() - full).abs().max() < 0.05, name


def test_position_remapping_methods_need_rope():
    q, k, v = tensors((1, 2, 2, 10, 10, 16))
    for name in ("dca", "self_extend"):
        with pytest.raises(ValueError, match="needs un-rotated q and k"):
            run(name, q, k, v, None)


@pytest.mark.parametrize("name,opts,match", [
    ("select_merge", {"top_k": -1}, "'top_k' must be >= 0"),
    ("select_merge", {"block_size": 2.5}, "'block_size' must be a int"),
    ("s2", {"group_size": 1}, "'group_size' must be >= 2"),
    ("sinks", {"window": True}, "'window' must be a int"),
    ("softplus", {"power": 0.5}, "'power' must be >= 1"),
    ("dca", {"chunk": 5}, "takes no option 'chunk'"),
])
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        check_options(name, opts)


def test_shape_errors():
    q, k, v = tensors((1, 3, 2, 10, 10, 16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        run("sinks", q, k, v, None)


@pytest.mark.parametrize("k_len,train_length", [(200, 64), (200, 199), (200, 200), (64, 500)])
def test_dca_mscale_is_chunkllamas_temperature_beyond_the_trained_length(k_len, train_length):
    q, k, v = tensors((1, 4, 2, k_len, k_len, 16))
    rope = rope_for(16)
    opts = dict(chunk_size=40, local_window=5, block_size=32, train_length=train_length)
    out = run("dca", q, k, v, rope, mscale=True, **opts)
    scale = 16 ** -0.5
    if k_len > train_length:  # ChunkLlama multiplies cos and sin of q and k by 0.05 ln(n / L) + 1
        scale *= (0.05 * math.log(k_len / train_length) + 1) ** 2
    torch.testing.assert_close(out, ref.dca(q, k, v, rope, scale, 40, 5), **TOL)
    assert not torch.allclose(out, run("dca", q, k, v, rope, mscale=False, **opts)) or k_len <= train_length


@pytest.mark.parametrize("k_len,expected_group", [(100, 1), (160, 1), (161, 2), (300, 3), (1000, 8), (1001, 9)])
def test_self_extend_auto_group_covers_the_length(k_len, expected_group):
    from longreach.attention.self_extend import auto_group

    train_length, window = 160, 40
    assert auto_group(k_len, train_length, window) == expected_group
    assert (train_length - window) * expected_group + window >= k_len
    q, k, v = tensors((1, 2, 1, k_len, k_len, 16))
    rope = rope_for(16)
    opts = dict(train_length=train_length, window=window, block_size=32)
    torch.testing.assert_close(run("self_extend", q, k, v, rope, group_size="auto", **opts),
                               ref.self_extend(q, k, v, rope, 16 ** -0.5, expected_group, window), **TOL)


def test_select_blocks_breaks_score_ties_by_the_lower_block():
    from longreach.attention.select_merge import top_indices

    scores = torch.tensor([[0.5, 0.9, 0.7, 0.9, 0.7, 0.7, float("-inf")]])
    assert top_indices(scores, 3)[0].tolist() == [1, 3, 2]  # best first, each tie to the lower index
    assert top_indices(scores, 4)[0].tolist() == [1, 3, 2, 4]
    assert top_indices(scores.flip(-1), 3)[0].tolist() == [3, 5, 1]  # 0.9 at 3 and 5, then 0.7 at 1
    many = torch.zeros(3, 1000)  # all tied: the first ones, whatever the shape
    assert (top_indices(many, 5).sort(-1).values == torch.arange(5)).all()


def block_logits(logits: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, heads, 24, 4) in blocks of 4 whose query block 5 scores key block j (1-4) of each head by
    ``logits[head][j - 1]`` (the block's best key; block 0, the sink, scores 0)."""
    d, block = 4, 4
    q, k = torch.zeros(1, len(logits), 24, d), torch.zeros(1, len(logits), 24, d)
    q[0, :, 20:, 0] = 1.0
    for head, row in enumerate(logits):
        for jb, logit in enumerate(row, start=1):
            k[0, head, jb * block, 0] = logit * d**0.5
    return q, k


def test_shared_blocks_reach_every_head():
    from longreach.attention.select_merge import select_blocks

    # Query block 5 of four heads scores key blocks 1-4 (block 0 is its sink) by these logits. Each head's best
    # two are its votes: block 2 gets three (heads 0-2), the most, so with one shared pick of two it reaches
    # every head, head 3 (which ranks it last) included, beside each head's own best of the other blocks:
    # for heads 0 and 1, whose best is block 2, their second best.
    q, k = block_logits([[1.0, 5.0, 0.5, 0.0], [0.5, 5.0, 1.0, 0.0], [1.0, 3.5, 3.0, 4.0], [3.0, -1.0, 1.0, 4.0]])
    opts = dict(block_size=4, top_k=2, local=0, sink=1, score="max", query_rows=None, per_head=True,
                score_distance=None)
    assert select_blocks(q, k, **opts)[0, :, 5].tolist() == [[0, 1, 2, 5], [0, 2, 3, 5], [0, 2, 4, 5], [0, 1, 4, 5]]
    table = select_blocks(q, k, shared=1, **opts)[0, :, 5]
    assert table.tolist() == [[0, 1, 2, 5], [0, 2, 3, 5], [0, 2, 4, 5], [0, 2, 4, 5]]
    with pytest.raises(ValueError, match="shared must be in 0..top_k"):
        select_blocks(q, k, shared=3, **opts)


def test_carried_blocks_reach_the_layers_after():
    from longreach.attention.select_merge import LayerChain, select_blocks

    # Query block 5 of two heads scores key blocks 1-4 (block 0 is its sink). In layer 0 head 1 is sure of
    # block 3 (a logit 6 above the rest); in layer 1 neither head ranks block 3 in its best two, yet with
    # carry=1 every head of layer 1 keeps it beside its own best, and calling layer 1 again (a recomputed
    # checkpoint) selects the same.
    opts = dict(block_size=4, top_k=2, local=0, sink=1, score="max", query_rows=None, per_head=True,
                score_distance=None, carry=1)
    chain = LayerChain()
    first = select_blocks(*block_logits([[1.0, 1.2, 0.0, 0.5], [0.0, 0.1, 6.0, 0.2]]), link=chain.link(0), **opts)
    assert first[0, :, 5].tolist() == [[0, 2, 3, 5], [0, 3, 4, 5]]
    layer1 = block_logits([[2.0, 1.0, 0.0, 1.5], [0.5, 2.0, -1.0, 1.0]])
    # alone, layer 1 shares the block its own surest head picks (head 1's block 2, softmax 0.84)
    assert select_blocks(*layer1, **opts)[0, :, 5].tolist() == [[0, 1, 2, 5], [0, 2, 4, 5]]
    carried = select_blocks(*layer1, link=chain.link(1), **opts)
    assert carried[0, :, 5].tolist() == [[0, 1, 3, 5], [0, 2, 3, 5]]
    assert torch.equal(select_blocks(*layer1, link=chain.link(1), **opts), carried)
    q, k = (x.requires_grad_() for x in block_logits([[1.0, 1.2, 0.0, 0.5], [0.0, 0.1, 6.0, 0.2]]))
    select_blocks(q, k, link=chain.link(0), **opts)
    assert not chain.written[0][0].requires_grad  # a training step's graph is not held till the next
    with pytest.raises(ValueError, match="shared .* and carry .* both choose"):
        select_blocks(*layer1, **{**opts, "shared": 1})
    with pytest.raises(ValueError, match="layer 0 left blocks for"):
        select_blocks(*layer1, link=chain.link(1), **{**opts, "carry": 2})


@pytest.mark.parametrize("name", ["s2", "sf"])
@pytest.mark.parametrize(("offset", "heads"), [(0, 2), (2, 2), (4, 2), (6, 2), (4, 4), (0, 8)])
def test_shifted_heads_follow_their_global_index(name, offset, heads):
    # A sequence-parallel rank runs heads offset..offset + heads of 8 (4 kv heads): the shifted ones are
    # the global second half, whatever the slice.
    q, k, v = tensors((1, 8, 4, 70, 70, 16))
    rope = rope_for(16)
    opts = dict(group_size=24, block_size=8)
    full = run(name, q, k, v, rope, **opts)
    kv = slice(offset // 2, (offset + heads) // 2)
    part = run(name, q[:, offset:offset + heads], k[:, kv], v[:, kv], rope, global_heads=(offset, 8), **opts)
    torch.testing.assert_close(part, full[:, offset:offset + heads], **TOL)
    with pytest.raises(ValueError, match="global_heads"):
        run(name, q[:, :heads], k[:, :heads // 2], v[:, :heads // 2], rope, global_heads=(8, 8), **opts)


def test_value_norm_ranks_keys_by_their_output_share():
    from longreach.attention.select_merge import select_blocks

    # Query block 3 sees key blocks 1 and 2 as candidates (block 0 is its sink): block 1 holds the key of
    # larger logit (2.0 against 1.5), but its value is 100 times smaller, so its output share is smaller.
    d, block = 4, 4
    q, k, v = torch.zeros(1, 1, 16, d), torch.zeros(1, 1, 16, d), torch.ones(1, 1, 16, d)
    q[0, 0, 12:, 0] = 1.0
    k[0, 0, 5, 0], k[0, 0, 9, 0] = 2.0 * d**0.5, 1.5 * d**0.5
    v[0, 0, 5] = 0.01
    opts = dict(block_size=block, top_k=1, local=0, sink=1, score="max", query_rows=None, per_head=True)
    assert select_blocks(q, k, **opts)[0, 0, 3].tolist() == [0, 1, 3]
    assert select_blocks(q, k, v=v, **opts)[0, 0, 3].tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="value_norm.*score='max'"):
        select_blocks(q, k, v=v, **{**opts, "score": "mean"})


@pytest.mark.parametrize(("block", "first", "length"),
                         [(8, 0, 70), (16, 3, 70), (16, 21, 5), (8, 16, 1), (8, 0, 64), (16, 32, 48)])
@pytest.mark.parametrize("last_rows", [None, 1, 3, 7])
def test_block_means_of_the_last_rows(block, first, length, last_rows):
    from longreach.attention.select_merge import block_means

    x = torch.randn(2, 3, length, 4, dtype=torch.float64)
    expected = []
    for c in range(first // block, (first + length - 1) // block + 1):
        rows = [t for t in range(length) if (first + t) // block == c]
        expected.append(x[:, :, rows[-last_rows:] if last_rows else rows].mean(2))
    torch.testing.assert_close(block_means(x, block, first, last_rows), torch.stack(expected, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("score", ["mean", "representatives"])
def test_key_summaries_are_means_in_the_keys_dtype(score, dtype):
    """Part means of 16-bit keys stay 16-bit, so the best-key kernel scores them on the tensor cores (in float32 it
    took its FMA path, 11x slower than scoring every key at 64K on the H200)."""
    from longreach.attention.select_merge import key_summary

    k = torch.randn(2, 3, 70, 8, dtype=torch.float64).to(dtype)
    (summary,) = key_summary(k, 16, score, 4)
    rows = 4 if score == "representatives" else 16  # a part's rows; the last part holds what is left
    expected = torch.stack([k[:, :, i : i + rows].double().mean(2) for i in range(0, 70, rows)], 2).to(dtype)
    assert summary.dtype == dtype
    torch.testing.assert_close(summary[:, :, 0], expected)


def _noncausal_kept(q, k, block, top_k, local, sink, score, query_rows, per_head):
    """Brute force: per (batch, head, query block), the key blocks non-causal select-and-merge keeps."""
    b, h, lq, d = q.shape
    group, n_blocks = h // k.shape[1], -(-k.shape[2] // block)
    kept = {}
    for bi in range(b):
        for hh in range(h):
            voters = [hh] if per_head else list(range(hh // group * group, (hh // group + 1) * group))
            for ib in range(-(-lq // block)):
                rows = list(range(ib * block, min((ib + 1) * block, lq)))[-query_rows:]
                forced = {jb for jb in range(n_blocks) if jb < sink or abs(jb - ib) <= local}
                others = [jb for jb in range(n_blocks) if jb not in forced]
                score_of = {jb: sum(ref.block_score(q[bi, m, rows].mean(0), k[bi, hh // group, jb * block:
                                                    (jb + 1) * block], score, block) for m in voters)
                            for jb in others}
                kept[bi, hh, ib] = forced | set(sorted(others, key=lambda jb: (-score_of[jb], jb))[:top_k])
    return kept


@pytest.mark.parametrize(("q_len", "k_len", "per_head", "score"),
                         [(96, 96, True, "max"), (80, 150, False, "mean"), (150, 70, True, "max")])
def test_noncausal_selection_keeps_the_brute_force_blocks(q_len, k_len, per_head, score):
    from longreach.attention.select_merge import select_blocks

    q, k, _ = tensors((2, 4, 2, q_len, k_len, 16))
    opts = dict(block_size=16, top_k=2, local=1, sink=1, score=score, query_rows=8, per_head=per_head)
    table = select_blocks(q, k, causal=False, **opts)
    expected = _noncausal_kept(q, k, 16, 2, 1, 1, score, 8, per_head)
    got = {(bi, hh, ib): {j for j in table[bi, hh, ib].tolist() if j >= 0} for (bi, hh, ib) in expected}
    assert got == expected


@pytest.mark.parametrize(("q_len", "k_len"), [(64, 64), (50, 130), (130, 50)])
def test_noncausal_select_merge_over_every_block_is_dense_attention(q_len, k_len):
    from longreach.attention.select_merge import noncausal_select_merge

    q, k, v = tensors((1, 4, 2, q_len, k_len, 16))
    out = noncausal_select_merge(q, k, v, block_size=16, top_k=16, local=0, sink=0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, dense, **TOL)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        noncausal_select_merge(q[:, :3], k, v)


def _prefilter_statement(q, k, block, top_k, local, sink, keep, parts):
    """Per (head, query block): the forced blocks and the top_k by best key among the ``keep`` best candidates by
    the best of each block's ``parts`` part means, by loops (q and k of equal heads, every row summarised)."""
    n, d = -(-k.shape[2] // block), q.shape[-1]
    kept = []
    for head in range(q.shape[1]):
        rows = []
        for i in range(n):
            q_bar = q[0, head, i * block:(i + 1) * block].mean(0)
            keys = [k[0, head, c * block:(c + 1) * block] for c in range(n)]
            rep = {c: max(float(q_bar @ part.mean(0)) for part in keys[c].split(block // parts)) / d**0.5
                   for c in range(sink, max(sink, i - local))}
            short = sorted(rep, key=lambda c: (-rep[c], c))[:keep]
            best = sorted(short, key=lambda c: (-float((keys[c] @ q_bar).max()), c))[:top_k]
            forced = {c for c in range(min(sink, i + 1))} | {c for c in range(max(sink, i - local), i + 1)}
            rows.append(sorted(forced | set(best)))
        kept.append(rows)
    return kept


@pytest.mark.parametrize("keep", [2, 3, 50])
def test_select_blocks_prefilter_keeps_the_best_key_among_the_best_part_means(keep):
    from longreach.attention.select_merge import select_blocks

    gen = torch.Generator().manual_seed(keep)
    q, k = torch.randn(1, 3, 160, 8, generator=gen, dtype=torch.float64), torch.randn(1, 3, 160, 8, generator=gen,
                                                                                         dtype=torch.float64)
    opts = dict(block_size=16, top_k=2, local=1, sink=1, score="max", query_rows=None, per_head=True,
                representatives=4, prefilter=keep)
    table = select_blocks(q, k, **opts)
    got = [[[c for c in row.tolist() if c >= 0] for row in head] for head in table[0]]
    assert got == _prefilter_statement(q, k, 16, 2, 1, 1, keep, 4)
    if keep >= 10:  # every candidate survives the first stage: the plain selection
        assert torch.equal(table, select_blocks(q, k, **{**opts, "prefilter": 0}))


def test_select_blocks_prefilter_bad_input():
    from longreach.attention.select_merge import select_blocks

    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="prefilter must be 0 or at least top_k"):
        select_blocks(q, q, block_size=16, top_k=2, local=1, sink=1, prefilter=1, per_head=True)
    with pytest.raises(ValueError, match="needs per_head=True"):
        select_blocks(q, q, block_size=16, top_k=2, local=1, sink=1, prefilter=2, per_head=False)
