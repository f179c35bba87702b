"""Rotary turns as single Triton passes: one read and one write of x per position map.

The cos/sin tables are formed in float32 by PyTorch (exactly :meth:`longreach.positions.Rope.rotate`'s
angles, times the rope's scaling) and the product runs in float32, rounding once to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..positions import Rope
from .tiles import batch_head, load_halves, rotate, store_halves

ROWS = 64


@triton.jit
def _turn_kernel(X, Y, COS, SIN, sxb, sxh, sxm, sc, H, L, FIRST, PERIOD,
                 ROWS: tl.constexpr, HALF: tl.constexpr, INVERSE: tl.constexpr, ACCUMULATE: tl.constexpr):
    # Rows of x (b, h, L, d) turned by row (FIRST + i) % PERIOD (PERIOD 0: row i) of the cos/sin
    # tables of batch b (stride sc, 0 when shared); with ACCUMULATE added to y.
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    _, b, h = batch_head(1, H)
    ok = r < L
    x1, x2 = load_halves(X + b * sxb + h * sxh, r, ok, sxm, HALF)
    row = FIRST + r
    if PERIOD > 0:
        row = row % PERIOD
    ptr = b * sc + row[:, None] * HALF + tl.arange(0, HALF)[None, :]
    c = tl.load(COS + ptr, mask=ok[:, None], other=0.0)
    s = tl.load(SIN + ptr, mask=ok[:, None], other=0.0)
    y1, y2 = rotate(x1.to(tl.float32), x2.to(tl.float32), c, s, INVERSE)
    if ACCUMULATE:
        z1, z2 = load_halves(Y + b * sxb + h * sxh, r, ok, sxm, HALF)
        y1, y2 = y1 + z1.to(tl.float32), y2 + z2.to(tl.float32)
    store_halves(Y + b * sxb + h * sxh, r, ok, sxm, y1, y2, HALF)


def turn(x: Tensor, cos: Tensor, sin: Tensor, *, first: int = 0, period: int = 0, inverse: bool = False,
         out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """x (b, h, L, d) contiguous turned row by row: row i by row (first + i) % period (period 0: row
    i) of ``cos``/``sin`` ((b or 1, n, d/2) float32). Into ``out`` (added to it with ``accumulate``)."""
    b, h, length, d = x.shape
    out = torch.empty_like(x) if out is None else out
    shared = cos.shape[0] == 1
    _turn_kernel[(triton.cdiv(length, ROWS), b * h)](
        x, out, cos, sin, x.stride(0), x.stride(1), x.stride(2), 0 if shared else cos.stride(0), h, length, first,
        period, ROWS=ROWS, HALF=d // 2, INVERSE=inverse, ACCUMULATE=accumulate)
    return out


@triton.jit
def _step_kernel(Q, OUT, K, POSITION, LENGTH, COS, SIN, sqb, sqh, skb, skh, skl, H, H_KV, HALF: tl.constexpr):
    # Program r < b * h: query row r at its batch row's position, into OUT; the others: the key of kv
    # row r - b * h at slot length - 1 (its position), in place.
    r = tl.program_id(0).to(tl.int64)
    dh = tl.arange(0, HALF)
    if r < tl.num_programs(0) // (H + H_KV) * H:
        src = Q + r // H * sqb + r % H * sqh
        dst = OUT + r * 2 * HALF
        at = tl.load(POSITION + r // H)
    else:
        r -= tl.num_programs(0) // (H + H_KV) * H
        at = tl.load(LENGTH) - 1
        src = K + r // H_KV * skb + r % H_KV * skh + at * skl
        dst = src
    x1, x2 = tl.load(src + dh).to(tl.float32), tl.load(src + HALF + dh).to(tl.float32)
    y1, y2 = rotate(x1, x2, tl.load(COS + at * HALF + dh), tl.load(SIN + at * HALF + dh), False)
    tl.store(dst + dh, y1.to(dst.dtype.element_ty))
    tl.store(dst + HALF + dh, y2.to(dst.dtype.element_ty))


def rotate_step(q: Tensor, keys: Tensor, position: Tensor, length: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """One static decode step's rotary in one launch: returns q (b, h, 1, d) rotated at ``position``
    (b,) and rotates in place the key the step wrote to ``keys`` (b, h_kv, L, d) at slot ``length`` - 1
    (a 0-d tensor on the device), at that slot's position. ``cos``/``sin``: (1, n, d/2) float32 tables
    of positions 0..n-1 (:func:`tables`), n above every position."""
    b, h, _, d = q.shape
    h_kv = keys.shape[1]
    if q.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("rotate_step: q and keys must be contiguous along the head dimension")
    out = torch.empty(b, h, 1, d, device=q.device, dtype=q.dtype)
    _step_kernel[(b * (h + h_kv),)](q, out, keys, position.contiguous(), length.reshape(1), cos, sin, q.stride(0),
                                   q.stride(1), *keys.stride()[:3], h, h_kv, HALF=d // 2)
    return out


def tables(rope: Rope, positions: Tensor) -> tuple[Tensor, Tensor]:
    """float32 (b, L, d/2) cos and sin of ``rope`` at ``positions`` (b, L), times its scaling."""
    angle = positions.to(torch.float32)[..., None] * rope.inv_freq.to(positions.device, torch.float32)
    return (angle.cos() * rope.scaling).contiguous(), (angle.sin() * rope.scaling).contiguous()


class _Frames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *maps):
        x = x.contiguous()
        out = x.new_empty(len(maps) // 2, *x.shape)
        for f in range(len(out)):
            turn(x, maps[2 * f], maps[2 * f + 1], out=out[f])
        ctx.save_for_backward(*maps)
        return out

    @staticmethod
    def backward(ctx, grad):
        maps = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(grad[0])
        for f in range(len(grad)):
            turn(grad[f], maps[2 * f], maps[2 * f + 1], inverse=True, out=dx, accumulate=f > 0)
        return (dx, *[None] * len(maps))


def rotate_frames(x: Tensor, rope: Rope, positions: list[Tensor]) -> Tensor:
    """x (b, h, L, d) rotated under each position map (b, L) in ``positions``: (F, b, h, L, d),
    differentiable in x (the gradient turns each frame's gradient back and sums them)."""
    maps = [t for p in positions for t in tables(rope, p)]
    return _Frames.apply(x, *maps)
