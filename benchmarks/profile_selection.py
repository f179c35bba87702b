"""Where select_merge's block selection spends its time on the GPU (benchmarks/attention.py's shapes).

Run on the device: ``python benchmarks/profile_selection.py OUT.json --length 65536``. Times
``select_blocks`` with the method's default options and the whole select_merge forward (CUDA events,
mean of 10 calls after 3 warm-up calls), then profiles 3 selection calls with torch.profiler and
records the CUDA time of each operator (summed over the 3 calls). ``--context N`` makes the queries the
last ``--length`` of N keys, as one chunk of a long chunked prefill (e.g. SmolLM2's shapes at 4M:
``--length 65536 --context 4194304 --heads 9 --kv-heads 3 --dim 64``). ``--tiles 64x4,128x8`` also times
``select_blocks`` with the best-key kernel's tiles set to each ROWSxWARPS (query summaries per program and
warps), as ``tiles_ms``: the choice of ``kernels/block_scores.py``'s ROWS and WARPS.
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
from longreach.kernels import block_scores
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


@contextmanager
def tiles(**constants: int):
    """The best-key kernel's tile constants (``ROWS``, ``ROWS_FP32``, ``WARPS``) set for the block, then restored."""
    saved = {name: getattr(block_scores, name) for name in constants}
    for name, value in constants.items():
        setattr(block_scores, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(block_scores, name, value)


def tiled_ms(tile: str, fn) -> float:
    """mean_ms of fn with the best-key kernel's ROWS and WARPS set from ``tile`` (``ROWSxWARPS``)."""
    rows, warps = (int(x) for x in tile.split("x"))
    with tiles(ROWS=rows, WARPS=warps):
        return mean_ms(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--context", type=int, default=None, help="keys (default: --length)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--tiles", default="", help="ROWSxWARPS,... of the best-key kernel to time")
    args = parser.parse_args()
    torch.manual_seed(0)
    context, kv_heads = args.context or args.length, args.kv_heads or args.heads
    if context < args.length or args.heads % kv_heads:
        raise SystemExit(f"--context ({context}) must be >= --length ({args.length}) and --kv-heads divide --heads")
    q = torch.randn(1, args.heads, args.length, args.dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, context, args.dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rope = default(args.dim, 10000.0)
    defaults = inspect.signature(select_merge).parameters
    options = {name: defaults[name].default for name in SELECTION}
    positions = Positions.contiguous(1, args.length, context, "cuda")
    with torch.no_grad():
        selection_ms = mean_ms(lambda: select_blocks(q, k, rope=rope, **options))
        tiles_ms = {tile: tiled_ms(tile, lambda: select_blocks(q, k, rope=rope, **options))
                    for tile in filter(None, args.tiles.split(","))}
        forward_ms = mean_ms(lambda: select_merge(q, k, v, positions=positions, rope=rope))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                select_blocks(q, k, rope=rope, **options)
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    record = {"length": args.length, "context": context, "heads": args.heads, "kv_heads": kv_heads, "dim": args.dim,
              "options": options,
              "device": torch.cuda.get_device_name(), "select_blocks_ms": selection_ms, "forward_ms": forward_ms,
              "tiles_ms": tiles_ms,
              "profile_calls": 3, "cuda_us": {e.key: e.device_time_total for e in events[:25] if e.device_time_total}}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
