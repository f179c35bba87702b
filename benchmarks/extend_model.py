"""Extend any model longreach loads with its fine-tuning recipe, every run on the same tokens, and evaluate it.

Run on the device, e.g. CLEX against YaRN and dynamic NTK on SmolLM2 at 16K (2x):

    python benchmarks/extend_model.py CORPUS OUT --model smollm2 --length 16k --steps 200 \\
        --runs clex=dense+clex:max_factor=16,yarn=dense+yarn,dynamic_ntk=dense+dynamic_ntk \\
        --evals passkey,perplexity --lengths 8k,16k,32k,64k,128k --trials 2

A run is ``NAME=ATTENTION+POSITION[:key=value/...]`` (POSITION: a scheme, ``crd_ntk``, ``clex`` or ``none``;
the options go to the attention method or ``FinetuneConfig``, e.g. ``max_factor``). Every run fine-tunes
a fresh copy of ``--model`` for exactly ``--steps`` steps of ``--batch`` rows of ``--length`` tokens, drawn
in the same order from ``CORPUS/train.jsonl.xz`` mixed with synthetic passkey and needle rows
(``--retrieval``), so all runs see the same tokens; time, tokens and peak memory are recorded. The tuned
model is then evaluated under its natural inference setup: its own attention (dense for s2 and sf, which
LongLoRA uses only in training), a fixed scheme at its training factor, NTK at each length's factor after
CRD-NTK (at most its largest training factor), CLEX with its trained state; ``--untuned SETUP,...`` evaluates
the un-tuned model too, in the same process. Lengths past ``--quadratic-limit`` are evaluated (with
``--long-trials`` prompts per cell) only under attention whose cost grows linearly, and a retrieval evaluation
stops after two lengths in a row that scored nothing; ``--eval-lengths KIND=LENGTHS`` gives one evaluation its
own lengths (e.g. ``passkey=8k,1m,4m``). Perplexity scores the same targets at every length (the last
``--window`` tokens of ``--samples`` segments of its longest length, cut from the shipped haystack texts or,
with ``--heldout``, from the corpus' held-out split). Writes ``OUT/extend_model.json`` and one plot
per evaluation after every cell (a cell that does not fit the GPU is kept under ``errors``); ``--save`` also
writes each tuned model (adapters merged) to ``OUT/NAME/model``, a checkpoint folder that ``--model`` of this
script and of ``smollm2.py`` loads.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from smollm2 import documents, parse_setup  # the sibling script's NAME:key=value/... setups and document reader

from longreach.cli import DTYPES, parse_lengths
from longreach.evals import needle, passkey, perplexity, report, setups
from longreach.evals.fit import does_not_fit
from longreach.pretrained import load_pretrained
from longreach.reference_model import haystack_texts
from longreach.reference_model.corpus import read
from longreach.reference_model.data import Batches
from longreach.train import FinetuneConfig, finetune, prepare
from longreach.train.data import token_stream
from longreach.train.loop import CLEX_STATE

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
TRAINING_ONLY = ("s2", "sf")
CONFIG_KEYS = ("max_factor", "factor", "lora_rank", "learning_rate", "clex_learning_rate", "clex_start")


def parse_run(spec: str) -> tuple[str, str, str | None, dict]:
    """``NAME=ATTENTION+POSITION[:options]`` -> (name, attention, position, options)."""
    name, _, rest = spec.partition("=")
    methods, options = parse_setup(rest)
    attention, _, position = methods.partition("+")
    if not name or not attention:
        raise ValueError(f"run {spec!r}: write NAME=ATTENTION+POSITION[:key=value/...]")
    return name, attention, None if position in ("", "none") else position, options


def train(args, spec: str, stream) -> tuple[torch.nn.Module, object, dict]:
    """A fresh model fine-tuned as ``spec``; returns it (adapters merged), its tokenizer and the run's record."""
    name, attention, position, options = parse_run(spec)
    dtype = DTYPES[args.dtype]
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=args.device)
    config_options = {k: options.pop(k) for k in CONFIG_KEYS if k in options}
    config = FinetuneConfig(length=args.length, steps=args.steps, attention=attention, attention_options=options,
                            position=position, batch_size=args.batch, checkpointing=True, seed=args.seed,
                            **{"learning_rate": args.lr, "warmup": args.warmup, **config_options})
    rows = Batches(tokenizer, stream, config.length, args.retrieval, config.seed)(args.steps * args.batch)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tuned = prepare(model, config)
    history = finetune(tuned, rows, config, out=args.out / name, progress=False)
    record = {"spec": spec, "steps": len(history), "tokens": len(history) * args.batch * args.length,
              "seconds": sum(h["seconds"] for h in history),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
              "first_loss": history[0]["loss"], "last_loss": sum(h["loss"] for h in history[-10:]) / len(history[-10:]),
              "curve": [{"step": h["step"], "loss": h["loss"], "factor": h["factor"]} for h in history]}
    merged = tuned.merge_and_unload()  # the peft wrapper's: the base model alone keeps its LoRA layers unmerged
    merged.config.use_cache = True
    if args.save:
        merged.save_pretrained(args.out / name / "model")
        tokenizer.save_pretrained(args.out / name / "model")
    return merged.to(dtype).eval(), tokenizer, record


def inference_setup(args, spec: str, trained: int) -> tuple[str, Callable[[int], float | None], dict]:
    """The tuned model's setup: (setup name, length -> factor or None, options)."""
    name, attention, position, options = parse_run(spec)
    max_factor = float(options.get("max_factor", FinetuneConfig.max_factor))
    options = {k: v for k, v in options.items() if k not in CONFIG_KEYS}
    attention = "dense" if attention in TRAINING_ONLY else attention
    options = {} if attention == "dense" else options
    if position == "clex":
        return f"{attention}+clex", lambda length: None, {**options, "state": str(args.out / name / CLEX_STATE)}
    if position == "crd_ntk":  # NTK at each length's factor, within the factors CRD-NTK trained on
        return f"{attention}+ntk", lambda length: min(max_factor, max(1.0, length / trained)), options
    if position is None:
        return attention, lambda length: None, options
    return f"{attention}+{position}", lambda length: max(1.0, args.length / trained), options


def reaches(setup: str, length: int, args) -> bool:
    """Whether ``setup`` is evaluated at ``length``: past ``--quadratic-limit`` only where attention's cost
    grows linearly (a dense 1M-token prompt on one GPU costs minutes a trial)."""
    return length <= args.quadratic_limit or setups.linear_cost(setup)


def evaluate(model, tokenizer, label: str, setup: str, factor_at: Callable[[int], float | None], options: dict,
             args, write: Callable[[str, list[dict]], None]) -> None:
    """Each evaluation at each length the setup reaches, each cell's records passed to ``write(kind, rows)`` as
    it is measured; a retrieval evaluation stops after two lengths in a row that scored nothing. A cell that
    does not fit the GPU's memory is written as one row with its ``error`` and the next length is tried."""
    for kind in args.evals.split(","):
        zeros, lengths = 0, args.eval_lengths.get(kind, args.lengths)
        for length in (n for n in lengths if reaches(setup, n, args)):
            if zeros >= 2:
                break
            setups.apply(model, setup, factor=factor_at(length), lengths=[length], options=options)
            try:
                reason = kind != "perplexity" and no_room(model, length, args)
                cell = [{"length": length, "error": reason}] if reason else measure(kind, model, tokenizer, length,
                                                                                    lengths, args)
            except torch.OutOfMemoryError as error:
                torch.cuda.empty_cache()
                cell = [{"length": length, "error": str(error).splitlines()[0]}]
            zeros = zeros + 1 if kind != "perplexity" and not any(r.get("correct") for r in cell) else 0
            write(kind, [{"setup": label, "inference": setup, "factor": factor_at(length), **r} for r in cell])


def no_room(model, length: int, args) -> str | None:
    """Why a retrieval prompt of ``length`` tokens would not fit the GPU's free memory now (other processes
    may hold some), or None."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this process' cached blocks count as taken in the driver's free memory
    return does_not_fit(model, length, 1, args.prefill_chunk)


def measure(kind: str, model, tokenizer, length: int, lengths: list[int], args) -> list[dict]:
    """One evaluation's records at one length."""
    if kind == "passkey":
        return passkey(model, tokenizer, [length], DEPTHS, trials=trials(args, length), batch_size=1,
                       prefill_chunk=args.prefill_chunk)
    if kind == "needle":
        return needle(model, tokenizer, [length], DEPTHS, texts=haystack_texts(), trials=trials(args, length),
                      batch_size=1, prefill_chunk=args.prefill_chunk)
    return perplexity(model, tokenizer, [length], texts=perplexity_texts(args), window=args.window,
                      samples=args.samples, segment_length=max(lengths))


def eval_lengths(spec: str) -> tuple[str, list[int]]:
    """``KIND=LENGTHS`` -> (kind, lengths)."""
    kind, _, lengths = spec.partition("=")
    if kind not in ("passkey", "needle", "perplexity") or not lengths:
        raise argparse.ArgumentTypeError(f"write passkey|needle|perplexity=LENGTHS, got {spec!r}")
    return kind, parse_lengths(lengths)


def perplexity_texts(args) -> tuple[str, ...]:
    """The corpus' held-out split with ``--heldout`` (more text: more segments of a long length), else the
    shipped haystack texts."""
    return documents(args.corpus / "heldout.jsonl.xz") if args.heldout else tuple(haystack_texts())


def trials(args, length: int) -> int:
    return args.trials if length <= args.quadratic_limit else args.long_trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="a corpus folder (python -m longreach.reference_model.corpus)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", required=True, help="NAME=ATTENTION+POSITION[:key=value/...], comma-separated")
    parser.add_argument("--untuned", default="", help="setups to evaluate the un-tuned model under")
    parser.add_argument("--length", type=lambda s: parse_lengths(s)[0], default=16384)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--retrieval", type=float, default=0.25, help="share of synthetic retrieval rows")
    parser.add_argument("--evals", default="passkey,needle,perplexity")
    parser.add_argument("--lengths", type=parse_lengths, default=[8192, 32768, 131072])
    parser.add_argument("--eval-lengths", type=eval_lengths, action="append", default=[],
                        help="KIND=LENGTHS: one evaluation's own lengths instead of --lengths (repeatable)")
    parser.add_argument("--trials", type=int, default=2, help="prompts per (length, depth)")
    parser.add_argument("--long-trials", type=int, default=1, help="prompts per cell past --quadratic-limit")
    parser.add_argument("--quadratic-limit", type=lambda s: parse_lengths(s)[0], default=131072,
                        help="the longest length for setups whose attention cost grows quadratically")
    parser.add_argument("--samples", type=int, default=2, help="perplexity segments (at most what the text holds)")
    parser.add_argument("--window", type=int, default=256, help="perplexity scores each segment's last WINDOW tokens")
    parser.add_argument("--heldout", action="store_true", help="perplexity of CORPUS/heldout.jsonl.xz")
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="write each tuned model to OUT/NAME/model")
    args = parser.parse_args()
    args.eval_lengths = dict(args.eval_lengths)
    if unknown := set(args.eval_lengths) - set(args.evals.split(",")):
        parser.error(f"--eval-lengths names {sorted(unknown)}, which --evals ({args.evals}) does not run")
    for spec in args.runs.split(","):
        parse_run(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _, tokenizer = load_pretrained(args.model)
    stream = token_stream(tokenizer, (d["text"] for d in read(args.corpus / "train.jsonl.xz")))
    result = {"model": args.model, "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "training": {}, "records": {kind: [] for kind in args.evals.split(",")}, "errors": []}

    def write(kind: str, rows: list[dict]) -> None:
        failed = [r for r in rows if "error" in r]
        result["errors"] += failed
        result["records"][kind] += [r for r in rows if "error" not in r]
        if result["records"][kind]:
            report.plot(kind, result["records"][kind], args.out / f"{kind}.png")
        result["seconds"] = time.time() - started
        (args.out / "extend_model.json").write_text(json.dumps(result, indent=1) + "\n")
        for r in failed:
            print(f"{r['setup']} {kind} at {r['length']}: {r['error']}", flush=True)

    for setup in filter(None, args.untuned.split(",")):
        model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
        evaluate(model, tokenizer, f"untuned ({setup})", setup, lambda length: None, {}, args, write)
        del model
    for spec in args.runs.split(","):
        model, tokenizer, record = train(args, spec, stream)
        result["training"][spec.partition("=")[0]] = record
        print(spec, {k: v for k, v in record.items() if k != "curve"}, flush=True)
        setup, factor_at, options = inference_setup(args, spec, model.config.max_position_embeddings)
        evaluate(model, tokenizer, f"tuned {spec.partition('=')[0]} ({setup})", setup, factor_at, options, args, write)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
