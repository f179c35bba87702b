"""benchmarks/extend_model.py: a fine-tuned model is evaluated and saved with its adapters merged."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
extend_model = pytest.importorskip("extend_model")

from longreach.evals import setups  # noqa: E402
from longreach.pretrained import load_pretrained  # noqa: E402
from longreach.reference_model import heldout_texts  # noqa: E402
from longreach.train.data import token_stream  # noqa: E402


def test_saved_model_reloads_as_the_tuned_model(tmp_path):
    args = argparse.Namespace(model="reference", dtype="float32", device="cpu", length=256, steps=2, batch=1,
                              lr=1e-3, warmup=0, retrieval=0.5, seed=0, save=True, out=tmp_path)
    _, tokenizer = load_pretrained("reference")
    stream = token_stream(tokenizer, heldout_texts()[:4])
    tuned, _, record = extend_model.train(args, "sm=select_merge+crd_ntk", stream)
    assert record["tokens"] == 2 * 256
    assert not any("lora" in name for name in tuned.state_dict())
    reloaded, _ = load_pretrained(tmp_path / "sm" / "model")
    assert tuned.state_dict().keys() == reloaded.state_dict().keys()
    untuned, _ = load_pretrained("reference")
    for model in (tuned, reloaded, untuned):
        setups.apply(model, "select_merge+ntk", factor=2.0, lengths=[128], options={})
    ids = torch.tensor([tokenizer(heldout_texts()[0])["input_ids"][:128]])
    with torch.no_grad():
        logits = tuned(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, logits)
        assert not torch.allclose(untuned(ids).logits, logits, atol=1e-3)
