"""select_merge's block scores by a block's best row, in one pass: a drop-in for
:func:`longreach.attention.select_merge.block_scores` with ``score="max"`` (every key of a block) or
``score="representatives"`` (the block's part means).

The reference multiplies every query summary by every key (or part mean), an (nq x L) tensor, then
takes each block's maximum. Here a program holds (ROWS query summaries) x (a tile of keys) products on
the tensor cores and reduces each block's columns in registers, so only the (nq x n_blocks) scores are
written, and only for the blocks a query block may causally see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import HEAD_DIMS
from .tiles import batch_head, row_offsets

# A program scores ROWS summaries against STEPS tiles of KEYS key rows: many programs even when a
# chunk holds few query blocks (a 4M-token prompt's chunks hold about 30). float32 products are FMAs, not
# tensor-core MMAs, and a 64 x 128 float32 tile spills registers (H200, the pretraining shape 256 x 6 heads x
# 16 summaries: 5.08 ms a call at 64 rows, 0.27 at 16), so float32 keys take ROWS_FP32 rows.
ROWS, ROWS_FP32, KEYS, STEPS, WARPS, STAGES = 64, 16, 128, 16, 4, 3
# Scores one chunk of select_blocks' query blocks may hold when they go straight to the top-k kernel (float32,
# 1 GiB). The row programs of one key range run side by side and share its keys in L2 only if a chunk holds
# many row tiles: at 1M tokens (32 heads, 16,384 blocks) the core's 16M-element tile budget left 32 query blocks
# a chunk, so every chunk read all the keys before it from memory, and half of each row tile was empty.
SCORES_PER_CHUNK = 1 << 28


def chunk_rows(dtype: torch.dtype, selections: int, n_blocks: int, budget: int) -> int:
    """Query blocks per chunk of select_blocks on the kernel path: as many as ``budget`` scores of ``selections``
    (batch x heads) rows of ``n_blocks`` allow, a multiple of the kernel's row tile for keys of ``dtype``, at
    least one tile."""
    tile = ROWS_FP32 if dtype == torch.float32 else ROWS
    return max(1, budget // (selections * n_blocks * tile)) * tile


@triton.jit
def _block_max_kernel(Q, K, BIAS, OUT, sqb, sqh, sqn, skb, skh, skn, sbb, sbh, sob, soh, son, H, GROUP, NQ, NB, NK,
                      FIRST, scale, PART: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr,
                      STEPS: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Program (b * H + h, i, j): query summaries i * ROWS.. (query block FIRST + row) of head h against key
    # blocks j * STEPS * COLS.. of kv head h // GROUP; block c is key rows c * PART .. c * PART + PART - 1,
    # rows past NK absent; with HAS_BIAS each key row's BIAS is added to its products.
    _, b, h = batch_head(0, H)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    dh = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + row_offsets(rows, sqn) + dh[None, :], mask=(rows < NQ)[:, None], other=0.0)
    keys = K + b * skb + (h // GROUP) * skh
    bias = BIAS + b * sbb + (h // GROUP) * sbh
    out = OUT + b * sob + h * soh + row_offsets(rows, son)
    COLS: tl.constexpr = KEYS // PART
    seen = tl.minimum(NB, FIRST + tl.minimum(tl.program_id(1) * ROWS + ROWS, NQ))
    lo = tl.program_id(2) * STEPS * COLS
    hi = tl.minimum(lo + STEPS * COLS, NB)
    # The tiles some row may see, then the rest filled with -inf: a loop without a branch, so the key loads
    # are pipelined.
    computed = tl.minimum(hi, tl.maximum(seen, lo))
    for c0 in range(lo, computed, COLS):
        blocks = c0 + tl.arange(0, COLS)
        index = c0 * PART + tl.arange(0, KEYS)
        k = tl.load(keys + row_offsets(index, skn) + dh[None, :], mask=(index < NK)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale
        if HAS_BIAS:
            s += tl.load(bias + index.to(tl.int64), mask=index < NK, other=0.0)[None, :]
        s = tl.where((index < NK)[None, :], s, float("-inf"))
        best = tl.max(tl.reshape(s, (ROWS, COLS, PART)), axis=2)
        best = tl.where(blocks[None, :] <= FIRST + rows[:, None], best, float("-inf"))
        tl.store(out + blocks[None, :], best, mask=(rows < NQ)[:, None] & (blocks < NB)[None, :])
    unseen = tl.full((ROWS, COLS), float("-inf"), tl.float32)
    for c0 in range(lo + tl.cdiv(computed - lo, COLS) * COLS, hi, COLS):
        blocks = c0 + tl.arange(0, COLS)
        tl.store(out + blocks[None, :], unseen, mask=(rows < NQ)[:, None] & (blocks < NB)[None, :])


def operands(name: str, q_bar: Tensor, keys: Tensor, part: int, bias: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The best-key kernels' checked operands: q_bar (b, h, nq, d) in keys' dtype, keys (b, h_kv, n, d), bias
    (b, h_kv, n) float32 (a (1, 1, 1) placeholder without one) and whether there is one."""
    h, d, h_kv = q_bar.shape[1], q_bar.shape[3], keys.shape[1]
    if d not in HEAD_DIMS or h % h_kv or part & (part - 1) or not 1 <= part <= KEYS:
        raise ValueError(f"{name} kernel: head_dim must be in {HEAD_DIMS}, heads a multiple of kv heads "
                         f"and part a power of two in [1, {KEYS}], got d={d}, heads={h}, kv heads={h_kv}, "
                         f"part={part}")
    q_bar = q_bar.to(keys.dtype)
    q_bar = q_bar if q_bar.stride(-1) == 1 else q_bar.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    if bias is not None and bias.shape != keys.shape[:3]:
        raise ValueError(f"{name} kernel: bias must be (b, h_kv, n) = {tuple(keys.shape[:3])}, "
                         f"got {tuple(bias.shape)}")
    if bias is None:
        return q_bar, keys, keys.new_zeros(1, 1, 1, dtype=torch.float32), False
    return q_bar, keys, bias.float().contiguous(), True


def block_max_scores(q_bar: Tensor, keys: Tensor, n_blocks: int, part: int, scale: float, first: int = 0,
                     bias: Tensor | None = None) -> Tensor:
    """(b, h, nq, n_blocks) float32: for query summary i of q_bar (b, h, nq, d) and key block c, the
    largest q . k * ``scale`` (+ the row's ``bias`` (b, h_kv, n), if given) over the block's rows k of
    ``keys`` (b, h_kv, n, d), rows c * part ..
    c * part + part - 1 (rows from n on are absent; a block without rows scores -inf). Summary i belongs
    to query block ``first`` + i and sees blocks c <= first + i only: later blocks score -inf. Query head
    j reads kv head j // (h / h_kv). q_bar is cast to keys' dtype, so 16-bit keys use the tensor cores."""
    b, h, nq, d = q_bar.shape
    h_kv, n_keys = keys.shape[1], keys.shape[2]
    q_bar, keys, bias, has_bias = operands("block_max_scores", q_bar, keys, part, bias)
    out = torch.empty(b, h, nq, n_blocks, device=q_bar.device, dtype=torch.float32)
    rows = ROWS_FP32 if keys.dtype == torch.float32 else ROWS
    grid = (b * h, triton.cdiv(nq, rows), triton.cdiv(n_blocks * part, STEPS * KEYS))
    _block_max_kernel[grid](q_bar, keys, bias, out, *q_bar.stride()[:3], *keys.stride()[:3], *bias.stride()[:2],
                            *out.stride()[:3], h, h // h_kv, nq, n_blocks, n_keys, first, scale, PART=part,
                            ROWS=rows, KEYS=KEYS, STEPS=STEPS, D=d, HAS_BIAS=has_bias,
                            DOT="ieee" if keys.dtype == torch.float32 else "tf32", num_warps=WARPS,
                            num_stages=STAGES)
    return out
