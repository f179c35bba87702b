"""Extend the shipped reference model from 512 tokens to 16x with longreach's fine-tuning recipe.

Run on the device: ``python benchmarks/extend_reference.py data/corpus OUT --minutes 3``. For each
training method (default select_merge and s2; dca too) the recipe fine-tunes the model at ``--length``
tokens with CRD-NTK (dca with its own position map instead; LoRA r=8 on q/k/v/o plus embeddings and
norms, bf16) on the project's corpus mixed, like the pretraining, with synthetic passkey and needle
prompts. Each run then evaluates passkey retrieval and perplexity at 1x to 64x the trained length,
next to the un-tuned model under the same setups, in the same process. The step count fits
``--minutes`` from a timed pilot of 3 steps.

Writes ``OUT/extend_reference.json`` (training curves and evaluation records), ``passkey.png`` and
``perplexity.png``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from pathlib import Path

import torch

from longreach.attention import select_merge
from longreach.evals import passkey, perplexity, report, setups
from longreach.reference_model import TRAIN_LENGTH, heldout_texts, load_reference_model
from longreach.reference_model.corpus import read
from longreach.reference_model.data import Batches
from longreach.train import FinetuneConfig, finetune, prepare
from longreach.train.data import token_stream

# How each training method is run at inference: (setup, NTK factor, method options), None standing
# for the extension factor. select_merge keeps its sparse attention: its merged positions span at
# most (sink + top_k + local + 1) blocks, so the factor that covers them is that span over the
# trained length (2 for the defaults); it also runs with a wider selection (top_k 32, which the
# tuned factors cover), densely, as s2 does (a training-time device, LongLoRA infers densely), and
# under dca, whose positions stay inside the trained window (no rescaling). select_merge now interpolates
# its merged positions into the trained length itself, so the factor that covers the span is 1 for
# runs after that change; the committed results predate it.
_DEFAULTS = {k: v.default for k, v in inspect.signature(select_merge).parameters.items()}
MERGED_SPAN = (_DEFAULTS["sink"] + _DEFAULTS["top_k"] + _DEFAULTS["local"] + 1) * _DEFAULTS["block_size"]
INFERENCE = {
    "select_merge": [("dca", 1, {}), ("select_merge+ntk", math.ceil(MERGED_SPAN / TRAIN_LENGTH), {}),
                     ("select_merge+ntk", None, {}), ("select_merge+ntk", None, {"top_k": 32}), ("ntk", None, {})],
    "s2": [("ntk", None, {})],
    "dca": [("dca", 1, {})],
}
# The position scheme each method trains with: dca maps every query-key distance into the trained
# window itself (intra-, successive- and inter-chunk positions all below 512), so rescaling RoPE on
# top would only move it away from the pretrained frequencies; the others see unseen distances and
# train with CRD-NTK.
TRAIN_POSITION = {"select_merge": "crd_ntk", "s2": "crd_ntk", "dca": None}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def rows_for(tokenizer, stream, config: FinetuneConfig, retrieval: float) -> torch.Tensor:
    count = config.steps * config.batch_size * config.accumulation
    return Batches(tokenizer, stream, config.length, retrieval, config.seed)(count)


def tune(method: str, stream, args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict]]:
    """Fine-tune a fresh copy of the reference model with ``method``; returns the merged model and history."""
    def fresh(steps: int):
        model, tokenizer = load_reference_model(torch.bfloat16, args.device)
        config = FinetuneConfig(length=args.length, steps=steps, attention=method, position=TRAIN_POSITION[method],
                                max_factor=args.max_factor or args.length / TRAIN_LENGTH, learning_rate=args.lr,
                                warmup=args.warmup, batch_size=args.batch, checkpointing=False, seed=args.seed)
        return prepare(model, config), tokenizer, config

    model, tokenizer, config = fresh(3)
    pilot = finetune(model, rows_for(tokenizer, stream, config, args.retrieval), config, progress=False)
    step_seconds = min(h["seconds"] for h in pilot[1:])
    steps = max(1, int(args.minutes * 60 / step_seconds))
    model, tokenizer, config = fresh(steps)
    history = finetune(model, rows_for(tokenizer, stream, config, args.retrieval), config, progress=False)
    merged = model.merge_and_unload().to(torch.bfloat16)
    merged.config.use_cache = True
    return merged, history


def evaluate(model, tokenizer, name: str, spec: str, factor: float, options: dict, args: argparse.Namespace) -> dict:
    setups.apply(model, spec, factor=factor, lengths=args.eval_lengths, options=options)
    keys = passkey(model, tokenizer, args.eval_lengths, DEPTHS, trials=args.trials, batch_size=args.trials)
    ppl = perplexity(model, tokenizer, args.eval_lengths, texts=heldout_texts(), window=256, samples=8)
    label = f"{name} ({spec} x{factor:g}" + "".join(f", {k}={v}" for k, v in options.items()) + ")"
    return {"passkey": [{"setup": label, **r} for r in keys], "perplexity": [{"setup": label, **r} for r in ppl]}


def summary(records: dict, lengths: list[int]) -> dict:
    out = {}
    for kind, value in (("passkey", "accuracy"), ("perplexity", "perplexity")):
        for r in records[kind]:
            cell = out.setdefault(r["setup"], {}).setdefault(kind, {})
            cell.setdefault(r["length"], []).append(r[value])
    return {setup: {kind: {n: sum(v[n]) / len(v[n]) for n in lengths} for kind, v in kinds.items()}
            for setup, kinds in out.items()}


def write(result: dict, args: argparse.Namespace) -> None:
    """Results so far: a run cut short by the device's time limit keeps the evaluations it finished."""
    result["summary"] = summary(result["records"], args.eval_lengths)
    (args.out / "extend_reference.json").write_text(json.dumps(result, indent=1) + "\n")
    for kind in ("passkey", "perplexity"):
        report.plot(kind, result["records"][kind], args.out / f"{kind}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--methods", default="select_merge,s2", help=f"any of {', '.join(INFERENCE)}")
    parser.add_argument("--length", type=int, default=16 * TRAIN_LENGTH)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time per method")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-factor", type=float, default=None,
                        help="CRD-NTK's largest factor (default: length / trained length)")
    parser.add_argument("--retrieval", type=float, default=0.25)
    parser.add_argument("--trials", type=int, default=10, help="passkey trials per (length, depth)")
    parser.add_argument("--eval-lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[TRAIN_LENGTH * 2**i for i in range(7)])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if unknown := set(args.methods.split(",")) - set(INFERENCE):
        parser.error(f"--methods: {', '.join(sorted(unknown))} not among {', '.join(INFERENCE)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base, tokenizer = load_reference_model(torch.bfloat16, args.device)
    stream = token_stream(tokenizer, (d["text"] for d in read(args.corpus / "train.jsonl.xz")))
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "device": device, "training": {}, "records": {"passkey": [], "perplexity": []}}
    methods = args.methods.split(",")
    for method in methods:
        tuned, history = tune(method, stream, args)
        losses = [h["loss"] for h in history]
        result["training"][method] = {
            "steps": len(history), "tokens": len(history) * args.batch * args.length,
            "seconds": sum(h["seconds"] for h in history),
            "tokens_per_second": sorted(h["tokens_per_second"] for h in history)[len(history) // 2],
            "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
            "curve": [{"step": h["step"], "loss": h["loss"], "factor": h["factor"]} for h in history[::10]]}
        print(method, {k: v for k, v in result["training"][method].items() if k != "curve"}, flush=True)
        for name, model in (("tuned " + method, tuned), ("reference", base)):
            for spec, factor, options in INFERENCE[method]:
                found = evaluate(model, tokenizer, name, spec, factor or args.length / TRAIN_LENGTH, options, args)
                for kind in found:
                    result["records"][kind] += found[kind]
                print(json.dumps(summary(found, args.eval_lengths)), flush=True)
                result["seconds"] = time.time() - started
                write(result, args)
        del tuned
        torch.cuda.empty_cache()
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
