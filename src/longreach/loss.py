"""Next-token cross-entropy computed from hidden states in position chunks, so that the full
(batch, L, vocab) logits tensor never exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_losses(hidden: Tensor, head: nn.Module, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Per-token losses (b, L) of ``head(hidden)`` (hidden (b, L, d)) against ``targets`` (b, L).

    Each chunk's logits are made in float32 and freed before the next chunk; under autograd each
    chunk is recomputed in the backward pass (checkpointed), so memory stays O(chunk * vocab).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    pieces = []
    for start in range(0, hidden.shape[1], chunk):
        h, t = hidden[:, start:start + chunk], targets[:, start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_loss, h, t, head, use_reentrant=False))
        else:
            pieces.append(_chunk_loss(h, t, head))
    return torch.cat(pieces, dim=1)


def _chunk_loss(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
