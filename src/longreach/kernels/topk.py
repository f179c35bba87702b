"""token_select's attended slots for one decode step, chosen on the device: a drop-in for
:func:`longreach.cache.select.attended_slots` (candidate mask, ``torch.topk``, concatenations).

Radix select: a candidate's vote (non-negative float32) orders like its bit pattern, so the k-th
largest is found 8 bits at a time. Each of four passes histograms one digit of the candidates whose
higher digits equal the prefix found so far (every program derives the prefix from the earlier
passes' histograms). Then one pass counts, per block of slots, the candidates above the threshold
and those equal to it, and the last writes the winners in slot order (ties at the threshold: the
earliest) between the first ``n_init`` and the last ``n_local`` slots. The length and the selection
cache's skip flags are read on the device, so a CUDA graph replays the step; a skipped row keeps
its picked slots and only its init and local slots are rewritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DIGIT = 8  # bits per pass
PASSES = 32 // DIGIT
RADIX = 2**DIGIT
BLOCK = 2048
EDGE = 256
# The jit functions read module globals only as constexprs.
_DIGIT, _PASSES, _RADIX = tl.constexpr(DIGIT), tl.constexpr(PASSES), tl.constexpr(RADIX)


@triton.jit
def _keys(VOTES, LENGTH, b, L, cols, N_INIT, N_LOCAL):
    # Slot keys: vote bits + 1 for candidates, 0 otherwise (past L too); and which slots exist.
    inside = cols < L
    candidate = inside & (cols >= N_INIT) & (cols < tl.load(LENGTH) - N_LOCAL)
    votes = tl.load(VOTES + b * L + cols, mask=inside, other=0.0)
    return tl.where(candidate, votes.to(tl.int32, bitcast=True) + 1, 0), inside


@triton.jit
def _prefix(HIST, K, PASS: tl.constexpr):
    # The first PASS digits of the K-th largest key, from the histograms of passes < PASS, and how
    # many keys with that prefix are still to be taken.
    digits = tl.arange(0, _RADIX)
    prefix = 0
    remaining = K
    for p in tl.static_range(PASS):
        h = tl.load(HIST + p * _RADIX + digits)
        at_least = tl.sum(h, 0) - tl.cumsum(h, 0) + h
        digit = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1
        remaining -= tl.sum(tl.where(digits > digit, h, 0), 0)
        prefix = prefix * _RADIX + digit
    return prefix, remaining


@triton.jit
def _histogram_kernel(VOTES, LENGTH, SKIP, HIST, L, K, N_INIT, N_LOCAL, PASS: tl.constexpr, BLOCK: tl.constexpr):
    # Program (b, j): digit PASS of the keys of slots j * BLOCK.. that match the prefix.
    b = tl.program_id(0)
    if tl.load(SKIP + b) == 0:
        key, match = _keys(VOTES, LENGTH, b, L, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK), N_INIT, N_LOCAL)
        hist = HIST + b * _PASSES * _RADIX
        if PASS > 0:
            prefix, _ = _prefix(hist, K, PASS)
            match = match & ((key >> (32 - _DIGIT * PASS)) == prefix)
        digit = (key >> (32 - _DIGIT * (PASS + 1))) & (_RADIX - 1)
        tl.atomic_add(hist + PASS * _RADIX + tl.arange(0, _RADIX), tl.histogram(digit, _RADIX, mask=match))


@triton.jit
def _count_kernel(VOTES, LENGTH, SKIP, HIST, COUNTS, L, K, N_INIT, N_LOCAL, NB, BLOCK: tl.constexpr):
    # Program (b, j): how many slots of block j have keys above the threshold, how many equal it.
    b = tl.program_id(0)
    j = tl.program_id(1)
    if tl.load(SKIP + b) == 0:
        key, inside = _keys(VOTES, LENGTH, b, L, j * BLOCK + tl.arange(0, BLOCK), N_INIT, N_LOCAL)
        threshold, _ = _prefix(HIST + b * _PASSES * _RADIX, K, _PASSES)
        tl.store(COUNTS + (b * NB + j) * 2, tl.sum((inside & (key > threshold)).to(tl.int32), 0))
        tl.store(COUNTS + (b * NB + j) * 2 + 1, tl.sum((inside & (key == threshold)).to(tl.int32), 0))


@triton.jit
def _write_kernel(VOTES, LENGTH, SKIP, HIST, COUNTS, INDEX, VALID, L, K, N_INIT, N_LOCAL, NB, N,
                  BLOCK: tl.constexpr, BLOCKS: tl.constexpr, EDGE: tl.constexpr):
    # Program (b, j): block j's winners at their rank among the row's winners; program (b, 0) also
    # writes the init and local slots.
    b = tl.program_id(0)
    j = tl.program_id(1)
    if tl.load(SKIP + b) == 0:
        cols = j * BLOCK + tl.arange(0, BLOCK)
        key, inside = _keys(VOTES, LENGTH, b, L, cols, N_INIT, N_LOCAL)
        threshold, take = _prefix(HIST + b * _PASSES * _RADIX, K, _PASSES)
        blocks = tl.arange(0, BLOCKS)
        earlier = COUNTS + (b * NB + blocks) * 2
        above_before = tl.sum(tl.load(earlier, mask=blocks < j, other=0), 0)
        equal_before = tl.sum(tl.load(earlier + 1, mask=blocks < j, other=0), 0)
        above = (inside & (key > threshold)).to(tl.int32)
        equal = (inside & (key == threshold)).to(tl.int32)
        above_rank = above_before + tl.cumsum(above, 0) - above
        equal_rank = equal_before + tl.cumsum(equal, 0) - equal
        won = (above != 0) | ((equal != 0) & (equal_rank < take))
        at = b * N + N_INIT + above_rank + tl.minimum(equal_rank, take)
        tl.store(INDEX + at, cols.to(tl.int64), mask=won)
        tl.store(VALID + at, (key > 0).to(tl.int8), mask=won)
    if j == 0:
        length = tl.load(LENGTH)
        for start in range(0, N_INIT, EDGE):
            i = start + tl.arange(0, EDGE)
            tl.store(INDEX + b * N + i, i.to(tl.int64), mask=i < N_INIT)
            tl.store(VALID + b * N + i, (i < length).to(tl.int8), mask=i < N_INIT)
        for start in range(0, N_LOCAL, EDGE):
            i = start + tl.arange(0, EDGE)
            slot = length - N_LOCAL + i
            tl.store(INDEX + b * N + N_INIT + K + i, tl.maximum(slot, 0).to(tl.int64), mask=i < N_LOCAL)
            tl.store(VALID + b * N + N_INIT + K + i, (slot >= N_INIT).to(tl.int8), mask=i < N_LOCAL)


def attended_slots(votes: Tensor, length: Tensor, n_init: int, top_k: int, n_local: int, index: Tensor,
                   valid: Tensor, skip: Tensor) -> None:
    """Write a step's attended slots into ``index`` (b, n_init + top_k + n_local) int64 and ``valid``
    (same shape, bool): the first ``n_init`` slots, the ``top_k`` candidates (slots from n_init up to
    length - n_local) with the most ``votes`` (b, L) float32 (non-negative), in slot order, and the last
    ``n_local``; valid where the slot holds a token that counts (a candidate, for the top-k part).
    ``length`` a 0-d integer tensor on the device, n_init + top_k + n_local <= L. Rows where ``skip``
    (b,) int8 is 1 keep their top-k part."""
    b, slots = votes.shape
    if index.shape != (b, n_init + top_k + n_local) or valid.shape != index.shape or slots < index.shape[1]:
        raise ValueError(f"attended_slots: index and valid must be (b, n_init + top_k + n_local) with at most "
                         f"{slots} slots, got {tuple(index.shape)} and {tuple(valid.shape)}")
    n_blocks = triton.cdiv(slots, BLOCK)
    hist = torch.zeros(b, PASSES, RADIX, device=votes.device, dtype=torch.int32)
    counts = torch.empty(b, n_blocks, 2, device=votes.device, dtype=torch.int32)
    votes, length = votes.contiguous(), length.reshape(1)
    shape = (votes, length, skip)
    for p in range(PASSES):
        _histogram_kernel[(b, n_blocks)](*shape, hist, slots, top_k, n_init, n_local, PASS=p, BLOCK=BLOCK)
    _count_kernel[(b, n_blocks)](*shape, hist, counts, slots, top_k, n_init, n_local, n_blocks, BLOCK=BLOCK)
    _write_kernel[(b, n_blocks)](*shape, hist, counts, index, valid.view(torch.int8), slots, top_k, n_init, n_local,
                                 n_blocks, index.shape[1], BLOCK=BLOCK, BLOCKS=triton.next_power_of_2(n_blocks),
                                 EDGE=EDGE)
