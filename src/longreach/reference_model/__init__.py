"""The shipped reference model: a 12.6M-parameter Llama pretrained by longreach at 512 tokens.

Its corpus (``corpus.py``), tokenizer (``tokenizer.py``), synthetic retrieval data (``data.py``) and
training recipe (``train.py``) live beside it; ``weights/training.json`` records how it was trained
and what it measured (loss curve, held-out perplexity, passkey accuracy).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights"
TRAIN_LENGTH = 512
# Its training rows and prompts begin with BOS, so its tokenizer adds one, as Llama's does.
TOKENIZER_OPTIONS = {"add_bos_token": True}


def load_reference_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)``: the reference ``LlamaForCausalLM`` in eval mode and its tokenizer.

    The weights ship in bfloat16 and are loaded as ``dtype``."""
    from ..pretrained import load_pretrained

    return load_pretrained("reference", dtype=dtype, device=device)


@cache
def heldout_texts() -> tuple[str, ...]:
    """Long documents held out of the training corpus (8 documents of 120K+ characters, 5 sources)."""
    from .corpus import read

    return tuple(doc["text"] for doc in read(WEIGHTS / "evaluation.jsonl.xz"))


@cache
def haystack_texts() -> tuple[str, ...]:
    """:func:`heldout_texts` and 170 more held-out documents of the corpus (``weights/haystack.jsonl.xz``,
    cut by ``corpus.write_haystack_set``; ``weights/haystack_manifest.json`` names the package versions):
    1.36M SmolLM2 tokens in all, so a needle haystack of a million tokens repeats no text."""
    from .corpus import read

    return heldout_texts() + tuple(doc["text"] for doc in read(WEIGHTS / "haystack.jsonl.xz"))


def training_record() -> dict:
    """What ``train.py`` recorded when it trained the shipped weights."""
    return json.loads((WEIGHTS / "training.json").read_text())
