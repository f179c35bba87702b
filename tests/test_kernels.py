import importlib

import pytest
import torch

from longreach.attention.core import Positions, blocked_attention, listed_attention, plain_logits
from longreach.attention.select_merge import noncausal_select_merge, select_blocks, select_merge
from longreach.attention.shifted import s2, sf
from longreach.positions import default, yarn

pytest.importorskip("triton")
from longreach.kernels.block_sparse import block_sparse_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton 3.6's interpreter multiplies bf16 tl.dot operands wrongly (a 16x16 product came out 2.5e10
# off), so on the CPU the 16-bit path is checked in float16; on a GPU bfloat16 is checked too.
LOW = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def inputs(b, h, hk, q_len, k_len, d, dtype):
    make = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    return make(b, h, q_len, d), make(b, hk, k_len, d), make(b, hk, k_len, d)


def random_table(b, h, q_len, k_len, block, width, gen):
    """Unsorted key-block lists with holes; every third query block lists nothing."""
    first = k_len - q_len
    blocks = torch.arange(first // block, (k_len - 1) // block + 1)
    table = torch.randint(0, 10**6, (b, h, len(blocks), width), generator=gen) % (blocks[None, None, :, None] + 1)
    table[..., 0] = blocks  # the diagonal block, so causality and the ragged edge are exercised
    table = torch.where(torch.rand(table.shape, generator=gen) < 0.25, -1, table)
    table[:, :, ::3] = -1
    # duplicates are the caller's business: keep one of each
    ordered = table.sort(-1).values
    dup = torch.zeros_like(ordered, dtype=torch.bool)
    dup[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return torch.where(dup, -1, ordered).flip(-1).to(DEVICE)


def grads(out, tensors, seed):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, tensors, g)


def close(actual, expected, dtype):
    """fp32: tight; 16-bit: relative Frobenius error as low-precision operands give."""
    actual, expected = actual.float(), expected.float()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    else:
        err = (actual - expected).norm() / expected.norm().clamp_min(1e-6)
        assert err < 2e-2, f"relative error {err:.3e}"


def upcast(*xs):
    return [x.detach().float().requires_grad_() for x in xs]


CASES = [  # b, h, hk, q_len, k_len, d, block
    (1, 2, 2, 64, 64, 32, 16),
    (2, 4, 2, 77, 77, 64, 16),
    (1, 4, 1, 20, 100, 32, 32),
    (1, 2, 1, 1, 53, 32, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("case", CASES)
def test_arbitrary_tables_match_reference(case, dtype):
    b, h, hk, q_len, k_len, d, block = case
    gen = torch.Generator().manual_seed(sum(case))
    q, k, v = inputs(b, h, hk, q_len, k_len, d, dtype)
    table = random_table(b, h, q_len, k_len, block, 4, gen)
    out = block_sparse_attention(q, k, v, table, block_size=block)
    rq, rk, rv = upcast(q, k, v)
    ref = blocked_attention(rq, (rk,), rv, Positions.contiguous(b, q_len, k_len, DEVICE), block_size=block,
                            key_blocks=table, logits=plain_logits(None, d**-0.5))
    close(out, ref, dtype)
    for a, e in zip(grads(out, (q, k, v), 1), grads(ref, (rq, rk, rv), 1), strict=True):
        close(a, e, dtype)


def test_empty_lists_give_zero_output_and_gradients():
    q, k, v = inputs(1, 2, 1, 40, 40, 32, torch.float32)
    table = torch.full((1, 2, 3, 2), -1, device=DEVICE)
    table[:, :, 1, 0] = 0
    out = block_sparse_attention(q, k, v, table, block_size=16)
    assert torch.isfinite(out).all()
    assert out[:, :, :16].abs().max() == 0 and out[:, :, 32:].abs().max() == 0
    dq, dk, dv = grads(out, (q, k, v), 2)
    assert dq[:, :, :16].abs().max() == 0 and torch.isfinite(dk).all() and dv[:, :, 16:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("q_len", [100, 30])
@pytest.mark.parametrize("scaled", [False, True])
def test_select_merge_rotary_in_kernel(dtype, q_len, scaled):
    q, k, v = inputs(1, 4, 2, q_len, 100, 32, dtype)
    # yarn multiplies cos and sin by its temperature, which the kernel folds into the in-block turn.
    rope = yarn(32, 10000.0, 4.0, 64) if scaled else default(32, 10000.0)
    assert (rope.scaling != 1.0) == scaled
    opts = dict(block_size=16, top_k=2, local=1, sink=1, score="max", query_rows=8, per_head=True, score_distance=40)
    table = select_blocks(q, k, rope=rope, **opts)
    out = block_sparse_attention(q, k, v, table, block_size=16, inv_freq=rope.inv_freq, rotary_scaling=rope.scaling)
    rq, rk, rv = upcast(q, k, v)
    ref = select_merge(rq, rk, rv, positions=Positions.contiguous(1, q_len, 100, DEVICE), rope=rope, **opts)
    close(out, ref, dtype)
    for a, e in zip(grads(out, (q, k, v), 3), grads(ref, (rq, rk, rv), 3), strict=True):
        close(a, e, dtype)


def test_select_merge_kernel_takes_a_table_per_query_head():
    q, k, v = inputs(1, 4, 2, 100, 100, 32, torch.float32)
    rope = default(32, 10000.0)
    opts = dict(block_size=16, top_k=2, local=1, sink=1, per_head=True, score="minmax", query_rows=4,
                score_distance=None)
    table = select_blocks(q, k, **opts)
    assert not torch.equal(table[:, 0], table[:, 1])  # heads of one kv group select apart
    out = block_sparse_attention(q, k, v, table, block_size=16, inv_freq=rope.inv_freq)
    rq, rk, rv = upcast(q, k, v)
    ref = select_merge(rq, rk, rv, positions=Positions.contiguous(1, 100, 100, DEVICE), rope=rope, **opts)
    close(out, ref, torch.float32)
    for a, e in zip(grads(out, (q, k, v), 3), grads(ref, (rq, rk, rv), 3), strict=True):
        close(a, e, torch.float32)


@pytest.mark.parametrize("global_heads", [None, (4, 8), (0, 16)])  # half, all or none of the 4 heads shifted
@pytest.mark.parametrize("group", [32, 40])
@pytest.mark.parametrize("name", ["s2", "sf"])
def test_token_rules_match_shifted_references(name, group, global_heads, monkeypatch):
    """Groups of 32 fall on block borders (only diagonal blocks masked), groups of 40 cut blocks."""
    from longreach.attention import shifted

    q, k, v = inputs(1, 4, 2, 90, 90, 32, torch.float32)
    rope = default(32, 10000.0)
    pos = Positions.contiguous(1, 90, 90, DEVICE)
    fn, extra = (s2, {}) if name == "s2" else (sf, {"sink": 3})
    extra["global_heads"] = global_heads
    rq, rk, rv = upcast(q, k, v)
    ref = fn(rq, rk, rv, positions=pos, rope=rope, group_size=group, block_size=16, **extra)
    monkeypatch.setattr(shifted.kernels, "use_kernel", lambda *a: True)
    out = fn(q, k, v, positions=pos, rope=rope, group_size=group, block_size=16, **extra)
    close(out, ref, torch.float32)
    for a, e in zip(grads(out, (q, k, v), 4), grads(ref, (rq, rk, rv), 4), strict=True):
        close(a, e, torch.float32)


def test_rejects_unsupported_shapes():
    q, k, v = inputs(1, 2, 2, 16, 16, 48, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be in"):
        block_sparse_attention(q, k, v, torch.zeros(1, 2, 1, 1, dtype=torch.long), block_size=16)


FRAME_CASES = [  # method, options, (b, h, hk, q_len, k_len), position offset
    ("dca", dict(train_length=32), (1, 4, 2, 90, 90), 0),
    ("dca", dict(train_length=40, local_window=4), (2, 2, 1, 37, 101), 5),
    ("self_extend", dict(train_length=32, group_size=4), (1, 4, 2, 90, 90), 0),
    ("self_extend", dict(train_length=24, group_size=3, window=10), (2, 2, 1, 37, 101), 3),
    ("sinks", dict(sink=3, window=20), (1, 4, 2, 90, 90), 0),
    ("sinks", dict(sink=17, window=33), (2, 2, 1, 37, 101), 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_frame_methods_match_references(case, dtype, monkeypatch):
    """DCA, self-extend and re-indexed sinks through the frame kernel against their references."""
    from longreach import kernels
    from longreach.attention import METHODS

    name, opts, (b, h, hk, q_len, k_len), offset = case
    q, k, v = inputs(b, h, hk, q_len, k_len, 32, dtype)
    rope = default(32, 10000.0)
    key = torch.arange(k_len, device=DEVICE).expand(b, k_len) + offset
    pos = Positions(key[:, k_len - q_len:], key)
    fn = METHODS[name].fn
    rq, rk, rv = upcast(q, k, v)
    ref = fn(rq, rk, rv, positions=pos, rope=rope, block_size=16, **opts)
    monkeypatch.setattr(kernels, "use_kernel", lambda *a: True)
    out = fn(q, k, v, positions=pos, rope=rope, block_size=16, **opts)
    close(out, ref, dtype)
    for a, e in zip(grads(out, (q, k, v), 5), grads(ref, (rq, rk, rv), 5), strict=True):
        close(a, e, dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="the benchmark's shape class; too slow for the interpreter")
@pytest.mark.parametrize("name", ["dca", "self_extend", "sinks"])
def test_frame_methods_at_default_blocks(name, monkeypatch):
    """The frame kernels at the methods' default block (64) and head_dim 128 over many chunks: the tile
    shape the benchmark autotunes, with long enough loops for software pipelining. On a fresh machine
    autotuning compiles every config first: several minutes per method."""
    from longreach import kernels
    from longreach.attention import METHODS

    length = 2048
    q, k, v = inputs(1, 2, 2, length, length, 128, torch.bfloat16)
    rope = default(128, 10000.0)
    key = torch.arange(length, device=DEVICE)[None]
    pos = Positions(key, key)
    opts = dict(window=256) if name == "sinks" else dict(train_length=512)
    fn = METHODS[name].fn
    rq, rk, rv = upcast(q, k, v)
    ref = fn(rq, rk, rv, positions=pos, rope=rope, **opts)
    monkeypatch.setattr(kernels, "use_kernel", lambda *a: True)
    out = fn(q, k, v, positions=pos, rope=rope, **opts)
    close(out, ref, torch.bfloat16)
    for a, e in zip(grads(out, (q, k, v), 6), grads(ref, (rq, rk, rv), 6), strict=True):
        close(a, e, torch.bfloat16)


def test_rotary_pass_matches_rope_rotate():
    """The one-pass rotation (with yarn's scaling) equals Rope.rotate per map; its gradient is the sum of
    each map's gradient."""
    from longreach.kernels.rotary import rotate_frames

    x = torch.randn(2, 3, 50, 32, device=DEVICE, dtype=torch.float64).float().requires_grad_()
    rope = yarn(32, 10000.0, 4.0, 64)
    maps = [torch.arange(50, device=DEVICE).expand(2, 50) * s + 7 for s in (1, 3)]
    out = rotate_frames(x, rope, maps)
    ref = torch.stack([rope.rotate(x, p[:, None]) for p in maps])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    torch.testing.assert_close(*[torch.autograd.grad(y, x, g)[0] for y in (out, ref)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1024, 2], ids=["one-normaliser-chunk", "normaliser-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 64, 290), (1, 4, 4, 128, 32, 128), (1, 6, 2, 200, 128, 1)])
def test_vote_kernel_matches_soft_votes(shape, dtype, chunk, monkeypatch):
    """TokenSelect's soft votes in one pass (split softmax over key blocks, device-side length) equal the
    reference's masked softmax summed over heads, including a ragged last block, a single stored key and
    block statistics merged over several chunks."""
    from longreach.cache.select import soft_votes
    from longreach.kernels import votes
    from longreach.kernels.votes import soft_votes as fused_votes

    monkeypatch.setattr(votes, "NORM_CHUNK", chunk)

    b, h, h_kv, slots, d, length = shape
    q = torch.randn(b, h, 3, d, device=DEVICE).to(dtype)
    keys = torch.randn(b, h_kv, slots, d, device=DEVICE) * 2
    # The last stored key answers every head of its group: each head's maximum lies in the last block.
    keys[:, :, length - 1] = 3 * q.float().mean(2).view(b, h_kv, h // h_kv, d).sum(2)
    keys = keys.to(dtype)
    stored = torch.arange(slots, device=DEVICE) < length
    ref = soft_votes(q, keys, d**-0.5, stored)
    out = fused_votes(q, keys, d**-0.5, torch.tensor(length, device=DEVICE))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    if length < slots:
        assert out[:, length:].abs().max() == 0
    torch.testing.assert_close(out.sum(-1), torch.full((b,), float(h), device=DEVICE), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("programs", [1024, 3], ids=["block-per-program", "blocks-per-program"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 64, 150), (1, 4, 4, 50, 32, 7), (1, 6, 2, 200, 128, 130),
                                   (1, 2, 1, 3000, 32, 2200)])
def test_gathered_decode_attention_matches_gather_then_attend(shape, dtype, programs, monkeypatch):
    """Attention over listed cache slots read in place equals gathering them and running the
    reference decode attention: GQA, repeated and non-counting slots, a ragged last block, a block
    with no counting slot, more partials than one merge step takes, and programs running several
    blocks (few programs aimed for, as for a long list)."""
    from longreach.cache.layers import _gather
    from longreach.cache.select import decode_attention
    from longreach.kernels import gathered
    from longreach.kernels.gathered import BLOCK, MERGE, gathered_decode_attention

    monkeypatch.setattr(gathered, "PROGRAMS", programs)

    b, h, h_kv, slots, d, n = shape
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(*s, generator=gen).to(DEVICE, dtype) for s in ((b, h, 1, d), *[(b, h_kv, slots, d)] * 2))
    index = torch.randint(0, slots, (b, n), generator=gen).to(DEVICE)
    if n > MERGE * BLOCK:
        # keys growing along the listed order put the largest logits in the last merge step, which
        # must then rescale what the earlier steps summed
        index = index.sort(-1).values
        k = k * torch.linspace(0.2, 4.0, slots, device=DEVICE)[:, None].to(dtype)
    valid = (torch.rand(b, n, generator=gen) < 0.7).to(DEVICE)
    valid[:, 0] = True
    valid[:, BLOCK : 2 * BLOCK] = False
    k32, v32 = _gather(k.float(), index[:, None]), _gather(v.float(), index[:, None])
    ref = decode_attention(q.float(), k32, v32, valid, d**-0.5)
    out = gathered_decode_attention(q, k, v, index, valid, d**-0.5)
    assert out.dtype == dtype
    close(out, ref, dtype)


def test_gathered_decode_attention_bad_input():
    from longreach.kernels.gathered import gathered_decode_attention

    q, k = torch.randn(1, 4, 1, 32, device=DEVICE), torch.randn(1, 2, 10, 32, device=DEVICE)
    index, valid = torch.zeros(1, 3, dtype=torch.long, device=DEVICE), torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="q must be"):
        gathered_decode_attention(q.expand(1, 4, 2, 32), k, k, index, valid, 1.0)
    with pytest.raises(ValueError, match="index and valid"):
        gathered_decode_attention(q, k, k, index, valid[:, :2], 1.0)


def test_kernel_offsets_do_not_wrap_past_2_31_elements():
    """A 4M-token q of 9 heads of 64: head 8 starts at 8 * 2**28 = 2**31 elements, and row 4M of a
    (b, L, h, d) layout (stride 576) at 2.4e9: the kernels' offsets must not wrap in int32."""
    from offset_kernel import offsets

    heads, rows, head_stride, row_stride, first_row = 9, 4, 2**28, 576, 4_194_300
    out = torch.zeros(heads, rows, dtype=torch.int64, device=DEVICE)
    offsets[(1, heads)](out, heads, head_stride, row_stride, first_row, ROWS=rows)
    expected = [[h * head_stride + (first_row + r) * row_stride for r in range(rows)] for h in range(heads)]
    assert out.tolist() == expected
    assert out.max() > 2**31


@pytest.mark.parametrize("rows", [16, 64, 128])  # float32's and 16-bit's tile heights, and a taller one
@pytest.mark.parametrize("steps", [16, 1])  # 1: the key blocks split over several programs
@pytest.mark.parametrize(("score", "representatives", "k_len", "q_len"), [("max", 4, 300, 300), ("max", 4, 300, 40),
                                                                          ("representatives", 4, 100, 100),
                                                                          ("representatives", 8, 77, 1)])
def test_block_max_kernel_matches_the_reference(score, representatives, k_len, q_len, steps, rows, monkeypatch):
    from longreach.attention.select_merge import block_means, block_scores, key_summary, summary_rows
    from longreach.kernels import block_scores as kernel
    from longreach.kernels.block_scores import block_max_scores

    monkeypatch.setattr(kernel, "STEPS", steps)
    monkeypatch.setattr(kernel, "ROWS_FP32", rows)

    block, gen = 16, torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, k_len, 32, generator=gen)
    q = torch.randn(1, 4, q_len, 32, generator=gen)
    first = k_len - q_len
    q_bar = block_means(q, block, first).view(1, 2, 2, -1, 32)  # (b, h_kv, group, nq, d)
    n_blocks, part = -(-k_len // block), summary_rows(score, block, representatives)
    summary = key_summary(k, block, score, representatives)
    expected = block_scores(q_bar, summary, score, n_blocks, part)
    seen = torch.arange(n_blocks) <= torch.arange(first // block, n_blocks)[:, None]
    expected = expected.masked_fill(~seen, float("-inf"))
    out = block_max_scores(q_bar.flatten(1, 2).to(DEVICE), summary[0][:, :, 0].to(DEVICE), n_blocks, part,
                           32**-0.5, first // block)
    torch.testing.assert_close(out.view_as(expected).cpu(), expected, rtol=1e-5, atol=1e-5)
    if score == "max":  # each key's log |v| added, as value_norm does
        v = torch.randn(1, 2, k_len, 32, generator=gen)
        summary = key_summary(k, block, score, representatives, v)
        expected = block_scores(q_bar, summary, score, n_blocks, part).masked_fill(~seen, float("-inf"))
        out = block_max_scores(q_bar.flatten(1, 2).to(DEVICE), k.to(DEVICE), n_blocks, part, 32**-0.5, first // block,
                               summary[1][:, :, 0, 0].to(DEVICE))
        torch.testing.assert_close(out.view_as(expected).cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score", ["max", "representatives"])
@pytest.mark.parametrize("common", [{}, {"shared": 1}, {"carry": 1}, {"carry": 2}, {"prefilter": 3},
                                    {"carry": 1, "prefilter": 3}, {"shared": 1, "prefilter": 4}])
def test_select_blocks_through_the_block_max_kernel_selects_as_the_reference(score, common, monkeypatch):
    from longreach import kernels

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 90, 32, generator=gen), torch.randn(1, 2, 150, 32, generator=gen)
    opts = dict(block_size=16, top_k=2, local=1, sink=1, score=score, query_rows=4, per_head=True, **common)
    v = torch.randn(1, 2, 150, 32, generator=gen) if score == "max" else None  # value_norm's log |v| too
    expected = [select_blocks(q, k, **opts), select_blocks(q, k, v=v, **opts)]
    monkeypatch.setattr(kernels, "enabled", lambda x: True)
    on_device = [select_blocks(q.to(DEVICE), k.to(DEVICE), v=values, **opts).cpu()
                 for values in (None, None if v is None else v.to(DEVICE))]
    assert all(torch.equal(a, e) for a, e in zip(on_device, expected, strict=True))


@pytest.mark.parametrize("common", [{}, {"carry": 1}, {"prefilter": 5}])
def test_select_blocks_kernel_path_in_chunks_selects_as_the_reference(common, monkeypatch):
    from longreach import kernels
    from longreach.kernels import block_scores

    module = importlib.import_module("longreach.attention.select_merge")  # the package's name is the function
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 600, 32, generator=gen), torch.randn(1, 2, 600, 32, generator=gen)
    opts = dict(block_size=16, top_k=3, local=1, sink=1, score="max", query_rows=4, per_head=True, **common)
    expected = select_blocks(q, k, **opts)
    monkeypatch.setattr(kernels, "enabled", lambda x: True)
    monkeypatch.setattr(block_scores, "SCORES_PER_CHUNK", 1)  # one row tile (16 of the 38 query blocks) a chunk
    monkeypatch.setattr(module, "tile_budget", lambda device: 1)  # carry's chunks: the same
    assert block_scores.chunk_rows(torch.float32, 4, 38, 1) == 16
    assert block_scores.chunk_rows(torch.bfloat16, 4, 38, 4 * 38 * 64 * 3 + 5) == 192
    assert torch.equal(select_blocks(q.to(DEVICE), k.to(DEVICE), **opts).cpu(), expected)


@pytest.mark.parametrize(("rows", "n", "take", "first", "sink", "local"), [
    (7, 40, 4, 33, 1, 2),     # every row has candidates
    (9, 20, 8, 0, 1, 2),      # early rows have fewer candidates than take: the rest are n
    (3, 1100, 8, 1097, 2, 0),  # rows of five tiles of 256
    (40, 1100, 8, 500, 1, 2),  # tiles past a program's last candidate skipped, the one holding it read
    (5, 300, 6, 290, 1, 2),    # rows walked in tiles of 64: ties across tiles go to the lower block
])
@pytest.mark.parametrize("insert", [0, 1])  # each tile merged, or inserted
def test_top_blocks_kernel_picks_as_the_reference(rows, n, take, first, sink, local, insert, monkeypatch):
    from longreach.attention.select_merge import top_indices
    from longreach.kernels import block_topk
    from longreach.kernels.block_topk import top_blocks

    monkeypatch.setattr(block_topk, "INSERT", insert)
    if n == 300:
        monkeypatch.setattr(block_topk, "ELEMENTS", 64)

    gen = torch.Generator().manual_seed(rows)
    scores = torch.randint(0, 6, (2, 3, rows, n), generator=gen).float()  # many ties
    scores[0, 0, 0, :n // 2] = float("-inf")  # causally unseen blocks score -inf
    query_block = torch.arange(first, first + rows)[:, None]
    blocks = torch.arange(n)
    candidate = (blocks >= sink) & (blocks < query_block - local)
    masked = scores.masked_fill(~candidate, float("-inf"))
    best = top_indices(masked, take)
    expected = torch.where(torch.isfinite(masked.gather(-1, best)), best, n)
    out = top_blocks(scores.to(DEVICE), take, first, sink, local).cpu()
    assert torch.equal(out, expected)  # the same blocks in the same order: best first, ties to the lower block


@pytest.mark.parametrize(("part", "n_keys", "m", "take", "bias"), [
    (4, 160, 5, 3, False),   # 40 blocks of 4 rows; five candidates, a non-power-of-two list
    (16, 150, 8, 8, False),  # the last block holds 6 of its 16 rows; every candidate kept
    (16, 150, 6, 2, True),   # each row's log |v| added (value_norm)
    (1, 40, 3, 1, False),    # one row a block (the part means themselves)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ranked_blocks_kernel_picks_as_the_reference(part, n_keys, m, take, bias, dtype):
    """Integer-valued operands make every score exact whatever the summation order and dtype, and ties common."""
    from longreach.attention.select_merge import _finite_top
    from longreach.kernels.block_rank import ranked_blocks

    gen = torch.Generator().manual_seed(part + m)
    n_blocks = -(-n_keys // part)
    q_bar = torch.randint(-2, 3, (2, 4, 7, 32), generator=gen).float()
    keys = torch.randint(-2, 3, (2, 2, n_keys, 32), generator=gen).float()
    row_bias = torch.randint(-3, 3, (2, 2, n_keys), generator=gen).float() if bias else None
    candidates = torch.rand(2, 4, 7, n_blocks, generator=gen).argsort(-1)[..., :m]
    candidates[0, 1, 2, 1:] = n_blocks  # a summary with one candidate, fewer than take where take > 1
    candidates[1, 3, 0] = n_blocks  # one without any
    logits = q_bar @ keys.repeat_interleave(2, 1).transpose(-1, -2) * 0.5  # query head j reads kv head j // 2
    if row_bias is not None:
        logits = logits + row_bias.repeat_interleave(2, 1)[:, :, None]
    padded = torch.cat([logits, logits.new_full((2, 4, 7, n_blocks * part - n_keys), float("-inf"))], -1)
    full = padded.view(2, 4, 7, n_blocks, part).amax(-1)
    listed = torch.zeros(2, 4, 7, n_blocks + 1, dtype=torch.bool).scatter(-1, candidates, True)[..., :n_blocks]
    expected = _finite_top(full.masked_fill(~listed, float("-inf")), take)
    out = ranked_blocks(q_bar.to(DEVICE), keys.to(DEVICE, dtype), candidates.to(DEVICE), n_blocks, part, 0.5, take,
                        None if row_bias is None else row_bias.to(DEVICE)).cpu()
    assert torch.equal(out, expected)  # the same blocks in the same order: best first, ties to the lower block


def test_ranked_blocks_kernel_bad_input():
    from longreach.kernels.block_rank import ranked_blocks

    q, k = torch.zeros(1, 2, 3, 32, device=DEVICE), torch.zeros(1, 1, 64, 32, device=DEVICE)
    cands = torch.zeros(1, 2, 3, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="part a power of two"):
        ranked_blocks(q, k, cands, 4, 12, 1.0, 2)
    with pytest.raises(ValueError, match="take in 1..min"):
        ranked_blocks(q, k, cands, 4, 16, 1.0, 5)
    with pytest.raises(ValueError, match="candidates must be"):
        ranked_blocks(q, k, cands[:, :1], 4, 16, 1.0, 2)


def test_selection_kernels_compile_for_hopper():
    """The interpreter never lowers a kernel; tests/hopper_compile.py has Triton and ptxas build the selection
    kernels for sm_90, without a GPU, so a kernel that only the compiler rejects fails here, not on the device."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_compile.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_top_blocks_kernel_bad_input():
    from longreach.kernels.block_topk import top_blocks

    with pytest.raises(ValueError, match="float32 scores"):
        top_blocks(torch.zeros(1, 4, 8, dtype=torch.float16, device=DEVICE), 2, 0, 1, 1)
    with pytest.raises(ValueError, match="take in"):
        top_blocks(torch.zeros(1, 4, 8, device=DEVICE), 9, 0, 1, 1)


def _masked_reference(q, k, v, allowed):
    """Softmax attention of q (b, h, Lq, d) over k, v (b, h_kv, Lk, d) where ``allowed`` (b, h, Lq, Lk);
    a query that sees no key outputs zeros."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    return torch.where(allowed.any(-1, keepdim=True), scores.softmax(-1), 0.0) @ v


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize(("q_len", "k_len", "tabled"), [(64, 64, False), (70, 150, False), (150, 53, False),
                                                        (77, 77, True), (40, 130, True), (100, 37, True)])
def test_non_causal_and_cross_attention_match_the_reference(q_len, k_len, tabled, dtype):
    block, gen = 16, torch.Generator().manual_seed(q_len + k_len)
    q, k, v = inputs(2, 4, 2, q_len, k_len, 32, dtype)
    n_q, n_k = -(-q_len // block), -(-k_len // block)
    allowed = torch.ones(2, 4, q_len, k_len, dtype=torch.bool)
    table = None
    if tabled:  # any key blocks, holes, and query blocks that list nothing
        table = torch.randint(-1, n_k, (2, 4, n_q, 3), generator=gen)
        table[:, :, ::3] = -1
        ordered = table.sort(-1).values
        table = torch.where(torch.cat([ordered[..., :1] < -1, ordered[..., 1:] == ordered[..., :-1]], -1), -1, ordered)
        listed = torch.zeros(2, 4, n_q, n_k + 1, dtype=torch.bool).scatter_(-1, table.clamp_min(-1) % (n_k + 1), True)
        allowed = listed[..., :n_k].repeat_interleave(block, 2)[:, :, :q_len].repeat_interleave(block, 3)[..., :k_len]
        table = table.to(DEVICE)
    out = block_sparse_attention(q, k, v, table, block_size=block, causal=False)
    exact = upcast(q, k, v)
    reference = _masked_reference(*exact, allowed.to(DEVICE))
    close(out, reference, dtype)
    for got, want in zip(grads(out, (q, k, v), 1), grads(reference, exact, 1), strict=True):
        close(got, want, dtype)
    if tabled:  # the kernel's PyTorch reference in the library
        close(listed_attention(q, k, v, table, block_size=block, scale=q.shape[-1] ** -0.5), reference, dtype)


@pytest.mark.parametrize(("q_len", "k_len"), [(96, 96), (96, 160), (150, 53)])
def test_noncausal_select_merge_runs_the_kernel_as_its_reference(q_len, k_len, monkeypatch):
    from longreach import kernels

    q, k, v = inputs(1, 4, 2, q_len, k_len, 32, torch.float32)
    opts = dict(block_size=16, top_k=3, local=1, sink=1)
    monkeypatch.setattr(kernels, "enabled", lambda x: False)
    reference = noncausal_select_merge(q, k, v, **opts)
    monkeypatch.setattr(kernels, "enabled", lambda x: True)
    close(noncausal_select_merge(q, k, v, **opts), reference, torch.float32)


def test_transpose_lists_each_key_blocks_queries_in_order():
    from longreach.kernels.block_sparse import compact, transpose

    torch.manual_seed(0)
    n_k = 7
    table = torch.randint(-1, n_k, (2, 3, 5, 4))
    table = torch.where(torch.rand(table.shape) < 0.3, -1, table)
    table, count = compact(table)
    offsets, query_block, slot = transpose(table, count, n_k)
    assert offsets[0] == 0 and offsets[-1] == int(count.sum())
    for b in range(2):
        for h in range(3):
            for j in range(n_k):
                cell = (b * 3 + h) * n_k + j
                listed = list(zip(query_block[offsets[cell]:offsets[cell + 1]].tolist(),
                                  slot[offsets[cell]:offsets[cell + 1]].tolist(), strict=True))
                expected = [(m, s) for m in range(5) for s in range(int(count[b, h, m]))
                            if int(table[b, h, m, s]) == j]
                assert listed == expected


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA matter")
@pytest.mark.parametrize("options", [{}, {"prefilter": 4}])  # prefilter: the two-stage selection's kernels
def test_a_select_merge_training_step_never_waits_on_the_host(options):
    from longreach import extend
    from longreach.models import tiny_model

    model = tiny_model("llama", hidden_size=256, vocab_size=512).cuda().train()
    extend(model, attention="select_merge", block_size=32, top_k=2, **options)
    rows = torch.randint(0, 512, (2, 513), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(input_ids=rows[:, :-1]).logits.float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA matter")
def test_sparse_backward_never_waits_on_the_host():
    q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    table = select_blocks(q.detach(), k.detach(), block_size=64, top_k=2, local=1, sink=1)
    out = block_sparse_attention(q, k, v, table, block_size=64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert q.grad is not None and k.grad is not None
