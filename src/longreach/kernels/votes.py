"""TokenSelect's soft votes in one read of the cache: a drop-in for :func:`longreach.cache.select.soft_votes`.

The reference forms the (b, h, L) logits with a batched product whose rows are the few query heads
of a kv group, then masks, softmaxes and sums them in separate passes. Here one Triton pass reads
each key block once for all query heads of its group, writes the logits and each block's running
softmax statistics (max, sum of exp); the per-head normaliser is combined from those block
statistics (flash-decoding's split softmax) and the votes summed from the logits. The number of
stored tokens is read on the device, so a CUDA graph can replay the step at any length.
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


@triton.jit
def _logits_kernel(Q, K, LENGTH, LOGITS, BMAX, BSUM, skb, skh, skl, H_KV, L, NB, scale,
                   G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr):
    # Program (b * h_kv + hk, j): keys j * BLOCK.. of kv head hk against its G query fingerprints.
    bhk, b, hk, j, cols = kv_program(H_KV, BLOCK)
    stored = cols < tl.load(LENGTH)
    s, m, p, head, real = group_scores(Q, K + b * skb + hk * skh, bhk, cols, stored, skl, scale, G, ROWS, D, DOT)
    tl.store(LOGITS + head[:, None] * L + cols[None, :], s, mask=real[:, None] & (cols[None, :] < L))
    tl.store(BMAX + head * NB + j, m, mask=real)
    tl.store(BSUM + head * NB + j, tl.sum(p, 1), mask=real)


@triton.jit
def _sum_kernel(LOGITS, TOP, NORM, VOTES, H, L, BLOCK: tl.constexpr):
    # Program (b, j): votes of slots j * BLOCK.., summing each head's normalised probabilities.
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < L
    votes = tl.zeros((BLOCK,), tl.float32)
    for head in range(b * H, (b + 1) * H):
        s = tl.load(LOGITS + head * L + cols, mask=inside, other=float("-inf"))
        votes += tl.math.exp(s - tl.load(TOP + head)) / tl.load(NORM + head)
    tl.store(VOTES + b * L + cols, votes, mask=inside)


def soft_votes(query: Tensor, keys: Tensor, scale: float, length: Tensor) -> Tensor:
    """(b, L) float32: sum over heads of softmax over the first ``length`` keys of qbar . k * scale.

    ``query`` (b, h, Lq, d) is averaged over its rows; ``keys`` (b, h_kv, L, d) are read once per kv
    head; ``length`` a 0-d integer tensor on the keys' device, 1 <= length <= L; keys from it on vote 0.
    """
    b, h, _, d = query.shape
    h_kv, slots = keys.shape[1], keys.shape[2]
    if d not in HEAD_DIMS or h % h_kv:
        raise ValueError(f"soft_votes kernel: head_dim must be in {HEAD_DIMS} and heads a multiple of kv heads, "
                         f"got head_dim={d}, heads={h}, kv heads={h_kv}")
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    fingerprint = query.mean(2).contiguous()
    n_blocks = triton.cdiv(slots, BLOCK)
    logits = torch.empty(b, h, slots, device=keys.device, dtype=torch.float32)
    block_max = torch.empty(b, h, n_blocks, device=keys.device, dtype=torch.float32)
    block_sum = torch.empty_like(block_max)
    group = h // h_kv
    _logits_kernel[(b * h_kv, n_blocks)](
        fingerprint, keys, length.reshape(1), logits, block_max, block_sum, *keys.stride()[:3], h_kv, slots, n_blocks,
        scale, G=group, ROWS=max(16, triton.next_power_of_2(group)), D=d, BLOCK=BLOCK,
        DOT="ieee" if keys.dtype == torch.float32 else "tf32",
    )
    top = block_max.amax(-1, keepdim=True)
    norm = (block_sum * (block_max - top).exp()).sum(-1)
    votes = torch.empty(b, slots, device=keys.device, dtype=torch.float32)
    _sum_kernel[(b, triton.cdiv(slots, SUM_BLOCK))](logits, top, norm, votes, h, slots, BLOCK=SUM_BLOCK)
    return votes
