"""Block-sparse flash attention in Triton: forward and backward over per-query-block key-block lists.

Layout and conventions follow :func:`longreach.attention.core.blocked_attention`, whose output this
kernel reproduces: q (b, h, Lq, d) are the last Lq of Lk key positions; ``table`` (b, h, nq, K)
lists, per query block of the key-index grid, the key blocks it reads in ascending order, -1
padded, with the query block's own (diagonal) block last; ``count`` (b, h, nq) how many are used.
Without a table the kernels run dense causal attention (every key block up to the diagonal).
Per (query, key) pair the kernel masks: causal and in range always; with ``window``/``group``/
``sink`` set, also token rules (sinks + window; S2 groups with ``shift`` for heads >= ``shift_from``), on
the block pairs the rule does not allow whole.

Rotary inside the kernels, two ways:
- ``rotary``: select-and-merge's positions on selected tokens. The key at slot s, offset t sits at
  s * B + t and the query at its own (last) slot's position. Rotations in one plane compose,
  R(a) q . R(b) k = R(t_q) q . R(delta B) R(t_k) k with delta = s - own slot: q and k are turned by
  their offset inside the block once (one pass, :func:`longreach.kernels.rotary.turn`); per listed
  block the forward turns the query block back by delta * B (R(a) q . k = q . R(-a) k) and the dQ
  kernel the key block forward, each a single d/2 vector of cos/sin per block; the backward
  kernels turn dq and dk back by the in-block offset as they store them.
- frames: DCA, self-extend and re-indexed sinks score each (query, key) pair under one of two or
  three position maps, chosen per pair. q (and k) arrive rotated under each map, stacked (F, ...);
  a frame rule picks the map per pair, and only block pairs that straddle a frame border compute
  more than one product. Frame 0 is the common one: its query and key sit in registers. Each
  frame's gradient has its own accumulator, stored once by the program that owns its rows.
Structure after the Triton fused-attention tutorial (online softmax in base 2, no L x L tensor); the
backward recomputes probabilities from the saved log-sum-exp, and the dQ kernel forms
delta = rowsum(dO * O) for the dK/dV kernel.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import BLOCK_SIZES, DCA, HEAD_DIMS, SELF_EXTEND, SINKS, supports
from .rotary import turn
from .tiles import batch_head, load_halves, rotate, store_halves

LOG2E = 1.4426950408889634
KEYS = ["HALF", "BLOCK", "ROTARY", "TOKEN_MASK", "DOT", "FRAMES", "KEY_FRAMES", "RULE", "DENSE", "CAUSAL"]
# The interpreter (CPU tests) needs no tuning; on a GPU pick among a few pipelines per shape class.
CONFIGS = [triton.Config({}, num_warps=4, num_stages=2)]
if os.environ.get("TRITON_INTERPRET") != "1":
    CONFIGS += [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (4, 4), (8, 2), (8, 3), (8, 4))]
NO_FRAMES = 0


def _prune(configs: list, named_args: dict, **meta) -> list:
    # Triton 3.6 fails to lower the table-driven frame kernels (re-indexed sinks) with 8 warps; and
    # with three frames (DCA), 4 warps and more than 2 stages, its forward reads shared memory out
    # of range (compute-sanitizer, at every length from 2K on H100).
    frames = meta.get("FRAMES", 1)
    if frames > 1 and not meta.get("DENSE"):
        configs = [c for c in configs if c.num_warps == 4]
    if frames > 2:
        configs = [c for c in configs if c.num_warps == 8 or c.num_stages <= 2]
    return configs


TUNE = dict(configs=CONFIGS, key=KEYS, prune_configs_by={"early_config_prune": _prune})
# The jit functions read module globals only as constexprs.
RULE_DCA, RULE_SELF_EXTEND, RULE_SINKS = tl.constexpr(DCA), tl.constexpr(SELF_EXTEND), tl.constexpr(SINKS)


class Frames(NamedTuple):
    """A frame rule and its span (DCA's chunk length, self-extend's or the sinks' window), with the
    int32 positions (b, Lq) and (b, Lk) the DCA and self-extend rules read."""

    rule: int
    span: int
    q_pos: Tensor | None = None
    k_pos: Tensor | None = None


@triton.jit
def _dot_t(a1, a2, b1, b2, DOT: tl.constexpr):
    # [a1 a2] @ [b1 b2]^T over the two rotary halves of the head dimension.
    return tl.dot(a2, tl.trans(b2), tl.dot(a1, tl.trans(b1), input_precision=DOT), input_precision=DOT)


@triton.jit
def _turn_block(x1, x2, COS, SIN, turn, HALF: tl.constexpr, INVERSE: tl.constexpr):
    # A block's halves turned (in float32, returned in their dtype) by row ``turn`` of the
    # delta * B cos/sin tables of merged positions.
    dh = tl.arange(0, HALF)
    c = tl.load(COS + turn * HALF + dh)[None, :]
    s = tl.load(SIN + turn * HALF + dh)[None, :]
    r1, r2 = rotate(x1.to(tl.float32), x2.to(tl.float32), c, s, INVERSE)
    return r1.to(x1.dtype), r2.to(x2.dtype)


@triton.jit
def _result_layout(q1, q2, scale, HALF: tl.constexpr, DOT: tl.constexpr):
    # q's halves times ``scale`` in float32, in the layout of a product's result: a query turned
    # from there feeds the next product from registers, where one turned in the load layout goes
    # through shared memory first (the forward kernel's per-slot turn cost about 0.3 of 1.4 ms so).
    dh = tl.arange(0, HALF)
    eye = (dh[:, None] == dh[None, :]).to(q1.dtype)
    return tl.dot(q1, eye, input_precision=DOT) * scale, tl.dot(q2, eye, input_precision=DOT) * scale


@triton.jit
def _key_block(base, rows, ok, stride, COS, SIN, turn, HALF: tl.constexpr, ROTARY: tl.constexpr):
    # A key block's halves, turned for merged positions.
    k1, k2 = load_halves(base, rows, ok, stride, HALF)
    if ROTARY:
        k1, k2 = _turn_block(k1, k2, COS, SIN, turn, HALF, False)
    return k1, k2


@triton.jit
def _store_gradient(base, rows, ok, stride, g1, g2, TCOS, TSIN, scale, HALF: tl.constexpr, BLOCK: tl.constexpr,
                    ROTARY: tl.constexpr):
    # q and k were turned by their in-block offset before the kernels: turn their gradients back.
    if ROTARY:
        ptr = tl.arange(0, BLOCK)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        g1, g2 = rotate(g1, g2, tl.load(TCOS + ptr), tl.load(TSIN + ptr), True)
    store_halves(base, rows, ok, stride, g1 * scale, g2 * scale, HALF)


@triton.jit
def _allowed(q_idx, k_idx, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK: tl.constexpr,
             CAUSAL: tl.constexpr):
    if CAUSAL:
        ok = (k_idx[None, :] <= q_idx[:, None]) & (k_idx[None, :] < Lk)
    else:
        ok = (k_idx[None, :] < Lk) & (q_idx[:, None] >= 0)  # (queries, keys), as the causal mask
    if TOKEN_MASK:
        rule = tl.full(ok.shape, True, tl.int1)
        if WINDOW > 0:
            rule = rule & (q_idx[:, None] - k_idx[None, :] < WINDOW)
        if GROUP > 0:
            s = tl.where(h >= SHIFT_FROM, SHIFT, 0)
            rule = rule & (((q_idx + s) // GROUP)[:, None] == ((k_idx + s) // GROUP)[None, :])
        ok = ok & (rule | (k_idx[None, :] < SINK))
    return ok


@triton.jit
def _needs_mask(q_block, k_block, diagonal, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, BLOCK: tl.constexpr,
                TOKEN_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    # The diagonal pair always needs the per-token mask (causal, ragged edge), or without causality the
    # ragged last key block; with token rules, so does any pair the rule does not allow whole (a window or
    # group border inside it).
    if CAUSAL:
        need = diagonal
    else:
        need = (k_block + 1) * BLOCK > Lk
    if TOKEN_MASK:
        q_lo = q_block * BLOCK
        q_hi = tl.minimum(q_lo + BLOCK, Lk) - 1
        k_lo = k_block * BLOCK
        k_hi = tl.minimum(k_lo + BLOCK, Lk) - 1
        whole = (WINDOW <= 0) | (q_hi - k_lo < WINDOW)
        if GROUP > 0:
            s = tl.where(h >= SHIFT_FROM, SHIFT, 0)
            g = (q_lo + s) // GROUP
            whole = whole & ((q_hi + s) // GROUP == g) & ((k_lo + s) // GROUP == g) & ((k_hi + s) // GROUP == g)
        need = need | ~(whole | (k_hi < SINK))
    return need


@triton.jit
def _frame(q_idx, k_idx, q_pos, k_pos, SPAN, RULE: tl.constexpr):
    # (queries, keys) frame of each pair, 0 the common one. DCA: 0 inter-chunk, 1 successive chunk,
    # 2 same chunk (chunks of SPAN positions); self-extend: 0 grouped, 1 neighbour (distance < SPAN);
    # sinks: 0 in the window of SPAN indices, 1 a sink seen from the capped query position.
    if RULE == RULE_DCA:
        gap = q_pos[:, None] // SPAN - k_pos[None, :] // SPAN
        f = tl.where(gap == 0, 2, tl.where(gap == 1, 1, 0))
    elif RULE == RULE_SELF_EXTEND:
        f = tl.where(q_pos[:, None] - k_pos[None, :] < SPAN, 1, 0)
    else:
        f = tl.where(q_idx[:, None] - k_idx[None, :] < SPAN, 0, 1)
    return f


@triton.jit
def _frame_bounds(QB, KB, m, START_BLOCK, k_block, SPAN, BLOCK: tl.constexpr, RULE: tl.constexpr):
    # Lowest and highest frame in the pair of query block m (of the query grid) and a key block,
    # from the blocks' (min, max) positions (indices for sinks), so that most pairs, which lie in
    # one frame, skip the per-pair rule.
    if RULE == RULE_SINKS:
        gap = (START_BLOCK + m - k_block) * BLOCK
        lo = tl.where(gap - BLOCK + 1 < SPAN, 0, 1)
        hi = tl.where(gap + BLOCK - 1 >= SPAN, 1, 0)
    else:
        q_lo = tl.load(QB + 2 * m)
        q_hi = tl.load(QB + 2 * m + 1)
        k_lo = tl.load(KB + 2 * k_block)
        k_hi = tl.load(KB + 2 * k_block + 1)
        if RULE == RULE_SELF_EXTEND:
            lo = tl.where(q_hi - k_lo >= SPAN, 0, 1)
            hi = tl.where(q_lo - k_hi < SPAN, 1, 0)
        else:
            g_lo = q_lo // SPAN - k_hi // SPAN
            g_hi = q_hi // SPAN - k_lo // SPAN
            lo = tl.where((g_lo < 0) | (g_hi >= 2), 0, tl.where(g_hi >= 1, 1, 2))
            hi = tl.where((g_lo <= 0) & (g_hi >= 0), 2, tl.where((g_lo <= 1) & (g_hi >= 1), 1, 0))
    return lo, hi


@triton.jit
def _operand(main1, main2, base, f, frame_stride, rows, ok, stride, HALF: tl.constexpr, PER_FRAME: tl.constexpr):
    # An operand block under frame f: its own copy when it has one per frame, else the main one.
    if PER_FRAME:
        a1, a2 = load_halves(base + f * frame_stride, rows, ok, stride, HALF)
    else:
        a1, a2 = main1, main2
    return a1, a2


@triton.jit
def _frame_scores(r1, r2, c1, c2, fr, lo, hi, R, sr, rows_r, ok_r, srm, C, sc, rows_c, ok_c, scm,
                  HALF: tl.constexpr, BLOCK: tl.constexpr, FRAMES: tl.constexpr, R_FRAMES: tl.constexpr,
                  C_FRAMES: tl.constexpr, DOT: tl.constexpr):
    # Scores of row block (r1, r2) against column block (c1, c2), both under frame 0, with the pairs
    # of other frames (in fr, spanning lo..hi) scored from those frames' copies.
    scores = tl.zeros([BLOCK, BLOCK], tl.float32)
    if lo == 0:
        scores = _dot_t(r1, r2, c1, c2, DOT)
    for f in tl.static_range(1, FRAMES):
        if (lo <= f) & (f <= hi):
            a1, a2 = _operand(r1, r2, R, f, sr, rows_r, ok_r, srm, HALF, R_FRAMES > 1)
            b1, b2 = _operand(c1, c2, C, f, sc, rows_c, ok_c, scm, HALF, C_FRAMES > 1)
            scores = tl.where(fr == f, _dot_t(a1, a2, b1, b2, DOT), scores)
    return scores


@triton.jit
def _frame_gradient(acc1, acc2, ds, fr, f: tl.constexpr, lo, hi, main1, main2, base, frame_stride, rows, ok, stride,
                    HALF: tl.constexpr, PER_FRAME: tl.constexpr, DOT: tl.constexpr):
    # Frame f's share of a gradient: the entries of ds scored under frame f, times that frame's operand.
    if (lo <= f) & (f <= hi):
        b1, b2 = _operand(main1, main2, base, f, frame_stride, rows, ok, stride, HALF, PER_FRAME)
        part = tl.where(fr == f, ds, 0.0).to(b1.dtype)
        acc1 = tl.dot(part, b1, acc1, input_precision=DOT)
        acc2 = tl.dot(part, b2, acc2, input_precision=DOT)
    return acc1, acc2


@triton.jit
def _query_block(NQ, DENSE: tl.constexpr):
    # Dense causal runs the longest rows first, so they do not run last.
    if DENSE:
        m = NQ - 1 - tl.program_id(0)
    else:
        m = tl.program_id(0)
    return m


@triton.jit
def _list_length(COUNT, diagonal, Lk, BLOCK: tl.constexpr, DENSE: tl.constexpr, CAUSAL: tl.constexpr):
    if DENSE and CAUSAL:
        n = diagonal + 1
    elif DENSE:
        n = tl.cdiv(Lk, BLOCK)
    else:
        n = tl.load(COUNT)
    return n


@triton.jit
def _listed_block(LIST, i, DENSE: tl.constexpr):
    # Entry i of a block list; dense causal lists every block in order.
    if DENSE:
        block = i
    else:
        block = tl.load(LIST + i)
    return block


@triton.jit
def _positions(P, rows, ok, RULE: tl.constexpr):
    # The rotary positions that the DCA and self-extend rules read (the others read none).
    if RULE == RULE_DCA or RULE == RULE_SELF_EXTEND:
        pos = tl.load(P + rows, mask=ok, other=0)
    else:
        pos = rows
    return pos


@triton.autotune(**TUNE)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, TABLE, COUNT, COS, SIN, QPOS, KPOS, QB, KB,
    sqf, sqb, sqh, sqm, skf, skb, skh, skn, sob, soh, som,
    stb, sth, stm, scb, sch, spq, spk, sbq, sbk,
    H, GROUP_HEADS, Lq, Lk, FIRST, START_BLOCK, NQ, WIDTH, qk_scale,
    SINK, WINDOW, GROUP, SHIFT, SHIFT_FROM, SPAN,
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, TOKEN_MASK: tl.constexpr,
    DOT: tl.constexpr, FRAMES: tl.constexpr, KEY_FRAMES: tl.constexpr, RULE: tl.constexpr, DENSE: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    m = _query_block(NQ, DENSE)
    bh, b, h = batch_head(1, H)
    hk = h // GROUP_HEADS
    t = tl.arange(0, BLOCK)
    q_idx = (START_BLOCK + m) * BLOCK + t
    q_row = q_idx - FIRST
    q_ok = (q_row >= 0) & (q_row < Lq)
    q_base = Q + b * sqb + h * sqh
    q1, q2 = load_halves(q_base, q_row, q_ok, sqm, HALF)
    q_pos = _positions(QPOS + b * spq, q_row, q_ok, RULE)
    n = _list_length(COUNT + b * scb + h * sch + m, START_BLOCK + m, Lk, BLOCK, DENSE, CAUSAL)
    if ROTARY:
        qs1, qs2 = _result_layout(q1, q2, qk_scale, HALF, DOT)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK, HALF], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * skb + hk * skh
    table = TABLE + b * stb + h * sth + m * stm
    for slot in range(0, n):
        k_block = _listed_block(table, slot, DENSE)
        k_idx = k_block * BLOCK + t
        k_in = k_idx < Lk
        k1, k2 = load_halves(k_base, k_idx, k_in, skn, HALF)
        lo, hi = 0, 0
        if FRAMES > 1:
            lo, hi = _frame_bounds(QB + b * sbq, KB + b * sbk, m, START_BLOCK, k_block, SPAN, BLOCK, RULE)
        if ROTARY:
            # R(delta B) k . q = k . R(-delta B) q: the query turns back instead of the key.
            a1, a2 = _turn_block(qs1, qs2, COS, SIN, slot - n + WIDTH, HALF, True)
            qk = _dot_t(a1.to(q1.dtype), a2.to(q2.dtype), k1, k2, DOT)
        elif hi == 0:
            qk = _dot_t(q1, q2, k1, k2, DOT) * qk_scale
        else:
            fr = _frame(q_idx, k_idx, q_pos, _positions(KPOS + b * spk, k_idx, k_in, RULE), SPAN, RULE)
            qk = _frame_scores(q1, q2, k1, k2, fr, lo, hi, q_base, sqf, q_row, q_ok, sqm, k_base, skf, k_idx, k_in,
                               skn, HALF, BLOCK, FRAMES, FRAMES, KEY_FRAMES, DOT) * qk_scale
        if _needs_mask(START_BLOCK + m, k_block, slot == n - 1, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, BLOCK,
                       TOKEN_MASK, CAUSAL):
            ok = _allowed(q_idx, k_idx, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK, CAUSAL)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v1, v2 = load_halves(v_base, k_idx, k_in, skn, HALF)
        p = p.to(V.dtype.element_ty)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT)
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT)
        m_i = m_new
    empty = l_i == 0.0
    denom = tl.where(empty, 1.0, l_i)
    store_halves(Out + b * sob + h * soh, q_row, q_ok, som, acc1 / denom[:, None], acc2 / denom[:, None], HALF)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(denom))
    tl.store(LSE + bh * Lq + q_row, lse, mask=q_ok)


@triton.autotune(**TUNE)
@triton.jit
def _dq_kernel(
    Q, K, V, OUT, DO, DQ, LSE, DELTA, TABLE, COUNT, COS, SIN, TCOS, TSIN, QPOS, KPOS, QB, KB,
    sqf, sqb, sqh, sqm, skf, skb, skh, skn, sob, soh, som,
    stb, sth, stm, scb, sch, spq, spk, sbq, sbk,
    H, GROUP_HEADS, Lq, Lk, FIRST, START_BLOCK, NQ, WIDTH, qk_scale, sm_scale,
    SINK, WINDOW, GROUP, SHIFT, SHIFT_FROM, SPAN,
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, TOKEN_MASK: tl.constexpr,
    DOT: tl.constexpr, FRAMES: tl.constexpr, KEY_FRAMES: tl.constexpr, RULE: tl.constexpr, DENSE: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    m = _query_block(NQ, DENSE)
    bh, b, h = batch_head(1, H)
    hk = h // GROUP_HEADS
    t = tl.arange(0, BLOCK)
    q_idx = (START_BLOCK + m) * BLOCK + t
    q_row = q_idx - FIRST
    q_ok = (q_row >= 0) & (q_row < Lq)
    q_base = Q + b * sqb + h * sqh
    q1, q2 = load_halves(q_base, q_row, q_ok, sqm, HALF)
    do1, do2 = load_halves(DO + b * sob + h * soh, q_row, q_ok, som, HALF)
    o1, o2 = load_halves(OUT + b * sob + h * soh, q_row, q_ok, som, HALF)
    delta = tl.sum(do1.to(tl.float32) * o1.to(tl.float32) + do2.to(tl.float32) * o2.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + q_row, delta, mask=q_ok)
    lse = tl.load(LSE + bh * Lq + q_row, mask=q_ok, other=float("inf"))
    q_pos = _positions(QPOS + b * spq, q_row, q_ok, RULE)
    n = _list_length(COUNT + b * scb + h * sch + m, START_BLOCK + m, Lk, BLOCK, DENSE, CAUSAL)
    dq1 = tl.zeros([BLOCK, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK, HALF], tl.float32)
    # Frames 1 and 2's gradients (unused without them).
    dqa1 = tl.zeros([BLOCK, HALF], tl.float32)
    dqa2 = tl.zeros([BLOCK, HALF], tl.float32)
    dqb1 = tl.zeros([BLOCK, HALF], tl.float32)
    dqb2 = tl.zeros([BLOCK, HALF], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * skb + hk * skh
    table = TABLE + b * stb + h * sth + m * stm
    for slot in range(0, n):
        k_block = _listed_block(table, slot, DENSE)
        k_idx = k_block * BLOCK + t
        k_in = k_idx < Lk
        k1, k2 = _key_block(k_base, k_idx, k_in, skn, COS, SIN, slot - n + WIDTH, HALF, ROTARY)
        lo, hi = 0, 0
        if FRAMES > 1:
            lo, hi = _frame_bounds(QB + b * sbq, KB + b * sbk, m, START_BLOCK, k_block, SPAN, BLOCK, RULE)
        if hi == 0:
            qk = _dot_t(q1, q2, k1, k2, DOT)
        else:
            fr = _frame(q_idx, k_idx, q_pos, _positions(KPOS + b * spk, k_idx, k_in, RULE), SPAN, RULE)
            qk = _frame_scores(q1, q2, k1, k2, fr, lo, hi, q_base, sqf, q_row, q_ok, sqm, k_base, skf, k_idx, k_in,
                               skn, HALF, BLOCK, FRAMES, FRAMES, KEY_FRAMES, DOT)
        qk = qk * qk_scale
        if _needs_mask(START_BLOCK + m, k_block, slot == n - 1, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, BLOCK,
                       TOKEN_MASK, CAUSAL):
            ok = _allowed(q_idx, k_idx, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK, CAUSAL)
            qk = tl.where(ok, qk, float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        v1, v2 = load_halves(v_base, k_idx, k_in, skn, HALF)
        dp = _dot_t(do1, do2, v1, v2, DOT)
        ds = p * (dp - delta[:, None])
        if hi == 0:
            dq1 = tl.dot(ds.to(K.dtype.element_ty), k1, dq1, input_precision=DOT)
            dq2 = tl.dot(ds.to(K.dtype.element_ty), k2, dq2, input_precision=DOT)
        else:
            fr = _frame(q_idx, k_idx, q_pos, _positions(KPOS + b * spk, k_idx, k_in, RULE), SPAN, RULE)
            dq1, dq2 = _frame_gradient(dq1, dq2, ds, fr, 0, lo, hi, k1, k2, k_base, skf, k_idx, k_in, skn, HALF,
                                       False, DOT)
            dqa1, dqa2 = _frame_gradient(dqa1, dqa2, ds, fr, 1, lo, hi, k1, k2, k_base, skf, k_idx, k_in, skn, HALF,
                                         KEY_FRAMES > 1, DOT)
            if FRAMES > 2:
                dqb1, dqb2 = _frame_gradient(dqb1, dqb2, ds, fr, 2, lo, hi, k1, k2, k_base, skf, k_idx, k_in, skn,
                                             HALF, KEY_FRAMES > 1, DOT)
    dq_base = DQ + b * sqb + h * sqh
    _store_gradient(dq_base, q_row, q_ok, sqm, dq1, dq2, TCOS, TSIN, sm_scale, HALF, BLOCK, ROTARY)
    if FRAMES > 1:
        store_halves(dq_base + sqf, q_row, q_ok, sqm, dqa1 * sm_scale, dqa2 * sm_scale, HALF)
    if FRAMES > 2:
        store_halves(dq_base + 2 * sqf, q_row, q_ok, sqm, dqb1 * sm_scale, dqb2 * sm_scale, HALF)


@triton.autotune(**TUNE)
@triton.jit
def _dkv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, COUNT, CSR_OFF, CSR_M, CSR_SLOT, COS, SIN, TCOS, TSIN, QPOS, KPOS, QB, KB,
    sqf, sqb, sqh, sqm, skf, skb, skh, skn, sob, soh, som, scb, sch, spq, spk, sbq, sbk,
    H, HKV, GROUP_HEADS, Lq, Lk, FIRST, START_BLOCK, NQ, WIDTH, NK, qk_scale, sm_scale,
    SINK, WINDOW, GROUP, SHIFT, SHIFT_FROM, SPAN,
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, TOKEN_MASK: tl.constexpr,
    DOT: tl.constexpr, FRAMES: tl.constexpr, KEY_FRAMES: tl.constexpr, RULE: tl.constexpr, DENSE: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # Heads vary fastest, so the long lists of the first (sink) blocks start first, not last.
    bhk, b, hk = batch_head(0, HKV)
    j = tl.program_id(1)
    t = tl.arange(0, BLOCK)
    k_idx = j * BLOCK + t
    k_in = k_idx < Lk
    kv_base = b * skb + hk * skh
    k1, k2 = load_halves(K + kv_base, k_idx, k_in, skn, HALF)
    v1, v2 = load_halves(V + kv_base, k_idx, k_in, skn, HALF)
    k_pos = _positions(KPOS + b * spk, k_idx, k_in, RULE)
    dk1 = tl.zeros([BLOCK, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK, HALF], tl.float32)
    dv1 = tl.zeros([BLOCK, HALF], tl.float32)
    dv2 = tl.zeros([BLOCK, HALF], tl.float32)
    # Keys rotated per frame: frames 1 and 2's gradients (unused without them).
    dka1 = tl.zeros([BLOCK, HALF], tl.float32)
    dka2 = tl.zeros([BLOCK, HALF], tl.float32)
    dkb1 = tl.zeros([BLOCK, HALF], tl.float32)
    dkb2 = tl.zeros([BLOCK, HALF], tl.float32)
    for g in range(0, GROUP_HEADS):
        h = hk * GROUP_HEADS + g
        bh = b * H + h
        if DENSE:
            lo_e = tl.maximum(j - START_BLOCK, 0) if CAUSAL else 0
            hi_e = NQ
        else:
            lo_e = tl.load(CSR_OFF + bh * NK + j)
            hi_e = tl.load(CSR_OFF + bh * NK + j + 1)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sob + h * soh
        for e in range(lo_e, hi_e):
            m = _listed_block(CSR_M, e, DENSE)
            q_idx = (START_BLOCK + m) * BLOCK + t
            q_row = q_idx - FIRST
            q_ok = (q_row >= 0) & (q_row < Lq)
            q1, q2 = load_halves(q_base, q_row, q_ok, sqm, HALF)
            do1, do2 = load_halves(do_base, q_row, q_ok, som, HALF)
            lse = tl.load(LSE + bh * Lq + q_row, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * Lq + q_row, mask=q_ok, other=0.0)
            if ROTARY:
                # R(delta B) k . q = k . R(-delta B) q: turning q back leaves k and dk in one frame.
                turn_row = tl.load(CSR_SLOT + e) - tl.load(COUNT + b * scb + h * sch + m) + WIDTH
                q1, q2 = _turn_block(q1, q2, COS, SIN, turn_row, HALF, True)
            # Transposed scores: rows are keys, columns queries.
            lo, hi = 0, 0
            if FRAMES > 1:
                lo, hi = _frame_bounds(QB + b * sbq, KB + b * sbk, m, START_BLOCK, j, SPAN, BLOCK, RULE)
            if hi == 0:
                qkT = _dot_t(k1, k2, q1, q2, DOT)
            else:
                frT = tl.trans(_frame(q_idx, k_idx, _positions(QPOS + b * spq, q_row, q_ok, RULE), k_pos, SPAN, RULE))
                qkT = _frame_scores(k1, k2, q1, q2, frT, lo, hi, K + kv_base, skf, k_idx, k_in, skn, q_base, sqf,
                                    q_row, q_ok, sqm, HALF, BLOCK, FRAMES, KEY_FRAMES, FRAMES, DOT)
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
            if _needs_mask(START_BLOCK + m, j, START_BLOCK + m == j, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT,
                           BLOCK, TOKEN_MASK, CAUSAL):
                okT = tl.trans(_allowed(q_idx, k_idx, Lk, h, SHIFT_FROM, SINK, WINDOW, GROUP, SHIFT, TOKEN_MASK,
                                        CAUSAL))
                pT = tl.where(okT, pT, 0.0)
            dv1 = tl.dot(pT.to(DO.dtype.element_ty), do1, dv1, input_precision=DOT)
            dv2 = tl.dot(pT.to(DO.dtype.element_ty), do2, dv2, input_precision=DOT)
            dpT = _dot_t(v1, v2, do1, do2, DOT)
            dsT = pT * (dpT - delta[None, :])
            if hi == 0:
                dk1 = tl.dot(dsT.to(Q.dtype.element_ty), q1, dk1, input_precision=DOT)
                dk2 = tl.dot(dsT.to(Q.dtype.element_ty), q2, dk2, input_precision=DOT)
            else:
                frT = tl.trans(_frame(q_idx, k_idx, _positions(QPOS + b * spq, q_row, q_ok, RULE), k_pos, SPAN, RULE))
                dk1, dk2 = _frame_gradient(dk1, dk2, dsT, frT, 0, lo, hi, q1, q2, q_base, sqf, q_row, q_ok, sqm, HALF,
                                           False, DOT)
                if KEY_FRAMES > 1:
                    dka1, dka2 = _frame_gradient(dka1, dka2, dsT, frT, 1, lo, hi, q1, q2, q_base, sqf, q_row, q_ok, sqm,
                                                 HALF, True, DOT)
                    if FRAMES > 2:
                        dkb1, dkb2 = _frame_gradient(dkb1, dkb2, dsT, frT, 2, lo, hi, q1, q2, q_base, sqf, q_row, q_ok,
                                                     sqm, HALF, True, DOT)
                else:
                    dk1, dk2 = _frame_gradient(dk1, dk2, dsT, frT, 1, lo, hi, q1, q2, q_base, sqf, q_row, q_ok, sqm,
                                               HALF, True, DOT)
                    if FRAMES > 2:
                        dk1, dk2 = _frame_gradient(dk1, dk2, dsT, frT, 2, lo, hi, q1, q2, q_base, sqf, q_row, q_ok,
                                                   sqm, HALF, True, DOT)
    _store_gradient(DK + kv_base, k_idx, k_in, skn, dk1, dk2, TCOS, TSIN, sm_scale, HALF, BLOCK, ROTARY)
    if KEY_FRAMES > 1:
        store_halves(DK + skf + kv_base, k_idx, k_in, skn, dka1 * sm_scale, dka2 * sm_scale, HALF)
    if KEY_FRAMES > 2:
        store_halves(DK + 2 * skf + kv_base, k_idx, k_in, skn, dkb1 * sm_scale, dkb2 * sm_scale, HALF)
    store_halves(DV + kv_base, k_idx, k_in, skn, dv1, dv2, HALF)


def compact(table: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each list ascending with -1 last; return (table int32, count int32 (b, h, nq))."""
    big = torch.iinfo(table.dtype).max
    ordered = torch.where(table >= 0, table, big).sort(dim=-1).values
    count = (ordered != big).sum(-1)
    return torch.where(ordered != big, ordered, -1).int().contiguous(), count.int().contiguous()


def transpose(table: Tensor, count: Tensor, n_key_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of the table by key block: offsets (b*h*nk + 1,), query blocks and slots, grouped per (b, h, j)
    in query-block order (unused slots sort past the last offset).

    Every shape is fixed by the table's, so the backward never waits on the host (nonzero and bincount
    would: their output sizes depend on the values)."""
    b, h, nq, width = table.shape
    device, cells = table.device, b * h * n_key_blocks
    used = torch.arange(width, device=device) < count[..., None].long()
    pair = torch.arange(b * h, device=device).view(b, h, 1, 1) * n_key_blocks
    key = torch.where(used, pair + table.long(), cells).flatten()
    order = torch.argsort(key, stable=True)
    offsets = torch.searchsorted(key[order], torch.arange(cells + 1, device=device)).int()
    query_block = torch.arange(nq, device=device, dtype=torch.int32).view(nq, 1).expand(b, h, nq, width).flatten()
    slot = torch.arange(width, device=device, dtype=torch.int32).expand(b, h, nq, width).flatten()
    return offsets, query_block[order].contiguous(), slot[order].contiguous()


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


def _launch_args(q: Tensor, k: Tensor, out: Tensor, table: Tensor, count: Tensor, setup: dict) -> dict:
    """Stride and size arguments of the kernels; q (F, b, h, Lq, d), k (Fk, b, h_kv, Lk, d). The dK/dV
    kernel walks the table's transpose, so it takes ``per_row`` (count and position strides) but not
    ``table`` (the table's own strides)."""
    h, q_len = q.shape[2], q.shape[3]
    h_kv, k_len = k.shape[2], k.shape[3]
    first = k_len - q_len if setup["causal"] else 0
    block = setup["block"]
    n_q = (k_len - 1) // block + 1 - first // block if setup["causal"] else -(-q_len // block)
    return dict(
        strides=(*q.stride()[:4], *k.stride()[:4], *out.stride()[:3]),
        table=table.stride()[:3],
        per_row=(*count.stride()[:2], setup["q_pos"].stride(0), setup["k_pos"].stride(0),
                 setup["q_bounds"].stride(0), setup["k_bounds"].stride(0)),
        sizes=(h, h // h_kv, q_len, k_len, first, first // block, n_q),
    )


def _positional(setup: dict) -> tuple[Tensor, ...]:
    return setup["q_pos"], setup["k_pos"], setup["q_bounds"], setup["k_bounds"]


def _block_bounds(pos: Tensor, lead: int, block: int) -> Tensor:
    """(b, n, 2) int32 min and max of positions (b, L) over blocks of ``block`` rows, the first
    block missing its first ``lead`` rows."""
    big = torch.iinfo(torch.int32).max
    pad = (lead, -(lead + pos.shape[1]) % block)
    low = torch.nn.functional.pad(pos, pad, value=big).view(pos.shape[0], -1, block).amin(-1)
    high = torch.nn.functional.pad(pos, pad, value=-big).view(pos.shape[0], -1, block).amax(-1)
    return torch.stack([low, high], dim=-1).int().contiguous()


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, count, turns, setup):
        b, h, q_len, d = q.shape[1:]
        block, first = setup["block"], k.shape[3] - q_len
        rotary = turns is not None
        if rotary:
            q = turn_within_blocks(q[0], first, block, *turns[2:])[None]
            k = turn_within_blocks(k[0], 0, block, *turns[2:])[None]
        else:
            turns = (q.new_empty(1, dtype=torch.float32),) * 4
        out = torch.empty_like(q[0])
        lse = torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
        a = _launch_args(q, k, out, table, count, setup)
        n_q = a["sizes"][-1]
        _fwd_kernel[(n_q, b * h)](
            q, k, v, out, lse, table, count, *turns[:2], *_positional(setup),
            *a["strides"], *a["table"], *a["per_row"], *a["sizes"], table.shape[-1], setup["scale"] * LOG2E,
            *setup["rule"], **_meta(setup, d, rotary, q, k),
        )
        ctx.save_for_backward(q, k, v, out, lse, table, count, *turns)
        ctx.rotary, ctx.setup = rotary, setup
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, table, count, *turns = ctx.saved_tensors
        setup = ctx.setup
        grad = grad.contiguous()
        b, h, q_len, d = q.shape[1:]
        h_kv, k_len = k.shape[2], k.shape[3]
        block, scale = setup["block"], setup["scale"]
        meta = _meta(setup, d, ctx.rotary, q, k)
        a = _launch_args(q, k, out, table, count, setup)
        n_q = a["sizes"][-1]
        delta = torch.empty_like(lse)
        dq = torch.empty_like(q)
        _dq_kernel[(n_q, b * h)](
            q, k, v, out, grad, dq, lse, delta, table, count, *turns, *_positional(setup),
            *a["strides"], *a["table"], *a["per_row"], *a["sizes"], table.shape[-1], scale * LOG2E, scale,
            *setup["rule"], **meta,
        )
        n_key_blocks = -(-k_len // block)
        offsets, csr_m, csr_slot = (count,) * 3 if setup["dense"] else transpose(table, count, n_key_blocks)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        sizes = a["sizes"]
        _dkv_kernel[(b * h_kv, n_key_blocks)](
            q, k, v, grad, dk, dv, lse, delta, count, offsets, csr_m, csr_slot, *turns,
            *_positional(setup), *a["strides"], *a["per_row"],
            sizes[0], h_kv, *sizes[1:], table.shape[-1], n_key_blocks, scale * LOG2E, scale, *setup["rule"], **meta,
        )
        return dq, dk, dv, None, None, None, None


def _meta(setup: dict, dim: int, rotary: bool, q: Tensor, k: Tensor) -> dict:
    rule = setup["rule"]
    token_mask = rule[1] > 0 or rule[2] > 0
    # float32 inputs get IEEE products (no silent TF32 rounding); 16-bit inputs use the tensor cores.
    dot = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(BLOCK=setup["block"], HALF=dim // 2, ROTARY=rotary, TOKEN_MASK=token_mask, DOT=dot,
                FRAMES=q.shape[0], KEY_FRAMES=k.shape[0], RULE=setup["frame_rule"], DENSE=setup["dense"],
                CAUSAL=setup["causal"])


def turn_within_blocks(x: Tensor, first: int, block: int, cos: Tensor, sin: Tensor) -> Tensor:
    """x (b, h, L, d), row i at index first + i, rotated by its offset inside its block with the
    (block, d/2) ``cos``/``sin`` of :func:`rotary_turns`; one read and one write of x."""
    return turn(x.contiguous(), cos[None], sin[None], first=first, period=block)


def _check(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> None:
    if not supports(q, block_size):
        raise ValueError(f"block-sparse kernel: head_dim must be in {HEAD_DIMS} and block_size in {BLOCK_SIZES}, "
                         f"got head_dim={q.shape[-1]}, block_size={block_size}, dtype={q.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"block-sparse kernel: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _run(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, turns, *, block_size: int, scale: float | None,
         rule: tuple[int, int, int, int, int], frames: Frames, causal: bool = True) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dense = table is None
    if dense:
        table = count = q.new_zeros(1, 1, 1, 1, dtype=torch.int32)
    else:
        table, count = compact(table)
    placeholder = q.new_zeros(1, 1, dtype=torch.int32)
    q_pos = k_pos = q_bounds = k_bounds = placeholder
    if frames.rule in (DCA, SELF_EXTEND):
        q_pos, k_pos = frames.q_pos.int().contiguous(), frames.k_pos.int().contiguous()
        first = k.shape[-2] - q.shape[-2]
        q_bounds, k_bounds = _block_bounds(q_pos, first % block_size, block_size), _block_bounds(k_pos, 0, block_size)
    setup = dict(block=block_size, scale=scale, rule=(*rule, frames.span), frame_rule=frames.rule, dense=dense,
                 causal=causal, q_pos=q_pos, k_pos=k_pos, q_bounds=q_bounds, k_bounds=k_bounds)
    return _BlockSparseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), table, count, turns, setup)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    *,
    block_size: int,
    scale: float | None = None,
    inv_freq: Tensor | None = None,
    rotary_scaling: float = 1.0,
    sink: int = 0,
    window: int = 0,
    group: int = 0,
    shift: int = 0,
    shift_from: int | None = None,
    causal: bool = True,
) -> Tensor:
    """Attention of each query block over its listed key blocks; differentiable in q, k and v.

    q (b, h, Lq, d), k/v (b, h_kv, Lk, d), table (b, h, nq, K) of key-block ids (-1 unused, any
    order), for the query blocks of the key-index grid from (Lk - Lq) // block_size on; None lists
    every key block (dense). With ``inv_freq`` the kernel rotates q and k at merged positions (see the
    module docstring). ``window``/``group`` > 0 switch on the token rules; S2's groups are shifted by
    ``shift`` for the heads from ``shift_from`` (default h // 2) on. With ``causal=False`` (no rotary,
    no token rules) queries and keys are separate sequences (cross attention when Lq != Lk): query
    block i is rows i * block_size.. of q, and every listed key is seen. Returns (b, h, Lq, d).
    """
    _check(q, k, v, block_size)
    if inv_freq is not None and table is None:
        raise ValueError("block-sparse kernel: merged-position rotary (inv_freq) needs a table")
    if not causal and (inv_freq is not None or sink or window or group):
        raise ValueError("block-sparse kernel: causal=False takes no merged-position rotary (inv_freq) and no "
                         "token rules (sink, window, group)")
    turns = None
    if inv_freq is not None:
        width = table.shape[-1]
        turns = rotary_turns(inv_freq, width, block_size, rotary_scaling, q.device)
    rule = (int(sink), int(window), int(group), int(shift), q.shape[1] // 2 if shift_from is None else int(shift_from))
    return _run(q[None], k[None], v, table, turns, block_size=block_size, scale=scale, rule=rule,
                frames=Frames(NO_FRAMES, 0), causal=causal)


def frame_attention(q: Tensor, k: Tensor, v: Tensor, frames: Frames, *, block_size: int, table: Tensor | None = None,
                    scale: float | None = None, sink: int = 0, window: int = 0) -> Tensor:
    """Attention scoring each (query, key) pair under the position map that ``frames.rule`` picks.

    q (F, b, h, Lq, d) and k (Fk, b, h_kv, Lk, d) hold the queries and keys rotated under each map
    (Fk = 1 when keys have one), v (b, h_kv, Lk, d). ``table`` as in :func:`block_sparse_attention`;
    None runs dense causal attention without a table. Differentiable in q, k and v; (b, h, Lq, d).
    """
    _check(q[0], k[0], v, block_size)
    if not 1 < q.shape[0] <= 3 or k.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"frame attention: q needs 2 or 3 frames and k 1 or as many, got {q.shape[0]}, {k.shape[0]}")
    rule = (int(sink), int(window), 0, 0, 0)
    return _run(q, k, v, table, None, block_size=block_size, scale=scale, rule=rule, frames=frames)
