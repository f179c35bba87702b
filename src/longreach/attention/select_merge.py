"""Correlation-aware select-and-merge attention (Wang, Li, Bai, Li, 2024, arXiv 2410.04211).

From the paper: queries and keys are cut into regions, region-to-region correlation picks a few
key regions per query region (selection), the picked regions are attended together (merge), and
for pre-training/extrapolation rotary positions go on the selected tokens only.
longreach's definition of the parts the paper's text did not settle (each an option):
- blocks of ``block_size`` B = 64 tokens, the last one ragged;
- correlation of query block i and key block j (causal, j <= i) is, by default, the largest
  rotary logit R(512) qbar_i . k / sqrt(d) over the un-rotated keys k of block j, with qbar_i the
  mean of the block's last 8 query rows turned to a distance of 512 positions, chosen per query head
  (``score="max"``, ``query_rows=8``, ``score_distance=512``, ``per_head=True``: measured on
  SmolLM2 needles, `benchmarks/results/smollm2/selection/`). The options: score key blocks by their
  mean key (``"mean"``, the block means of the paper's region correlation), Quest's per-channel bound
  (``"minmax"``) or their best part mean (``"representatives"``); summarise a query block by all its
  rows (``query_rows=None``); leave the summary un-turned (``score_distance=None``); share one
  selection per kv group (``per_head=False``) by the heads' mean score or softmax vote (``vote``);
  with ``value_norm`` a key's logit gains log |v| (``score="max"`` only), so a block ranks by its key
  of largest output share exp(logit) |v| rather than largest logit: keys that draw attention as a
  no-op (sink-like tokens, whose values are small) stop outranking the ones that carry content.
  Turning the summary scores a block as attention would see it that far away (InfLLM gives all
  distant memory one distance); un-rotated, the high-frequency channels add noise; with ``shared``,
  that many of the ``top_k`` picks are common to the layer's heads (the blocks most heads rank among
  their best two), so a block that a few retrieval heads find reaches every head; with ``carry``,
  that many are the blocks that the surest head of this layer or of any earlier one in the same
  forward pass found (a head's largest softmax over the candidates at temperature 1/2), so the few
  heads that find a needle in a middle layer hand it to every head of the layers after; with ``prefilter``,
  a head's candidates are first cut to that many by the ``representatives`` score, and ``score`` ranks those
  (on SmolLM2, the best key among 16 blocks cut so kept the needle's block in more heads than among all
  blocks: ``benchmarks/results/smollm2/selection/prefilter_*``, a recall proxy);
- each query block keeps its ``top_k`` best key blocks plus its own block, the ``local`` blocks
  before it and the first ``sink`` blocks;
- merge: the kept blocks, in original order, form one sequence attended with one softmax
  (causal inside the diagonal block): O(L (top_k + local + sink + 1) B) work, O(L) memory;
- ``positions="selected"``: merged keys get rotary positions 0..m-1 in merged order and each
  query the position of its own key, so no relative distance exceeds the merged length;
  ``positions="absolute"`` keeps the model's own positions. A merged span longer than the model's
  ``train_length`` has its merged positions linearly interpolated into that length.
In decoding the query-block summary is over the query rows present in the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import kernels
from ..positions import Rope
from .core import (
    Logits,
    Positions,
    Tile,
    blocked_attention,
    check_shapes,
    dot,
    listed_attention,
    plain_logits,
    require_rope,
    rotated_keys,
    tile_budget,
)

SCORES = ("mean", "minmax", "representatives", "max")
VOTES = ("mean", "softmax")


def block_means(x: Tensor, block: int, first: int = 0, last_rows: int | None = None) -> Tensor:
    """Mean of x (b, h, L, d) over blocks of the index grid; row t has index first + t.

    Returns (b, h, n_blocks, d) for the blocks from first // block to the last; partial blocks
    average the rows they hold, and with ``last_rows`` only the last ``last_rows`` rows each block holds.
    """
    b, h, length, d = x.shape
    lead, tail = first % block, -(first + length) % block
    acc = torch.promote_types(x.dtype, torch.float32)
    if last_rows is not None and last_rows < block:
        if not (lead or tail):  # whole blocks: one strided sum, no gather (a prefill's usual case)
            return x.view(b, h, -1, block, d)[:, :, :, block - last_rows:].sum(3, dtype=acc) / last_rows
        return _last_rows_means(x, block, lead, last_rows, acc)
    slot = torch.arange(lead + length + tail, device=x.device)
    weight = (slot >= lead) & (slot < lead + length)
    padded = x if not (lead or tail) else torch.cat([x.new_zeros(b, h, lead, d), x, x.new_zeros(b, h, tail, d)], 2)
    sums = padded.view(b, h, -1, block, d).sum(3, dtype=acc)
    return sums / weight.to(acc).view(-1, block).sum(1).clamp_min(1)[:, None]


def _last_rows_means(x: Tensor, block: int, lead: int, last_rows: int, acc: torch.dtype) -> Tensor:
    """:func:`block_means` over the last ``last_rows`` rows of each block, gathered: only those rows are read."""
    b, h, length, d = x.shape
    start = torch.arange(0, lead + length, block, device=x.device)
    end = (start + block).clamp_max(lead + length)
    rows = end[:, None] - last_rows + torch.arange(last_rows, device=x.device)
    held = rows >= start.clamp_min(lead)[:, None]
    picked = x.index_select(2, (rows.clamp_min(lead) - lead).flatten()).view(b, h, -1, last_rows, d)
    sums = (picked * held[..., None].to(x.dtype)).sum(3, dtype=acc)
    return sums / held.sum(1).to(acc)[:, None]


def _padded_blocks(x: Tensor, block: int, fill: float) -> Tensor:
    """x (b, h, L, d) as (b, h, n_blocks, block, d), the last block filled up with ``fill``."""
    tail = -x.shape[2] % block
    if tail:
        x = torch.cat([x, x.new_full((*x.shape[:2], tail, x.shape[3]), fill)], 2)
    return x.view(*x.shape[:2], -1, block, x.shape[3])


def summary_rows(score: str, block: int, representatives: int) -> int:
    """Rows of :func:`key_summary` per key block: 1 (``mean``), ``representatives`` or ``block`` (``max``)."""
    if score == "representatives" and block % representatives:
        raise ValueError(f"select_merge: block_size {block} must be a multiple of representatives {representatives}")
    return {"representatives": representatives, "max": block}.get(score, 1)


def value_logits(v: Tensor) -> Tensor:
    """log |v| (b, h_kv, Lk) float32 of values v (b, h_kv, Lk, d): a key's share of the output is
    exp(logit + log |v|) up to the softmax's normaliser."""
    return torch.linalg.vector_norm(v.float(), dim=-1).clamp_min(torch.finfo(torch.float32).tiny).log()


def key_summary(k: Tensor, block: int, score: str, representatives: int, v: Tensor | None = None
                ) -> tuple[Tensor, ...]:
    """What ``score`` keeps of each key block of k (b, h_kv, Lk, d), each (b, h_kv, 1, n, d): the mean key
    (``mean``), the per-channel maximum and minimum (``minmax``), the means of the block's
    ``representatives`` equal parts, n = n_blocks * representatives (``representatives``), or every key
    (``max``), then with values v the keys' :func:`value_logits` (b, h_kv, 1, 1, Lk) (``max`` only). Means are
    summed in float32 and returned in k's dtype, so 16-bit keys' summaries take the tensor-core products (in
    float32 the best-key kernel's FMA path made prefilter's first stage 11x slower than scoring every key, H200)."""
    if score == "max":
        return (k[:, :, None],) if v is None else (k[:, :, None], value_logits(v)[:, :, None, None])
    if score == "minmax":
        kf = k.float() if k.dtype in (torch.float16, torch.bfloat16) else k
        return (_padded_blocks(kf, block, float("-inf")).amax(3)[:, :, None],
                _padded_blocks(kf, block, float("inf")).amin(3)[:, :, None])
    return (block_means(k, block // summary_rows(score, block, representatives)).to(k.dtype)[:, :, None],)


def block_scores(q_bar: Tensor, summary: tuple[Tensor, ...], score: str, n_blocks: int, part: int) -> Tensor:
    """Scores (b, h_kv, g, nq, n_blocks) of query summaries q_bar (b, h_kv, g, nq, d) against
    :func:`key_summary`'s, divided by sqrt(d):
    - ``mean``: q_bar . kbar_j, the block's mean key;
    - ``minmax``: Quest's bound sum_c max(q_c min_c, q_c max_c) over the block's per-channel extremes;
    - ``representatives``: the best q_bar . r over the means r of the block's equal parts (a few
      representative keys per block, as InfLLM scores its memory units by its representative tokens);
    - ``max``: the best q_bar . k over the block's keys (plus each key's log |v| where the summary has them).
    ``part`` is :func:`summary_rows`: the summary rows per block.
    """
    scale = q_bar.shape[-1] ** -0.5
    if score == "minmax":
        top, low = summary
        qf = q_bar.to(top.dtype)
        return (qf.clamp_min(0) @ top.transpose(-1, -2) + qf.clamp_max(0) @ low.transpose(-1, -2)) * scale
    scores = q_bar @ summary[0].transpose(-1, -2).to(q_bar.dtype) * scale
    if len(summary) == 2:
        scores = scores + summary[1]
    if part == 1:
        return scores
    missing = n_blocks * part - scores.shape[-1]
    scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], missing), float("-inf"))], -1)
    return scores.view(*scores.shape[:-1], n_blocks, part).amax(-1)


def _fused(score: str, q: Tensor, part: int) -> bool:
    """Whether a block's best row is scored by the kernel, which never writes the (rows x keys) products."""
    return (score in ("representatives", "max") and kernels.enabled(q) and q.shape[-1] in kernels.HEAD_DIMS
            and not part & (part - 1) and part <= 128)


def _chunk_rows(dtype: torch.dtype, selections: int, n_blocks: int, budget: int | None) -> int:
    from ..kernels.block_scores import SCORES_PER_CHUNK, chunk_rows

    return chunk_rows(dtype, selections, n_blocks, SCORES_PER_CHUNK if budget is None else budget)


def _fused_top(q: Tensor, n_blocks: int, take: int, plain: bool) -> bool:
    """Whether the kernel picks the blocks (masking, top-k, dropping non-finite picks in one pass): on
    ``plain`` scores (per head, or a group's mean; the softmax vote needs the candidate mask first)."""
    if not (plain and kernels.enabled(q)):
        return False
    from ..kernels.block_topk import MAX_TAKE

    return 1 <= take <= min(n_blocks, MAX_TAKE)


def _top_blocks(scores: Tensor, take: int, first_block: int, sink: int, local: int) -> Tensor:
    from ..kernels.block_topk import top_blocks

    return top_blocks(scores, take, first_block, sink, local)


def top_indices(scores: Tensor, take: int) -> Tensor:
    """Indices (..., take) of the ``take`` largest of ``scores`` (..., n), best first, ties going to the lower
    index (so each prefix holds that many best).

    torch.topk leaves ties to its kernel, which may break them differently for another tensor shape, so
    a prompt prefilled in chunks could select other blocks than in one pass (a block's best key ties
    with another block's wherever a token repeats, as in the first layer)."""
    threshold = scores.topk(take, dim=-1).values[..., -1:]
    above, tied = scores > threshold, scores == threshold
    room = take - above.sum(-1, keepdim=True, dtype=torch.int32)
    chosen = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))
    # distinct for the chosen (float32 holds every index below 2**24 blocks): the lower index first
    rank = torch.arange(scores.shape[-1], 0, -1, device=scores.device, dtype=torch.float32)
    ascending = torch.where(chosen, rank, 0.0).topk(take, dim=-1).indices
    order = scores.gather(-1, ascending).sort(dim=-1, descending=True, stable=True).indices
    return ascending.gather(-1, order)


SHARED_VOTES = 2  # each selection's best blocks that count as its votes for the shared ones
CARRY_TEMPERATURE = 0.5  # of the softmax whose largest probability says how sure a head is of a block


@dataclass
class LayerChain:
    """What ``carry`` hands from layer to layer in one forward pass: per layer index, the surest blocks of
    each query block as (sureness, block) tensors (b, n_q, carry). Layer i reads what layer i - 1 wrote, so
    a checkpointed layer recomputed in the backward pass reads what it read in the forward pass."""

    written: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def link(self, layer: int) -> Link:
        return Link(self, layer)


@dataclass(frozen=True)
class Link:
    """One layer's place in a :class:`LayerChain`."""

    chain: LayerChain
    layer: int

    def prior(self) -> tuple[Tensor, Tensor] | None:
        return self.chain.written.get(self.layer - 1)

    def keep(self, sure: Tensor, blocks: Tensor) -> None:
        self.chain.written[self.layer] = (sure, blocks)


def _finite_top(scores: Tensor, take: int) -> Tensor:
    """:func:`top_indices` of masked ``scores`` (..., n), a pick without a finite score replaced by n."""
    best = top_indices(scores, take)
    return torch.where(torch.isfinite(scores.gather(-1, best)), best, scores.shape[-1])


def _prior(link: Link | None, shape: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    prior = None if link is None else link.prior()
    if prior is not None and tuple(prior[0].shape) != shape:
        raise ValueError(f"select_merge carry: layer {link.layer - 1} left blocks for {tuple(prior[0].shape)} "
                         f"(batch, query blocks, carry), this layer needs {shape}: every layer of one forward "
                         "pass must select with the same options over the same queries")
    return prior


def with_shared(best: Callable[[int], Tensor], take: int, shared: int, n_k: int) -> Tensor:
    """Picks (b, s, rows, take) of s selections (heads or kv groups) from ``best(n)``, each selection's n best
    blocks (b, s, rows, n), best first, n_k where none is left: the ``shared`` blocks found most often among
    the selections' best :data:`SHARED_VOTES` (ties to the lower block; none where no block has a vote),
    which all s selections keep, then each selection's best ``take - shared`` of the blocks not shared, so
    that no pick repeats another."""
    shared = min(shared, take)
    ranked = best(take)
    if not shared:
        return ranked
    votes = ranked[..., : min(SHARED_VOTES, take)]
    b, s, rows, _ = votes.shape
    counts = torch.zeros(b, rows, n_k + 1, device=votes.device)
    ballots = votes.transpose(1, 2).flatten(2)
    counts.scatter_add_(-1, ballots, torch.ones_like(ballots, dtype=counts.dtype))
    common = _finite_top(counts[..., :n_k].masked_fill(counts[..., :n_k] == 0, float("-inf")), shared)
    return with_common(ranked, common[:, None].expand(b, s, rows, shared), n_k)


def with_common(ranked: Tensor, common: Tensor, n_k: int) -> Tensor:
    """Picks (b, s, rows, take) from each selection's ``take`` best blocks ``ranked`` (b, s, rows, take), best
    first, and the blocks ``common`` (b, s, rows, c) to every selection, n_k for none: the common ones first,
    then the selection's best of the others until ``take`` (at most c of its best are common, so enough
    remain), n_k where none is left."""
    is_common = (ranked[..., :, None] == common[..., None, :]).any(-1)
    unused, order = torch.cat([common == n_k, is_common | (ranked == n_k)], -1).to(torch.uint8).sort(
        dim=-1, stable=True)
    take = ranked.shape[-1]
    picks = torch.cat([common, ranked], -1).gather(-1, order[..., :take])
    return torch.where(unused[..., :take].bool(), n_k, picks)


def surest(scores: Tensor, prior: tuple[Tensor, Tensor] | None, carry: int, n_k: int) -> tuple[Tensor, Tensor]:
    """The ``carry`` blocks (b, rows, carry) that some selection is surest of, and that sureness: each
    selection's softmax over its candidates' ``scores`` (b, s, rows, n_k), -inf for non-candidates, at
    :data:`CARRY_TEMPERATURE`, its largest over the selections and over ``prior`` (the same query blocks'
    (sureness, blocks) of an earlier layer). n_k (sureness 0) where no block has any."""
    sure = (scores.detach().float() / CARRY_TEMPERATURE).softmax(-1).nan_to_num(0.0).amax(1)  # no graph kept
    sure = torch.cat([sure, sure.new_zeros(*sure.shape[:-1], 1)], -1)
    if prior is not None:
        sure.scatter_reduce_(-1, prior[1], prior[0], "amax")
    blocks = top_indices(sure[..., :n_k], carry)
    values = sure.gather(-1, blocks)
    return values, torch.where(values > 0, blocks, n_k)


def _chunk_scores(q_bar: Tensor, summary: tuple[Tensor, ...], score: str, n_blocks: int, part: int, fused: bool,
                  first_block: int) -> Tensor:
    if not fused:
        return block_scores(q_bar, summary, score, n_blocks, part)
    from ..kernels.block_scores import block_max_scores

    bias = summary[1][:, :, 0, 0] if len(summary) == 2 else None
    out = block_max_scores(q_bar.flatten(1, 2), summary[0][:, :, 0], n_blocks, part, q_bar.shape[-1] ** -0.5,
                           first_block, bias)
    return out.view(*q_bar.shape[:-1], n_blocks)


def _prefiltered(q_bar: Tensor, summary: tuple[Tensor, ...], n_k: int, part: int, candidate: Tensor, keep: int,
                 first_block: int) -> Tensor:
    """Mask (b, h_kv, g, rows, n_k) of the ``keep`` best ``candidate`` blocks of each selection by the
    ``representatives`` score of its query summaries q_bar (b, h_kv, g, rows, d) against the keys' part means
    ``summary`` (:func:`key_summary`, ``part`` of them a block)."""
    scores = _chunk_scores(q_bar, summary, "representatives", n_k, part, _fused("representatives", q_bar, part),
                           first_block).masked_fill(~candidate, float("-inf"))
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top_indices(scores, min(keep, n_k)), True)
    return kept & candidate


def _ranked(q_bar: Tensor, summary: tuple[Tensor, ...], parts: tuple[Tensor, ...], n_k: int, part: int,
            parts_rows: int, keep: int, first_block: int, sink: int, local: int, take: int) -> Tensor:
    """Picks (b, h, rows, take) of query summaries q_bar (b, h_kv, g, rows, d) in two kernel passes: each head's
    ``keep`` best candidates by the ``representatives`` score against the part means ``parts``, then the best
    ``take`` of those by the best row of ``summary`` (``part`` rows a block), gathering only their keys. The
    picks of :func:`_prefiltered`'s mask and the top-k kernel, without scoring every block by ``summary``."""
    from ..kernels.block_rank import ranked_blocks

    scale = q_bar.shape[-1] ** -0.5
    scores = _chunk_scores(q_bar, parts, "representatives", n_k, parts_rows, True, first_block).flatten(1, 2)
    short = _top_blocks(scores, min(keep, n_k), first_block, sink, local)
    bias = summary[1][:, :, 0, 0] if len(summary) == 2 else None
    return ranked_blocks(q_bar.flatten(1, 2), summary[0][:, :, 0], short, n_k, part, scale, take, bias)


def _staged(q: Tensor, fused: bool, fused_top: bool, prefilter: int, carry: int, parts_rows: int, n_k: int) -> bool:
    """Whether ``prefilter`` takes :func:`_ranked`'s two passes (carry needs every candidate's score)."""
    from ..kernels.block_topk import MAX_TAKE

    return (fused and fused_top and prefilter > 0 and not carry and _fused("representatives", q, parts_rows)
            and min(prefilter, n_k) <= MAX_TAKE)


def select_blocks(q: Tensor, k: Tensor, *, block_size: int, top_k: int, local: int, sink: int, score: str = "mean",
                  query_rows: int | None = None, per_head: bool = False, representatives: int = 4,
                  vote: str = "mean", rope: Rope | None = None, score_distance: int | None = None,
                  v: Tensor | None = None, causal: bool = True, shared: int = 0, carry: int = 0,
                  link: Link | None = None, prefilter: int = 0) -> Tensor:
    """Key-block table (b, h, nq, K) of select-and-merge, -1 padded, ascending.

    q (b, h, Lq, d) un-rotated, k (b, h_kv, Lk, d) un-rotated. K = sink + top_k + local + 1. Each query
    block is summarised by the mean of its rows (its last ``query_rows`` rows, if given) and scores the
    key blocks by :func:`block_scores`; the query heads of a kv group share one selection unless
    ``per_head``: by the mean of their scores (``vote="mean"``) or by the sum of each head's softmax over
    the candidate blocks (``vote="softmax"``, TokenSelect's soft voting: a head sure of a block outvotes
    heads that spread their attention). With ``score_distance`` the summaries are turned by ``rope`` at
    that position first, so each score is the rotary logit at that distance. Given values v (b, h_kv, Lk, d)
    (``score="max"`` only), each key's logit gains log |v| (:func:`value_logits`). Scores are formed for a
    bounded number of query blocks at a time,
    so memory stays O(L) plus one (chunk x L/B) score tile of at most the core's tile budget.
    With ``prefilter`` > 0 (per head only), a head's candidates are first cut to its ``prefilter`` best by the
    ``representatives`` score (the best of each block's ``representatives`` part means, :func:`block_scores`),
    and ``score`` ranks those only (on the kernel path without ``carry``, only those are scored by ``score``:
    :func:`_ranked`).
    With ``shared`` > 0, ``shared`` of the ``top_k`` picks are common to all the layer's selections (heads, or
    kv groups): the blocks that most of them count among their best :data:`SHARED_VOTES` (:func:`with_shared`).
    With ``carry`` > 0 instead, ``carry`` of them are the blocks some selection of this layer, or of the
    layers before it that wrote to ``link``'s chain, was surest of (:func:`surest`); the layer writes its own.
    With ``causal=False`` q and k are separate sequences (non-causal self or cross attention): query block
    i is rows i*B.. of q, every key block is a candidate, and the forced blocks are the first ``sink`` and
    those within ``local`` of index i on either side; K = sink + top_k + 2 local + 1.
    """
    group = check_shapes(q, k, k if v is None else v, causal)
    for name, value in (("shared", shared), ("carry", carry)):
        if not 0 <= value <= top_k:
            raise ValueError(f"select_merge: {name} must be in 0..top_k ({top_k}), got {value}")
    if prefilter and (prefilter < top_k or not per_head):
        raise ValueError(f"select_merge: prefilter must be 0 or at least top_k ({top_k}) and needs per_head=True, "
                         f"got prefilter={prefilter}, per_head={per_head}")
    if shared and carry:
        raise ValueError(f"select_merge: shared ({shared}) and carry ({carry}) both choose the common picks; "
                         "set one of them to 0")
    if v is not None and score != "max":
        raise ValueError(f"select_merge: value_norm weighs each key by its value, so it needs score='max', "
                         f"got {score!r}")
    b, h, q_len, d = q.shape
    h_kv, first = k.shape[1], k.shape[2] - q_len if causal else 0
    q_bar = block_means(q, block_size, first, query_rows).view(b, h_kv, group, -1, d)
    if score_distance is not None:
        q_bar = require_rope(rope, "select_merge score_distance").rotate(q_bar, q_bar.new_full((1,), score_distance))
    if score == "mean" and not per_head and vote == "mean":  # linear in q: the group's mean query, one product
        q_bar = q_bar.mean(2, keepdim=True)
    n_q, n_k = q_bar.shape[3], -(-k.shape[2] // block_size)
    heads = h if per_head else h_kv
    device = q.device
    q_block = torch.arange(first // block_size, first // block_size + n_q, device=device)[:, None]
    sinks = torch.arange(sink, device=device).expand(n_q, sink)
    sinks = torch.where(((sinks <= q_block) | (not causal)) & (sinks < n_k), sinks, n_k)
    near = q_block + torch.arange(-local, (0 if causal else local) + 1, device=device)
    near = torch.where((near >= sink) & (near >= 0) & (near < n_k), near, n_k)
    picked = torch.full((b, heads, n_q, top_k), n_k, dtype=torch.long, device=device)
    take = min(top_k, n_k)
    part = summary_rows(score, block_size, representatives)
    fused = _fused(score, q, part)
    key_block = torch.arange(n_k, device=device)
    summary = key_summary(k, block_size, score, representatives, v)
    parts = None
    if prefilter:  # the first stage's part means, which score="representatives" has already formed
        parts = summary if score == "representatives" else key_summary(k, block_size, "representatives",
                                                                        representatives)
    parts_rows = summary_rows("representatives", block_size, representatives) if prefilter else 0
    fused_top = causal and _fused_top(q, n_k, take, per_head or vote == "mean")
    carry = min(carry, take)
    staged = _staged(q, fused, fused_top, prefilter, carry, parts_rows, n_k)
    selections = b * q_bar.shape[1] * q_bar.shape[2]
    if fused:  # scores that go straight to the top-k kernel may take a larger chunk than those PyTorch reads
        direct = fused_top and not carry and (staged or not prefilter)  # no PyTorch pass over the scores
        rows = _chunk_rows(summary[0].dtype, selections, n_k, None if direct else tile_budget(device))
    else:
        rows = max(1, tile_budget(device) // (selections * n_k * part))
    if carry:
        prior = _prior(link, (b, n_q, carry))
        kept = (q.new_zeros(b, n_q, carry, dtype=torch.float32), picked.new_full((b, n_q, carry), n_k))
    for lo in range(0, n_q if take else 0, rows):
        here = slice(lo, lo + rows)
        if staged:
            best = functools.partial(_ranked, q_bar[:, :, :, here], summary, parts, n_k, part, parts_rows, prefilter,
                                     first // block_size + lo, sink, local)
            picked[:, :, here, :take] = with_shared(best, take, shared, n_k)
            continue
        # Non-causal: every block lies at or before the last one, so the causal kernel scores them all.
        scores = _chunk_scores(q_bar[:, :, :, lo : lo + rows], summary, score, n_k, part, fused,
                               first // block_size + lo if causal else n_k)
        if not fused_top or carry or prefilter:  # the kernel masks the non-candidates itself
            apart = key_block < q_block[here] - local if causal else (key_block - q_block[here]).abs() > local
            candidate = (key_block >= sink) & apart
        if prefilter:
            short = _prefiltered(q_bar[:, :, :, here], parts, n_k, parts_rows, candidate, prefilter,
                                 first // block_size + lo if causal else n_k)
            scores = scores.masked_fill(~short, float("-inf"))
        if fused_top:
            scores = scores.flatten(1, 2) if per_head else scores.mean(2)
            best = functools.partial(_top_blocks, scores, first_block=first // block_size + lo,
                                     sink=sink, local=local)
            if carry:
                scores = scores.masked_fill(~candidate, float("-inf"))
        else:
            scores = scores.masked_fill(~candidate, float("-inf"))
            if per_head:
                scores = scores.flatten(1, 2)
            elif vote == "softmax":
                scores = torch.where(candidate.any(-1, keepdim=True), scores.softmax(-1), 0.0).sum(2)
                scores = scores.masked_fill(~candidate, float("-inf"))
            else:
                scores = scores.mean(2)
            best = functools.partial(_finite_top, scores)
        if carry:
            sure, common = surest(scores, prior and (prior[0][:, here], prior[1][:, here]), carry, n_k)
            kept[0][:, here], kept[1][:, here] = sure, common
            common = common[:, None].expand(*scores.shape[:3], carry)
            picked[:, :, here, :take] = with_common(best(take), common, n_k)
        else:
            picked[:, :, here, :take] = with_shared(best, take, shared, n_k)
    if link is not None and carry:
        link.keep(*kept)
    forced = torch.cat([sinks, near], dim=-1).expand(b, heads, n_q, -1)
    table = torch.cat([forced, picked], dim=-1).sort(dim=-1).values
    table = torch.where(table < n_k, table, -1)
    return table if per_head else table.repeat_interleave(group, dim=1)


def merged_rope(rope: Rope, span: int, train_length: int | None) -> Rope:
    """``rope`` for merged positions 0..span-1: frequencies divided by span / train_length where the
    span exceeds the trained length, so that no merged distance leaves the trained window."""
    if train_length is None or span <= train_length:
        return rope
    return Rope(rope.inv_freq * (train_length / span), rope.scaling)


def _selected_logits(rope: Rope, scale: float) -> Logits:
    def logits(t: Tile) -> Tensor:
        # Merged position of each column: how many real columns precede it in merged order.
        present = (t.k_index >= 0).long()
        k_pos = present.cumsum(-1) - 1
        own = (t.k_index[..., None, :] == t.q_index[..., None]).long()
        q_pos = (own * k_pos[..., None, :]).sum(-1)
        return dot(rope.rotate(t.q, q_pos), rope.rotate(t.k[0], k_pos), scale)

    return logits


def select_merge(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Positions,
    rope: Rope | None,
    scale: float | None = None,
    block_size: int = 64,
    top_k: int = 8,
    local: int = 2,
    sink: int = 1,
    position_mode: str = "selected",
    score: str = "max",
    query_rows: int | None = 8,
    per_head: bool = True,
    representatives: int = 4,
    vote: str = "mean",
    score_distance: int | None = 512,
    value_norm: bool = False,
    train_length: int | None = None,
    shared: int = 0,
    carry: int = 0,
    link: Link | None = None,
    prefilter: int = 0,
) -> Tensor:
    """Select-and-merge attention. q (b, h, Lq, d), k/v (b, h_kv, Lk, d) -> (b, h, Lq, d).

    ``score``, ``query_rows``, ``per_head``, ``representatives``, ``vote``, ``score_distance``, ``value_norm``,
    ``shared``, ``carry`` (with ``link``, this layer's place in the forward pass' :class:`LayerChain`) and
    ``prefilter`` choose how blocks are selected (:func:`select_blocks`, turning the summaries with the merged
    positions' rotary).
    With ``position_mode="selected"``, a merged span (at most K blocks, at most Lk) that may exceed
    ``train_length`` (the model's trained length) has its positions linearly interpolated into it.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if position_mode == "selected":
        # A query's merged span is at most its K blocks and at most the keys there are: a prompt inside the
        # trained length keeps the model's own frequencies (every block kept is then exactly dense attention).
        span = min((sink + top_k + local + 1) * block_size, k.shape[-2])
        rope = merged_rope(require_rope(rope, "select_merge"), span, train_length)
    blocks = select_blocks(q, k, block_size=block_size, top_k=top_k, local=local, sink=sink, score=score,
                           query_rows=query_rows, per_head=per_head, representatives=representatives, vote=vote,
                           rope=rope, score_distance=score_distance, v=v if value_norm else None, shared=shared,
                           carry=carry, link=link, prefilter=prefilter)
    if kernels.use_kernel(q, positions, block_size):
        return kernels.sparse_attention(q, k, v, blocks, positions=positions, rope=rope, block_size=block_size,
                                    scale=scale, merged_positions=position_mode == "selected")
    if position_mode == "selected":
        keys, logits = (k,), _selected_logits(rope, scale)
    else:
        keys, logits = rotated_keys(rope, k, positions), plain_logits(rope, scale)
    return blocked_attention(q, keys, v, positions, block_size=block_size, key_blocks=blocks, logits=logits)


def noncausal_select_merge(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, block_size: int = 64,
                           top_k: int = 8, local: int = 2, sink: int = 1, score: str = "max",
                           query_rows: int | None = 8, per_head: bool = True, representatives: int = 4,
                           vote: str = "mean", shared: int = 0) -> Tensor:
    """Select-and-merge without causality, for non-causal self attention and cross attention (CAB's
    other patterns). q (b, h, Lq, d), k/v (b, h_kv, Lk, d) -> (b, h, Lq, d).

    q and k are separate sequences, already rotated at their own positions (merged positions are a
    causal notion, so none are applied). Query block i keeps the first ``sink`` key blocks, those within
    ``local`` of index i, and its ``top_k`` best others by :func:`select_blocks`'s score (un-turned), and
    attends them with one softmax: the block-sparse kernel's ``causal=False`` path, or
    :func:`~longreach.attention.core.listed_attention` where no kernel runs. Not an LM attention method:
    a causal model must not see later tokens.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    blocks = select_blocks(q, k, block_size=block_size, top_k=top_k, local=local, sink=sink, score=score,
                           query_rows=query_rows, per_head=per_head, representatives=representatives, vote=vote,
                           causal=False, shared=shared)
    if kernels.enabled(q) and kernels.supports(q, block_size):
        from ..kernels.block_sparse import block_sparse_attention

        return block_sparse_attention(q, k, v, blocks, block_size=block_size, scale=scale, causal=False)
    return listed_attention(q, k, v, blocks, block_size=block_size, scale=scale)
