import pytest
import torch
from transformers import AttentionInterface

import longreach
from longreach.models import tiny_model

ARCHS = ["llama", "mistral", "qwen2"]


def _batch(vocab: int):
    ids = torch.randint(1, vocab, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_extension_leaves_model_unchanged(arch):
    model = tiny_model(arch)
    ids, mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids).logits
        padded = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        longreach.extend(model, attention="dense")
        assert model.config._attn_implementation == "longreach_dense"
        torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=0)
        real = mask.bool()
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], padded[real], atol=1e-5, rtol=0)
        again = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert again.shape[1] == 60
    assert torch.equal(again, generated)


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_reaches_attention_unapplied(arch):
    model = tiny_model(arch)
    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            seen["q"], seen["pos"] = query, kwargs["position_ids"]
        return AttentionInterface._global_mapping["longreach_dense"](module, query, key, value, attention_mask,
                                                                     **kwargs)

    longreach.extend(model, attention="dense")
    layer = model.model.layers[0].self_attn
    AttentionInterface.register("spy", spy)
    model.set_attn_implementation("spy")
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        model(ids)
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        raw_q = layer.q_proj(hidden).view(1, 12, -1, layer.head_dim).transpose(1, 2)
        if hasattr(layer, "q_norm"):
            raw_q = layer.q_norm(raw_q)
    torch.testing.assert_close(seen["q"], raw_q)
    assert seen["pos"].tolist() == [list(range(12))]


@pytest.mark.parametrize("scheme,native,opts", [
    ("linear", {"rope_type": "linear", "factor": 4.0}, {"factor": 4.0}),
    ("dynamic_ntk", {"rope_type": "dynamic", "factor": 4.0}, {"factor": 4.0}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
     {"factor": 4.0, "original_max_position": 64}),
])
def test_extended_equals_native_rope_config(scheme, native, opts):
    max_position = 64 if scheme == "dynamic_ntk" else 256
    base = tiny_model("llama", max_position=max_position)
    reference = tiny_model("llama", max_position=max_position,
                           rope_parameters={"rope_theta": 10000.0, **native})
    reference.load_state_dict(base.state_dict())
    ids = torch.randint(0, 100, (1, 200))
    with torch.no_grad():
        expected = reference(ids).logits
        longreach.extend(base, position=scheme, **opts)
        torch.testing.assert_close(base(ids).logits, expected, atol=1e-5, rtol=0)


def test_extend_again_replaces_and_restore_undoes():
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (1, 64))
    with torch.no_grad():
        original = model(ids).logits
        longreach.extend(model, position="linear", factor=4.0, attention="sinks", window=8)
        sinks_linear = model(ids).logits
        longreach.extend(model, attention="dense")
        torch.testing.assert_close(model(ids).logits, original, atol=1e-5, rtol=0)
        assert longreach.describe(model)["attention"] == "dense"
        longreach.extend(model, position="linear", factor=4.0, attention="sinks", window=8)
        torch.testing.assert_close(model(ids).logits, sinks_linear)
        longreach.restore(model)
        assert model.config._attn_implementation == "sdpa"
        assert longreach.describe(model) is None
        torch.testing.assert_close(model(ids).logits, original, atol=0, rtol=0)
    assert not (original - sinks_linear).abs().max() < 1e-3


def test_registered_names_and_lists():
    assert set(longreach.attention_methods()) >= {"dense", "select_merge", "s2", "sf", "dca", "self_extend",
                                                  "sinks", "softplus"}
    assert set(longreach.position_schemes()) >= {"linear", "ntk", "dynamic_ntk", "yarn", "truncated"}
    longreach.extend(tiny_model("llama"))
    for name in longreach.attention_methods():
        assert "longreach_" + name in AttentionInterface._global_mapping


@pytest.mark.parametrize("kwargs,match", [
    ({"attention": "flash9"}, "unknown attention method 'flash9'"),
    ({"position": "rope2"}, "unknown position scheme 'rope2'"),
    ({"position": "linear", "factor": 0}, "factor must be > 0"),
    ({"position": "linear", "factor": -2.0}, "factor must be > 0"),
    ({"position": "yarn", "factor": float("nan")}, "factor must be a finite number"),
    ({"position": "linear"}, "needs factor"),
    ({"attention": "dense", "window": 5}, "option 'window'.*belongs to \\['self_extend', 'sinks'\\]"),
    ({"attention": "sinks", "top_k": 5}, "option 'top_k'.*belongs to \\['select_merge'\\]"),
    ({"position": "ntk", "factor": 2.0, "beta_fast": 3}, "option 'beta_fast'.*belongs to \\['yarn'\\]"),
    ({"attention": "sinks", "window": 0}, "'window' must be >= 1"),
    ({"attention": "select_merge", "position_mode": "relative"}, "'position_mode' must be one of"),
    ({"position": "yarn", "factor": 2.0, "original_max_position": 0}, "original_max_position must be"),
])
def test_bad_input_fails_at_extend(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        longreach.extend(model, **kwargs)
    assert longreach.describe(model) is None


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        longreach.extend(model, attention="dense")


def test_qwen3_supported():
    model = tiny_model("qwen3", head_dim=16)
    ids = torch.randint(0, 100, (1, 30))
    with torch.no_grad():
        expected = model(ids).logits
        longreach.extend(model)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_select_merge_carry_hands_blocks_down_the_layers():
    # With carry, each layer's surest blocks are written for the next one, within the forward pass (prefill
    # and each decode step alike); top_k covering every block leaves nothing to choose, so it equals carry=0.
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 96))
    with torch.no_grad():
        longreach.extend(model, attention="select_merge", block_size=16, top_k=1, local=0, carry=1)
        chain = model._longreach.chain
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert sorted(chain.written) == list(range(model.config.num_hidden_layers))
        assert chain.written[0][1].shape == (1, 1, 1)  # the last decode step's one query block
        model(ids)
        assert chain.written[0][1].shape == (1, 6, 1)
        longreach.extend(model, attention="select_merge", block_size=16, top_k=8, local=0, carry=1)
        wide = model(ids).logits
        longreach.extend(model, attention="select_merge", block_size=16, top_k=8, local=0)
        torch.testing.assert_close(model(ids).logits, wide)
    assert out.shape == (1, 99)
