"""Self-Extend (Jin et al., 2024, "LLM Maybe LongLM"): grouped positions beyond a neighbour window.

For query position p_q and key position p_k (p_q >= p_k):
- neighbour (p_q - p_k < window): the ordinary positions;
- grouped otherwise: key position p_k // G, query position p_q // G + window - window // G, so the
  two maps meet at distance ``window``.
One softmax over the merged logits. The usable length is (L - window) * G + window for pre-training
length L; the default window is L / 4 (LongLM's 1024 for L = 4096) and G = 8 (its signature default).
LongLM's README picks G per target length: ``group_size="auto"`` takes the smallest G whose usable
length covers the current keys, ceil((n - window) / (L - window)). While no query is ``window`` or
more past a key, every pair is a neighbour and dense attention runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..positions import Rope
from .core import Logits, Positions, Tile, blocked_attention, dot, require_rope, rotate_keys
from .dense import dense

AUTO = "auto"


def auto_group(length: int, train_length: int, window: int) -> int:
    """The smallest group size G with (L - window) * G + window >= ``length`` (at least 1)."""
    if window >= train_length:
        raise ValueError(f"self_extend: window ({window}) must be below train_length ({train_length})")
    return max(1, -(-(length - window) // (train_length - window)))


def _self_extend_logits(rope: Rope, scale: float, group: int, window: int) -> Logits:
    def logits(t: Tile) -> Tensor:
        near = dot(rope.rotate(t.q, t.q_pos), t.k[0], scale)
        far = dot(rope.rotate(t.q, t.q_pos // group + window - window // group), t.k[1], scale)
        return torch.where(t.q_pos[..., None] - t.k_pos[..., None, :] < window, near, far)

    return logits


def self_extend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    train_length: int = 4096,
    group_size: int | str = 8,
    window: int | None = None,
    block_size: int = 64,
) -> Tensor:
    """Self-Extend. q (b, h, Lq, d), k/v (b, h_kv, Lk, d) un-rotated -> (b, h, Lq, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    window = train_length // 4 if window is None else window
    rope = require_rope(rope, "self_extend")
    if int(positions.query.max() - positions.key.min()) < window:
        return dense(q, k, v, positions=positions, rope=rope, scale=scale)
    if group_size == AUTO:
        group_size = auto_group(int(positions.key.max()) + 1, train_length, window)
    if kernels.use_kernel(q, positions, block_size):
        grouped_q = positions.query // group_size + window - window // group_size
        return kernels.framed_attention(
            q, k, v, rope=rope, query_maps=[grouped_q, positions.query],
            key_maps=[positions.key // group_size, positions.key], rule=kernels.SELF_EXTEND, span=window,
            positions=positions, block_size=block_size, scale=scale)
    keys = (rotate_keys(rope, k, positions.key), rotate_keys(rope, k, positions.key // group_size))
    logits = _self_extend_logits(rope, scale, group_size, window)
    return blocked_attention(q, keys, v, positions, block_size=block_size, key_blocks=None, logits=logits)
