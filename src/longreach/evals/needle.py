"""Needle in a haystack: a named 7-digit number hidden in real held-out text, asked for at the end."""

from __future__ import annotations

import random
from collections.abc import Sequence

from . import prompts
from .retrieval import Progress, evaluate, haystack_ids


def needle(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], *, texts: Sequence[str],
           trials: int = 10, seed: int = 0, batch_size: int = 8, progress: Progress | None = None) -> list[dict]:
    """Records as :func:`~longreach.evals.passkey.passkey`; each prompt's haystack is a window of one of ``texts``
    (for the reference model, its held-out documents: ``longreach.reference_model.heldout_texts()``)."""
    documents = [prompts.encode(tokenizer, text) for text in texts]

    def make(length: int, depth: float, rng: random.Random) -> prompts.Prompt:
        return prompts.needle(tokenizer, length, depth, rng, haystack_ids(documents, length, rng))

    return evaluate(model, tokenizer, make, lengths, depths, trials=trials, seed=seed, batch_size=batch_size,
                    progress=progress)
