"""Would a cheap first stage keep the blocks that select_merge's best-key score picks? (CPU probe.)

A selection linear in the length cannot score every key for every query block; a two-stage one would keep the N
best blocks by a cheap score (the block's mean key, or Quest's minmax bound: L^2 / 4096 products; or the best of
the block's 4 or 16 part means, ``rep4`` / ``rep16``: L^2 / 1024 and L^2 / 256) and rank only those by their best
key. For the last query block of each needle prompt (the ones ``longreach needle``
builds, seed 0) and each (layer, head), this records whether the needle's block is among the default's top 8
(``best_key_top8``) and among the top 8 of the two-stage selection for each cheap score and N
(``mean@N``, ``minmax@N``, ``rep4@N``, ``rep16@N``), and prints the share of (layer, head) pairs that keep it:

    python benchmarks/selection_prefilter.py 32k 0.5,0.2 OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from selection_recall import select_blocks
from selection_votes import BLOCK, last_block_scores, needle_prefills

from longreach.cli import parse_lengths

# name: (score, representatives)
CHEAP = {"mean": ("mean", 4), "minmax": ("minmax", 4), "rep4": ("representatives", 4), "rep16": ("representatives", 16)}
SIZES, TOP_K = (16, 32, 64, 128), 8


class Scores:
    """Stands in for ``select_blocks``: selects as it does and records the last query block's scores per head."""

    def __init__(self):
        self.layers = []

    def __call__(self, q, k, **options):
        self.layers.append({name: last_block_scores(q, k, options["rope"], *how)
                            for name, how in {"max": ("max", 4), **CHEAP}.items()})
        return select_blocks(q, k, **options)


def kept(layers: list, needle: list[int], cheap: str | None, n: int) -> float:
    """Share of (layer, head) pairs whose top TOP_K by best key, among the n best by ``cheap``, hold the needle."""
    hits = total = 0
    for out in layers:
        for best, pre in zip(out["max"], out[cheap] if cheap else out["max"], strict=True):
            allowed = torch.zeros_like(best, dtype=torch.bool).index_fill(0, pre.topk(n).indices, True) if cheap \
                else torch.ones_like(best, dtype=torch.bool)
            hits += any(p in needle for p in best.masked_fill(~allowed, float("-inf")).topk(TOP_K).indices.tolist())
            total += 1
    return hits / total


def main() -> None:
    lengths, depths, out = parse_lengths(sys.argv[1]), [float(x) for x in sys.argv[2].split(",")], Path(sys.argv[3])
    rows = []
    for length, depth, needle, scores in needle_prefills("smollm2", lengths, depths, Scores, "cpu"):
        row = {"length": length, "depth": depth, "needle": needle,
               "best_key_top8": kept(scores.layers, needle, None, 0)}
        row |= {f"{c}@{n}": kept(scores.layers, needle, c, n) for c in CHEAP for n in SIZES if n < length // BLOCK}
        print(row, flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1) + "\n")

if __name__ == "__main__":
    main()
