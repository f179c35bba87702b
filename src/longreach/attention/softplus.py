"""Softplus attention with l1 normalisation and re-weighting, LSSA/LSSAR (Gao & Spratling, 2025).

From the paper: softmax = a positive map plus row-wise l1 normalisation, and the normalisation is
what matters; LSSA uses Softplus with a row-dependent scale that grows with the number of visible
tokens; LSSAR then sharpens the weights with a power function. The exact constants could not be
read; longreach uses, for row i with n_i visible keys and scores s_ij = q_i . k_j / sqrt(d):
    A_ij = softplus(lambda_i s_ij) / sum_j softplus(lambda_i s_ij),  lambda_i = log(n_i) / log(L)
    W_ij = A_ij^p / sum_j A_ij^p
with L = ``train_length`` (so lambda = 1 at the training length) and p = ``power`` (1 gives LSSA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..positions import Rope
from .core import Positions, Tile, blocked_attention, plain_logits, rotated_keys


def softplus_weights(scores: Tensor, valid: Tensor, train_length: int, power: float) -> Tensor:
    """LSSAR weights (..., n_rows, n_keys) from scores and the visibility mask; empty rows give zeros."""
    visible = valid.sum(dim=-1, keepdim=True).clamp_min(1)
    lam = torch.log(visible.to(scores.dtype)) / math.log(train_length)
    a = F.softplus(lam * scores).masked_fill(~valid, 0.0)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if power != 1:
        a = a.pow(power)
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a


def softplus(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    train_length: int = 4096,
    power: float = 2.0,
    block_size: int = 64,
) -> Tensor:
    """LSSAR attention over all causal keys. q (b, h, Lq, d), k/v (b, h_kv, Lk, d) -> (b, h, Lq, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def weights(t: Tile, scores: Tensor) -> Tensor:
        return softplus_weights(scores, t.valid, train_length, power)

    keys = rotated_keys(rope, k, positions)
    return blocked_attention(
        q, keys, v, positions, block_size=block_size, key_blocks=None, logits=plain_logits(rope, scale), weights=weights
    )
