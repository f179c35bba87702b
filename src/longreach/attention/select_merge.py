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

    q (b, h, Lq, d) un-rotated, k (b, h_kv, Lk, d) un-rotated. K = top_k + local + sink + 1.
    """
    group = check_shapes(q, k, k)
    b, h, q_len, d = q.shape
    k_len = k.shape[2]
    first = k_len - q_len
    q_means = block_means(q, block_size, first).view(b, k.shape[1], group, -1, d).mean(2)
    k_means = block_means(k, block_size)
    n_q, n_k = q_means.shape[2], k_means.shape[2]
    q_block = torch.arange(first // block_size, first // block_size + n_q, device=q.device)[:, None]
    key_block = torch.arange(n_k, device=q.device)[None, :]
    forced = (key_block < sink) | ((key_block <= q_block) & (key_block >= q_block - local))
    candidate = (key_block <= q_block) & ~forced
    scores = (q_means @ k_means.transpose(-1, -2)) / d**0.5
    scores = scores.masked_fill(~candidate, float("-inf"))
    picked = torch.zeros_like(candidate).expand_as(scores).clone()
    if top_k > 0 and n_k > 0:
        best = scores.topk(min(top_k, n_k), dim=-1)
        picked.scatter_(-1, best.indices, torch.isfinite(best.values))
    keep = (picked | (forced & (key_block <= q_block))).repeat_interleave(group, dim=1)
    width = min(top_k + local + sink + 1, n_k)
    # Sort kept block ids ascending; unkept slots sort last and become -1.
    order = torch.where(keep, key_block, n_k).sort(dim=-1).values[..., :width]
    return torch.where(order < n_k, order, -1)


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
        keys, logits = (k,), _selected_logits(require_rope(rope, "select_merge"), scale)
    else:
        keys, logits = rotated_keys(rope, k, positions), plain_logits(rope, scale)
    return blocked_attention(q, keys, v, positions, block_size=block_size, key_blocks=blocks, logits=logits)
