"""Dual chunk attention, DCA (An et al., 2024, "Training-Free Long-Context Scaling", ChunkLlama).

Positions are cut into chunks of ``chunk_len = chunk_size - local_window``; every key gets position
p_k mod chunk_len. The query's position depends on the key's chunk relative to its own:
- intra (same chunk): p_q mod chunk_len, exact relative distances;
- successive (previous chunk): min(p_q mod chunk_len + chunk_len, chunk_size), exact for the first
  ``local_window`` queries of a chunk and capped after;
- inter (earlier chunks): the constant chunk_size.
One softmax runs over all three parts (equal to ChunkLlama's log-sum-exp merge). Defaults follow
ChunkLlama's current code: chunk_size = 3L/4, local_window = L/8 for pre-training length L =
``train_length`` (the paper's code used L/16), and its temperature ``mscale``: beyond L, logits are
multiplied by (0.05 ln(n / L) + 1)^2 for n keys. On SmolLM2 (8K) at 32K these beat the paper's
(passkey 0.40 vs 0.15, needle 0.70 vs 0.50: ``benchmarks/results/smollm2/``).
No relative distance exceeds chunk_size < L, whatever the input length; while every position is
inside the first chunk all three maps are the ordinary positions, and dense attention runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import kernels
from ..positions import Rope
from .core import Logits, Positions, Tile, blocked_attention, dot, require_rope, rotate_keys
from .dense import dense


def chunk_sizes(train_length: int, chunk_size: int | None, local_window: int | None) -> tuple[int, int]:
    chunk_size = 3 * train_length // 4 if chunk_size is None else chunk_size
    local_window = train_length // 8 if local_window is None else local_window
    if not 0 <= local_window < chunk_size:
        raise ValueError(f"local_window must be in [0, chunk_size={chunk_size}), got {local_window}")
    return chunk_size, local_window


def _dca_logits(rope: Rope, scale: float, chunk_size: int, chunk_len: int) -> Logits:
    def logits(t: Tile) -> Tensor:
        q_chunk, q_in = t.q_pos // chunk_len, t.q_pos % chunk_len
        k_chunk = t.k_pos // chunk_len
        k = t.k[0]
        out = dot(rope.rotate(t.q, torch.full_like(q_in, chunk_size)), k, scale)
        # Columns two or more chunks before every row are inter-chunk only: skip the other two products.
        near = (k_chunk >= q_chunk.min() - 1).flatten(0, -2).any(0).nonzero()
        if near.numel():
            start = int(near.min())
            k_near = k[..., start:, :]
            intra = dot(rope.rotate(t.q, q_in), k_near, scale)
            successive = dot(rope.rotate(t.q, (q_in + chunk_len).clamp_max(chunk_size)), k_near, scale)
            gap = q_chunk[..., None] - k_chunk[..., None, start:]
            out[..., start:] = torch.where(gap == 0, intra, torch.where(gap == 1, successive, out[..., start:]))
        return out

    return logits


def dca(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    train_length: int = 4096,
    chunk_size: int | None = None,
    local_window: int | None = None,
    mscale: bool = True,
    block_size: int = 64,
) -> Tensor:
    """Dual chunk attention. q (b, h, Lq, d), k/v (b, h_kv, Lk, d) un-rotated -> (b, h, Lq, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk_size, local_window = chunk_sizes(train_length, chunk_size, local_window)
    rope = require_rope(rope, "dca")
    chunk_len = chunk_size - local_window
    last = int(positions.key.max())
    if mscale and last + 1 > train_length:
        scale *= (0.05 * math.log((last + 1) / train_length) + 1) ** 2
    if last < chunk_len and int(positions.key.min()) >= 0:
        return dense(q, k, v, positions=positions, rope=rope, scale=scale)
    if kernels.use_kernel(q, positions, block_size):
        q_in = positions.query % chunk_len
        maps = [torch.full_like(q_in, chunk_size), (q_in + chunk_len).clamp_max(chunk_size), q_in]
        return kernels.framed_attention(q, k, v, rope=rope, query_maps=maps, key_maps=[positions.key % chunk_len],
                                        rule=kernels.DCA, span=chunk_len, positions=positions,
                                        block_size=block_size, scale=scale)
    keys = (rotate_keys(rope, k, positions.key % chunk_len),)
    logits = _dca_logits(rope, scale, chunk_size, chunk_len)
    return blocked_attention(q, keys, v, positions, block_size=block_size, key_blocks=None, logits=logits)
