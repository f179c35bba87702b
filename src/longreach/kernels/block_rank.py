"""select_merge's second stage with ``prefilter``: each query summary ranks only its listed candidate
blocks by their best row, and keeps the best ``take``. A drop-in for scoring every block with
:func:`~longreach.kernels.block_scores.block_max_scores`, masking all but the candidates and
:func:`~longreach.kernels.block_topk.top_blocks`.

Scoring every block costs L^2 / block products per head (about 210 ms at 1M tokens on the H200); ranking
n candidates costs L * n, linear in L. The candidates differ from row to row, so a program gathers one
row's n blocks and forms each block's (rows x d) . q on the CUDA cores: the pass is bound by the gathered
keys' reads, not by products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_scores import operands
from .block_topk import MAX_TAKE
from .tiles import batch_head

WARPS, STAGES = 4, 2


@triton.jit
def _rank_kernel(Q, K, BIAS, C, OUT, sqb, sqh, sqn, skb, skh, skn, sbb, sbh, scb, sch, scn, sob, soh, son, H, GROUP,
                 NB, NK, N, scale, PART: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr, TAKE: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    # Program (i, b * H + h): query summary i of head h against its N candidate blocks C[b, h, i, :] (NB for
    # none) of kv head h // GROUP; block c is key rows c * PART .. c * PART + PART - 1, rows past NK absent.
    _, b, h = batch_head(1, H)
    i = tl.program_id(0).to(tl.int64)
    dh = tl.arange(0, D)
    part = tl.arange(0, PART)
    q = tl.load(Q + b * sqb + h * sqh + i * sqn + dh).to(tl.float32)
    keys = K + b * skb + (h // GROUP) * skh
    bias = BIAS + b * sbb + (h // GROUP) * sbh
    cands = C + b * scb + h * sch + i * scn
    slot = tl.arange(0, SLOTS)
    block = tl.load(cands + slot, mask=slot < N, other=NB)
    score = tl.full((SLOTS,), float("-inf"), tl.float32)
    for j in range(N):
        c = tl.load(cands + j)
        index = c * PART + part
        present = (index < NK) & (c < NB)
        k = tl.load(keys + index[:, None] * skn + dh[None, :], mask=present[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        if HAS_BIAS:
            s += tl.load(bias + index, mask=present, other=0.0)
        best = tl.max(tl.where(present, s, float("-inf")), axis=0)
        score = tl.where(slot == j, best, score)
    out = OUT + b * sob + h * soh + i * son
    # Best first, ties to the lower block (as top_blocks); NB where no finite score is left.
    for t in tl.static_range(TAKE):
        top = tl.max(score, axis=0)
        at = tl.min(tl.where(score == top, block, NB), axis=0)
        tl.store(out + t, tl.where(top > float("-inf"), at, NB).to(tl.int64))
        score = tl.where(block == at, float("-inf"), score)


def ranked_blocks(q_bar: Tensor, keys: Tensor, candidates: Tensor, n_blocks: int, part: int, scale: float,
                  take: int, bias: Tensor | None = None) -> Tensor:
    """Indices (b, h, nq, take) int64 of the ``take`` best of each query summary's candidate blocks, best
    first, ties to the lower block, ``n_blocks`` where no candidate with a finite score is left.

    q_bar (b, h, nq, d); keys (b, h_kv, n, d), block c being rows c * part .. c * part + part - 1 (rows from n
    on are absent); candidates (b, h, nq, m) int64 distinct blocks, ``n_blocks`` for none. A block's score is
    the largest q . k * ``scale`` (+ the row's ``bias`` (b, h_kv, n), if given) over its rows, as
    :func:`~longreach.kernels.block_scores.block_max_scores` gives it; q_bar is cast to keys' dtype first and
    the products are summed in float32. Query head j reads kv head j // (h / h_kv)."""
    b, h, nq, d = q_bar.shape
    h_kv, n_keys, m = keys.shape[1], keys.shape[2], candidates.shape[-1]
    if candidates.shape[:3] != q_bar.shape[:3] or not 1 <= take <= min(m, MAX_TAKE):
        raise ValueError(f"ranked_blocks kernel: candidates must be (b, h, nq, m) = {tuple(q_bar.shape[:3])} + (m,) "
                         f"and take in 1..min(m, {MAX_TAKE}), got {tuple(candidates.shape)}, take {take}")
    q_bar, keys, bias, has_bias = operands("ranked_blocks", q_bar, keys, part, bias)
    candidates = candidates.contiguous()  # the kernel reads a summary's candidates as one run
    out = torch.empty(b, h, nq, take, device=q_bar.device, dtype=torch.int64)
    if not out.numel():
        return out
    _rank_kernel[(nq, b * h)](q_bar, keys, bias, candidates, out, *q_bar.stride()[:3], *keys.stride()[:3],
                              *bias.stride()[:2], *candidates.stride()[:3], *out.stride()[:3], h, h // h_kv,
                              n_blocks, n_keys, m, scale, PART=part, D=d, SLOTS=triton.next_power_of_2(m),
                              TAKE=take, HAS_BIAS=has_bias, num_warps=WARPS, num_stages=STAGES)
    return out
