"""Cache policies as transformers cache layers: sinks + window, H2O, TokenSelect.

Each layer stores keys un-rotated (longreach hands attention the un-rotated key, see ``hf.py``), so
positions are given at attention time: key j of the cache gets a position one more than key j - 1,
which re-indexes the kept tokens (StreamingLLM's and the H2O recipe's rolling positions). After
``update`` appends a step's keys, the longreach attention function calls the layer's ``attend``,
which computes the step's attention its own way and then evicts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import Positions
from ..kernels import HAS_TRITON, decode_kernels, enabled
from ..positions import Rope
from . import select

if HAS_TRITON:
    from ..kernels.rotary import rotate_frames
    from ..kernels.votes import recall as recall_kernel
    from ..kernels.votes import soft_votes as soft_votes_kernel

# The configured attention method over (q, k, v, positions): the prompt's own pass goes through it.
Full = Callable[[Tensor, Tensor, Tensor, Positions], Tensor]


def soft_votes(q: Tensor, keys: Tensor, scale: float, length: Tensor | None = None,
               skip: Tensor | None = None) -> Tensor:
    """:func:`select.soft_votes` over the first ``length`` keys (a 0-d tensor on the keys' device;
    all of them if None), in the fused Triton pass where it covers the keys, which then leaves the
    rows where ``skip`` (b,) is nonzero unwritten (the reference computes them anyway)."""
    if decode_kernels(keys):
        stored = torch.full((), keys.shape[2], device=keys.device) if length is None else length
        return soft_votes_kernel(q, keys, scale, stored, skip)
    mask = None if length is None else torch.arange(keys.shape[2], device=keys.device) < length
    return select.soft_votes(q, keys, scale, mask)


def recall(fingerprint: Tensor, stored: Tensor, threshold: float, counts: Tensor) -> Tensor:
    """TokenSelect's selection cache on the device: (b,) flags, nonzero where :func:`select.similar`
    holds for the row's ``fingerprint`` (b, n) and its ``stored`` one (b, n) float32, which the other
    rows overwrite; ``counts`` (2,) gains (rows tested, rows reusing). In one Triton program per row
    where the kernels run."""
    if enabled(stored):
        return recall_kernel(fingerprint, stored, threshold, counts)
    reuse = select.similar(fingerprint, stored, threshold)
    stored.copy_(torch.where(reuse[:, None], stored, fingerprint.float()))
    counts[0] += len(reuse)
    counts[1] += reuse.sum()
    return reuse


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (b, h or 1, n) of x (b, h, L, d) along L."""
    index = index.expand(x.shape[0], x.shape[1], -1)
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


class PolicyLayer(DynamicLayer):
    """A dynamic layer whose attention over the cache and whose eviction belong to a policy."""

    def attend(self, q: Tensor, where: Positions, rope: Rope | None, scale: float, full: Full) -> Tensor:
        raise NotImplementedError

    def keep(self, index: Tensor) -> None:
        """Keep cached rows ``index`` (L,) or (b, h_kv, n), in order."""
        if index.dim() == 1:
            self.keys, self.values = self.keys[:, :, index], self.values[:, :, index]
        else:
            self.keys, self.values = _gather(self.keys, index), _gather(self.values, index)


class SinksLayer(PolicyLayer):
    """StreamingLLM: the first ``sink`` tokens and the last ``budget - sink``; attention over all of
    them and the step's own tokens, then the oldest window token leaves."""

    def __init__(self, budget: int, sink: int = 4):
        super().__init__()
        self.budget, self.sink = budget, sink

    def attend(self, q: Tensor, where: Positions, rope: Rope | None, scale: float, full: Full) -> Tensor:
        out = full(q, self.keys, self.values, where)
        self.keep(select.sink_window(self.keys.shape[2], self.sink, self.budget - self.sink, q.device))
        return out


class H2OLayer(PolicyLayer):
    """H2O: dense attention over the cache; each key accumulates the attention mass it receives; past
    ``budget`` tokens the ``recent`` last ones stay and, of the older, those with the highest score."""

    def __init__(self, budget: int, recent: int | None = None):
        super().__init__()
        self.budget = budget
        self.recent = budget // 2 if recent is None else recent
        self.scores: Tensor | None = None

    def attend(self, q: Tensor, where: Positions, rope: Rope | None, scale: float, full: Full) -> Tensor:
        out, mass = select.attention_with_mass(q, self.keys, self.values, where.query, where.key, rope, scale)
        previous = 0 if self.scores is None else self.scores.shape[2]
        grown = mass.new_zeros(*mass.shape[:2], mass.shape[2] - previous)
        self.scores = mass + (grown if self.scores is None else torch.cat([self.scores, grown], dim=2))
        if self.scores.shape[2] > self.budget:
            index = select.heavy_hitters(self.scores, self.budget, self.recent)
            self.keep(index)
            self.scores = self.scores.gather(2, index)
        return out

    def reset(self) -> None:
        self.scores = None
        super().reset()


def cosine_threshold(value: float) -> float:
    """token_select's ``threshold`` option, checked: a cosine similarity in [-1, 1]."""
    threshold = float(value)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {value}")
    return threshold


class TokenSelectLayer(PolicyLayer):
    """TokenSelect: keeps every token; a step attends to the first ``n_init``, the ``top_k`` tokens with
    the most soft votes of its query fingerprint (rotated query and keys) and the last ``n_local``.

    The selection cache: while the un-rotated fingerprint's cosine similarity to the one that made the
    last selection stays at least ``threshold`` (in every batch row; TokenSelect compares its queries
    before rotation too), the step reuses that top-k without scoring the cache. The local window only
    moves forward, so the reused tokens stay candidates."""

    def __init__(self, top_k: int, n_init: int, n_local: int, threshold: float = 0.9):
        super().__init__()
        self.top_k, self.n_init, self.n_local, self.threshold = top_k, n_init, n_local, threshold
        self.fingerprint: Tensor | None = None
        self.picked: Tensor | None = None
        self.selections = self.reuses = 0

    def attend(self, q: Tensor, where: Positions, rope: Rope | None, scale: float, full: Full) -> Tensor:
        length, q_len = self.keys.shape[2], q.shape[2]
        if length <= self.n_init + self.top_k + self.n_local or q_len == length or q_len > self.n_local:
            return full(q, self.keys, self.values, where)
        index = select.attended(self.choose(q, where, rope, scale), length, self.n_init, self.n_local)
        keys, values = _gather(self.keys, index[:, None]), _gather(self.values, index[:, None])
        return full(q, keys, values, Positions(where.query, where.key.expand(len(index), -1).gather(1, index), None))

    def choose(self, q: Tensor, where: Positions, rope: Rope | None, scale: float) -> Tensor:
        """The step's top-k (b, k) for its query q (b, h, Lq, d): the stored one while the fingerprints
        agree, else the most voted of the rotated query and keys (TokenSelect scores its RoPE'd cache)."""
        fingerprint = q.mean(2)
        self.selections += 1
        if self.fingerprint is not None and bool(select.similar(fingerprint, self.fingerprint, self.threshold).all()):
            self.reuses += 1
            return self.picked
        scored_q, scored_k = q, self.keys
        if rope is not None:
            scored_q = rope.rotate(q, where.query[:, None])
            if decode_kernels(self.keys):
                scored_k = rotate_frames(self.keys, rope, [where.key.expand(len(q), -1)])[0]
            else:
                scored_k = rope.rotate(self.keys, where.key[:, None])
        votes = soft_votes(scored_q, scored_k, scale)
        self.fingerprint, self.picked = fingerprint, select.top_tokens(votes, self.n_init, self.n_local, self.top_k)
        return self.picked

    def reset(self) -> None:
        self.fingerprint = self.picked = None
        super().reset()


class PolicyCache(Cache):
    """A transformers ``Cache`` of one policy layer per model layer. It only works inside a model
    configured by ``longreach.extend`` (which also creates it for ``generate`` when asked to)."""

    def __init__(self, layers: list[PolicyLayer], policy: str):
        super().__init__(layers=layers)
        self.policy = policy
        self.wired = False

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if not self.wired:
            raise ValueError(f"cache policy {self.policy!r} needs a model configured with longreach.extend: its "
                             "attention runs the policy (the model's own attention would ignore it)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
