"""Where select_merge's block selection spends its time on the GPU (benchmarks/attention.py's shapes).

Run on the device: ``python benchmarks/profile_selection.py OUT.json --length 65536``. Times
``select_blocks`` with the method's default options and the whole select_merge forward (CUDA events,
mean of 10 calls after 3 warm-up calls), then profiles 3 selection calls with torch.profiler and
records the CUDA time of each operator (summed over the 3 calls). ``--context N`` makes the queries the
last ``--length`` of N keys, as one chunk of a long chunked prefill (e.g. SmolLM2's shapes at 4M:
``--length 65536 --context 4194304 --heads 9 --kv-heads 3 --dim 64``). ``--variants "STAGES=2;MAX_TILE=1024"``
also times ``select_blocks`` with the kernels' constants set to each ``;``-separated assignment list, as
``variants_ms``: the choice of ``kernels/block_scores.py``'s ROWS, WARPS, STAGES and ``kernels/block_topk.py``'s
MAX_TILE, or ``MODULE.NAME`` for another kernel module's (``block_rank.WARPS``); ``--variant-options
prefilter=16`` times the variants with those select_blocks options. ``--selections
"prefilter=16;prefilter=16,representatives=16"`` times ``select_blocks`` with the default options updated by each
``;``-separated list, as ``selections_ms``. The profile records each operator's device time (``cuda_us``) and
its host time (``cpu_us``), of ``select_blocks`` with the default options updated by ``--profile-options
prefilter=16``, if given.
"""

from __future__ import annotations

import argparse
import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from longreach.attention.core import Positions
from longreach.attention.select_merge import select_blocks, select_merge
from longreach.kernels import block_rank, block_scores, block_topk
from longreach.positions import default

SELECTION = ("block_size", "top_k", "local", "sink", "score", "query_rows", "per_head", "score_distance")


def mean_ms(fn, calls: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


KERNELS = {"block_scores": block_scores, "block_topk": block_topk, "block_rank": block_rank}


def _owner(name: str) -> tuple[object, str]:
    """The kernel module and constant that ``name`` means: ``module.NAME``, or a bare name of the best-key or the
    top-k kernel."""
    module, _, constant = name.rpartition(".")
    owners = [KERNELS[module]] if module in KERNELS else [block_scores, block_topk] if not module else []
    found = [m for m in owners if hasattr(m, constant)]
    if not found:
        raise SystemExit(f"--variants: no kernel constant {name!r} (NAME of block_scores or block_topk, or "
                         f"MODULE.NAME with MODULE in {sorted(KERNELS)})")
    return found[0], constant


@contextmanager
def tiles(**constants: int):
    """The selection kernels' constants (the best-key kernel's ``ROWS``, ``ROWS_FP32``, ``WARPS``, ``STAGES``,
    the top-k kernel's ``MAX_TILE``, or any ``module.NAME`` of :data:`KERNELS`) set for the block, then restored."""
    owners = {name: _owner(name) for name in constants}
    saved = {name: getattr(*owner) for name, owner in owners.items()}
    for name, value in constants.items():
        setattr(*owners[name], value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(*owners[name], value)


def assignments(text: str) -> dict[str, int]:
    """``NAME=VALUE,...`` as {NAME: int(VALUE)}; {} for no text."""
    return {name: int(value) for name, value in (part.split("=") for part in filter(None, text.split(",")))}


def variant_ms(variant: str, fn) -> float:
    """mean_ms of fn with the kernels' constants set by ``variant`` (``NAME=VALUE,...``)."""
    with tiles(**assignments(variant)):
        return mean_ms(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--context", type=int, default=None, help="keys (default: --length)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--variants", default="", help="NAME=VALUE,...;... kernel constants to time")
    parser.add_argument("--selections", default="", help="NAME=VALUE,...;... select_blocks options to time")
    parser.add_argument("--variant-options", default="", help="NAME=VALUE,... select_blocks options of --variants")
    parser.add_argument("--profile-options", default="", help="NAME=VALUE,... select_blocks options of the profile")
    args = parser.parse_args()
    torch.manual_seed(0)
    context, kv_heads = args.context or args.length, args.kv_heads or args.heads
    if context < args.length or args.heads % kv_heads:
        raise SystemExit(f"--context ({context}) must be >= --length ({args.length}) and --kv-heads divide --heads")
    q = torch.randn(1, args.heads, args.length, args.dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, context, args.dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rope = default(args.dim, 10000.0).to("cuda")  # where longreach.extend puts a model's: no copy a call
    defaults = inspect.signature(select_merge).parameters
    options = {name: defaults[name].default for name in SELECTION}
    positions = Positions.contiguous(1, args.length, context, "cuda")
    with torch.no_grad():
        selection_ms = mean_ms(lambda: select_blocks(q, k, rope=rope, **options))
        varied = {**options, **assignments(args.variant_options)}
        variants_ms = {variant: variant_ms(variant, lambda: select_blocks(q, k, rope=rope, **varied))
                       for variant in filter(None, args.variants.split(";"))}
        chosen = {text: {**options, **assignments(text)} for text in filter(None, args.selections.split(";"))}
        selections_ms = {text: mean_ms(lambda opts=opts: select_blocks(q, k, rope=rope, **opts))
                         for text, opts in chosen.items()}
        forward_ms = mean_ms(lambda: select_merge(q, k, v, positions=positions, rope=rope))
        profiled = {**options, **assignments(args.profile_options)}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                select_blocks(q, k, rope=rope, **profiled)
            torch.cuda.synchronize()
    events = prof.key_averages()
    on_device = sorted(events, key=lambda e: -e.device_time_total)
    on_host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    record = {"length": args.length, "context": context, "heads": args.heads, "kv_heads": kv_heads, "dim": args.dim,
              "options": options,
              "device": torch.cuda.get_device_name(), "select_blocks_ms": selection_ms, "forward_ms": forward_ms,
              "variant_options": varied, "variants_ms": variants_ms, "selections_ms": selections_ms,
              "profile_options": profiled, "profile_calls": 3,
              "cuda_us": {e.key: e.device_time_total for e in on_device[:25] if e.device_time_total},
              "cpu_us": {e.key: e.self_cpu_time_total for e in on_host[:40] if e.self_cpu_time_total}}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
