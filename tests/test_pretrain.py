import json
import lzma
import sys

import pytest
import torch
from safetensors.torch import load_file

from longreach.reference_model import WEIGHTS, heldout_texts
from longreach.reference_model import train as pretrain


@pytest.fixture
def corpus(tmp_path):
    text = heldout_texts()[0]
    for split, part in (("train", text[:60_000]), ("heldout", text[60_000:80_000])):
        with lzma.open(tmp_path / f"{split}.jsonl.xz", "wt") as out:
            out.write(json.dumps({"source": "test", "name": split, "text": part}) + "\n")
    return tmp_path


def test_pretraining_under_select_merge_runs_exactly_the_given_steps(corpus, tmp_path, monkeypatch):
    out = tmp_path / "model"
    monkeypatch.setattr(sys, "argv", ["train", str(corpus), str(WEIGHTS), str(out), "--steps", "2", "--batch", "2",
                                      "--warmup", "1", "--attention", "select_merge", "--option", "block_size=32",
                                      "--option", "top_k=4", "--passkey-lengths", "128"])
    pretrain.main()
    record = json.loads((out / "training.json").read_text())
    assert (record["steps"], record["tokens"]) == (2, 2 * 2 * 512)
    assert record["attention"] == "select_merge" and record["options"] == {"block_size": 32, "top_k": 4}
    assert [r["length"] for r in record["passkey"]] == [128] * 5
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()


def _run(corpus, out, monkeypatch, *extra):
    monkeypatch.setattr(sys, "argv", ["train", str(corpus), str(WEIGHTS), str(out), "--steps", "4", "--batch", "2",
                                      "--warmup", "1", "--passkey-lengths", "128", *extra])
    pretrain.main()


def _weights(out):
    return {k: v for shard in sorted(out.glob("*.safetensors")) for k, v in load_file(shard).items()}


def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_weights(corpus, tmp_path, monkeypatch):
    _run(corpus, tmp_path / "whole", monkeypatch)
    calls = {"n": 0}
    draw = pretrain.Batches.__call__

    def interrupted(self, rows):
        calls["n"] += 1
        if calls["n"] == 4:  # the fourth step's batch: steps 1-3 ran, the checkpoint holds step 2
            raise KeyboardInterrupt
        return draw(self, rows)

    out = tmp_path / "resumed"
    monkeypatch.setattr(pretrain.Batches, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(corpus, out, monkeypatch, "--save-every", "2")
    assert torch.load(out / pretrain.CHECKPOINT, weights_only=False)["step"] == 2
    monkeypatch.setattr(pretrain.Batches, "__call__", draw)
    _run(corpus, out, monkeypatch, "--save-every", "2")
    whole, resumed = _weights(tmp_path / "whole"), _weights(out)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert json.loads((out / "training.json").read_text())["steps"] == 4


def test_resuming_under_another_recipe_names_what_changed(corpus, tmp_path, monkeypatch):
    out = tmp_path / "model"
    _run(corpus, out, monkeypatch, "--save-every", "4")
    with pytest.raises(ValueError, match=r"--lr is 0.001, the checkpoint's 0.0015"):
        _run(corpus, out, monkeypatch, "--save-every", "4", "--lr", "0.001")
    monkeypatch.setattr(sys, "argv", ["train", str(corpus), str(WEIGHTS), str(out), "--save-every", "-1"])
    with pytest.raises(SystemExit):
        pretrain.main()
