"""Attention sinks plus a sliding window (Xiao et al., 2024, StreamingLLM).

Query index i attends to the first ``sink`` keys and to keys j with i - j < ``window``. Positions
are re-indexed as in a rolling cache of sink + window slots: window keys keep their true
distance, and a sink key (at its own position p_j) is seen from query position
min(p_i, sink + window - 1), as if the evicted middle were not there. With window >= length this
is dense attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..positions import Rope
from .core import Logits, Positions, Tile, blocked_attention, dot, rotate, rotated_keys


def sink_window_tables(batch: int, heads: int, q_len: int, k_len: int, block: int, sink: int,
                       window: int, device: torch.device | str) -> Tensor:
    """(b, h, nq, K) key blocks: the sink blocks and the blocks the window of each query block touches."""
    first = k_len - q_len
    q_blocks = torch.arange(first // block, (k_len - 1) // block + 1, device=device)
    n_sink = -(-sink // block)
    start = (q_blocks * block - window + 1).clamp_min(0) // block
    width = -(-window // block) + 1
    table = start[:, None] + torch.arange(width, device=device)
    table = torch.where((table <= q_blocks[:, None]) & (table >= n_sink), table, -1)
    sinks = torch.arange(n_sink, device=device).expand(len(q_blocks), n_sink)
    sinks = torch.where(sinks <= q_blocks[:, None], sinks, -1)
    return torch.cat([sinks, table], dim=-1).expand(batch, heads, -1, -1)


def _sink_logits(rope: Rope | None, scale: float, sink: int, window: int) -> Logits:
    def logits(t: Tile) -> Tensor:
        recent = dot(rotate(rope, t.q, t.q_pos), t.k[0], scale)
        in_window = t.q_index[..., None] - t.k_index[..., None, :] < window
        scores = recent
        if rope is not None:
            far = dot(rope.rotate(t.q, t.q_pos.clamp_max(sink + window - 1)), t.k[0], scale)
            scores = torch.where(in_window, recent, far)
        return scores.masked_fill(~(in_window | (t.k_index[..., None, :] < sink)), float("-inf"))

    return logits


def sinks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    sink: int = 4,
    window: int = 1024,
    block_size: int = 64,
) -> Tensor:
    """Sinks + sliding window. q (b, h, Lq, d), k/v (b, h_kv, Lk, d) -> (b, h, Lq, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads, q_len, _ = q.shape
    table = sink_window_tables(batch, heads, q_len, k.shape[2], block_size, sink, window, q.device)
    if kernels.use_kernel(q, positions, block_size):
        if rope is None:
            return kernels.sparse_attention(q, k, v, table, positions=positions, rope=None, block_size=block_size,
                                            scale=scale, sink=sink, window=window)
        capped = positions.query.clamp_max(sink + window - 1)
        return kernels.framed_attention(q, k, v, rope=rope, query_maps=[positions.query, capped],
                                        key_maps=[positions.key], rule=kernels.SINKS, span=window,
                                        positions=positions, block_size=block_size, scale=scale, table=table,
                                        sink=sink, window=window)
    logits = _sink_logits(rope, scale, sink, window)
    keys = rotated_keys(rope, k, positions)
    return blocked_attention(q, keys, v, positions, block_size=block_size, key_blocks=table, logits=logits)
