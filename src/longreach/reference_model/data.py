"""Training batches for the reference model: corpus windows mixed with synthetic retrieval prompts.

The corpus is one token stream (``<s> doc </s> <s> doc </s> ...``); a row is a random window of it.
A share of rows instead starts with a passkey or needle prompt (``longreach.evals.prompts``) of
random length and depth followed by its answer, then corpus text fills the row.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..evals import prompts


class Batches:
    """Rows of ``length + 1`` tokens (inputs and shifted targets), ``retrieval`` of them synthetic prompts."""

    def __init__(self, tokenizer, stream: np.ndarray, length: int, retrieval: float, seed: int):
        if not 0.0 <= retrieval <= 1.0:
            raise ValueError(f"retrieval must be in [0, 1], got {retrieval}")
        self.tokenizer, self.stream, self.length, self.retrieval = tokenizer, stream, length, retrieval
        self.rng = random.Random(seed)
        self.shortest = 8 + max(
            prompts.fixed_size(tokenizer, prompts.PASSKEY_INTRO, prompts.PASSKEY_NEEDLE.format(key="00000"),
                               prompts.PASSKEY_QUESTION, prompts.PASSKEY_LEAD),
            prompts.fixed_size(tokenizer, prompts.NEEDLE_INTRO, prompts.NEEDLE_SENTENCE.format(name="Lisbon",
                               key="0000000"), prompts.NEEDLE_QUESTION.format(name="Lisbon"),
                               prompts.NEEDLE_LEAD.format(name="Lisbon")))

    def window(self, size: int) -> list[int]:
        start = self.rng.randrange(0, len(self.stream) - size)
        return self.stream[start:start + size].tolist()

    def prompt_row(self) -> list[int]:
        size = self.rng.randint(self.shortest, self.length - 12)
        depth = self.rng.random()
        if self.rng.random() < 0.5:
            prompt = prompts.passkey(self.tokenizer, size, depth, self.rng)
        else:
            prompt = prompts.needle(self.tokenizer, size, depth, self.rng, self.window(size))
        row = prompt.ids + prompt.answer + [self.tokenizer.eos_token_id]
        return row + self.window(self.length + 1 - len(row))

    def __call__(self, rows: int) -> torch.Tensor:
        """(rows, length + 1) int64 tokens."""
        batch = [self.prompt_row() if self.rng.random() < self.retrieval else self.window(self.length + 1)
                 for _ in range(rows)]
        return torch.tensor(batch, dtype=torch.int64)
