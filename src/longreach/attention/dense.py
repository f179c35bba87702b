"""Dense softmax attention: softmax(q k^T / sqrt(d)) v over all visible keys (Vaswani et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from ..positions import Rope
from .core import Positions, check_shapes, rotate


def causal_mask(q_len: int, k_len: int, device: torch.device | str = "cpu") -> Tensor:
    """(Lq, Lk) bool: query i (key index Lk - Lq + i) sees keys with index <= its own."""
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= rows


def dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Dense attention with rotary positions applied here. Shapes: q (b, h, Lq, d), k/v (b, h_kv, Lk, d).

    ``sliding_window`` w keeps keys with index > query index - w (Mistral's window).
    Returns (b, h, Lq, d).
    """
    group = check_shapes(q, k, v)
    q_len, k_len = q.shape[2], k.shape[2]
    q = rotate(rope, q, positions.query[:, None])
    k = rotate(rope, k, positions.key[:, None])
    if causal and sliding_window is None and positions.key_mask is None:
        # No mask tensor: an (Lq, Lk) one would take Lq * Lk bytes (16 GiB at 128K) for what is_causal says, or
        # for queries after a cache, the lower-right causal bias; one query after a cache sees every key.
        mask = causal_lower_right(q_len, k_len) if 1 < q_len < k_len else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=q_len == k_len, scale=scale,
                                              enable_gqa=group > 1)
    mask = None
    if causal:
        mask = causal_mask(q_len, k_len, q.device)
        if sliding_window is not None and sliding_window < k_len:
            rows = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
            mask = mask & (torch.arange(k_len, device=q.device)[None, :] > rows - sliding_window)
    if positions.key_mask is not None:
        keys = positions.key_mask[:, None, None, :].to(torch.bool)
        mask = keys if mask is None else mask & keys
        # A padding query sees no key; let it see all so that SDPA stays finite (its output is unused).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
