"""Triton helpers shared by the kernels: rows of a (L, d) slab as their two rotary halves, and the turn."""

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
def load_halves(base, rows, ok, stride, HALF: tl.constexpr):
    # Rows ``rows`` of a (L, 2 * HALF) slab as its two rotary halves; rows where ``ok`` fails read 0.
    dh = tl.arange(0, HALF)
    ptr = base + rows[:, None] * stride + dh[None, :]
    return tl.load(ptr, mask=ok[:, None], other=0.0), tl.load(ptr + HALF, mask=ok[:, None], other=0.0)


@triton.jit
def store_halves(base, rows, ok, stride, y1, y2, HALF: tl.constexpr):
    ptr = base + rows[:, None] * stride + tl.arange(0, HALF)[None, :]
    tl.store(ptr, y1.to(base.dtype.element_ty), mask=ok[:, None])
    tl.store(ptr + HALF, y2.to(base.dtype.element_ty), mask=ok[:, None])

