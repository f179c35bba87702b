"""A KV cache sharded by kv head over sequence-parallel ranks (Ulysses prefill, then decoding).

The prefill runs each rank on its 1/N of the prompt: the first update of a layer exchanges the
shard's keys and values (all kv heads, L/N tokens) into this rank's kv heads over the whole prompt
(h_kv/N heads, L tokens), so the cache of an L-token prompt is split N ways. Every later update
(decoding: the same tokens on every rank) keeps this rank's kv heads of the new tokens, with no
communication; the attention then runs this rank's query heads and gathers the heads' outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from ..parallel import SequenceParallel, heads_from_sequence, local_heads


class HeadShardLayer(DynamicLayer):
    """One layer's keys and values (b, h_kv/N, L, d) of this rank's kv heads. ``replicated`` says how the
    last update came: False for the sharded prefill, True for tokens every rank holds."""

    def __init__(self, sp: SequenceParallel):
        super().__init__()
        self.sp, self.replicated = sp, False

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.replicated = self.get_seq_length() > 0
        take = (lambda t: local_heads(t, self.sp)) if self.replicated else (lambda t: heads_from_sequence(t, self.sp))
        return super().update(take(key_states), take(value_states))


class HeadShardCache(Cache):
    """The transformers ``Cache`` of :class:`HeadShardLayer` per model layer, for a model configured by
    ``longreach.extend(..., sequence_parallel=sp)`` (which creates it for a caching forward)."""

    def __init__(self, sp: SequenceParallel, num_layers: int):
        super().__init__(layers=[HeadShardLayer(sp) for _ in range(num_layers)])


@torch.no_grad()
def generate(model, ids: Tensor, sp: SequenceParallel, max_new_tokens: int) -> Tensor:
    """Greedy continuation (b, max_new_tokens) of the prompt ``ids`` (b, L; the whole prompt on every rank)
    by ``model``, configured by ``longreach.extend(..., sequence_parallel=sp)``: each rank prefills its
    1/N of the prompt into a cache sharded by kv head, the rank holding the last token picks the first
    new one, and every rank then decodes the same tokens. Returns the same tokens on every rank."""
    from ..hf import cache_kwargs, output_cache
    from ..parallel import shard

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device).expand(batch, length)
    out = model(input_ids=shard(ids, sp), position_ids=shard(positions, sp), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    last = sp.size - 1 if sp.group is None else dist.get_global_rank(sp.group, sp.size - 1)
    dist.broadcast(token, src=last, group=sp.group)
    tokens = [token]
    for step in range(1, max_new_tokens):
        where = torch.full((batch, 1), length + step - 1, device=ids.device)
        out = model(input_ids=token, position_ids=where, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(output_cache(out)))
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)
