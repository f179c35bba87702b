import json
import lzma
import sys

import pytest

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
