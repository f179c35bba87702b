"""Block-sparse flash attention in Triton: forward and backward over per-query-block key-block lists.

Layout and conventions follow :func:`longreach.attention.core.blocked_attention`, whose output this
kernel reproduces: q (b, h, Lq, d) are the last Lq of Lk key positions; ``table`` (b, h, nq, K)
lists, per query block of the key-index grid, the key blocks it reads in ascending order, -1
padded, with the query block's own (diagonal) block last; ``count`` (b, h, nq) how many are used.
Per (query, key) pair the kernel masks: causal and in range always; with ``window``/``group``/
``sink`` set, also token rules (sinks + window; S2 groups with ``shift`` for heads >= H // 2).
With ``rotary`` the kernel applies select-and-merge's positions on selected tokens: the key at
slot s, offset t sits at s * B + t and the query at its own (last) slot's position. Since rotations
in one plane compose, R(a) q . R(b) k = R(t_q) q . R(delta B) R(t_k) k with delta = s - own slot:
q and k are turned by their offset inside the block once (one pass, :func:`_turn_kernel`), the
kernels turn each key block by delta * B, a single d/2 vector of cos/sin per block, and the
backward kernels turn dq and dk back by the in-block offset as they store them. Structure after
the Triton fused-attention tutorial (online softmax in base 2, no L x L tensor); the backward
recomputes probabilities from the saved log-sum-exp, and the dQ kernel forms delta = rowsum(dO * O)
for the dK/dV kernel, so no pass outside the kernels touches the (b, h, L, d) tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import BLOCK_SIZES, HEAD_DIMS, supports

LOG2E = 1.4426950408889634
KEYS = ["HALF", "BLOCK", "ROTARY", "TOKEN_MASK", "DOT"]
# The interpreter (CPU tests) needs no tuning; on a GPU pick among a few pipelines per shape class.
CONFIGS = [triton.Config({}, num_warps=4, num_stages=2)]
if os.environ.get("TRITON_INTERPRET") != "1":
    CONFIGS += [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (4, 4), (8, 2), (8, 3), (8, 4))]


@triton.jit
def _rotate(x1, x2, cos, sin, INVERSE: tl.constexpr):
    # Half-split rotary: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); the inverse turns by -theta.
    if INVERSE:
        return x1 * cos + x2 * sin, x2 * cos - x1 * sin
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _dot_t(a1, a2, b1, b2, DOT: tl.constexpr):
    # [a1 a2] @ [b1 b2]^T over the two rotary halves of the head dimension.
    return tl.dot(a2, tl.trans(b2), tl.dot(a1, tl.trans(b1), input_precision=DOT), input_precision=DOT)


@triton.jit
def _load_halves(base, rows, ok, stride, HALF: tl.constexpr):
    # Rows ``rows`` of a (L, 2 * HALF) slab as its two rotary halves; rows where ``ok`` fails read 0.
    dh = tl.arange(0, HALF)
    ptr = base + rows[:, None] * stride + dh[None, :]
    return tl.load(ptr, mask=ok[:, None], other=0.0), tl.load(ptr + HALF, mask=ok[:, None], other=0.0)


@triton.jit
def _turn_block(x1, x2, COS, SIN, turn, HALF: tl.constexpr, INVERSE: tl.constexpr):
    # A block's halves turned (in float32, returned in their dtype) by row ``turn`` of the
    # delta * B cos/sin tables of merged positions.
    dh = tl.arange(0, HALF)
    c = tl.load(COS + turn * HALF + dh)[None, :]
    s = tl.load(SIN + turn * HALF + dh)[None, :]
    r1, r2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), c, s, INVERSE)
    return r1.to(x1.dtype), r2.to(x2.dtype)


@triton.jit
def _key_block(base, rows, ok, stride, COS, SIN, turn, HALF: tl.constexpr, ROTARY: tl.constexpr):
    # A key block's halves, turned for merged positions.
    k1, k2 = _load_halves(base, rows, ok, stride, HALF)
    if ROTARY:
        k1, k2 = _turn_block(k1, k2, COS, SIN, turn, HALF, False)
    return k1, k2


@triton.jit
def _turn_kernel(X, Y, COS, SIN, sxb, sxh, sxm, H, L, FIRST,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    # Rows of x (b, h, L, d), row i at index FIRST + i, turned by their offset inside their block.
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    ok = r < L
    x1, x2 = _load_halves(X + b * sxb + h * sxh, r, ok, sxm, HALF)
    c, s = _offset_turn(COS, SIN, (FIRST + r) % BLOCK, HALF)
    y1, y2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), c, s, False)
    _store_halves(Y + b * sxb + h * sxh, r, ok, sxm, y1, y2, HALF)


@triton.jit
def _offset_turn(COS, SIN, offset, HALF: tl.constexpr):
    # cos and sin (rows, HALF) of the in-block turn for each row's offset.
    ptr = offset[:, None] * HALF + tl.arange(0, HALF)[None, :]
    return tl.load(COS + ptr), tl.load(SIN + ptr)


@triton.jit
def _store_halves(base, rows, ok, stride, y1, y2, HALF: tl.constexpr):
    ptr = base + rows[:, None] * stride + tl.arange(0, HALF)[None, :]
    tl.store(ptr, y1.to(base.dtype.element_ty), mask=ok[:, None])
    tl.store(ptr + HALF, y2.to(base.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _store_gradient(base, rows, ok, stride, g1, g2, TCOS, TSIN, scale, HALF: tl.constexpr, BLOCK: tl.constexpr,
                    ROTARY: tl.constexpr):
    # q and k were turned by their in-block offset before the kernels: turn their gradients back.
    if ROTARY:
        c, s = _offset_turn(TCOS, TSIN, tl.arange(0, BLOCK), HALF)
        g1, g2 = _rotate(g1, g2, c, s, True)
    _store_halves(base, rows, ok, stride, g1 * scale, g2 * scale, HALF)


@triton.jit
def _allowed(q_idx, k_idx, Lk, h, H, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK: tl.constexpr):
    ok = (k_idx[None, :] <= q_idx[:, None]) & (k_idx[None, :] < Lk)
    if TOKEN_MASK:
        rule = tl.full(ok.shape, True, tl.int1)
        if WINDOW > 0:
            rule = rule & (q_idx[:, None] - k_idx[None, :] < WINDOW)
        if GROUP > 0:
            s = tl.where(h >= H // 2, SHIFT, 0)
            rule = rule & (((q_idx + s) // GROUP)[:, None] == ((k_idx + s) // GROUP)[None, :])
        ok = ok & (rule | (k_idx[None, :] < SINK))
    return ok


@triton.autotune(configs=CONFIGS, key=KEYS)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, TABLE, COUNT, COS, SIN,
    sqb, sqh, sqm, skb, skh, skn, sob, soh, som,
    stb, sth, stm, scb, sch,
    H, GROUP_HEADS, Lq, Lk, FIRST, START_BLOCK, WIDTH, qk_scale,
    SINK, WINDOW, GROUP, SHIFT,
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, TOKEN_MASK: tl.constexpr,
    DOT: tl.constexpr,
):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP_HEADS
    t = tl.arange(0, BLOCK)
    q_idx = (START_BLOCK + m) * BLOCK + t
    q_row = q_idx - FIRST
    q_ok = (q_row >= 0) & (q_idx < Lk)
    q1, q2 = _load_halves(Q + b * sqb + h * sqh, q_row, q_ok, sqm, HALF)
    n = tl.load(COUNT + b * scb + h * sch + m)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK, HALF], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * skb + hk * skh
    table = TABLE + b * stb + h * sth + m * stm
    for slot in range(0, n):
        k_idx = tl.load(table + slot) * BLOCK + t
        k_in = k_idx < Lk
        k1, k2 = _key_block(k_base, k_idx, k_in, skn, COS, SIN, slot - n + WIDTH, HALF, ROTARY)
        qk = _dot_t(q1, q2, k1, k2, DOT)
        qk = qk * qk_scale
        if TOKEN_MASK or slot == n - 1:
            ok = _allowed(q_idx, k_idx, Lk, h, H, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v1, v2 = _load_halves(v_base, k_idx, k_in, skn, HALF)
        p = p.to(V.dtype.element_ty)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT)
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT)
        m_i = m_new
    empty = l_i == 0.0
    denom = tl.where(empty, 1.0, l_i)
    _store_halves(Out + b * sob + h * soh, q_row, q_ok, som, acc1 / denom[:, None], acc2 / denom[:, None], HALF)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(denom))
    tl.store(LSE + bh * Lq + q_row, lse, mask=q_ok)


@triton.autotune(configs=CONFIGS, key=KEYS)
@triton.jit
def _dq_kernel(
    Q, K, V, OUT, DO, DQ, LSE, DELTA, TABLE, COUNT, COS, SIN, TCOS, TSIN,
    sqb, sqh, sqm, skb, skh, skn,
    stb, sth, stm, scb, sch,
    H, GROUP_HEADS, Lq, Lk, FIRST, START_BLOCK, WIDTH, qk_scale, sm_scale,
    SINK, WINDOW, GROUP, SHIFT,
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, TOKEN_MASK: tl.constexpr,
    DOT: tl.constexpr,
):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP_HEADS
    t = tl.arange(0, BLOCK)
    q_idx = (START_BLOCK + m) * BLOCK + t
    q_row = q_idx - FIRST
    q_ok = (q_row >= 0) & (q_idx < Lk)
    row_base = b * sqb + h * sqh
    q1, q2 = _load_halves(Q + row_base, q_row, q_ok, sqm, HALF)
    do1, do2 = _load_halves(DO + row_base, q_row, q_ok, sqm, HALF)
    o1, o2 = _load_halves(OUT + row_base, q_row, q_ok, sqm, HALF)
    delta = tl.sum(do1.to(tl.float32) * o1.to(tl.float32) + do2.to(tl.float32) * o2.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + q_row, delta, mask=q_ok)
    lse = tl.load(LSE + bh * Lq + q_row, mask=q_ok, other=float("inf"))
    n = tl.load(COUNT + b * scb + h * sch + m)
    dq1 = tl.zeros([BLOCK, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK, HALF], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * skb + hk * skh
    table = TABLE + b * stb + h * sth + m * stm
    for slot in range(0, n):
        k_idx = tl.load(table + slot) * BLOCK + t
        k_in = k_idx < Lk
        k1, k2 = _key_block(k_base, k_idx, k_in, skn, COS, SIN, slot - n + WIDTH, HALF, ROTARY)
        qk = _dot_t(q1, q2, k1, k2, DOT) * qk_scale
        if TOKEN_MASK or slot == n - 1:
            ok = _allowed(q_idx, k_idx, Lk, h, H, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK)
            qk = tl.where(ok, qk, float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        v1, v2 = _load_halves(v_base, k_idx, k_in, skn, HALF)
        dp = _dot_t(do1, do2, v1, v2, DOT)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT)
    _store_gradient(DQ + row_base, q_row, q_ok, sqm, dq1, dq2, TCOS, TSIN, sm_scale, HALF, BLOCK, ROTARY)


@triton.autotune(configs=CONFIGS, key=KEYS)
@triton.jit
def _dkv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, COUNT, CSR_OFF, CSR_M, CSR_SLOT, COS, SIN, TCOS, TSIN,
    sqb, sqh, sqm, skb, skh, skn, scb, sch,
    H, HKV, GROUP_HEADS, Lq, Lk, FIRST, START_BLOCK, WIDTH, NK, qk_scale, sm_scale,
    SINK, WINDOW, GROUP, SHIFT,
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, TOKEN_MASK: tl.constexpr,
    DOT: tl.constexpr,
):
    # Heads vary fastest, so the long lists of the first (sink) blocks start first, not last.
    bhk = tl.program_id(0)
    j = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    t = tl.arange(0, BLOCK)
    k_idx = j * BLOCK + t
    k_in = k_idx < Lk
    kv_base = b * skb + hk * skh
    k1, k2 = _load_halves(K + kv_base, k_idx, k_in, skn, HALF)
    v1, v2 = _load_halves(V + kv_base, k_idx, k_in, skn, HALF)
    dk1 = tl.zeros([BLOCK, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK, HALF], tl.float32)
    dv1 = tl.zeros([BLOCK, HALF], tl.float32)
    dv2 = tl.zeros([BLOCK, HALF], tl.float32)
    for g in range(0, GROUP_HEADS):
        h = hk * GROUP_HEADS + g
        bh = b * H + h
        lo = tl.load(CSR_OFF + bh * NK + j)
        hi = tl.load(CSR_OFF + bh * NK + j + 1)
        for e in range(lo, hi):
            m = tl.load(CSR_M + e)
            q_idx = (START_BLOCK + m) * BLOCK + t
            q_row = q_idx - FIRST
            q_ok = (q_row >= 0) & (q_idx < Lk)
            q1, q2 = _load_halves(Q + b * sqb + h * sqh, q_row, q_ok, sqm, HALF)
            do1, do2 = _load_halves(DO + b * sqb + h * sqh, q_row, q_ok, sqm, HALF)
            lse = tl.load(LSE + bh * Lq + q_row, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * Lq + q_row, mask=q_ok, other=0.0)
            if ROTARY:
                # R(delta B) k . q = k . R(-delta B) q: turning q back leaves k and dk in one frame.
                turn = tl.load(CSR_SLOT + e) - tl.load(COUNT + b * scb + h * sch + m) + WIDTH
                q1, q2 = _turn_block(q1, q2, COS, SIN, turn, HALF, True)
            # Transposed scores: rows are keys, columns queries.
            qkT = _dot_t(k1, k2, q1, q2, DOT) * qk_scale
            pT = tl.math.exp2(qkT - lse[None, :])
            if TOKEN_MASK or START_BLOCK + m == j:
                okT = tl.trans(_allowed(q_idx, k_idx, Lk, h, H, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK))
                pT = tl.where(okT, pT, 0.0)
            dv1 = tl.dot(pT.to(DO.dtype.element_ty), do1, dv1, input_precision=DOT)
            dv2 = tl.dot(pT.to(DO.dtype.element_ty), do2, dv2, input_precision=DOT)
            dpT = _dot_t(v1, v2, do1, do2, DOT)
            dsT = (pT * (dpT - delta[None, :])).to(Q.dtype.element_ty)
            dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT)
            dk2 = tl.dot(dsT, q2, dk2, input_precision=DOT)
    _store_gradient(DK + kv_base, k_idx, k_in, skn, dk1, dk2, TCOS, TSIN, sm_scale, HALF, BLOCK, ROTARY)
    _store_halves(DV + kv_base, k_idx, k_in, skn, dv1, dv2, HALF)


def compact(table: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each list ascending with -1 last; return (table int32, count int32 (b, h, nq))."""
    big = torch.iinfo(table.dtype).max
    ordered = torch.where(table >= 0, table, big).sort(dim=-1).values
    count = (ordered != big).sum(-1)
    return torch.where(ordered != big, ordered, -1).int().contiguous(), count.int().contiguous()


def transpose(table: Tensor, count: Tensor, n_key_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of the table by key block: offsets (b*h*nk + 1,), query blocks and slots, grouped per (b, h, j)."""
    b, h, nq, width = table.shape
    used = torch.arange(width, device=table.device) < count[..., None].long()
    bi, hi, mi, si = used.nonzero(as_tuple=True)
    key = (bi * h + hi) * n_key_blocks + table[bi, hi, mi, si].long()
    order = torch.argsort(key, stable=True)
    offsets = torch.zeros(b * h * n_key_blocks + 1, dtype=torch.int32, device=table.device)
    offsets[1:] = torch.bincount(key, minlength=b * h * n_key_blocks).cumsum(0)
    return offsets, mi[order].int().contiguous(), si[order].int().contiguous()


def rotary_turns(inv_freq: Tensor, width: int, block: int, scaling: float,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float32 cos and sin of the two turns of merged positions: (width, d/2) by delta * block, row r
    holding delta = r - width + 1 (the kernels read row slot - count + width, so the own, last slot
    turns by 0); then (block, d/2), times ``scaling``, by each offset inside a block."""
    freq = inv_freq.to(device).float()
    slots = torch.arange(1 - width, 1, device=device, dtype=torch.float32)[:, None] * block * freq
    offsets = torch.arange(block, device=device, dtype=torch.float32)[:, None] * freq
    turns = (slots.cos(), slots.sin(), offsets.cos() * scaling, offsets.sin() * scaling)
    return tuple(x.contiguous() for x in turns)


def turn_within_blocks(x: Tensor, first: int, block: int, cos: Tensor, sin: Tensor) -> Tensor:
    """x (b, h, L, d) contiguous, row i at index first + i, rotated by its offset inside its block
    with the (block, d/2) ``cos``/``sin`` of :func:`rotary_turns`; one read and one write of x."""
    b, h, length, d = x.shape
    out = torch.empty_like(x)
    rows = 64
    _turn_kernel[(triton.cdiv(length, rows), b * h)](x, out, cos, sin, *_strides(x), h, length, first,
                                                    ROWS=rows, BLOCK=block, HALF=d // 2)
    return out


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, count, block, scale, turns, token_rule):
        b, h, q_len, d = q.shape
        h_kv, k_len = k.shape[1], k.shape[2]
        first = k_len - q_len
        rotary = turns is not None
        if rotary:
            q = turn_within_blocks(q, first, block, *turns[2:])
            k = turn_within_blocks(k, 0, block, *turns[2:])
        else:
            turns = (q.new_empty(1, dtype=torch.float32),) * 4
        out = torch.empty_like(q)
        lse = torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
        _fwd_kernel[(table.shape[2], b * h)](
            q, k, v, out, lse, table, count, *turns[:2],
            *_strides(q), *_strides(k), *_strides(out), *_strides(table), count.stride(0), count.stride(1),
            h, h // h_kv, q_len, k_len, first, first // block, table.shape[-1], scale * LOG2E, *token_rule,
            **_meta(block, d, rotary, token_rule, q.dtype),
        )
        ctx.save_for_backward(q, k, v, out, lse, table, count, *turns)
        ctx.scale, ctx.rotary, ctx.token_rule, ctx.block = scale, rotary, token_rule, block
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, table, count, *turns = ctx.saved_tensors
        grad = grad.contiguous()
        b, h, q_len, d = q.shape
        h_kv, k_len = k.shape[1], k.shape[2]
        block, first, scale = ctx.block, k_len - q_len, ctx.scale
        meta = _meta(block, d, ctx.rotary, ctx.token_rule, q.dtype)
        delta = torch.empty_like(lse)
        dq = torch.empty_like(q)
        _dq_kernel[(table.shape[2], b * h)](
            q, k, v, out, grad, dq, lse, delta, table, count, *turns,
            *_strides(q), *_strides(k), *_strides(table), count.stride(0), count.stride(1),
            h, h // h_kv, q_len, k_len, first, first // block, table.shape[-1], scale * LOG2E, scale, *ctx.token_rule,
            **meta,
        )
        n_key_blocks = -(-k_len // block)
        offsets, csr_m, csr_slot = transpose(table, count, n_key_blocks)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _dkv_kernel[(b * h_kv, n_key_blocks)](
            q, k, v, grad, dk, dv, lse, delta, count, offsets, csr_m, csr_slot, *turns,
            *_strides(q), *_strides(k), count.stride(0), count.stride(1),
            h, h_kv, h // h_kv, q_len, k_len, first, first // block, table.shape[-1], n_key_blocks, scale * LOG2E,
            scale,
            *ctx.token_rule, **meta,
        )
        return dq, dk, dv, None, None, None, None, None, None


def _meta(block: int, dim: int, rotary: bool, token_rule: tuple[int, int, int, int], dtype: torch.dtype) -> dict:
    token_mask = token_rule[1] > 0 or token_rule[2] > 0
    # float32 inputs get IEEE products (no silent TF32 rounding); 16-bit inputs use the tensor cores.
    dot = "ieee" if dtype == torch.float32 else "tf32"
    return dict(BLOCK=block, HALF=dim // 2, ROTARY=rotary, TOKEN_MASK=token_mask, DOT=dot)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    inv_freq: Tensor | None = None,
    rotary_scaling: float = 1.0,
    sink: int = 0,
    window: int = 0,
    group: int = 0,
    shift: int = 0,
) -> Tensor:
    """Attention of each query block over its listed key blocks; differentiable in q, k and v.

    q (b, h, Lq, d), k/v (b, h_kv, Lk, d), table (b, h, nq, K) of key-block ids (-1 unused, any
    order), for the query blocks of the key-index grid from (Lk - Lq) // block_size on. With
    ``inv_freq`` the kernel rotates q and k at merged positions (see the module docstring).
    ``window``/``group`` > 0 switch on the token rules. Returns (b, h, Lq, d).
    """
    if not supports(q, block_size):
        raise ValueError(f"block-sparse kernel: head_dim must be in {HEAD_DIMS} and block_size in {BLOCK_SIZES}, "
                         f"got head_dim={q.shape[-1]}, block_size={block_size}, dtype={q.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"block-sparse kernel: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    table, count = compact(table)
    turns = None
    if inv_freq is not None:
        turns = rotary_turns(inv_freq, table.shape[-1], block_size, rotary_scaling, q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rule = (int(sink), int(window), int(group), int(shift))
    return _BlockSparseAttention.apply(q, k, v, table, count, block_size, scale, turns, rule)
