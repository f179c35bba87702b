"""select_merge's chosen key blocks per query block, in one pass: a drop-in for masking the
non-candidate blocks, :func:`longreach.attention.select_merge.top_indices` and dropping the picks left
without a finite score.

On the H200 at 64K tokens those steps took half of the selection's time (torch.topk is a radix
select of several launches, run twice by top_indices to break ties the same way for any shape, then
masks, a cumulative sum and gathers over the (rows x blocks) scores). Here a program walks ROWS rows of
scores a tile of blocks at a time, masks the blocks a row may not pick, and merges the tile into the
best TAKE kept so far, one pick at a time: the larger of the tile's and the kept maximum, the lowest
block holding it, which is then struck out. The scores are read once, and rows of any width (a
4M-token prompt has 65,536 blocks) take the same path.

With INSERT, a tile enters instead by insertion: only the tile's scores above a row's worst kept can enter, so a
tile takes as many steps as its rows' most such scores (at most TAKE), each putting a row's best remaining score
in place of its worst kept. Deep in a long row few scores beat the kept ones, so far fewer steps than TAKE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import best_first, keep_better

MAX_TAKE = 128
ELEMENTS = 4096  # scores a program holds at a time
MAX_TILE = 256  # blocks of a row per tile: short enough that a causal row's masked tail is skipped
# 1: merge each tile by insertion (above). H200, 32 heads (benchmarks/results/selection_prefilter_h200): the whole
# selection as fast as by the merge at 64K (1.27 against 1.29 ms in one run, 1.38 against 1.36 in another), 241
# against 259 ms at 1M, and with prefilter=16 (take 16) 2.11 against 2.40 ms at 64K and 87 against 191 at 1M.
INSERT = 1


@triton.jit
def _top_blocks_kernel(S, OUT, R, N, NQ, FIRST, SINK, LOCAL, TAKE: tl.constexpr, SLOTS: tl.constexpr,
                       TILE: tl.constexpr, ROWS: tl.constexpr, INSERT: tl.constexpr):
    # Program i: rows i * ROWS.. of S (R, N); row r is query block FIRST + r % NQ, whose candidates are the
    # blocks SINK <= c < FIRST + r % NQ - LOCAL. Walks the row TILE blocks at a time, keeping the best TAKE
    # so far (best first; N where no finite score is left) and merging each tile into them.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    last = FIRST + rows % NQ - LOCAL
    slot = tl.arange(0, SLOTS)
    if INSERT:  # slots from TAKE on hold +inf, so they are never the worst
        top_v = tl.where(slot < TAKE, float("-inf"), float("inf"))[None, :] + tl.zeros((ROWS, SLOTS), tl.float32)
    else:
        top_v = tl.full((ROWS, SLOTS), float("-inf"), tl.float32)
    top_i = tl.full((ROWS, SLOTS), N, tl.int32)
    # Past the program's last candidate every score is masked: those tiles are not read.
    for c0 in range(0, tl.minimum(N, tl.max(last, axis=0)), TILE):
        cols = c0 + tl.arange(0, TILE)
        present = (rows < R)[:, None] & (cols < N)[None, :]
        candidate = present & (cols[None, :] >= SINK) & (cols[None, :] < last[:, None])
        x = tl.load(S + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=present, other=float("-inf"))
        x = tl.where(candidate, x, float("-inf"))
        if INSERT:
            top_v, top_i = _insert(top_v, top_i, x, cols, N, TAKE, SLOTS)
        else:
            top_v, top_i = _merge(top_v, top_i, x, cols, N, TAKE, SLOTS)
    if INSERT:
        found = best_first(top_v, top_i, N, TAKE, SLOTS)
    else:
        found = tl.where(top_v > float("-inf"), top_i, N).to(tl.int64)
    tl.store(OUT + rows.to(tl.int64)[:, None] * TAKE + slot[None, :], found,
             mask=(rows < R)[:, None] & (slot < TAKE)[None, :])


@triton.jit
def _merge(top_v, top_i, x, cols, N, TAKE: tl.constexpr, SLOTS: tl.constexpr):
    # The best TAKE of the kept (best first) and the tile x (ROWS, TILE), best first, one pick at a time.
    slot = tl.arange(0, SLOTS)
    kept = top_v
    new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(top_i.shape, N, tl.int32)
    for t in tl.static_range(TAKE):
        best_x = tl.max(x, axis=1)
        best_k = tl.max(kept, axis=1)
        at_x = tl.min(tl.where(x == best_x[:, None], cols[None, :], N), axis=1)
        at_k = tl.min(tl.where(kept == best_k[:, None], top_i, N), axis=1)
        older = best_k >= best_x  # a tie goes to the kept block: earlier tiles hold lower blocks
        new_v = tl.where(slot[None, :] == t, tl.where(older, best_k, best_x)[:, None], new_v)
        new_i = tl.where(slot[None, :] == t, tl.where(older, at_k, at_x)[:, None], new_i)
        kept = tl.where(older[:, None] & (top_i == at_k[:, None]), float("-inf"), kept)
        x = tl.where(~older[:, None] & (cols[None, :] == at_x[:, None]), float("-inf"), x)
    return new_v, new_i


@triton.jit
def _insert(top_v, top_i, x, cols, N, TAKE: tl.constexpr, SLOTS: tl.constexpr):
    # The tile x (ROWS, TILE) inserted into the kept slots (unordered), its best scores first (ties to the lower
    # block, so every kept block of equal value is lower, as keep_better wants).
    above = tl.sum((x > tl.min(top_v, axis=1)[:, None]).to(tl.int32), axis=1)
    for _ in range(tl.minimum(tl.max(above, axis=0), TAKE)):
        best_x = tl.max(x, axis=1)
        at_x = tl.min(tl.where(x == best_x[:, None], cols[None, :], N), axis=1)
        top_v, top_i = keep_better(top_v, top_i, best_x, at_x, SLOTS)
        x = tl.where(cols[None, :] == at_x[:, None], float("-inf"), x)
    return top_v, top_i


def top_blocks(scores: Tensor, take: int, first: int, sink: int, local: int) -> Tensor:
    """Indices (..., nq, take) int64 of the ``take`` best candidate key blocks of each row of ``scores``
    (..., nq, n) float32, best first, ties to the lower block; row i is query block ``first`` + i, whose
    candidates are the blocks c with ``sink`` <= c < ``first`` + i - ``local``; a pick with no finite
    candidate score left is n."""
    *_, nq, n = scores.shape
    if scores.dtype != torch.float32 or not 1 <= n < 2**31 or not 1 <= take <= min(n, MAX_TAKE):
        raise ValueError(f"top_blocks kernel: float32 scores of at least one block and take in 1..min(blocks, "
                         f"{MAX_TAKE}), got {scores.dtype}, {n} blocks, take {take}")
    scores = scores.contiguous()
    out = torch.empty(*scores.shape[:-1], take, device=scores.device, dtype=torch.int64)
    tile = min(triton.next_power_of_2(n), MAX_TILE, ELEMENTS)
    rows = ELEMENTS // tile
    count = scores.numel() // n
    _top_blocks_kernel[(triton.cdiv(count, rows),)](scores, out, count, n, nq, first, sink, local, TAKE=take,
                                                     SLOTS=triton.next_power_of_2(take), TILE=tile, ROWS=rows,
                                                     INSERT=INSERT, num_warps=4)
    return out
