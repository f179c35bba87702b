import inspect
import math

import pytest
import torch

import longreach
from longreach.clex import Clex, Dynamics, rk4
from longreach.models import tiny_model
from longreach.positions import default_inv_freq, ntk, yarn

DIM, BASE = 16, 10000.0


def scheme(**kw) -> Clex:
    torch.manual_seed(0)
    return Clex(default_inv_freq(DIM, BASE), BASE, trained_length=64, max_factor=8, **kw)


def test_t1_is_the_models_own_rope_and_untrained_dynamics_follow_ntk():
    clex = scheme()
    assert torch.equal(clex.frequencies(1), default_inv_freq(DIM, BASE))
    for t in (2, 3.5, 8):
        # W_down starts at zero: dz/dt is d/dt log of NTK frequencies with alpha = 2t - 1.
        torch.testing.assert_close(clex.frequencies(t), ntk(DIM, BASE, 2 * t - 1).inv_freq, rtol=1e-5, atol=0)


def test_untrained_dynamics_from_yarn_follow_yarns_frequencies(tmp_path):
    clex = scheme(start="yarn")
    assert torch.equal(clex.frequencies(1), default_inv_freq(DIM, BASE))
    ramp = clex.dynamics.ramp
    assert ramp.min() == 0 and ramp.max() == 1  # some pairs kept, some interpolated
    for t in (2, 3.5, 8):
        torch.testing.assert_close(clex.frequencies(t), yarn(DIM, BASE, t, 64).inv_freq, rtol=1e-5, atol=0)
    torch.nn.init.normal_(clex.dynamics.down, std=0.1)
    clex.save(tmp_path / "clex.pt")
    loaded = Clex.load(tmp_path / "clex.pt", default_inv_freq(DIM, BASE))
    assert loaded.settings()["start"] == "yarn"
    torch.testing.assert_close(loaded.frequencies(5), clex.frequencies(5))
    with pytest.raises(ValueError, match=r"start must be one of \('ntk', 'yarn'\)"):
        scheme(start="linear")


def test_a_model_cast_to_16_bits_keeps_the_frequencies_in_float32():
    torch.manual_seed(0)
    model = tiny_model(max_position=64)
    longreach.extend(model, position="clex", max_factor=4, start="yarn")
    clex = model.model.clex
    before = clex.frequencies(3).detach().clone()  # untrained (W_down = 0): from the buffers alone
    model.to(torch.bfloat16)
    assert clex.inv_freq.dtype == clex.dynamics.ramp.dtype == torch.float32
    assert clex.dynamics.down.dtype == torch.bfloat16  # parameters are cast as asked
    torch.testing.assert_close(clex.frequencies(3), before)


def test_rk4_against_closed_form_and_a_fine_step_reference():
    z0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    exact = z0 * math.exp(-0.7 * 2.5)
    torch.testing.assert_close(rk4(lambda t, z: -0.7 * z, z0, 1.0, 3.5, 0.01), exact, rtol=1e-10, atol=0)
    # dz/dt = t: z(t1) = z0 + (t1^2 - t0^2) / 2, exact for rk4 even in one step.
    torch.testing.assert_close(rk4(lambda t, z: z * 0 + t, z0, 1.0, 4.0, 3.0), z0 + 7.5, rtol=1e-12, atol=0)
    torch.manual_seed(1)
    dynamics = Dynamics(DIM, BASE)
    torch.nn.init.normal_(dynamics.down, std=0.5)
    z = default_inv_freq(DIM, BASE).log()
    coarse, fine = rk4(dynamics, z, 1.0, 6.0, 0.01), rk4(dynamics, z, 1.0, 6.0, 0.0005)
    torch.testing.assert_close(coarse, fine, rtol=1e-5, atol=1e-5)
    assert (coarse - rk4(dynamics, z, 1.0, 6.0, 0.5)).abs().max() > 1e-4  # the test can tell steps apart
    # The scheme's default step, at its largest t, on a head of 64 with RoPE base 1e5 (SmolLM2's).
    torch.manual_seed(0)
    wide = Dynamics(64, 1e5)
    torch.nn.init.normal_(wide.down, std=0.05)  # 20 times the spread SmolLM2's 200-step run trained
    z = default_inv_freq(64, 1e5).log()
    default_step = inspect.signature(Clex).parameters["step"].default
    fine = rk4(wide, z, 1.0, 16.0, 0.001)
    assert (rk4(wide, z, 1.0, 16.0, default_step) - fine).abs().max() < 5e-4
    assert (rk4(wide, z, 1.0, 16.0, 0.5) - fine).abs().max() > 1e-3


def test_gradients_reach_the_dynamics():
    clex = scheme()
    clex.frequencies(4).sum().backward()
    assert clex.dynamics.down.grad.abs().sum() > 0
    torch.nn.init.normal_(clex.dynamics.down, std=0.1)
    clex.dynamics.up.grad = None
    clex.frequencies(4).sum().backward()
    assert clex.dynamics.up.grad.abs().sum() > 0


def test_training_draws_spread_positions_over_t_times_the_length():
    clex, gen = scheme(step=0.05), torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        positions = clex.train_step(100, gen)
        t, scale = clex.draw
        seen.add(t)
        assert 1 <= t <= 8 and scale == 100 / 64
        assert len(positions) == 100 and positions[0] == 0 and positions[-1] == 100 * t - 1
        assert (positions.diff() > 0).all()
        rope = clex.at(123456)  # the draw decides, not the length
        torch.testing.assert_close(rope.inv_freq, clex.frequencies(t) / scale)
    assert seen == set(range(1, 9))
    clex.end_training()
    assert clex.at(64 * 3).inv_freq.requires_grad is False
    torch.testing.assert_close(clex.at(64 * 3).inv_freq, clex.frequencies(3))
    torch.testing.assert_close(clex.at(10**9).inv_freq, clex.frequencies(8))  # capped at max_factor


def test_inference_cache_follows_the_parameters():
    clex = scheme()
    before = clex.at(64 * 4).inv_freq.clone()
    with torch.no_grad():
        clex.dynamics.down.add_(0.3)
    after = clex.at(64 * 4).inv_freq
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, clex.frequencies(4))


def test_save_load_round_trip_and_clear_errors(tmp_path):
    clex = scheme(width=2, activation="silu")
    torch.nn.init.normal_(clex.dynamics.down, std=0.1)
    clex.save(tmp_path / "clex.pt")
    loaded = Clex.load(tmp_path / "clex.pt", default_inv_freq(DIM, BASE))
    assert loaded.settings() == clex.settings()
    torch.testing.assert_close(loaded.frequencies(5), clex.frequencies(5))
    torch.testing.assert_close(Clex.load(tmp_path / "clex.pt").frequencies(5), clex.frequencies(5))
    with pytest.raises(ValueError, match="not found: fine-tune with position='clex' first"):
        Clex.load(tmp_path / "missing.pt", default_inv_freq(DIM, BASE))
    with pytest.raises(ValueError, match="other rotary frequencies"):
        Clex.load(tmp_path / "clex.pt", default_inv_freq(DIM, 500.0))
    for bad in (0.5, 9, float("nan"), True):
        with pytest.raises(ValueError, match=r"t must be a number in \[1, max_factor=8\]"):
            clex.frequencies(bad)
    with pytest.raises(ValueError, match="max_factor must be an integer >= 1"):
        Clex(default_inv_freq(DIM, BASE), BASE, 64, max_factor=2.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        Clex(default_inv_freq(DIM, BASE), BASE, 64, activation="relu")


def test_extend_with_clex_keeps_logits_inside_the_trained_length_and_loads_a_state(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(max_position=64)
    ids = torch.randint(0, 128, (1, 60))
    with torch.no_grad():
        reference = model(ids).logits
        longreach.extend(model, position="clex", max_factor=4)
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
        clex = model.model.clex
        assert [n for n, _ in model.named_parameters() if "clex" in n] == ["model.clex.dynamics.up",
                                                                          "model.clex.dynamics.down"]
        torch.nn.init.normal_(clex.dynamics.down, std=0.5)
        long_ids = torch.randint(0, 128, (1, 200))
        trained = model(long_ids).logits
        clex.save(tmp_path / "clex.pt")
        longreach.extend(model, attention="dense")
        assert not hasattr(model.model, "clex")
        longreach.extend(model, position="clex", state=str(tmp_path / "clex.pt"))
        torch.testing.assert_close(model(long_ids).logits, trained)
    with pytest.raises(ValueError, match="not found"):
        longreach.extend(model, position="clex", state=str(tmp_path / "nothing.pt"))
