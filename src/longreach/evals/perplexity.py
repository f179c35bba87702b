"""Perplexity of long held-out documents at several context lengths.

For a fair comparison every context length predicts the same targets: each sample is a segment of
``max(lengths)`` tokens, a length c reads its last c tokens, and the score is the loss of the last
``window`` tokens. Per-position losses of every length are kept (binned) for the loss-per-position plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..loss import token_losses
from .prompts import DOCUMENT_SEPARATOR, encode, encode_documents
from .retrieval import Progress, check_token_ids


def segments(tokenizer, texts: Sequence[str], length: int, samples: int) -> torch.Tensor:
    """Up to ``samples`` disjoint segments of ``length`` tokens, evenly spaced along the documents joined in
    their order (so a length may exceed any one document): (n, length)."""
    separator = encode(tokenizer, DOCUMENT_SEPARATOR)
    stream = [token for doc in encode_documents(tokenizer, tuple(texts)) for token in (*doc, *separator)]
    count = min(samples, len(stream) // length)
    if count == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one segment of {length}: "
                         "lower the lengths or pass more text")
    stride = len(stream) // count
    return torch.tensor([stream[i * stride:i * stride + length] for i in range(count)])


@torch.no_grad()
def sequence_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses (b, L - 1) of ``ids`` (b, L), never forming the full logits."""
    hidden = model.get_decoder()(input_ids=ids[:, :-1]).last_hidden_state
    return token_losses(hidden, model.get_output_embeddings(), ids[:, 1:])


def perplexity(model, tokenizer, lengths: Sequence[int], *, texts: Sequence[str], window: int = 256,
               samples: int = 8, bins: int = 64, progress: Progress | None = None,
               segment_length: int | None = None) -> list[dict]:
    """Records ``{length, loss, perplexity, window, samples, position_loss}``; ``position_loss`` lists
    ``[position, mean loss]`` over ``bins`` equal spans of the length's positions. ``segment_length``
    (at least the longest length) cuts the segments longer than ``lengths`` need, so that calls for one
    length at a time score the same targets as one call for all of them."""
    if not lengths or any(int(n) != n or n < 2 for n in lengths):
        raise ValueError(f"lengths must be integers >= 2, got {list(lengths)}")
    if not 1 <= window < min(lengths):
        raise ValueError(f"window must be in [1, {min(lengths) - 1}] (below the shortest length), got {window}")
    if samples < 1 or bins < 1:
        raise ValueError(f"samples and bins must be >= 1, got {samples} and {bins}")
    if segment_length is not None and segment_length < max(lengths):
        raise ValueError(f"segment_length must be at least the longest length {max(lengths)}, got {segment_length}")
    data = segments(tokenizer, texts, (segment_length or max(lengths)) + 1, samples)
    check_token_ids(model, int(data.max()))
    device = next(model.parameters()).device
    records = []
    for length in lengths:
        losses = torch.cat([sequence_losses(model, row[None, -(length + 1):].to(device)).float().cpu()
                            for row in data])
        if progress is not None:
            progress(1)
        loss = losses[:, -window:].mean().item()
        per_position = losses.mean(0)
        edges = torch.linspace(0, length, min(bins, length) + 1).long()
        binned = [[int(lo), per_position[lo:hi].mean().item()]
                  for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
        records.append({"length": length, "loss": loss, "perplexity": math.exp(loss), "window": window,
                        "samples": len(data), "position_loss": binned})
    return records
