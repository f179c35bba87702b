"""One decode step's attention over a list of cached slots, read in place: a drop-in for gathering
the listed keys and values and calling :func:`longreach.cache.select.decode_attention` on them.

Flash-decoding: the list is split into runs of blocks of ``BLOCK`` slots; one program per (batch,
kv head, run) loads its slots' keys and values straight from the cache for every query head of the
group and writes an unnormalised partial output with its softmax statistics (max, sum of exp); a
second pass merges the partials per head (softmax over the union = rescaled sum of the parts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import HEAD_DIMS
from .tiles import group_scores, kv_program, row_offsets

BLOCK = 64
MERGE = 32
# Programs to aim for: long lists (the full cache) give each program several blocks, short ones one.
PROGRAMS = 1024


@triton.jit
def _partial_kernel(Q, K, V, INDEX, VALID, ACC, MAX, SUM, skb, skh, skl, svb, svh, svl, H_KV, N, NS, PER, scale,
                    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr):
    # Program (b * h_kv + hk, j): listed slots j * PER * BLOCK.. (PER blocks, online softmax) of batch
    # row b against kv head hk's G queries.
    bhk, b, hk, j, _block_positions = kv_program(H_KV, BLOCK)
    kv = K + b * skb + hk * skh
    dh = tl.arange(0, D)
    head = bhk * G + tl.arange(0, ROWS)
    real = tl.arange(0, ROWS) < G
    top = tl.full((ROWS,), float("-inf"), tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for blk in range(j * PER, tl.minimum((j + 1) * PER, tl.cdiv(N, BLOCK))):
        n = blk * BLOCK + tl.arange(0, BLOCK)
        listed = n < N
        slot = tl.load(INDEX + b * N + n, mask=listed, other=0)
        counts = listed & (tl.load(VALID + b * N + n, mask=listed, other=0) != 0)
        _logits, m, p, _heads, _rows = group_scores(Q, kv, bhk, slot, counts, skl, scale, G, ROWS, D, DOT)
        v = tl.load(V + b * svb + hk * svh + row_offsets(slot, svl) + dh[None, :], mask=counts[:, None], other=0.0)
        new_top = tl.maximum(top, m)
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        old, w = tl.math.exp(top - shift), tl.math.exp(m - shift)
        total = total * old + tl.sum(p, 1) * w
        acc = acc * old[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT) * w[:, None]
        top = new_top
    out = head * NS + j
    tl.store(ACC + out[:, None] * D + dh[None, :], acc, mask=real[:, None])
    tl.store(MAX + out, top, mask=real)
    tl.store(SUM + out, total, mask=real)


@triton.jit
def _merge_kernel(ACC, MAX, SUM, OUT, NB, D: tl.constexpr, MERGE: tl.constexpr):
    # Program bh: merge its NB partials, MERGE at a time, with a running max.
    bh = tl.program_id(0)
    dh = tl.arange(0, D)
    top = tl.full((1,), float("-inf"), tl.float32)
    total = tl.zeros((1,), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for start in range(0, NB, MERGE):
        part = start + tl.arange(0, MERGE)
        inside = part < NB
        m = tl.load(MAX + bh * NB + part, mask=inside, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(m, 0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        old = tl.math.exp(top - shift)
        w = tl.math.exp(m - shift)
        total = total * old + tl.sum(w * tl.load(SUM + bh * NB + part, mask=inside, other=0.0), 0)
        a = tl.load(ACC + (bh * NB + part)[:, None] * D + dh[None, :], mask=inside[:, None], other=0.0)
        acc = acc * old + tl.sum(w[:, None] * a, 0)
        top = new_top
    tl.store(OUT + bh * D + dh, (acc / total).to(OUT.dtype.element_ty))


def gathered_decode_attention(q: Tensor, keys: Tensor, values: Tensor, index: Tensor, valid: Tensor,
                              scale: float) -> Tensor:
    """softmax(q k_S^T * scale) v_S over the listed slots S, every query head of a group sharing them.

    q (b, h, 1, d) rotated; keys/values (b, h_kv, L, d) the cache (keys rotated); index (b, n) slots
    of L (any order; a slot listed twice counts twice, as gathering it twice would); valid (b, n)
    True where the listed slot counts. At least one listed slot per row must count. Returns
    (b, h, 1, d) in q's dtype.
    """
    b, h, rows, d = q.shape
    h_kv = keys.shape[1]
    if rows != 1 or d not in HEAD_DIMS or h % h_kv or index.shape != valid.shape or index.shape[0] != b:
        raise ValueError(f"gathered_decode_attention: q must be (b, h, 1, d) with d in {HEAD_DIMS} and h a "
                         f"multiple of the kv heads, index and valid (b, n); got q {tuple(q.shape)}, "
                         f"keys {tuple(keys.shape)}, index {tuple(index.shape)}, valid {tuple(valid.shape)}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    n = index.shape[1]
    n_blocks = triton.cdiv(n, BLOCK)
    per = triton.cdiv(n_blocks, max(1, PROGRAMS // (b * h_kv)))
    splits = triton.cdiv(n_blocks, per)
    partial = torch.empty(b, h, splits, d, device=q.device, dtype=torch.float32)
    part_max = torch.empty(b, h, splits, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    group = h // h_kv
    _partial_kernel[(b * h_kv, splits)](
        q.contiguous(), keys, values, index.contiguous(), valid.contiguous().view(torch.uint8),
        partial, part_max, part_sum, *keys.stride()[:3], *values.stride()[:3], h_kv, n, splits, per, scale,
        G=group, ROWS=max(16, triton.next_power_of_2(group)), D=d, BLOCK=BLOCK,
        DOT="ieee" if keys.dtype == torch.float32 else "tf32",
    )
    out = torch.empty_like(q)
    _merge_kernel[(b * h,)](partial, part_max, part_sum, out, splits, D=d, MERGE=MERGE)
    return out
