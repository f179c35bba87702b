"""Shifted sparse attention: LongLoRA's S2 (Chen et al., 2023) and SinkLoRA's SF (Zhang, 2024).

S2: the sequence is cut into groups of G tokens and each query attends causally inside its group;
the second half of the heads (h >= H // 2) uses groups shifted by G / 2, so information flows
between neighbouring groups. longreach follows LongLoRA's flash-attention path: shifted groups
start at G/2 + nG with a first group [0, G/2), so nothing wraps around the sequence end.
SF (longreach's definition, the paper's indices could not be read): the shifted heads' groups are
cut at the unshifted group borders and reassembled into the unshifted layout, so a shifted head
never reaches across the start of the sequence, and every query also attends to the first
``sink`` tokens (global attention sinks). With sink = 0 SF equals S2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import kernels
from ..positions import Rope
from .core import Logits, Positions, Tile, blocked_attention, dot, rotate, rotated_keys


def group_size_for(k_len: int, group_size: int | None) -> int:
    """LongLoRA's default G = n / 4 (rounded up) unless a size is given."""
    return max(2, math.ceil(k_len / 4)) if group_size is None else group_size


def shifted_from(heads: int, global_heads: tuple[int, int] | None) -> int:
    """The first of ``heads`` local heads that shifts: H // 2, or where the global half starts when they are
    heads offset.. of ``global_heads`` = (offset, total) (a sequence-parallel rank's share)."""
    if global_heads is None:
        return heads // 2
    offset, total = global_heads
    if not 0 <= offset <= total - heads:
        raise ValueError(f"global_heads: {heads} heads from offset {offset} do not fit in {total} heads")
    return min(heads, max(0, total // 2 - offset))


def head_shifts(heads: int, group: int, shift: bool, device: torch.device | str, first_shifted: int | None = None
                ) -> Tensor:
    """(heads,) offset added to indices before grouping: G/2 for heads >= ``first_shifted`` (default
    H // 2) when shifting."""
    shifted = torch.arange(heads, device=device) >= (heads // 2 if first_shifted is None else first_shifted)
    return (shifted & shift).long() * (group // 2)


def _shifted_tables(batch: int, heads: int, q_len: int, k_len: int, block: int, group: int,
                    shifts: Tensor, sink: int) -> Tensor:
    first = k_len - q_len
    q_blocks = torch.arange(first // block, (k_len - 1) // block + 1, device=shifts.device)
    lead = q_blocks[None, :] * block + shifts[:, None]
    group_start = (lead // group * group - shifts[:, None]).clamp_min(0)
    n_sink = -(-sink // block)
    width = group // block + 2
    table = (group_start // block)[..., None] + torch.arange(width, device=shifts.device)
    table = torch.where((table <= q_blocks[None, :, None]) & (table >= n_sink), table, -1)
    if n_sink:
        sinks = torch.arange(n_sink, device=shifts.device).expand(heads, len(q_blocks), n_sink)
        sinks = torch.where(sinks <= q_blocks[None, :, None], sinks, -1)
        table = torch.cat([sinks, table], dim=-1)
    return table.expand(batch, heads, -1, -1)


def _group_logits(rope: Rope | None, scale: float, group: int, shifts: Tensor, sink: int) -> Logits:
    def logits(t: Tile) -> Tensor:
        s = shifts.view(1, -1, 1, 1, 1)
        same = (t.q_index[..., None] + s) // group == (t.k_index[..., None, :] + s) // group
        allowed = same | (t.k_index[..., None, :] < sink)
        scores = dot(rotate(rope, t.q, t.q_pos), t.k[0], scale)
        return scores.masked_fill(~allowed, float("-inf"))

    return logits


def _shifted(q: Tensor, k: Tensor, v: Tensor, positions: Positions, rope: Rope | None, scale: float | None,
             group_size: int | None, shift: bool, sink: int, block_size: int,
             global_heads: tuple[int, int] | None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    group = group_size_for(k_len, group_size)
    block = min(block_size, group)
    first_shifted = shifted_from(heads, global_heads)
    shifts = head_shifts(heads, group, shift, q.device, first_shifted)
    table = _shifted_tables(batch, heads, q_len, k_len, block, group, shifts, sink)
    if kernels.use_kernel(q, positions, block):
        rule = dict(sink=sink, group=group, shift=group // 2 if shift else 0, shift_from=first_shifted)
        return kernels.sparse_attention(q, k, v, table, positions=positions, rope=rope, block_size=block, scale=scale,
                                    **rule)
    logits = _group_logits(rope, scale, group, shifts, sink)
    keys = rotated_keys(rope, k, positions)
    return blocked_attention(q, keys, v, positions, block_size=block, key_blocks=table, logits=logits)


def s2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    group_size: int | None = None,
    shift: bool = True,
    block_size: int = 64,
    global_heads: tuple[int, int] | None = None,
) -> Tensor:
    """S2-Attn. Query index i and key index j of head h attend iff j <= i and
    (i + s_h) // G == (j + s_h) // G, s_h = G/2 for shifted heads (the second half of all heads;
    ``global_heads`` = (offset, total) places these heads among all, for a sequence-parallel rank).
    q (b, h, Lq, d) -> (b, h, Lq, d)."""
    return _shifted(q, k, v, positions, rope, scale, group_size, shift, 0, block_size, global_heads)


def sf(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    group_size: int | None = None,
    shift: bool = True,
    sink: int = 4,
    block_size: int = 64,
    global_heads: tuple[int, int] | None = None,
) -> Tensor:
    """SF-Attn: S2's groups in the reassembled layout, plus keys j < ``sink`` visible to every query
    (``global_heads`` as for :func:`s2`)."""
    return _shifted(q, k, v, positions, rope, scale, group_size, shift, sink, block_size, global_heads)
