"""CAB's four attention patterns on the GPU: SDPA and FlexAttention against longreach's methods, one run.

Causal and non-causal self attention and causal and non-causal cross attention (``--key-ratio`` x the
queries' keys), at a Llama-7B attention shape by default (32 heads, head_dim 128, bf16, batch 1), through
:func:`longreach.evals.patterns.pattern_efficiency` (the code behind ``longreach efficiency --patterns``).
Each method runs at its defaults with RoPE base 1e4 on the patterns it defines (select_merge on all
four; the others causally). Every record carries ``vs_sdpa``: SDPA's time over its own in the same pattern,
length and mode, measured in this run. Writes ``OUT/patterns.json`` and ``OUT/patterns.png``.

    python benchmarks/patterns.py --out DIR [--lengths 16k,64k] [--methods select_merge,dca] [--patterns causal_self]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from longreach.attention import METHODS
from longreach.cli import parse_lengths
from longreach.evals import report
from longreach.evals.patterns import PATTERNS, implementations, parse_patterns, pattern_efficiency
from longreach.positions import default


def with_ratios(records: list[dict]) -> list[dict]:
    sdpa = {(r["pattern"], r["length"], r["mode"]): r["seconds"] for r in records if r["impl"] == "sdpa"}
    for r in records:
        base = sdpa.get((r["pattern"], r["length"], r["mode"]))
        r["vs_sdpa"] = base / r["seconds"] if base and r["seconds"] else None
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", default="64k", help="query lengths")
    parser.add_argument("--methods", default="select_merge,s2,sinks,dca,self_extend")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--key-ratio", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patterns", default="all", help=f"all, or a comma-separated subset of {PATTERNS}")
    args = parser.parse_args()
    methods = tuple(args.methods.split(","))
    if unknown := set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {sorted(METHODS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rope = default(args.dim, 10000.0).to(device)
    named = implementations({name: {} for name in methods}, rope, baseline=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "python": platform.python_version(), "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.dim, "key_ratio": args.key_ratio, "repeats": args.repeats,
            "defaults": {name: METHODS[name].defaults() for name in methods}}
    records: list[dict] = []
    for pattern in parse_patterns(args.patterns):  # written after each, so a run cut short keeps what it measured
        measured = pattern_efficiency(named, parse_lengths(args.lengths), patterns=(pattern,), heads=args.heads,
                                      kv_heads=args.kv_heads, head_dim=args.dim, key_ratio=args.key_ratio,
                                      repeats=args.repeats, device=device,
                                      dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        records += with_ratios([{"setup": r["impl"], **r} for r in measured])
        (args.out / "patterns.json").write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
        print(f"{pattern}: {len(records)} records", flush=True)
    report.plot("efficiency", records, args.out / "patterns.png")
    print(report.table("efficiency", records))


if __name__ == "__main__":
    main()
