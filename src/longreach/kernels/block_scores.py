"""select_merge's block scores in one pass: a drop-in for
:func:`longreach.attention.select_merge.block_scores` with ``score="representatives"`` (``"mean"`` is the
case of one part per block).

The reference multiplies every query summary by every part mean, an (nq x n_blocks x R) tensor, then
takes each block's maximum over its R parts. Here a program holds a (rows x blocks) tile and a running
maximum over the parts, so only the (nq x n_blocks) scores are written: R times fewer bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import HEAD_DIMS
from .tiles import batch_head

ROWS, COLS = 32, 64


@triton.jit
def _part_max_kernel(Q, P, OUT, sqb, sqh, sqn, spb, sph, spn, sob, soh, son, H, GROUP, NQ, NB, NP, R, scale,
                     ROWS: tl.constexpr, COLS: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr):
    # Program (b * H + h, i, j): query summaries i * ROWS.. of head h against the parts of key blocks
    # j * COLS.. of kv head h // GROUP; block c's part r is row c * R + r of the parts, rows past NP are absent.
    _, b, h = batch_head(0, H)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    blocks = tl.program_id(2) * COLS + tl.arange(0, COLS)
    dh = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqn + dh[None, :], mask=(rows < NQ)[:, None],
                other=0.0)
    parts = P + b * spb + (h // GROUP) * sph
    best = tl.full((ROWS, COLS), float("-inf"), tl.float32)
    for r in range(R):
        index = blocks * R + r
        present = (blocks < NB) & (index < NP)
        p = tl.load(parts + index.to(tl.int64)[:, None] * spn + dh[None, :], mask=present[:, None], other=0.0)
        s = tl.dot(q, tl.trans(p), input_precision=DOT) * scale
        best = tl.maximum(best, tl.where(present[None, :], s, float("-inf")))
    out = OUT + b * sob + h * soh + rows.to(tl.int64)[:, None] * son + blocks[None, :]
    tl.store(out, best, mask=(rows < NQ)[:, None] & (blocks < NB)[None, :])


def part_max_scores(q_bar: Tensor, parts: Tensor, n_blocks: int, representatives: int, scale: float) -> Tensor:
    """(b, h, nq, n_blocks) float32: for each query summary of q_bar (b, h, nq, d) and key block c, the
    largest q . p * scale over the block's parts p = ``parts`` (b, h_kv, n_parts, d) rows c * R .. c * R + R - 1
    (R = ``representatives``; rows from n_parts on are absent, a block with none scores -inf). Query head
    i reads kv head i // (h / h_kv)."""
    b, h, nq, d = q_bar.shape
    h_kv, n_parts = parts.shape[1], parts.shape[2]
    if d not in HEAD_DIMS or h % h_kv or q_bar.dtype != parts.dtype:
        raise ValueError(f"part_max_scores kernel: head_dim must be in {HEAD_DIMS}, heads a multiple of kv heads "
                         f"and both inputs of one dtype, got d={d}, heads={h}, kv heads={h_kv}, "
                         f"{q_bar.dtype} and {parts.dtype}")
    q_bar = q_bar if q_bar.stride(-1) == 1 else q_bar.contiguous()
    parts = parts if parts.stride(-1) == 1 else parts.contiguous()
    out = torch.empty(b, h, nq, n_blocks, device=q_bar.device, dtype=torch.float32)
    grid = (b * h, triton.cdiv(nq, ROWS), triton.cdiv(n_blocks, COLS))
    _part_max_kernel[grid](q_bar, parts, out, *q_bar.stride()[:3], *parts.stride()[:3], *out.stride()[:3], h,
                           h // h_kv, nq, n_blocks, n_parts, representatives, scale, ROWS=ROWS, COLS=COLS, D=d,
                           DOT="ieee" if q_bar.dtype == torch.float32 else "tf32")
    return out
