"""Correlation-aware select-and-merge attention (Wang, Li, Bai, Li, 2024, arXiv 2410.04211).

From the paper: queries and keys are cut into regions, region-to-region correlation picks a few
key regions per query region (selection), the picked regions are attended together (merge), and
for pre-training/extrapolation rotary positions go on the selected tokens only.
longreach's definition of the parts the paper's text did not settle (each an option):
- blocks of ``block_size`` B = 64 tokens, the last one ragged;
- correlation of query block i and key block j is qbar_i . kbar_j / sqrt(d), the means of the
  un-rotated vectors, averaged over the query heads of a kv group (so a group shares its
  selection), causal (j <= i);
- each query block keeps its ``top_k`` best key blocks plus its own block, the ``local`` blocks
  before it and the first ``sink`` blocks;
- merge: the kept blocks, in original order, form one sequence attended with one softmax
  (causal inside the diagonal block): O(L (top_k + local + sink + 1) B) work, O(L) memory;
- ``positions="selected"``: merged keys get rotary positions 0..m-1 in merged order and each
  query the position of its own key, so no relative distance exceeds the merged length;
  ``positions="absolute"`` keeps the model's own positions.
In decoding the query-block mean is over the query rows present in the call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..positions import Rope
from .core import (
    Logits,
    Positions,
    Tile,
    blocked_attention,
    check_shapes,
    dot,
    plain_logits,
    require_rope,
    rotated_keys,
    tile_budget,
)


def block_means(x: Tensor, block: int, first: int = 0) -> Tensor:
    """Mean of x (b, h, L, d) over blocks of the index grid; row t has index first + t.

    Returns (b, h, n_blocks, d) for the blocks from first // block to the last; partial blocks
    average the rows they hold.
    """
    b, h, length, d = x.shape
    lead, tail = first % block, -(first + length) % block
    acc = torch.promote_types(x.dtype, torch.float32)
    padded = x if not (lead or tail) else torch.cat([x.new_zeros(b, h, lead, d), x, x.new_zeros(b, h, tail, d)], 2)
    sums = padded.view(b, h, -1, block, d).sum(3, dtype=acc)
    counts = torch.zeros(lead + length + tail, device=x.device, dtype=acc)
    counts[lead : lead + length] = 1
    return sums / counts.view(-1, block).sum(1).clamp_min(1)[:, None]


def select_blocks(q: Tensor, k: Tensor, *, block_size: int, top_k: int, local: int, sink: int) -> Tensor:
    """Key-block table (b, h, nq, K) of select-and-merge, -1 padded, ascending, shared per kv group.

    q (b, h, Lq, d) un-rotated, k (b, h_kv, Lk, d) un-rotated. K = sink + top_k + local + 1. The
    correlation scores are formed for a bounded number of query blocks at a time, so memory stays
    O(L) plus one (chunk x L/B) score tile of at most the core's tile budget.
    """
    group = check_shapes(q, k, k)
    b, h, q_len, d = q.shape
    first = k.shape[2] - q_len
    q_means = block_means(q, block_size, first).view(b, k.shape[1], group, -1, d).mean(2)
    k_means = block_means(k, block_size)
    n_q, n_k = q_means.shape[2], k_means.shape[2]
    device = q.device
    q_block = torch.arange(first // block_size, first // block_size + n_q, device=device)[:, None]
    sinks = torch.arange(sink, device=device).expand(n_q, sink)
    sinks = torch.where(sinks <= q_block, sinks, n_k)
    near = q_block - torch.arange(local, -1, -1, device=device)
    near = torch.where((near >= sink) & (near >= 0), near, n_k)
    picked = torch.full((b, k.shape[1], n_q, top_k), n_k, dtype=torch.long, device=device)
    take = min(top_k, n_k)
    rows = max(1, tile_budget(q.device) // max(1, b * k.shape[1] * n_k))
    key_block = torch.arange(n_k, device=device)
    for lo in range(0, n_q if take else 0, rows):
        qb = q_block[lo : lo + rows]
        candidate = (key_block >= sink) & (key_block < qb - local)
        scores = (q_means[:, :, lo : lo + rows] @ k_means.transpose(-1, -2)) / d**0.5
        best = scores.masked_fill(~candidate, float("-inf")).topk(take, dim=-1)
        picked[:, :, lo : lo + rows, :take] = torch.where(torch.isfinite(best.values), best.indices, n_k)
    forced = torch.cat([sinks, near], dim=-1).expand(b, k.shape[1], n_q, -1)
    table = torch.cat([forced, picked], dim=-1).sort(dim=-1).values
    table = torch.where(table < n_k, table, -1)
    return table.repeat_interleave(group, dim=1)


def _selected_logits(rope: Rope, scale: float) -> Logits:
    def logits(t: Tile) -> Tensor:
        # Merged position of each column: how many real columns precede it in merged order.
        present = (t.k_index >= 0).long()
        k_pos = present.cumsum(-1) - 1
        own = (t.k_index[..., None, :] == t.q_index[..., None]).long()
        q_pos = (own * k_pos[..., None, :]).sum(-1)
        return dot(rope.rotate(t.q, q_pos), rope.rotate(t.k[0], k_pos), scale)

    return logits


def select_merge(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    block_size: int = 64,
    top_k: int = 8,
    local: int = 2,
    sink: int = 1,
    position_mode: str = "selected",
) -> Tensor:
    """Select-and-merge attention. q (b, h, Lq, d), k/v (b, h_kv, Lk, d) -> (b, h, Lq, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    blocks = select_blocks(q, k, block_size=block_size, top_k=top_k, local=local, sink=sink)
    if position_mode == "selected":
        rope = require_rope(rope, "select_merge")
    if kernels.use_kernel(q, positions, block_size):
        return kernels.sparse_attention(q, k, v, blocks, positions=positions, rope=rope, block_size=block_size,
                                    scale=scale, merged_positions=position_mode == "selected")
    if position_mode == "selected":
        keys, logits = (k,), _selected_logits(rope, scale)
    else:
        keys, logits = rotated_keys(rope, k, positions), plain_logits(rope, scale)
    return blocked_attention(q, keys, v, positions, block_size=block_size, key_blocks=blocks, logits=logits)
