"""Documents as one token stream, and that stream cut into fixed-length training rows."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def token_stream(tokenizer, texts: Iterable[str]) -> np.ndarray:
    """All documents as one stream, each wrapped in BOS ... EOS where the tokenizer has them;
    uint16 when the vocabulary fits, int32 otherwise."""
    start = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return np.concatenate([np.array(start + ids + end, dtype=dtype) for ids in encoded] or [np.zeros(0, dtype)])


def pack(tokenizer, texts: Iterable[str], length: int) -> torch.Tensor:
    """:func:`token_stream` cut into rows of ``length + 1`` tokens (inputs and shifted targets):
    (n, length + 1); the remainder is dropped."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    stream = token_stream(tokenizer, texts)
    n = len(stream) // (length + 1)
    if n == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one row of {length + 1}")
    return torch.from_numpy(stream[:n * (length + 1)].astype(np.int64)).view(n, length + 1)
