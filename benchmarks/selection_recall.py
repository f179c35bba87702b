"""Does select_merge pick the needle's block? Selection recall and oracle accuracy on needle prompts.

Run on the device, e.g.:
``python benchmarks/selection_recall.py OUT --lengths 4k,8k,32k --setups select_merge,select_merge:score=minmax``

For each setup (``select_merge`` with options, or with a position scheme, written as in
``benchmarks/smollm2.py``: ``select_merge+ntk:top_k=16``, whose factor is ceil(length / trained length), at most
``--max-factor``), length and depth,
``--trials`` needle prompts (the ones ``longreach needle`` builds with the same seed) are answered twice by
greedy decoding: as the setup selects, and with an oracle that adds the blocks holding the needle's key to
every selection that may causally see them. While the setup selects, each call's block table is read:
``prefill_recall`` is, per layer and query head, whether the prompt's last query block (the one that
produces the first answer token) kept a needle block; ``decode_recall`` is the share of decode steps
that did. Accuracy with the oracle tells "wrong blocks picked" (oracle accuracy high) from "the sparse
context changes the model" (oracle accuracy low too). Writes ``OUT/selection_recall.json``: one record per
prompt, and a summary per (setup, length).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import time
from pathlib import Path
from unittest import mock

import torch
from smollm2 import parse_setup  # the sibling script's NAME:key=value/... setups

from longreach.cli import DTYPES, parse_lengths
from longreach.evals import prompts, setups
from longreach.evals.retrieval import answered, greedy, haystack_ids
from longreach.pretrained import load_pretrained
from longreach.reference_model import haystack_texts

SELECT = importlib.import_module("longreach.attention.select_merge")
select_blocks = SELECT.select_blocks


def key_blocks(tokenizer, prompt: prompts.Prompt, block: int) -> list[int]:
    """The blocks holding the needle's key digits (the needle sentence is found in the prompt's tokens)."""
    digits = [i for i, t in enumerate(prompt.ids) if any(c.isdigit() for c in tokenizer.decode([t]))]
    answer = [t for t in prompt.answer if any(c.isdigit() for c in tokenizer.decode([t]))]
    for start in digits:
        if prompt.ids[start:start + len(answer)] == answer:
            return sorted({p // block for p in range(start, start + len(answer))})
    raise ValueError("the needle's key was not found in the prompt")


def with_blocks(table: torch.Tensor, extra: list[int], first_block: int, n_k: int) -> torch.Tensor:
    """``table`` (b, h, nq, K) with the blocks ``extra`` added to every row that may causally see them."""
    rows = torch.arange(first_block, first_block + table.shape[2], device=table.device)[:, None]
    add = torch.tensor(extra, device=table.device)[None, :].expand(len(rows), -1)
    add = torch.where(add <= rows, add, -1).expand(*table.shape[:2], -1, -1)
    merged = torch.cat([table, add], -1)
    merged = torch.where(merged < 0, n_k, merged).sort(-1).values
    repeated = torch.cat([torch.zeros_like(merged[..., :1], dtype=torch.bool), merged[..., 1:] == merged[..., :-1]], -1)
    merged = torch.where(repeated, n_k, merged).sort(-1).values
    return torch.where(merged >= n_k, -1, merged)


class Probe:
    """Stands in for ``select_blocks``: records whether each table keeps a needle block, or adds them."""

    def __init__(self, block: int):
        self.block, self.needle, self.oracle = block, [], False
        self.prefill, self.decode = [], []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, **options) -> torch.Tensor:
        table = select_blocks(q, k, **options)
        first_block, n_k = (k.shape[2] - q.shape[2]) // self.block, -(-k.shape[2] // self.block)
        if self.oracle:
            return with_blocks(table, self.needle, first_block, n_k)
        kept = torch.isin(table[0, :, -1], torch.tensor(self.needle, device=table.device)).any(-1)
        (self.prefill if q.shape[2] > 1 else self.decode).append(kept.cpu())
        return table

    def recall(self, layers: int) -> tuple[list, list]:
        prefill = torch.stack(self.prefill).float()
        decode = torch.stack(self.decode).float().view(-1, layers, prefill.shape[1]).mean(0)
        return prefill.tolist(), decode.tolist()


def answer(model, tokenizer, prompt: prompts.Prompt) -> tuple[bool, float]:
    ids = torch.tensor([prompt.ids], device=next(model.parameters()).device)
    start = time.perf_counter()
    tokens = greedy(model, ids, len(prompt.answer) + 1)
    return answered(tokenizer.decode(tokens[0]), prompt.key), time.perf_counter() - start


def run(model, tokenizer, setup: str, length: int, depths: list[float], args) -> list[dict]:
    name, options = parse_setup(setup)
    setups.apply(model, name, factor=min(args.max_factor, setups.factor_for(model, [length])), lengths=[length],
                 options=options)
    block = options.get("block_size", 64)
    documents = prompts.encode_documents(tokenizer, haystack_texts())
    separator = prompts.encode(tokenizer, prompts.DOCUMENT_SEPARATOR)
    layers = model.config.num_hidden_layers
    records = []
    for depth in depths:
        rng = random.Random(f"{args.seed}/{length}/{depth}")
        for trial in range(args.trials):
            prompt = prompts.needle(tokenizer, length, depth, rng, haystack_ids(documents, length, rng, separator))
            probe = Probe(block)
            probe.needle = key_blocks(tokenizer, prompt, block)
            with mock.patch.object(SELECT, "select_blocks", probe):
                correct, seconds = answer(model, tokenizer, prompt)
                probe.oracle = True
                oracle = answer(model, tokenizer, prompt)[0] if args.oracle else None
            prefill, decode = probe.recall(layers)
            records.append({"setup": setup, "length": length, "depth": depth, "trial": trial,
                            "needle_blocks": probe.needle, "correct": correct, "oracle_correct": oracle,
                            "seconds": seconds, "prefill_recall": prefill, "decode_recall": decode})
    return records


def summary(records: list[dict]) -> list[dict]:
    cells = {}
    for r in records:
        cells.setdefault((r["setup"], r["length"]), []).append(r)
    rows = []
    for (setup, length), cell in cells.items():
        prefill = torch.tensor([r["prefill_recall"] for r in cell])
        decode = torch.tensor([r["decode_recall"] for r in cell])
        rows.append({"setup": setup, "length": length, "trials": len(cell),
                     "accuracy": sum(r["correct"] for r in cell) / len(cell),
                     "oracle_accuracy": None if cell[0]["oracle_correct"] is None
                     else sum(r["oracle_correct"] for r in cell) / len(cell),
                     "prefill_recall": prefill.mean().item(), "decode_recall": decode.mean().item(),
                     "prefill_recall_best_head": prefill.mean(0).max().item(),
                     "prefill_recall_by_layer": prefill.mean((0, 2)).tolist(),
                     "seconds_per_trial": sum(r["seconds"] for r in cell) / len(cell)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", type=parse_lengths, default=[4096, 8192, 32768])
    parser.add_argument("--setups", default="select_merge")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--trials", type=int, default=4, help="prompts per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-factor", type=float, default=16.0,
                        help="a setup's rescaling factor is ceil(length / trained length), at most this")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                        help="also answer with the needle's blocks added (--no-oracle halves the time)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype], device=device)
    depths = [float(d) for d in args.depths.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "seed": args.seed,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    records = []
    for setup in args.setups.split(","):
        for length in args.lengths:
            records += run(model, tokenizer, setup, length, depths, args)
            rows = summary(records)
            print({k: v for k, v in rows[-1].items() if k != "prefill_recall_by_layer"}, flush=True)
            (args.out / "selection_recall.json").write_text(
                json.dumps({**meta, "summary": rows, "records": records}) + "\n")


if __name__ == "__main__":
    main()
