"""Decode cost of each cache policy against the full cache, Llama-3-8B shape (random weights), one run.

Run on the device: ``python benchmarks/decode.py --contexts 32k,128k --out DIR``. For each context
length the caches are filled with random un-rotated keys and values (decode cost does not depend on
their values): the full cache with all of them, ``token_select`` likewise (it keeps every token),
``h2o`` and ``sinks`` with their budget. Then the same greedy step loop that ``generate`` runs (one
forward per token through the cache) is timed: per-token latency, the attention time of the step
(CUDA events around the attention function of every layer, selection and eviction included) and the
bytes the cache holds. The full cache runs transformers' own SDPA attention.

Then the static caches (``full``, ``token_select``) are decoded by ``longreach.decode.GraphDecoder``
from a CUDA graph: per-token latency, one layer's attention replayed alone from its own graph (times
the layer count) and, for the full cache, the bandwidth bound: (weight bytes + cache bytes read) /
the measured device-to-device copy bandwidth. token_select's attention is timed twice, voting afresh
at every replay and reusing the selection at every replay, and weighted by the reuse rate its
selection cache (threshold 0.9) had during the decode. ``--profile`` also writes, per static cache,
context and (for token_select) fresh or reusing step, torch.profiler's per-kernel table of one
layer's attention run eagerly (``profile_*.txt``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import longreach
from longreach.attention import Positions
from longreach.cache import PolicyCache, make_cache
from longreach.cache.static import make_static_cache
from longreach.cli import parse_lengths
from longreach.decode import GraphDecoder, capture_graph
from longreach.hf import PREFIX, cache_kwargs, register

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
POLICIES = {"token_select": dict(budget=2688, n_init=128, n_local=512), "h2o": dict(budget=2688),
            "sinks": dict(budget=2688, sink=128)}


class AttentionClock:
    """Wraps an attention function: CUDA events around each call, summed per decode step."""

    def __init__(self, fn):
        self.fn, self.pairs = fn, []

    def __call__(self, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn(*args, **kwargs)
        end.record()
        self.pairs.append((start, end))
        return out

    def take_ms(self) -> float:
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self.pairs)
        self.pairs = []
        return total


def build() -> LlamaForCausalLM:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def fill(cache, length: int, config) -> None:
    kv, d = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(1, kv, length, d, device="cuda", dtype=torch.bfloat16)
        if isinstance(cache, PolicyCache):
            cache.layers[layer].update(keys, torch.randn_like(keys))
        else:
            cache.update(keys, torch.randn_like(keys), layer)
        if hasattr(cache.layers[layer], "scores"):
            cache.layers[layer].scores = torch.rand(1, kv, length, device="cuda")


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "scores"):
            tensor = getattr(layer, name, None)
            total += 0 if tensor is None else tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def decode(model, cache, context: int, clock: AttentionClock, steps: int, warmup: int = 3) -> dict:
    token = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    latency, attention = [], []
    for i in range(warmup + steps):
        position = torch.tensor([[context + i]], device="cuda")
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(cache, position[0]))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            latency.append(start.elapsed_time(end))
            attention.append(clock.take_ms())
        else:
            clock.take_ms()
    return {"latency_ms": statistics.median(latency), "attention_ms": statistics.median(attention)}


def run(model, context: int, steps: int) -> list[dict]:
    config, records = model.config, []
    for policy in ("full", *POLICIES):
        torch.cuda.empty_cache()
        if policy == "full":
            longreach.restore(model)
            cache = DynamicCache(config=config)
        else:
            longreach.extend(model, attention="dense", cache=policy, **POLICIES[policy])
            install_clocks()
            cache = make_cache(policy, config.num_hidden_layers, **POLICIES[policy])
            cache.wired = True
        kept = context if policy in ("full", "token_select") else POLICIES[policy]["budget"]
        fill(cache, kept, config)
        held = cache_bytes(cache)
        clock = CLOCKS["sdpa" if policy == "full" else PREFIX + "dense"]
        try:
            result = decode(model, cache, context, clock, steps)
        except torch.OutOfMemoryError:
            result = {"error": "out of memory"}
        extra = {}
        if policy == "token_select":
            layers = cache.layers
            extra["selection_reuse"] = sum(x.reuses for x in layers) / max(1, sum(x.selections for x in layers))
        records.append({"policy": policy, "context": context, "path": "eager", "cache_gib": held / 2**30,
                        **result, **extra,
                        "options": POLICIES.get(policy, {})})
        print(records[-1], flush=True)
        del cache
    return records


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` between CUDA events, synchronised after each call."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, replays: int = 20) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (GPU time, no launch overhead)."""
    return median_ms(capture_graph(fn).replay, replays)


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s from a 4 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**31, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def profile_table(fn, path: Path, repeats: int = 10) -> None:
    """torch.profiler's CUDA kernel table of ``repeats`` eager calls of ``fn`` (after one warm call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30) + "\n")


def attention_ms(attend, table: Path | None) -> float:
    """Median ms of ``attend`` replayed from a CUDA graph; with ``table``, its profile written there."""
    ms = graph_ms(attend)
    if table is not None:
        profile_table(attend, table)
    return ms


def compiled(model, context: int, steps: int, bandwidth: float, profile: Path | None = None) -> list[dict]:
    """The static caches decoded from a CUDA graph: per-token latency, the attention time of one step
    (one layer's attention replayed alone, times the layer count) and the bandwidth bound; with
    ``profile`` a directory, the per-kernel tables of one layer's attention there."""
    config, records = model.config, []
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    longreach.extend(model, attention="dense")
    for policy, options in (("full", {}), ("token_select", {"top_k": 2048, "n_init": 128, "n_local": 512})):
        torch.cuda.empty_cache()
        cache = make_static_cache(policy, config.num_hidden_layers, context + 64, **options)
        cache.wired = True
        fill(cache, context, config)
        decoder = GraphDecoder(model, cache, torch.zeros(1, 1, dtype=torch.long, device="cuda"), context)
        decoder.capture()
        latency = median_ms(decoder.step, steps)
        layer = cache.layers[0]
        q = torch.randn(1, config.num_attention_heads, 1, layer.k_head_dim, device="cuda", dtype=torch.bfloat16)
        where = Positions(torch.full((1, 1), context, device="cuda"), None, None)
        rope = model._longreach.rope
        attend = partial(layer.attend, q, where, rope, layer.k_head_dim ** -0.5, None)
        table = None if profile is None else profile / f"profile_{policy}_{context}.txt"
        extra = {}
        if policy == "token_select":
            reuse = sum(x.reuses for x in cache.layers) / sum(x.selections for x in cache.layers)
            layer.threshold = 2.0  # every replay votes afresh
            attention = attention_ms(attend, table)
            layer.threshold = -1.0  # every replay after the first reuses the selection
            reused = attention_ms(attend, table and table.with_stem(table.stem + "_reusing"))
            extra = {"selection_reuse": reuse, "attention_reused_ms": reused * config.num_hidden_layers,
                     "attention_at_measured_reuse_ms": ((1 - reuse) * attention + reuse * reused)
                     * config.num_hidden_layers}
        else:
            attention = attention_ms(attend, table)
        read = cache_bytes(cache) // (context + 64) * context if policy == "full" else 0
        records.append({"policy": policy, "context": context, "path": "cuda_graph", "latency_ms": latency,
                        "attention_ms": attention * config.num_hidden_layers, **extra,
                        "weights_gib": weights / 2**30, "cache_gib": cache_bytes(cache) / 2**30,
                        "bandwidth_bound_ms": (weights + read) / bandwidth * 1e3 if policy == "full" else None,
                        "options": options})
        print(records[-1], flush=True)
        del decoder, cache
    return records


CLOCKS: dict[str, AttentionClock] = {}


def install_clocks() -> None:
    """Put the clocks in front of SDPA and longreach's dense attention (``extend`` re-registers the latter)."""
    for name, fn in (("sdpa", sdpa_attention_forward), (PREFIX + "dense", ALL_ATTENTION_FUNCTIONS[PREFIX + "dense"])):
        if not isinstance(fn, AttentionClock):
            CLOCKS[name] = AttentionClock(fn)
            AttentionInterface.register(name, CLOCKS[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=parse_lengths, default=[32768, 131072])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", action="store_true", help="write per-kernel tables of the static attention")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    register()
    install_clocks()
    model = build()
    bandwidth = copy_bandwidth()
    records = [r for context in args.contexts for r in run(model, context, args.steps)]
    profile = args.out if args.profile else None
    records += [r for context in args.contexts for r in compiled(model, context, args.steps, bandwidth, profile)]
    meta = {"device": torch.cuda.get_device_name(), "model": "Llama-3-8B shape, random bf16 weights",
            "steps": args.steps, "batch": 1, "copy_bandwidth_gb_s": bandwidth / 1e9}
    (args.out / "decode.json").write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
