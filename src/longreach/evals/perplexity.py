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
from .prompts import encode
from .retrieval import Progress, check_token_ids


def segments(tokenizer, texts: Sequence[str], length: int, samples: int) -> torch.Tensor:
    """Up to ``samples`` disjoint segments of ``length`` tokens cut from the documents, round-robin: (n, length)."""
    docs = [encode(tokenizer, text) for text in texts]
    per_doc = [[doc[i:i + length] for i in range(0, len(doc) - length + 1, length)] for doc in docs]
    chosen = []
    for rank in range(max(map(len, per_doc), default=0)):
        chosen += [segs[rank] for segs in per_doc if rank < len(segs)]
    chosen = chosen[:samples]
    if not chosen:
        longest = max(map(len, docs), default=0)
        raise ValueError(f"no document holds {length} tokens (the longest holds {longest}): lower the lengths")
    return torch.tensor(chosen)


@torch.no_grad()
def sequence_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses (b, L - 1) of ``ids`` (b, L), never forming the full logits."""
    hidden = model.get_decoder()(input_ids=ids[:, :-1]).last_hidden_state
    return token_losses(hidden, model.get_output_embeddings(), ids[:, 1:])


def perplexity(model, tokenizer, lengths: Sequence[int], *, texts: Sequence[str], window: int = 256,
               samples: int = 8, bins: int = 64, progress: Progress | None = None) -> list[dict]:
    """Records ``{length, loss, perplexity, window, samples, position_loss}``; ``position_loss`` lists
    ``[position, mean loss]`` over ``bins`` equal spans of the length's positions."""
    if not lengths or any(int(n) != n or n < 2 for n in lengths):
        raise ValueError(f"lengths must be integers >= 2, got {list(lengths)}")
    if not 1 <= window < min(lengths):
        raise ValueError(f"window must be in [1, {min(lengths) - 1}] (below the shortest length), got {window}")
    if samples < 1 or bins < 1:
        raise ValueError(f"samples and bins must be >= 1, got {samples} and {bins}")
    data = segments(tokenizer, texts, max(lengths) + 1, samples)
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
