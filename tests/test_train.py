"""The fine-tuning recipe on tiny random models: what trains, what stays frozen, resumption, the loss."""

from __future__ import annotations

import pytest
import torch

from longreach import attention_methods
from longreach.models import tiny_model
from longreach.train import FinetuneConfig, finetune, prepare
from longreach.train.loop import sequence_loss


def _run(attention: str, position: str | None, steps: int = 2, **kwargs):
    torch.manual_seed(0)
    model = tiny_model("llama", max_position=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = FinetuneConfig(length=128, steps=steps, attention=attention, position=position, learning_rate=1e-2,
                            warmup=0, batch_size=2, accumulation=2, loss_chunk=32, **kwargs)
    peft_model = prepare(model, config)
    rows = torch.randint(1, 128, (6, 129))
    return before, peft_model, finetune(peft_model, rows, config, progress=False)


def _changed(peft_model, before):
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in peft_model.named_parameters()}
    return {n for n, p in before.items() if not torch.equal(p, after[n].to(p.dtype))}, after


@pytest.mark.parametrize("attention", list(attention_methods()))
@pytest.mark.parametrize("position", ["crd_ntk", "yarn"])
def test_two_steps_train_only_lora_embeddings_and_norms(attention, position):
    before, peft_model, history = _run(attention, position)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    changed, after = _changed(peft_model, before)
    assert changed == {n for n in before if "embed" in n or "norm" in n}
    lora = [p for n, p in after.items() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # lora_B starts at zero: it moved
    if position == "crd_ntk":
        assert all(h["factor"] >= 1.0 for h in history)


def _dense_run(steps: int, out=None) -> list[dict]:
    torch.manual_seed(0)  # the same rows and the same frozen weights in every run
    rows = torch.randint(1, 128, (4, 65))
    config = FinetuneConfig(length=64, steps=steps, attention="dense", position=None, learning_rate=1e-2, warmup=0)
    return finetune(prepare(tiny_model("llama", max_position=64), config), rows, config, out=out, progress=False)


def test_resume_continues_from_the_checkpoint(tmp_path):
    full = _dense_run(3)
    _dense_run(2, out=tmp_path)
    resumed = _dense_run(3, out=tmp_path)
    assert [h["step"] for h in resumed] == [0, 1, 2]
    assert resumed[2]["loss"] == pytest.approx(full[2]["loss"], rel=1e-6)
    assert resumed[2]["loss"] != pytest.approx(_dense_run(1)[0]["loss"], rel=1e-6)


def test_offloaded_activations_give_the_same_step():
    def run(offload: bool) -> float:
        torch.manual_seed(0)
        rows = torch.randint(1, 128, (4, 65))
        config = FinetuneConfig(length=64, steps=2, attention="select_merge", position=None, learning_rate=1e-2,
                                warmup=0, offload_activations=offload)
        return finetune(prepare(tiny_model("llama", max_position=64), config), rows, config, progress=False)[1]["loss"]

    assert run(True) == pytest.approx(run(False), rel=1e-6)


def test_chunked_sequence_loss_equals_the_models_own_loss():
    torch.manual_seed(0)
    model = tiny_model("llama")
    rows = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        ours = sequence_loss(model, rows, None, chunk=7)
        full = torch.nn.functional.cross_entropy(model(input_ids=rows[:, :-1]).logits.flatten(0, 1),
                                                 rows[:, 1:].flatten())
    torch.testing.assert_close(ours, full)


def test_clex_trains_its_dynamics_with_the_adapters_saves_and_resumes(tmp_path):
    from longreach.clex import Clex

    before, peft_model, history = _run("dense", "clex", steps=3, max_factor=4)
    changed, after = _changed(peft_model, before)
    assert changed == {n for n in before if "embed" in n or "norm" in n}
    clex = peft_model.get_base_model().model.clex
    assert clex.draw is None and clex.dynamics.down.abs().sum() > 0  # W_down starts at zero: it learned
    assert {h["factor"] for h in history} <= {1, 2, 3, 4}
    torch.manual_seed(0)
    config = FinetuneConfig(length=32, steps=2, attention="dense", position="clex", max_factor=4, learning_rate=1e-2,
                            warmup=0)
    rows = torch.randint(1, 128, (4, 33))
    first = prepare(tiny_model("llama", max_position=64), config)
    finetune(first, rows, config, out=tmp_path, progress=False)
    trained = first.get_base_model().model.clex
    resumed = prepare(tiny_model("llama", max_position=64), config)
    finetune(resumed, rows, config, out=tmp_path, progress=False)  # every step done: loads the checkpoint
    for a, b in zip(trained.parameters(), resumed.get_base_model().model.clex.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    saved = Clex.load(tmp_path / "clex.pt", trained.inv_freq)
    torch.testing.assert_close(saved.frequencies(3), trained.frequencies(3))


def test_adapters_start_from_the_seed():
    def adapters(seed):
        torch.manual_seed(seed + 100)  # the global generator's state must not matter
        config = FinetuneConfig(length=32, steps=1, attention="dense", position=None, seed=seed)
        model = prepare(tiny_model("llama", max_position=64), config)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_clex_start_reaches_the_trained_scheme():
    _, peft_model, _ = _run("dense", "clex", steps=1, max_factor=4, clex_start="yarn")
    clex = peft_model.get_base_model().model.clex
    assert clex.settings()["start"] == "yarn" and clex.dynamics.ramp.max() == 1


def test_clex_learning_rate_steps_the_dynamics_apart_from_the_adapters():
    _, peft_model, history = _run("dense", "clex", steps=1, max_factor=4, clex_learning_rate=1e-5)
    clex = peft_model.get_base_model().model.clex
    # Adam's first step moves each parameter by about its learning rate: 1e-5 for W_down (from zero),
    # 1e-2 without clex_learning_rate.
    assert 0 < clex.dynamics.down.abs().max() <= 1.01e-5
    assert history[0]["lr"] == 1e-2
    _, plain, _ = _run("dense", "clex", steps=1, max_factor=4)
    assert plain.get_base_model().model.clex.dynamics.down.abs().max() > 1e-3


@pytest.mark.parametrize(("kwargs", "message"), [({"length": 0}, "length must be >= 1"),
                                                 ({"learning_rate": 0}, "learning_rate must be > 0"),
                                                 ({"position": "clex", "attention": "select_merge"},
                                                  "position 'clex' learns its frequencies"),
                                                 ({"clex_learning_rate": 1e-5}, "applies to position='clex' only"),
                                                 ({"shard_weights": True}, "shard_weights .* needs sequence_parallel"),
                                                 ({"position": "clex", "attention": "dense", "clex_learning_rate": 0},
                                                  "clex_learning_rate must be > 0"),
                                                 ({"clex_start": "yarn"}, "clex_start applies to position='clex'"),
                                                 ({"position": "clex", "attention": "dense", "clex_start": "linear"},
                                                  r"clex_start must be one of \('ntk', 'yarn'\)")])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**({"length": 64, "steps": 1} | kwargs))


def test_cli_finetune_runs_and_resumes(tmp_path):
    from click.testing import CliRunner

    from longreach.cli import main

    text = tmp_path / "doc.txt"
    text.write_text("The grass is green. The sky is blue. " * 400)
    args = ["finetune", "--data", str(text), "--length", "256", "--attention", "s2", "--lr", "1e-3",
            "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(main, [*args, "--steps", "1"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, [*args, "--steps", "2"])
    assert second.exit_code == 0 and "2 steps" in second.output, second.output
    bad = CliRunner().invoke(main, ["finetune", "--data", str(text), "--length", "100000", "--steps", "1",
                                    "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "fewer than one row" in bad.output
