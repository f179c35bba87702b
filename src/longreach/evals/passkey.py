"""Passkey retrieval (Mohtashami & Jaggi 2023): a random 5-digit key in repeated filler, asked for at the end."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from . import prompts
from .retrieval import Progress, evaluate


def passkey(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], *, trials: int = 10, seed: int = 0,
            batch_size: int = 8, chat: bool = False, progress: Progress | None = None,
            prefill_chunk: int | None = None) -> list[dict]:
    """Records ``{length, depth, trials, correct, accuracy, seconds_per_trial, peak_gib}``: ``length`` counts
    the prompt's tokens and ``depth`` the share of filler before the key. A trial is right when the greedy
    answer is the key. ``chat`` asks in the model's chat template (instruct models)."""
    return evaluate(model, tokenizer, partial(prompts.passkey, tokenizer, chat=chat), lengths, depths, trials=trials,
                    seed=seed, batch_size=batch_size, progress=progress, prefill_chunk=prefill_chunk)
