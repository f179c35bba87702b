"""Static-shape caches for compiled decoding: preallocated buffers, the length kept on the device.

Every tensor shape is fixed and nothing waits for the host, so one decode step can be captured in a
CUDA graph (:mod:`longreach.decode`). Slot j holds position j, so keys are stored rotated (once, when
written) and a step reads each key once. On CUDA the attention reads the attended slots in place
(:mod:`longreach.kernels.gathered`). ``full`` attends to every stored token; ``token_select``
scores every stored token against the step's query (on CUDA in one Triton pass over the keys,
:mod:`longreach.kernels.votes`) and attends to the first ``n_init``, the ``top_k`` most voted and
the last ``n_local`` (on CUDA chosen by a radix select, :mod:`longreach.kernels.topk`). Its selection
cache is decided on the device: a batch row whose un-rotated query is within ``threshold`` cosine
similarity of the one that made the last selection keeps that top-k, and the vote and top-k kernels
skip it (no branch leaves the graph), as :class:`longreach.cache.layers.TokenSelectLayer` does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import StaticLayer

from ..attention import Positions
from ..kernels import HAS_TRITON, decode_kernels
from ..positions import Rope
from . import select
from .layers import Full, PolicyCache, _gather, cosine_threshold, recall, soft_votes

if HAS_TRITON:
    from ..kernels.gathered import gathered_decode_attention
    from ..kernels.rotary import rotate_step, tables
    from ..kernels.topk import attended_slots

STATIC_POLICIES = ("full", "token_select")


class StaticPolicyLayer(StaticLayer):
    """transformers' static layer (in-place writes at a device-side length) plus a policy's attention."""

    def __init__(self, max_cache_len: int, policy: str, top_k: int = 0, n_init: int = 0, n_local: int = 1,
                 threshold: float = 0.9, rotary: dict | None = None):
        super().__init__(max_cache_len)
        self.policy, self.top_k, self.n_init, self.n_local = policy, top_k, n_init, n_local
        self.threshold = threshold
        # The kernel path's cos/sin tables of every slot's position, shared by the cache's layers.
        self.rotary = {} if rotary is None else rotary
        # token_select's attended slots and their validity (b, n_init + top_k + n_local), kept between
        # steps for the selection cache with the fingerprint that chose the top-k (b, h * d; zero: none
        # yet) and (rows tested, rows reusing); allocated at the first step.
        self.index = self.valid = self.fingerprint = self.counts = None

    @property
    def selections(self) -> int:
        return 0 if self.counts is None else int(self.counts[0])

    @property
    def reuses(self) -> int:
        return 0 if self.counts is None else int(self.counts[1])

    def fill(self, keys: Tensor, values: Tensor, rope: Rope | None) -> None:
        """Store a prompt's un-rotated keys (b, h_kv, n, d) and values after the stored ones."""
        start = self.cumulative_length if self.is_initialized else 0
        positions = torch.arange(keys.shape[2], device=keys.device) + start
        self.update(keys if rope is None else rope.rotate(keys, positions), values)
        self.forget()

    def forget(self) -> None:
        """Drop the stored selection: the next step votes afresh."""
        if self.fingerprint is not None:
            self.fingerprint.zero_()

    def reset(self) -> None:
        self.forget()
        super().reset()

    def attend(self, q: Tensor, where: Positions, rope: Rope | None, scale: float, full: Full) -> Tensor:
        if q.shape[2] != 1:
            raise ValueError(f"static cache: decode one token per step (got {q.shape[2]}); fill the prompt first")
        fingerprint = q.flatten(1)
        if rope is not None:
            q = self.rotate(q, where.query[:, 0], rope)
        if self.policy == "full":
            slots = torch.arange(self.max_cache_len, device=q.device)
            index, valid = slots.expand(len(q), -1), (slots < self.cumulative_length).expand(len(q), -1)
        else:
            index, valid = self.selection(fingerprint, q, scale)
        if decode_kernels(self.keys):
            return gathered_decode_attention(q, self.keys, self.values, index, valid, scale)
        if self.policy == "full":
            return select.decode_attention(q, self.keys, self.values, valid, scale)
        keys, values = _gather(self.keys, index[:, None]), _gather(self.values, index[:, None])
        return select.decode_attention(q, keys, values, valid, scale)

    def rotate(self, q: Tensor, position: Tensor, rope: Rope) -> Tensor:
        """q (b, h, 1, d) rotated at ``position`` (b,); and the key update() wrote un-rotated, rotated
        in place at its position (its slot)."""
        if decode_kernels(self.keys):
            if self.rotary.get("rope") is not rope:
                positions = torch.arange(self.max_cache_len, device=q.device)[None]
                self.rotary.update(rope=rope, tables=tables(rope, positions))
            return rotate_step(q, self.keys, position, self.cumulative_length, *self.rotary["tables"])
        slot = (self.cumulative_length - 1).view(1)
        self.keys.index_copy_(2, slot, rope.rotate(self.keys.index_select(2, slot), slot))
        return rope.rotate(q, position[:, None, None])

    def selection(self, fingerprint: Tensor, q: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Attended slots (b, n_init + top_k + n_local) and whether each holds a token that counts, for
        the rotated query q (b, h, 1, d) whose un-rotated form is ``fingerprint`` (b, h * d)."""
        length, sizes = self.cumulative_length, (self.n_init, self.top_k, self.n_local)
        if self.index is None:
            self.index = torch.zeros(len(q), sum(sizes), device=q.device, dtype=torch.long)
            self.valid = torch.zeros_like(self.index, dtype=torch.bool)
            self.fingerprint = q.new_zeros(fingerprint.shape, dtype=torch.float32)
            self.counts = torch.zeros(2, device=q.device, dtype=torch.long)
        reuse = recall(fingerprint, self.fingerprint, self.threshold, self.counts)
        votes = soft_votes(q, self.keys, scale, length, skip=reuse)
        if decode_kernels(self.keys):
            attended_slots(votes, length, *sizes, self.index, self.valid, reuse)
            return self.index, self.valid
        index, valid = select.attended_slots(votes, length, *sizes)
        columns = torch.arange(sum(sizes), device=q.device)
        kept = reuse.bool()[:, None] & (columns >= self.n_init) & (columns < self.n_init + self.top_k)
        self.index.copy_(torch.where(kept, self.index, index))
        self.valid.copy_(torch.where(kept, self.valid, valid))
        return self.index, self.valid


def make_static_cache(policy: str, num_layers: int, max_cache_len: int, **options) -> PolicyCache:
    """A static cache of ``policy`` ("full" or "token_select" with top_k, n_init, n_local, threshold=0.9)."""
    if policy not in STATIC_POLICIES:
        raise ValueError(f"static cache policy must be one of {STATIC_POLICIES}, got {policy!r}")
    if policy == "token_select":
        if options.get("top_k", 0) < 1 or options.get("n_local", 0) < 1 or options.get("n_init", 0) < 0:
            raise ValueError(f"token_select needs top_k >= 1, n_local >= 1, n_init >= 0, got {options}")
        options["threshold"] = cosine_threshold(options.get("threshold", 0.9))
        if sum(options[k] for k in ("top_k", "n_init", "n_local")) > max_cache_len:
            raise ValueError(f"top_k + n_init + n_local must not exceed max_cache_len {max_cache_len}")
    rotary = {}
    return PolicyCache([StaticPolicyLayer(max_cache_len, policy, rotary=rotary, **options) for _ in range(num_layers)],
                       policy)
