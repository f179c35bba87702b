"""Greedy decoding replayed from a CUDA graph: the static-shape decode path for longreach's caches.

Eager decoding of a 7-8B model is bound by kernel launches (tens of milliseconds per token whatever
the cache does); replaying one captured step removes the host from the loop, so the time a cache
policy saves on reading keys shows in the latency. The model must be configured by
``longreach.extend`` and the cache built by :func:`longreach.cache.static.make_static_cache`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache

from .cache import PolicyCache
from .hf import cache_kwargs, output_cache, place_rope


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 token, got {chunk}")


@torch.no_grad()
def forward_prompt(model, ids: Tensor, chunk: int | None = None, cache=None):
    """The model's output for the last token of ``ids`` (b, L), with its KV cache (``cache`` if given, else
    the one the model makes), run ``chunk`` tokens at a time (None: at once) so that activations stay those
    of one chunk. A chunk that is a multiple of the attention method's block size gives the same result
    as one pass."""
    check_chunk(chunk)
    step = ids.shape[1] if chunk is None else chunk
    out = None
    for start in range(0, ids.shape[1], step):
        kwargs = {} if cache is None else cache_kwargs(cache)
        out = model(input_ids=ids[:, start:start + step], use_cache=True, logits_to_keep=1, **kwargs)
        cache = output_cache(out)
    return out


@torch.no_grad()
def prefill(model, ids: Tensor, cache: PolicyCache, chunk: int | None = None) -> Tensor:
    """Run the prompt ``ids`` (b, L) through ``model`` (configured by ``extend``, no cache policy), ``chunk``
    tokens at a time (:func:`forward_prompt`), store its un-rotated keys and values in the static
    ``cache``; returns the next greedy token (b, 1)."""
    rope = place_rope(model, ids.device)
    dynamic = DynamicCache(config=model.config)
    out = forward_prompt(model, ids, chunk, dynamic)
    for layer, source in zip(cache.layers, dynamic.layers, strict=True):
        layer.fill(source.keys, source.values, rope)
    return out.logits[:, -1:].argmax(-1)


def capture_graph(fn: Callable[[], object], warmup: int = 1, warm: Callable[[], object] | None = None
                  ) -> torch.cuda.CUDAGraph:
    """Run ``warm`` (default ``fn``) ``warmup`` times on a side stream (first allocations, autotuning), then
    capture one call of ``fn``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            (warm or fn)()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class GraphDecoder:
    """Decodes one token per :meth:`step` for a batch of prompts whose cache is already filled.

    ``token`` (b, 1): the first token to feed (the prompt's greedy continuation); ``position``: its
    position (the prompt length). Steps before :meth:`capture` run eagerly; so do capture's warm-up
    steps, whose tokens the next :meth:`step` calls return, so that no decoded token is skipped. Each
    decoded token takes a cache slot: a step past the cache's ``max_cache_len`` raises.
    """

    def __init__(self, model, cache: PolicyCache, token: Tensor, position: int):
        if not isinstance(cache, PolicyCache) or not hasattr(cache.layers[0], "cumulative_length"):
            raise ValueError("cache must come from longreach.cache.static.make_static_cache")
        place_rope(model, token.device)
        self.model, self.cache = model, cache
        self.token = token.clone()
        self.position = torch.full((token.shape[0], 1), position, device=token.device, dtype=torch.long)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pending: list[Tensor] = []
        self.capacity, self.used = cache.layers[0].max_cache_len, position

    def _take_slot(self) -> None:
        if self.used >= self.capacity:
            raise ValueError(f"the static cache's {self.capacity} slots are full: make it with max_cache_len of "
                             f"at least the prompt plus the tokens to decode (plus capture's warm-up steps)")
        self.used += 1

    def _warm(self) -> None:
        self._take_slot()
        self._forward()
        self.pending.append(self.token.clone())

    @torch.no_grad()
    def _forward(self) -> None:
        out = self.model(input_ids=self.token, position_ids=self.position, use_cache=True,
                         **cache_kwargs(self.cache, self.position[0]))
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.add_(1)

    def capture(self, warmup: int = 2) -> None:
        """Run ``warmup`` eager steps on a side stream, then capture one step (CUDA only)."""
        if self.token.device.type != "cuda":
            raise ValueError(f"capture needs CUDA; the decoder runs on {self.token.device} (step() runs eagerly)")
        self.graph = capture_graph(self._forward, warmup, warm=self._warm)

    def step(self) -> Tensor:
        """Decode one token; returns the (b, 1) tokens just produced (a buffer the next step overwrites)."""
        if self.pending:
            return self.pending.pop(0)
        self._take_slot()
        if self.graph is None:
            self._forward()
        else:
            self.graph.replay()
        return self.token
