import json

import pytest
import torch
from click.testing import CliRunner

import longreach
from longreach.attention import Positions, dense
from longreach.cache import make_cache, select
from longreach.cache.layers import H2OLayer, SinksLayer, TokenSelectLayer
from longreach.cache.static import StaticPolicyLayer, make_static_cache
from longreach.cli import main
from longreach.decode import GraphDecoder, prefill
from longreach.evals import passkey
from longreach.hf import cache_kwargs, output_cache
from longreach.models import tiny_model
from longreach.positions import default
from longreach.reference_model import load_reference_model

# The kernel-path tests put their tensors where the kernels run: the GPU if there is one, else the
# CPU through Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POLICIES = [("sinks", {}), ("h2o", {}), ("token_select", {"n_init": 2, "n_local": 4})]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("policy,options", POLICIES)
def test_budget_covering_the_context_generates_like_the_full_cache(arch, policy, options):
    model = tiny_model(arch)
    ids = torch.randint(1, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=20, do_sample=False)
        longreach.extend(model, cache=policy, budget=50, **options)
        out = model.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, full)
    assert type(output_cache(out)).__name__ == "PolicyCache"


@pytest.mark.parametrize("policy,options", POLICIES)
def test_small_budget_bounds_what_is_kept(policy, options):
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 40))
    longreach.extend(model, cache=policy, budget=16, **options)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    kept = {layer.keys.shape[2] for layer in output_cache(out).layers}
    assert kept == ({49} if policy == "token_select" else {16})


def _step(layer, q, k, v, rope=None):
    """One attention step of a policy layer: append k/v, attend with positions along the cache."""
    layer.update(k, v)
    length, q_len = layer.keys.shape[2], q.shape[2]
    positions = torch.arange(length, device=k.device)[None]
    where = Positions(positions[:, length - q_len :], positions, None)

    def full(q_, k_, v_, positions):
        return dense(q_, k_, v_, positions=positions, rope=rope, scale=q.shape[-1] ** -0.5)

    return layer.attend(q, where, rope, q.shape[-1] ** -0.5, full)


def test_h2o_keeps_budget_and_evicts_lowest_accumulated_score():
    budget, recent, h, h_kv, d = 6, 2, 4, 2, 8
    layer = H2OLayer(budget, recent)
    kept = [[] for _ in range(h_kv)]  # brute force: per kv head, [token id, key, value, score]
    token = 0
    for q_len in (5, 1, 1, 1, 1, 1, 1):
        q, k, v = torch.randn(1, h, q_len, d), torch.randn(1, h_kv, q_len, d), torch.randn(1, h_kv, q_len, d)
        v[..., 0] = torch.arange(token, token + q_len, dtype=torch.float32)  # the value names its token
        out = _step(layer, q, k, v)
        for head in range(h_kv):
            kept[head] += [[token + i, k[0, head, i], v[0, head, i], 0.0] for i in range(q_len)]
            keys = torch.stack([e[1] for e in kept[head]])
            values = torch.stack([e[2] for e in kept[head]])
            for g in range(h // h_kv):
                for row in range(q_len):
                    visible = len(kept[head]) - q_len + row + 1
                    probs = torch.softmax(keys[:visible] @ q[0, head * 2 + g, row] / d**0.5, 0)
                    torch.testing.assert_close(out[0, head * 2 + g, row], probs @ values[:visible])
                    for j in range(visible):
                        kept[head][j][3] += probs[j].item()
            while len(kept[head]) > budget:
                old = kept[head][: len(kept[head]) - recent]
                kept[head].remove(min(old, key=lambda e: e[3]))
        token += q_len
        assert layer.keys.shape[2] == min(token, budget)
        for head in range(h_kv):
            assert layer.values[0, head, :, 0].tolist() == [float(e[0]) for e in kept[head]]
            torch.testing.assert_close(layer.scores[0, head], torch.tensor([e[3] for e in kept[head]]))


def test_sinks_keeps_first_and_last_tokens():
    layer = SinksLayer(budget=6, sink=2)
    for step in range(10):
        k = torch.randn(1, 2, 1, 4)
        v = torch.full((1, 2, 1, 4), float(step))
        _step(layer, torch.randn(1, 2, 1, 4), k, v)
    assert layer.values[0, 0, :, 0].tolist() == [0, 1, 6, 7, 8, 9]


def _brute_votes(q, keys, scale):
    h, h_kv = q.shape[1], keys.shape[1]
    votes = torch.zeros(q.shape[0], keys.shape[2])
    for head in range(h):
        fingerprint = q[:, head].mean(1)
        logits = torch.einsum("bd,bld->bl", fingerprint, keys[:, head // (h // h_kv)]) * scale
        votes += logits.softmax(-1)
    return votes


def test_token_select_picks_brute_force_top_k_of_soft_votes():
    n_init, n_local, top_k = 3, 5, 7
    layer = TokenSelectLayer(top_k, n_init, n_local, threshold=2.0)
    k, v = torch.randn(2, 2, 60, 16), torch.randn(2, 2, 60, 16)
    layer.update(k[:, :, :59], v[:, :, :59])
    q = torch.randn(2, 4, 1, 16)
    out = _step(layer, q, k[:, :, 59:], v[:, :, 59:])
    votes = _brute_votes(q, k, 16**-0.5)
    for row in range(2):
        picked = sorted(votes[row, n_init : 60 - n_local].topk(top_k).indices.add(n_init).tolist())
        assert layer.picked[row].tolist() == picked
        index = torch.tensor(list(range(n_init)) + picked + list(range(60 - n_local, 60)))
        attended = torch.softmax(torch.einsum("hd,hld->hl", q[row, :, 0], k[row, :, index].repeat_interleave(2, 0))
                                 / 4, -1)
        expected = torch.einsum("hl,hld->hd", attended, v[row, :, index].repeat_interleave(2, 0))
        torch.testing.assert_close(out[row, :, 0], expected)


def test_token_select_kernels_score_like_the_reference(monkeypatch):
    """The eager layer's kernel path (one rotary pass over the keys, the fused votes) picks the
    reference's tokens and gives its output, with rotary positions."""
    from longreach.cache import layers

    rope = default(32, 10000.0)
    k, v, q = (torch.randn(*shape).to(DEVICE) for shape in ((2, 2, 90, 32), (2, 2, 90, 32), (2, 4, 1, 32)))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(layers, "decode_kernels", lambda keys, fused=fused: fused)
        layer = TokenSelectLayer(top_k=9, n_init=2, n_local=6, threshold=2.0)
        layer.update(k[:, :, :89], v[:, :, :89])
        results.append((_step(layer, q, k[:, :, 89:], v[:, :, 89:], rope), layer.picked))
    (ref, ref_picked), (out, picked) = results
    assert torch.equal(picked, ref_picked)
    torch.testing.assert_close(out, ref)


def _reuse_scene(d):
    """A cache of 42 tokens; query q (b, 4, 1, d) and ``close`` to it (cosine 0.96). Slot 38 (in the
    last n_local=2 when q votes at length 40) answers q; slot 10 answers only what ``close`` adds."""
    k, v, q = torch.randn(1, 2, 42, d), torch.randn(1, 2, 42, d), torch.randn(1, 4, 1, d)
    group = q[0, :, 0].view(2, 2, d)
    basis = torch.linalg.qr(group.transpose(1, 2)).Q  # per kv head, its two queries' span
    turn = torch.randn(2, d, 1)
    turn = (turn - basis @ (basis.transpose(1, 2) @ turn))[..., 0]  # orthogonal to both queries
    turn *= 0.3 * group.norm(dim=-1).amin(-1, keepdim=True) / turn.norm(dim=-1, keepdim=True)
    k[0, :, 38], k[0, :, 10] = 4 * q[0, ::2, 0], 40 * turn
    return k, v, q, q + turn.repeat_interleave(2, 0)[None, :, None]


def _top(votes, n_init, n_local, top_k, length):
    return sorted(votes[0, n_init : length - n_local].topk(top_k).indices.add(n_init).tolist())


def _check_scene(k, q, close, d):
    """The top-k that q picks at length 40, which a reusing step at 41 keeps: not slot 38 (still local
    at the vote), and not slot 10, which a fresh vote of ``close`` would pick."""
    assert select.similar(close.mean(2), q.mean(2), 0.95).item()
    picked = _top(_brute_votes(q, k[:, :, :40], d**-0.5), 1, 2, 4, 40)
    assert 38 not in picked and 10 not in picked
    assert 10 in _top(_brute_votes(close, k[:, :, :41], d**-0.5), 1, 2, 4, 41)
    return picked


def test_token_select_reuses_selection_only_while_fingerprints_agree():
    """A query close to the one that chose the top-k reuses it without scoring; a far one votes afresh."""
    n_init, n_local, top_k, d = 1, 2, 4, 8
    k, v, q, close = _reuse_scene(d)
    first = _check_scene(k, q, close, d)
    layer = TokenSelectLayer(top_k, n_init, n_local, threshold=0.9)
    layer.update(k[:, :, :39], v[:, :, :39])
    _step(layer, q, k[:, :, 39:40], v[:, :, 39:40])
    assert layer.picked[0].tolist() == first and layer.reuses == 0
    _step(layer, close, k[:, :, 40:41], v[:, :, 40:41])
    assert layer.reuses == 1 and layer.picked[0].tolist() == first
    _step(layer, -q, k[:, :, 41:], v[:, :, 41:])
    assert layer.reuses == 1 and layer.selections == 3
    assert layer.picked[0].tolist() == _top(_brute_votes(-q, k, d**-0.5), n_init, n_local, top_k, 42)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton"])
def test_static_token_select_reuses_selection_only_while_fingerprints_agree(fused, monkeypatch):
    """The static layer decides the selection cache on the device, with the eager layer's rule."""
    from longreach.cache import layers, static

    for module in (layers, static):
        monkeypatch.setattr(module, "decode_kernels", lambda keys: fused)
    monkeypatch.setattr(layers, "enabled", lambda x: fused)
    n_init, n_local, top_k, d = 1, 2, 4, 32
    k, v, q, close = _reuse_scene(d)
    first = _check_scene(k, q, close, d)
    layer = StaticPolicyLayer(48, "token_select", top_k=top_k, n_init=n_init, n_local=n_local, threshold=0.9)
    layer.update(k[:, :, :39].to(DEVICE), v[:, :, :39].to(DEVICE))
    last = _top(_brute_votes(-q, k, d**-0.5), n_init, n_local, top_k, 42)
    for query, length, picked, reuses in [(q, 40, first, 0), (close, 41, first, 1), (-q, 42, last, 1)]:
        layer.update(k[:, :, length - 1 : length].to(DEVICE), v[:, :, length - 1 : length].to(DEVICE))
        where = Positions(torch.tensor([[length - 1]]), None, None)
        out = layer.attend(query.to(DEVICE), where, None, d**-0.5, None).cpu()
        index = torch.tensor(list(range(n_init)) + picked + list(range(length - n_local, length)))
        torch.testing.assert_close(out[0, :, 0], _attention_over(query, k, v, index))
        assert (layer.selections, layer.reuses) == (length - 39, reuses)


@pytest.mark.parametrize("length,n_init,top_k,n_local", [(4500, 3, 700, 64), (4500, 2, 4470, 40), (60, 0, 1, 1)])
def test_topk_kernel_matches_attended_slots(length, n_init, top_k, n_local):
    """The radix-select kernel lists the reference's slots: init, the top-k candidates (any order; with
    fewer candidates than k, the rest not counting), local; a skipped row keeps its top-k part."""
    from longreach.kernels.topk import attended_slots

    votes = torch.rand(3, 5000).square()
    votes[0] = votes[0].mul(40).floor()  # many ties, at the threshold too
    index = torch.full((3, n_init + top_k + n_local), -1)
    valid = torch.zeros_like(index, dtype=torch.bool)
    skip = torch.tensor([0, 1, 0], dtype=torch.int8)
    on = [x.to(DEVICE) for x in (votes, torch.tensor(length), index, valid, skip)]
    attended_slots(on[0], on[1], n_init, top_k, n_local, on[2], on[3], on[4])
    got_index, got_valid = on[2].cpu(), on[3].cpu()
    ref_index, ref_valid = select.attended_slots(votes, torch.tensor(length), n_init, top_k, n_local)
    middle = slice(n_init, n_init + top_k)
    for row in (0, 2):
        ends = [*range(n_init), *range(n_init + top_k, index.shape[1])]
        assert torch.equal(got_index[row, ends], ref_index[row, ends])
        assert torch.equal(got_valid[row, ends], ref_valid[row, ends])
        counted, ref_counted = (i[row, middle][ok[row, middle]] for i, ok in ((got_index, got_valid),
                                                                               (ref_index, ref_valid)))
        assert torch.equal(votes[row, counted].sort().values, votes[row, ref_counted].sort().values)
        assert len(set(got_index[row, middle].tolist())) == top_k
    assert (got_index[1, middle] == -1).all() and not got_valid[1, middle].any()


def test_recall_kernel_matches_similar():
    """The selection-cache kernel: flags as select.similar (zero stored rows never reuse), fresh rows
    store their fingerprint, and the counts gather (rows, reusing rows)."""
    from longreach.kernels.votes import recall

    stored = torch.randn(5, 1500)
    fingerprint = torch.cat([stored[:2] + 0.01 * torch.randn(2, 1500), torch.randn(3, 1500)]).bfloat16()
    stored[4] = 0
    expected = select.similar(fingerprint, stored, 0.9)
    assert expected.tolist() == [True, True, False, False, False]
    buffer, counts = stored.clone().to(DEVICE), torch.tensor([3, 1]).to(DEVICE)
    reuse = recall(fingerprint.to(DEVICE), buffer, 0.9, counts).cpu()
    assert reuse.bool().tolist() == expected.tolist()
    torch.testing.assert_close(buffer.cpu(), torch.where(expected[:, None], stored, fingerprint.float()))
    assert counts.tolist() == [8, 3]


@pytest.mark.parametrize("kwargs,match", [
    ({"cache": "lru", "budget": 8}, "unknown cache policy"),
    ({"cache": "h2o"}, "needs budget"),
    ({"cache": "h2o", "budget": 1}, "budget must be an integer >= 2"),
    ({"cache": "h2o", "budget": 8, "recent": 9}, r"recent must be an integer in \[0, 8\]"),
    ({"cache": "sinks", "budget": 8, "sink": 8}, r"sink must be an integer in \[0, 7\]"),
    ({"cache": "token_select", "budget": 8, "threshold": 3}, "threshold must be"),
    ({"cache": "token_select", "budget": 8, "n_local": 0}, "n_local must be"),
])
def test_bad_cache_options_fail_at_extend(kwargs, match):
    with pytest.raises(ValueError, match=match):
        longreach.extend(tiny_model("llama"), **kwargs)


def test_policy_cache_needs_an_extended_model_and_equal_lengths():
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 12))
    with pytest.raises(ValueError, match="needs a model configured with longreach.extend"):
        model(ids, **cache_kwargs(make_cache("sinks", model.config.num_hidden_layers, budget=8)))
    longreach.extend(model, cache="sinks", budget=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_token_select_keeps_reference_model_passkey():
    model, tokenizer = load_reference_model()
    full = passkey(model, tokenizer, [512], [0.2, 0.5, 0.8], trials=6, batch_size=6)
    longreach.extend(model, cache="token_select", budget=192, n_init=16, n_local=48)
    selected = passkey(model, tokenizer, [512], [0.2, 0.5, 0.8], trials=6, batch_size=6)
    right = sum(r["correct"] for r in full)
    assert right >= 15
    assert sum(r["correct"] for r in selected) >= 0.9 * right


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("policy,options", [("full", {}), ("token_select", {"top_k": 40, "n_init": 4, "n_local": 8})])
def test_static_cache_decodes_like_the_full_cache(arch, policy, options):
    model = tiny_model(arch)
    ids = torch.randint(1, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=12, do_sample=False)
    longreach.extend(model, attention="dense")
    cache = make_static_cache(policy, model.config.num_hidden_layers, 64, **options)
    decoder = GraphDecoder(model, cache, prefill(model, ids, cache), ids.shape[1])
    tokens = [decoder.token.clone()] + [decoder.step().clone() for _ in range(11)]
    assert torch.equal(torch.cat([ids, *tokens], dim=1), full)


def test_static_cache_full_raises_instead_of_writing_past_its_slots():
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 30))
    longreach.extend(model, attention="dense")
    cache = make_static_cache("full", model.config.num_hidden_layers, 32)
    decoder = GraphDecoder(model, cache, prefill(model, ids, cache), ids.shape[1])
    decoder.step(), decoder.step()
    with pytest.raises(ValueError, match="32 slots are full"):
        decoder.step()


def _attention_over(q, k, v, index):
    """Batch row 0's decode attention (h, d) of q (1, h, 1, d) over the cache slots ``index``, kv heads
    shared by pairs of query heads."""
    keys, values = (x[0, :, index].repeat_interleave(2, 0) for x in (k, v))
    probs = torch.softmax(torch.einsum("hd,hld->hl", q[0, :, 0], keys) * q.shape[-1] ** -0.5, -1)
    return torch.einsum("hl,hld->hd", probs, values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy,options", [
    ("full", {}),
    ("token_select", {"top_k": 16, "n_init": 4, "n_local": 8}),
    ("token_select", {"top_k": 16, "n_init": 4, "n_local": 8, "threshold": -1.0}),
], ids=["full", "token_select", "token_select-reusing"])
def test_graph_replay_decodes_like_eager_steps(policy, options):
    """The captured step (decode kernels, device-side length, the selection cache's device-side
    verdict) replays what eager steps decode; with threshold -1 every step after the first reuses."""
    model = tiny_model("llama", hidden_size=128).cuda()
    ids = torch.randint(1, model.config.vocab_size, (2, 100), device="cuda")
    longreach.extend(model, attention="dense")
    runs = []
    for graph in (False, True):
        cache = make_static_cache(policy, model.config.num_hidden_layers, 160, **options)
        decoder = GraphDecoder(model, cache, prefill(model, ids, cache), ids.shape[1])
        if graph:
            decoder.capture(warmup=2)  # the two warm-up steps run eagerly; the first two step() calls return them
        steps = [decoder.step().clone() for _ in range(12)]
        runs.append((torch.cat(steps, dim=1), cache.layers[0]))
    (eager, eager_layer), (replayed, layer) = runs
    assert torch.equal(replayed, eager)
    if policy == "token_select":
        assert layer.selections == eager_layer.selections == 2 * 12 and layer.reuses == eager_layer.reuses
        if options.get("threshold") == -1.0:
            assert layer.reuses == 2 * 11


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton"])
def test_static_token_select_attends_to_its_selection(fused, monkeypatch):
    from longreach.cache import layers, static

    for module in (layers, static):
        monkeypatch.setattr(module, "decode_kernels", lambda keys: fused)
    n_init, n_local, top_k, d = 2, 3, 5, 32
    layer = StaticPolicyLayer(32, "token_select", top_k=top_k, n_init=n_init, n_local=n_local)
    k, v = torch.randn(1, 2, 20, d), torch.randn(1, 2, 20, d)
    layer.update(k.to(DEVICE), v.to(DEVICE))
    q = torch.randn(1, 4, 1, d)
    out = layer.attend(q.to(DEVICE), Positions(torch.tensor([[19]]), None, None), None, d**-0.5, None).cpu()
    votes = _brute_votes(q, k, d**-0.5)
    picked = sorted(votes[0, n_init : 20 - n_local].topk(top_k).indices.add(n_init).tolist())
    index = torch.tensor(list(range(n_init)) + picked + list(range(20 - n_local, 20)))
    torch.testing.assert_close(out[0, :, 0], _attention_over(q, k, v, index))


@pytest.mark.parametrize("policy,options", [("full", {}), ("token_select", {"top_k": 9, "n_init": 2, "n_local": 6})])
def test_static_kernel_path_rotates_like_the_reference(policy, options, monkeypatch):
    """With rotary, the kernel path (one launch turning the query and the step's key from shared
    tables, the fused votes, the radix top-k, the gathered attention) gives the reference's output and
    leaves the same rotated keys, step after step."""
    from longreach.cache import layers, static

    rope, d = default(32, 10000.0), 32
    k, v, q = torch.randn(2, 2, 70, d), torch.randn(2, 2, 70, d), torch.randn(3, 2, 4, 1, d)
    runs = []
    for fused in (False, True):
        for module in (layers, static):
            monkeypatch.setattr(module, "decode_kernels", lambda keys, fused=fused: fused)
        monkeypatch.setattr(layers, "enabled", lambda x, fused=fused: fused)
        cache = make_static_cache(policy, 2, 80, **options)
        layer = cache.layers[1]
        layer.fill(k[:, :, :67].to(DEVICE), v[:, :, :67].to(DEVICE), rope)
        outs = []
        for step in range(3):
            layer.update(k[:, :, 67 + step : 68 + step].to(DEVICE), v[:, :, 67 + step : 68 + step].to(DEVICE))
            where = Positions(torch.full((2, 1), 67 + step, device=DEVICE), None, None)
            outs.append(layer.attend(q[step].to(DEVICE), where, rope, d**-0.5, None).cpu())
        runs.append((torch.stack(outs), layer.keys[:, :, :70].cpu()))
    (ref, ref_keys), (out, keys) = runs
    torch.testing.assert_close(keys, ref_keys)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton"])
def test_static_full_attends_to_every_stored_token(fused, monkeypatch):
    from longreach.cache import static

    monkeypatch.setattr(static, "decode_kernels", lambda keys: fused)
    d = 32
    layer = StaticPolicyLayer(200, "full")
    k, v = torch.randn(2, 2, 150, d), torch.randn(2, 2, 150, d)
    layer.update(k.to(DEVICE), v.to(DEVICE))
    q = torch.randn(2, 4, 1, d)
    out = layer.attend(q.to(DEVICE), Positions(torch.tensor([[149], [149]]), None, None), None, d**-0.5, None).cpu()
    probs = torch.softmax(torch.einsum("bhd,bhld->bhl", q[:, :, 0], k.repeat_interleave(2, 1)) * d**-0.5, -1)
    torch.testing.assert_close(out[:, :, 0], torch.einsum("bhl,bhld->bhd", probs, v.repeat_interleave(2, 1)))


def test_static_cache_bad_input():
    with pytest.raises(ValueError, match="static cache policy"):
        make_static_cache("h2o", 2, 16)
    with pytest.raises(ValueError, match="must not exceed max_cache_len"):
        make_static_cache("token_select", 2, 16, top_k=10, n_init=4, n_local=4)


def test_cli_passkey_with_a_cache_policy(tmp_path):
    result = CliRunner().invoke(main, ["passkey", "--cache", "sinks", "--option", "budget=64", "--lengths", "512",
                                       "--depths", "0.5", "--trials", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "passkey.json").read_text())["cache"] == "sinks"
    bad = CliRunner().invoke(main, ["passkey", "--cache", "lru", "--option", "budget=64", "--lengths", "512",
                                    "--trials", "1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown cache policy" in bad.output
