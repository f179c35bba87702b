"""Packing documents into fixed-length training rows."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def pack(tokenizer, texts: Iterable[str], length: int) -> torch.Tensor:
    """Documents (each BOS ... EOS where the tokenizer has them) concatenated and cut into rows of
    ``length + 1`` tokens (inputs and shifted targets): (n, length + 1); the remainder is dropped."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    stream: list[int] = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        stream += ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)
        stream += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n = len(stream) // (length + 1)
    if n == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one row of {length + 1}")
    return torch.tensor(stream[:n * (length + 1)]).view(n, length + 1)
