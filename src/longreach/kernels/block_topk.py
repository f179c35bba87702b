"""select_merge's chosen key blocks per query block, in one pass: a drop-in for masking the
non-candidate blocks, :func:`longreach.attention.select_merge.top_indices` and dropping the picks left
without a finite score.

On the H200 at 64K tokens those steps took half of the selection's time (torch.topk is a radix
select of several launches, run twice by top_indices to break ties the same way for any shape, then
masks, a cumulative sum and gathers over the (rows x blocks) scores). Here a program holds ROWS rows of
scores, masks the blocks a row may not pick, and takes its best TAKE one at a time: the maximum, then
the lowest block holding it, which is then struck out. The scores are read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCKS = 16384  # a row of a 1M-token prompt at block 64; longer rows keep the reference
MAX_TAKE = 128
ELEMENTS = 4096  # scores a program holds


@triton.jit
def _top_blocks_kernel(S, OUT, R, N, NQ, FIRST, SINK, LOCAL, TAKE: tl.constexpr, BLOCK_N: tl.constexpr,
                       ROWS: tl.constexpr):
    # Program i: rows i * ROWS.. of S (R, N); row r is query block FIRST + r % NQ, whose candidates are the
    # blocks SINK <= c < FIRST + r % NQ - LOCAL. Writes the TAKE best (N where no finite score is left).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    present = (rows < R)[:, None] & (cols < N)[None, :]
    last = FIRST + rows % NQ - LOCAL
    candidate = present & (cols[None, :] >= SINK) & (cols[None, :] < last[:, None])
    x = tl.load(S + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=present, other=float("-inf"))
    x = tl.where(candidate, x, float("-inf"))
    out = OUT + rows.to(tl.int64) * TAKE
    for t in tl.static_range(TAKE):
        best = tl.max(x, axis=1)
        at = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_N), axis=1)
        tl.store(out + t, tl.where(best > float("-inf"), at, N).to(tl.int64), mask=rows < R)
        x = tl.where(cols[None, :] == at[:, None], float("-inf"), x)


def top_blocks(scores: Tensor, take: int, first: int, sink: int, local: int) -> Tensor:
    """Indices (..., nq, take) int64 of the ``take`` best candidate key blocks of each row of ``scores``
    (..., nq, n) float32, best first, ties to the lower block; row i is query block ``first`` + i, whose
    candidates are the blocks c with ``sink`` <= c < ``first`` + i - ``local``; a pick with no finite
    candidate score left is n."""
    *_, nq, n = scores.shape
    if scores.dtype != torch.float32 or not 1 <= n <= MAX_BLOCKS or not 1 <= take <= min(n, MAX_TAKE):
        raise ValueError(f"top_blocks kernel: float32 scores of 1..{MAX_BLOCKS} blocks and take in 1..min(blocks, "
                         f"{MAX_TAKE}), got {scores.dtype}, {n} blocks, take {take}")
    scores = scores.contiguous()
    out = torch.empty(*scores.shape[:-1], take, device=scores.device, dtype=torch.int64)
    block_n = triton.next_power_of_2(n)
    rows = max(1, ELEMENTS // block_n)
    count = scores.numel() // n
    _top_blocks_kernel[(triton.cdiv(count, rows),)](scores, out, count, n, nq, first, sink, local, TAKE=take,
                                                     BLOCK_N=block_n, ROWS=rows,
                                                     num_warps=min(16, max(4, rows * block_n // 1024)))
    return out
