"""Needle in a haystack: a named 7-digit number hidden in real held-out text, asked for at the end."""

from __future__ import annotations

import random
from collections.abc import Sequence

from . import prompts
from .retrieval import Progress, evaluate, haystack_ids


def needle(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], *, texts: Sequence[str],
           trials: int = 10, seed: int = 0, batch_size: int = 8, chat: bool = False,
           progress: Progress | None = None, prefill_chunk: int | None = None) -> list[dict]:
    """Records as :func:`~longreach.evals.passkey.passkey`; each prompt's haystack is real text from ``texts``
    (held-out documents: ``longreach.reference_model.heldout_texts()``), joined in a random order and read
    from a random place (:func:`~longreach.evals.retrieval.haystack_ids`), so any length up to their total works."""
    documents = prompts.encode_documents(tokenizer, tuple(texts))
    separator = prompts.encode(tokenizer, prompts.DOCUMENT_SEPARATOR)

    def make(length: int, depth: float, rng: random.Random) -> prompts.Prompt:
        return prompts.needle(tokenizer, length, depth, rng, haystack_ids(documents, length, rng, separator), chat)

    return evaluate(model, tokenizer, make, lengths, depths, trials=trials, seed=seed, batch_size=batch_size,
                    progress=progress, prefill_chunk=prefill_chunk)
