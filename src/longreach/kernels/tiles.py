"""Triton helpers shared by the kernels: rows of a (L, d) slab as their two rotary halves, the turn,
and a kv group's decode scores."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotate(x1, x2, cos, sin, INVERSE: tl.constexpr):
    # Half-split rotary: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); the inverse turns by -theta.
    if INVERSE:
        return x1 * cos + x2 * sin, x2 * cos - x1 * sin
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def batch_head(AXIS: tl.constexpr, H):
    # Program id on AXIS as b * H + h: (bh, b, h) in int64, so that head offsets past 2**31 elements
    # (a 4M-token q of 9 heads of 64) do not wrap.
    bh = tl.program_id(AXIS).to(tl.int64)
    return bh, bh // H, bh % H


@triton.jit
def row_offsets(rows, stride):
    # (n, 1) int64 offsets of rows ``rows``: 4M rows of a (b, L, h, d) layout's stride pass 2**31.
    return rows.to(tl.int64)[:, None] * stride


@triton.jit
def load_halves(base, rows, ok, stride, HALF: tl.constexpr):
    # Rows ``rows`` of a (L, 2 * HALF) slab as its two rotary halves; rows where ``ok`` fails read 0.
    dh = tl.arange(0, HALF)
    ptr = base + row_offsets(rows, stride) + dh[None, :]
    return tl.load(ptr, mask=ok[:, None], other=0.0), tl.load(ptr + HALF, mask=ok[:, None], other=0.0)


@triton.jit
def store_halves(base, rows, ok, stride, y1, y2, HALF: tl.constexpr):
    ptr = base + row_offsets(rows, stride) + tl.arange(0, HALF)[None, :]
    tl.store(ptr, y1.to(base.dtype.element_ty), mask=ok[:, None])
    tl.store(ptr + HALF, y2.to(base.dtype.element_ty), mask=ok[:, None])



@triton.jit
def kv_program(H_KV, BLOCK: tl.constexpr):
    # A decode kernel's program (b * h_kv + hk, j): bhk, b, hk, j and the j-th block's positions.
    bhk, b, hk = batch_head(0, H_KV)
    j = tl.program_id(1)
    return bhk, b, hk, j, j * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def group_scores(Q, kv, bhk, slots, ok, stride, scale, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                 DOT: tl.constexpr):
    # Decode scores (ROWS, n) of kv-head program bhk's G query rows of Q (b * h, D) (rows from G on
    # are padding) against rows ``slots`` of the (L, D) slab at ``kv``, -inf where ``ok`` fails; with
    # each row's max and exp(s - max), a split softmax's part. Also returns head ids, real rows.
    dh = tl.arange(0, D)
    k = tl.load(kv + row_offsets(slots, stride) + dh[None, :], mask=ok[:, None], other=0.0)
    g = tl.arange(0, ROWS)
    head = bhk * G + g
    q = tl.load(Q + head[:, None] * D + dh[None, :], mask=g[:, None] < G, other=0.0)
    s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT) * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.math.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
    return s, m, p, head, g < G


@triton.jit
def keep_better(top_v, top_i, x, at, SLOTS: tl.constexpr):
    # Each row's kept (value, block) slots (ROWS, SLOTS) with (x, at) (ROWS,) in place of the row's worst kept,
    # where x beats it. The worst is the lowest value, among equals the highest block, then the highest slot;
    # a tie loses, since the caller offers blocks after every kept one of equal value. Slots that must never
    # change hold +inf.
    slot = tl.arange(0, SLOTS)
    worst = tl.min(top_v, axis=1)
    rank = top_i * SLOTS + slot[None, :]
    evict = tl.max(tl.where(top_v == worst[:, None], rank, -1), axis=1)
    enter = (x > worst)[:, None] & (rank == evict[:, None])
    return tl.where(enter, x[:, None], top_v), tl.where(enter, at[:, None], top_i)


@triton.jit
def best_first(top_v, top_i, NB, TAKE: tl.constexpr, SLOTS: tl.constexpr):
    # The kept blocks (ROWS, SLOTS) int64 ordered best first, ties to the lower block; NB in the slots from TAKE
    # on and where a kept value is -inf (never filled).
    slot = tl.arange(0, SLOTS)
    top_v = tl.where(slot[None, :] < TAKE, top_v, float("-inf"))
    top_i = tl.where(slot[None, :] < TAKE, top_i, NB)
    picks = tl.full(top_v.shape, NB, tl.int64)
    for t in tl.static_range(TAKE):
        high = tl.max(top_v, axis=1)
        at = tl.where(high > float("-inf"), tl.min(tl.where(top_v == high[:, None], top_i, NB), axis=1), NB)
        picks = tl.where(slot[None, :] == t, at.to(tl.int64)[:, None], picks)
        struck = top_i == at[:, None]
        top_v = tl.where(struck, float("-inf"), top_v)
        top_i = tl.where(struck, NB, top_i)
    return picks
