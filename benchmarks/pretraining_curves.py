"""Extrapolation curves of models pretrained at one length, each under its own attention, in one figure.

    python benchmarks/pretraining_curves.py OUT LABEL=DIR [LABEL=DIR ...]

Each DIR holds ``benchmarks/smollm2.py``'s ``passkey.json``, ``needle.json`` and ``perplexity.json`` for one
model (run with ``--every-length`` for whole curves). Writes ``OUT/extrapolation_<eval>.json`` (every model's
records, ``setup`` prefixed with its LABEL) and ``OUT/extrapolation.png``: passkey and needle accuracy (over
all depths and trials) and perplexity against the length, one line per model, and each model's mean loss
per position at its longest length.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EVALS = ("passkey", "needle", "perplexity")


def merged(runs: dict[str, Path], kind: str) -> dict:
    meta, records = {}, []
    for label, folder in runs.items():
        data = json.loads((folder / f"{kind}.json").read_text())
        meta = {k: v for k, v in data.items() if k not in ("records", "model")}
        records += [{**r, "setup": f"{label}: {r['setup']}"} for r in data["records"] if "error" not in r]
    return {**meta, "records": records}


def curve(records: list[dict], kind: str) -> dict[str, tuple[list[int], list[float]]]:
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for r in records:
        point = points[r["setup"]][r["length"]]
        if kind == "perplexity":
            point[0], point[1] = r["perplexity"], 1.0
        else:
            point[0] += r["correct"]
            point[1] += r["trials"]
    return {setup: (sorted(by_length), [by_length[n][0] / by_length[n][1] for n in sorted(by_length)])
            for setup, by_length in points.items()}


def along_the_longest(axis, records: list[dict]) -> None:
    """Each model's mean loss per position (binned) at its longest length: whether it grows with the position."""
    longest = {}
    for r in records:
        if r["length"] >= longest.get(r["setup"], {"length": 0})["length"]:
            longest[r["setup"]] = r
    for setup, r in longest.items():
        positions, losses = zip(*r["position_loss"], strict=True)
        axis.plot(positions, losses, label=setup)
    axis.set_xlabel("position (tokens)")
    axis.set_ylabel("mean loss")
    axis.set_title(f"loss per position at {max(r['length'] for r in longest.values()):,} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR")
    args = parser.parse_args()
    runs = {label: Path(folder) for label, _, folder in (run.partition("=") for run in args.runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(EVALS) + 1, figsize=(5 * len(EVALS) + 5, 4))
    for axis, kind in zip(axes[:-1], EVALS, strict=True):
        data = merged(runs, kind)
        if kind == "perplexity":
            along_the_longest(axes[-1], data["records"])
        (args.out / f"extrapolation_{kind}.json").write_text(json.dumps(data, indent=1) + "\n")
        for setup, (lengths, values) in curve(data["records"], kind).items():
            axis.plot(lengths, values, marker="o", label=setup)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log" if kind == "perplexity" else "linear")
        axis.set_title(kind)
        axis.set_xlabel("length (tokens)")
        axis.set_ylabel("perplexity" if kind == "perplexity" else "accuracy")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out / "extrapolation.png", dpi=120)


if __name__ == "__main__":
    main()
