"""Retrieval and perplexity of a real pretrained model (default SmolLM2-135M-Instruct, trained at 8K) under
longreach's training-free setups, at lengths from 2K to 1M tokens.

Run on the device, e.g.:
``python benchmarks/smollm2.py passkey OUT --lengths 2k,8k,32k,128k --setups baseline,yarn,dca --trials 4``

Each length gets its own rescaling factor (max(1, ceil(length / trained length))), as a user extending to that length
would pick (at most ``--max-factor``, e.g. the largest factor a CRD-NTK fine-tune trained on). A setup is ``name`` or
``name:key=value/key=value`` (method or scheme options, e.g. ``select_merge:top_k=16`` or
``self_extend:group_size=auto``). ``--trials`` counts prompts per (length, depth) (``--long-trials`` past
``--long-from`` tokens); a setup that scores 0 at two lengths in a row is not run at longer ones (unless
``--every-length``), a rescaling scheme is skipped where its factor is 1 (the baseline), and past
``--quadratic-limit`` tokens only setups whose attention cost grows linearly (select_merge, sinks) run. Perplexity
scores the same targets at every length: ``--samples`` segments of the longest length (of the haystack texts, or of
``--perplexity-texts``), each length reading its last tokens. Records (the evaluations' own, with ``model``,
``setup``, ``factor`` and ``options``) are written to ``OUT/<eval>.json`` after every cell, so a run cut short keeps
what it measured; ``OUT/<eval>.png`` is drawn at the end. ``--budget`` seconds stops before a cell would start past
it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch

from longreach.cli import DTYPES, parse_lengths, parse_options
from longreach.evals import needle, passkey, perplexity, report, setups
from longreach.pretrained import load_pretrained
from longreach.reference_model import haystack_texts
from longreach.reference_model.corpus import read


def parse_setup(spec: str) -> tuple[str, dict]:
    name, _, options = spec.partition(":")
    return name, parse_options(tuple(options.split("/"))) if options else {}


def run_cell(kind: str, model, tokenizer, length: int, args, texts) -> list[dict]:
    depths = [float(d) for d in args.depths.split(",")]
    trials = args.long_trials if length > args.long_from else args.trials
    if kind == "passkey":
        return passkey(model, tokenizer, [length], depths, trials=trials, seed=args.seed, batch_size=args.batch_size,
                       chat=args.chat, prefill_chunk=args.prefill_chunk)
    if kind == "needle":
        return needle(model, tokenizer, [length], depths, texts=texts, trials=trials, seed=args.seed,
                      batch_size=args.batch_size, chat=args.chat, prefill_chunk=args.prefill_chunk)
    texts = documents(args.perplexity_texts) if args.perplexity_texts else texts
    return perplexity(model, tokenizer, [length], texts=texts, window=args.window, samples=args.samples,
                      segment_length=max(parse_lengths(args.lengths)))


@functools.cache
def documents(path: Path) -> tuple[str, ...]:
    """The texts of a ``*.jsonl.xz`` of documents (a corpus split), read once per process."""
    return tuple(d["text"] for d in read(path))


def with_bos(tokenizer) -> None:
    """Makes ``tokenizer`` begin every text with its BOS token, as Llama's tokenizer does."""
    tokenizer.add_bos_token = True
    if tokenizer.bos_token_id is None or tokenizer.encode("a")[:1] != [tokenizer.bos_token_id]:
        raise SystemExit("--bos: this tokenizer has no BOS token or does not add it on request")


def scored_zero(records: list[dict]) -> bool:
    return all(r.get("accuracy", 1.0) == 0.0 for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval", choices=("passkey", "needle", "perplexity"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="2k,8k,32k,128k")
    parser.add_argument("--setups", default="baseline,yarn,dca,self_extend,select_merge")
    parser.add_argument("--max-factor", type=float, default=math.inf, help="the largest rescaling factor")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--trials", type=int, default=4, help="prompts per (length, depth)")
    parser.add_argument("--seed", type=int, default=0, help="the prompts' seed (another seed, other prompts)")
    parser.add_argument("--long-trials", type=int, default=2, help="prompts per (length, depth) past --long-from")
    parser.add_argument("--long-from", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill tokens at a time (passkey, needle)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--perplexity-texts", type=Path, default=None,
                        help="a *.jsonl.xz of documents (a corpus' heldout.jsonl.xz) for perplexity, not the haystack")
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--bos", action="store_true",
                        help="prompts begin with the tokenizer's BOS token (SmolLM2's tokenizer adds none by itself)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--quadratic-limit", type=lambda s: parse_lengths(s)[0], default=131072,
                        help="the longest length for setups whose attention cost grows quadratically")
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds; no cell starts after them")
    parser.add_argument("--every-length", action="store_true",
                        help="run every length, also after a setup scored 0 at two lengths in a row (full curves)")
    args = parser.parse_args()

    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype], device=device)
    if args.bos:
        with_bos(tokenizer)
    texts = haystack_texts()
    path = args.out / f"{args.eval}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dtype": args.dtype, "command": args.eval, "chat": args.chat, "bos": args.bos, "seed": args.seed}
    records: list[dict] = json.loads(path.read_text())["records"] if path.exists() else []
    zeros: dict[str, int] = {}
    for length in parse_lengths(args.lengths):
        factor = min(args.max_factor, setups.factor_for(model, [length]))
        for spec in args.setups.split(","):
            name, options = parse_setup(spec)
            if (zeros.get(spec, 0) >= 2 and not args.every_length) or time.time() - started > args.budget:
                continue
            if length > args.quadratic_limit and not setups.linear_cost(name):
                continue
            if "position" in setups.parse(name) and factor == 1.0 and name != "truncated":
                continue  # a scheme at factor 1 is the model's own RoPE: the baseline's row
            config = setups.apply(model, name, factor=factor, lengths=[length], options=options)
            try:
                cell = run_cell(args.eval, model, tokenizer, length, args, texts)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                cell = [{"length": length, "error": "out of memory"}]
            zeros[spec] = zeros.get(spec, 0) + 1 if scored_zero(cell) else 0
            records += [{"model": args.model, "setup": spec, "factor": config.get("factor"), "options": options,
                         **r} for r in cell]
            path.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
            summary = [r.get("accuracy", r.get("perplexity", r.get("error"))) for r in cell]
            print(f"{spec:<32} {length:>8} factor {config.get('factor')}: {summary} "
                  f"({cell[0].get('seconds_per_trial', 0):.2f} s/trial, peak {cell[0].get('peak_gib')} GiB)",
                  flush=True)
    done = [r for r in records if "error" not in r]
    if done:
        report.plot(args.eval, [{**r, "setup": r["setup"]} for r in done], args.out / f"{args.eval}.png")
        print(report.table(args.eval, done))


if __name__ == "__main__":
    main()
