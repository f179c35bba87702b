"""longreach: run and fine-tune Hugging Face causal LMs far beyond their trained context."""

from __future__ import annotations

from .attention import METHODS
from .hf import POSITION_OPTIONS, describe, extend, restore
from .pretrained import convert, load_pretrained
from .reference_model import load_reference_model

__all__ = ["attention_methods", "convert", "describe", "extend", "load_pretrained", "load_reference_model",
           "position_schemes", "restore"]
__version__ = "0.1.0"


def attention_methods() -> dict[str, str]:
    """Registered attention methods: name -> one-line summary (also ``attn_implementation="longreach_<name>"``)."""
    return {name: method.summary for name, method in METHODS.items()}


def position_schemes() -> dict[str, tuple[str, ...]]:
    """Rotary position schemes for :func:`extend`: name -> the options it takes.

    ``crd_ntk`` is a training-time sampler (:class:`longreach.positions.CRDNTK`), not a fixed scheme.
    """
    return dict(POSITION_OPTIONS)
