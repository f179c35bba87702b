"""TokenSelect's soft votes in one read of the cache: a drop-in for :func:`longreach.cache.select.soft_votes`.

The reference forms the (b, h, L) logits with a batched product whose rows are the few query heads
of a kv group, then masks, softmaxes and sums them in separate passes. Here one Triton pass reads
each key block once for all query heads of its group, writes the logits and each block's running
softmax statistics (max, sum of exp); the per-head normaliser is combined from those block
statistics (flash-decoding's split softmax) and the votes summed from the logits. The number of
stored tokens is read on the device, so a CUDA graph can replay the step at any length; so is the
selection cache's verdict (:func:`recall`), by which every pass skips a batch row that reuses its
selection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import HEAD_DIMS
from .tiles import group_scores, kv_program

BLOCK = 128
SUM_BLOCK = 256
NORM_CHUNK = 1024


@triton.jit
def _logits_kernel(Q, K, LENGTH, SKIP, LOGITS, BMAX, BSUM, skb, skh, skl, H_KV, L, NB, scale,
                   G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr):
    # Program (b * h_kv + hk, j): keys j * BLOCK.. of kv head hk against its G query fingerprints.
    bhk, b, hk, j, cols = kv_program(H_KV, BLOCK)
    if tl.load(SKIP + b) == 0:
        stored = cols < tl.load(LENGTH)
        s, m, p, head, real = group_scores(Q, K + b * skb + hk * skh, bhk, cols, stored, skl, scale, G, ROWS, D, DOT)
        tl.store(LOGITS + head[:, None] * L + cols[None, :], s, mask=real[:, None] & (cols[None, :] < L))
        tl.store(BMAX + head * NB + j, m, mask=real)
        tl.store(BSUM + head * NB + j, tl.sum(p, 1), mask=real)


@triton.jit
def _norm_kernel(BMAX, BSUM, SKIP, TOP, NORM, H, NB, CHUNK: tl.constexpr):
    # Program b * h + head: the head's softmax maximum and normaliser from its NB block statistics.
    bh = tl.program_id(0)
    if tl.load(SKIP + bh // H) == 0:
        top = tl.full((1,), float("-inf"), tl.float32)
        norm = tl.zeros((1,), tl.float32)
        for start in range(0, NB, CHUNK):
            j = start + tl.arange(0, CHUNK)
            m = tl.load(BMAX + bh * NB + j, mask=j < NB, other=float("-inf"))
            new_top = tl.maximum(top, tl.max(m, 0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            part = tl.load(BSUM + bh * NB + j, mask=j < NB, other=0.0) * tl.math.exp(m - shift)
            norm = norm * tl.math.exp(top - shift) + tl.sum(part, 0)
            top = new_top
        tl.store(TOP + bh + tl.arange(0, 1), top)
        tl.store(NORM + bh + tl.arange(0, 1), norm)


@triton.jit
def _sum_kernel(LOGITS, TOP, NORM, SKIP, VOTES, H, L, BLOCK: tl.constexpr):
    # Program (b, j): votes of slots j * BLOCK.., summing each head's normalised probabilities.
    b = tl.program_id(0)
    if tl.load(SKIP + b) == 0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < L
        votes = tl.zeros((BLOCK,), tl.float32)
        for head in range(b * H, (b + 1) * H):
            s = tl.load(LOGITS + head * L + cols, mask=inside, other=float("-inf"))
            votes += tl.math.exp(s - tl.load(TOP + head)) / tl.load(NORM + head)
        tl.store(VOTES + b * L + cols, votes, mask=inside)


@triton.jit
def _recall_kernel(F, STORED, REUSE, COUNTS, N, threshold, BLOCK: tl.constexpr):
    # Program b: the selection-cache test of row b (select.similar); a row that selects afresh
    # stores its fingerprint. COUNTS gathers (rows tested, rows reusing).
    b = tl.program_id(0)
    dot = tl.zeros((BLOCK,), tl.float32)
    norm_f = tl.zeros((BLOCK,), tl.float32)
    norm_s = tl.zeros((BLOCK,), tl.float32)
    big = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        f = tl.load(F + b * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        s = tl.load(STORED + b * N + cols, mask=cols < N, other=0.0)
        dot += f * s
        norm_f += f * f
        norm_s += s * s
        big = tl.maximum(big, tl.abs(s))
    reuse = (tl.max(big, 0) > 0) & (tl.sum(dot, 0) >= threshold * tl.sqrt(tl.sum(norm_f, 0) * tl.sum(norm_s, 0)))
    tl.store(REUSE + b, reuse.to(tl.int8))
    tl.atomic_add(COUNTS, 1)
    tl.atomic_add(COUNTS + 1, reuse.to(tl.int64))
    if reuse == 0:
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            f = tl.load(F + b * N + cols, mask=cols < N, other=0.0).to(tl.float32)
            tl.store(STORED + b * N + cols, f, mask=cols < N)


def recall(fingerprint: Tensor, stored: Tensor, threshold: float, counts: Tensor) -> Tensor:
    """The selection cache's verdict per batch row, (b,) int8 (1: reuse), as :func:`longreach.cache.select.similar`;
    rows that select afresh overwrite their ``stored`` (b, n) float32 fingerprint with ``fingerprint``
    (b, n). ``counts`` (2,) int64 gains (rows tested, rows reusing), on the device."""
    b, n = fingerprint.shape
    reuse = torch.empty(b, device=fingerprint.device, dtype=torch.int8)
    _recall_kernel[(b,)](fingerprint.contiguous(), stored, reuse, counts, n, threshold, BLOCK=1024)
    return reuse


def soft_votes(query: Tensor, keys: Tensor, scale: float, length: Tensor, skip: Tensor | None = None) -> Tensor:
    """(b, L) float32: sum over heads of softmax over the first ``length`` keys of qbar . k * scale.

    ``query`` (b, h, Lq, d) is averaged over its rows; ``keys`` (b, h_kv, L, d) are read once per kv
    head; ``length`` a 0-d integer tensor on the keys' device, 1 <= length <= L; keys from it on vote 0.
    Rows where ``skip`` (b,) int8 is 1 are left unwritten.
    """
    b, h, _, d = query.shape
    h_kv, slots = keys.shape[1], keys.shape[2]
    if d not in HEAD_DIMS or h % h_kv:
        raise ValueError(f"soft_votes kernel: head_dim must be in {HEAD_DIMS} and heads a multiple of kv heads, "
                         f"got head_dim={d}, heads={h}, kv heads={h_kv}")
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    fingerprint = (query[:, :, 0] if query.shape[2] == 1 else query.mean(2)).contiguous()
    n_blocks = triton.cdiv(slots, BLOCK)
    logits = torch.empty(b, h, slots, device=keys.device, dtype=torch.float32)
    block_max = torch.empty(b, h, n_blocks, device=keys.device, dtype=torch.float32)
    block_sum = torch.empty_like(block_max)
    group = h // h_kv
    skip = torch.zeros(b, device=keys.device, dtype=torch.int8) if skip is None else skip
    _logits_kernel[(b * h_kv, n_blocks)](
        fingerprint, keys, length.reshape(1), skip, logits, block_max, block_sum, *keys.stride()[:3], h_kv, slots,
        n_blocks, scale, G=group, ROWS=max(16, triton.next_power_of_2(group)), D=d, BLOCK=BLOCK,
        DOT="ieee" if keys.dtype == torch.float32 else "tf32",
    )
    top, norm = torch.empty(2, b * h, device=keys.device, dtype=torch.float32)
    _norm_kernel[(b * h,)](block_max, block_sum, skip, top, norm, h, n_blocks, CHUNK=NORM_CHUNK)
    votes = torch.empty(b, slots, device=keys.device, dtype=torch.float32)
    _sum_kernel[(b, triton.cdiv(slots, SUM_BLOCK))](logits, top, norm, skip, votes, h, slots, BLOCK=SUM_BLOCK)
    return votes
