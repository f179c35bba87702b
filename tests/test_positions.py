import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longreach import positions as pos

DIM, BASE, L = 64, 10000.0, 256


def hf_config(rope_type: str, **params) -> LlamaConfig:
    rope = {"rope_type": rope_type, "rope_theta": BASE, **params}
    return LlamaConfig(hidden_size=DIM * 4, num_attention_heads=4, max_position_embeddings=L, rope_parameters=rope)


@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0, 0.5])
def test_linear_equals_transformers(factor):
    inv, scale = ROPE_INIT_FUNCTIONS["linear"](hf_config("linear", factor=factor))
    rope = pos.linear(DIM, BASE, factor)
    torch.testing.assert_close(rope.inv_freq, inv, atol=1e-6, rtol=0)
    assert rope.scaling == pytest.approx(scale, abs=1e-6)


@pytest.mark.parametrize("factor", [2.0, 4.0])
@pytest.mark.parametrize("seq_len", [10, L, 3 * L, 16 * L])
def test_dynamic_ntk_equals_transformers(factor, seq_len):
    inv, scale = ROPE_INIT_FUNCTIONS["dynamic"](hf_config("dynamic", factor=factor), seq_len=seq_len)
    rope = pos.DynamicRope(DIM, BASE, factor, L).at(seq_len)
    torch.testing.assert_close(rope.inv_freq, inv, atol=1e-6, rtol=0)
    assert rope.scaling == pytest.approx(scale, abs=1e-6)


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
@pytest.mark.parametrize("betas", [(32, 1), (16, 2)])
@pytest.mark.parametrize("original", [64, 256])
def test_yarn_equals_transformers(factor, betas, original):
    cfg = hf_config("yarn", factor=factor, beta_fast=betas[0], beta_slow=betas[1],
                    original_max_position_embeddings=original)
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    rope = pos.yarn(DIM, BASE, factor, original, beta_fast=betas[0], beta_slow=betas[1])
    torch.testing.assert_close(rope.inv_freq, inv, atol=1e-6, rtol=0)
    assert rope.scaling == pytest.approx(scale, abs=1e-6)


def test_yarn_temperature_is_published_value():
    assert pos.yarn(DIM, BASE, 8.0, L).scaling == pytest.approx(0.1 * math.log(8.0) + 1)


@pytest.mark.parametrize("factor", [1.0, 2.0, 10.0])
def test_ntk_published_formula(factor):
    # b' = b * s^(d/(d-2)); theta_i = b'^(-2i/d), computed here in float64 from the formula.
    new_base = BASE * factor ** (DIM / (DIM - 2))
    expected = [new_base ** (-2 * i / DIM) for i in range(DIM // 2)]
    rope = pos.ntk(DIM, BASE, factor)
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    # highest frequency untouched, lowest divided by exactly s
    assert rope.inv_freq[0] == pytest.approx(1.0)
    assert rope.inv_freq[-1].item() == pytest.approx(BASE ** (-(DIM - 2) / DIM) / factor, rel=1e-5)


@pytest.mark.parametrize("cutoff", [64, 512, 4096])
def test_truncated_published_rule(cutoff):
    b = 2 * math.pi / cutoff
    rope = pos.truncated(DIM, BASE, cutoff)
    for i in range(DIM // 2):
        theta = BASE ** (-2 * i / DIM)
        expected = theta if theta >= b else (b / 16 if theta >= b / 8 else 0.0)
        assert rope.inv_freq[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert (rope.inv_freq == 0).any() and (rope.inv_freq == rope.inv_freq[0]).any()


def test_rotate_matches_transformers_llama_rotary():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = hf_config("yarn", factor=4.0, original_max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 3, 50, DIM)
    position_ids = torch.arange(7, 57).expand(2, 50)
    cos, sin = rotary(x, position_ids)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    rope = pos.yarn(DIM, BASE, 4.0, 64)
    torch.testing.assert_close(rope.rotate(x, position_ids[:, None]), expected, atol=1e-6, rtol=0)


def test_crd_ntk_reproducible_and_in_range():
    def take(seed, n):
        it = iter(pos.CRDNTK(DIM, BASE, period=4096, max_factor=8.0, growth_steps=100, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = take(3, 500), take(3, 500), take(4, 500)
    assert [(s.factor, s.offset) for s in a] == [(s.factor, s.offset) for s in b]
    assert [(s.factor, s.offset) for s in a] != [(s.factor, s.offset) for s in c]
    sampler = pos.CRDNTK(DIM, BASE, period=4096, max_factor=8.0, growth_steps=100)
    for step, s in enumerate(a):
        assert 1.0 <= s.factor <= sampler.bound(step) + 1e-12
        assert 0 <= s.offset < 4096
        torch.testing.assert_close(s.rope.inv_freq, pos.ntk(DIM, BASE, s.factor).inv_freq)
        ids = s.positions(1000)
        assert int(ids.min()) >= 0 and int(ids.max()) < 4096
    factors = [s.factor for s in a[100:]]
    offsets = [s.offset for s in a]
    assert min(factors) < 1.5 and max(factors) > 7.0  # the grown range is covered
    assert max(s.factor for s in a[:10]) <= sampler.bound(9)  # early steps stay small
    assert min(offsets) < 200 and max(offsets) > 3900
    wrapped = pos.CRDStep(2.0, 4090, 4096, pos.ntk(DIM, BASE, 2.0)).positions(10)
    assert wrapped.tolist() == [4090, 4091, 4092, 4093, 4094, 4095, 0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_bad_factor_rejected(bad):
    with pytest.raises(ValueError, match="factor"):
        pos.linear(DIM, BASE, bad)
