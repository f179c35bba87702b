"""The reference model's pretraining recipe (run on the device GPU; about 10 minutes on an H100).

``python -m longreach.reference_model.train CORPUS_DIR TOKENIZER_DIR OUT_DIR --minutes 6`` trains a
small Llama (grouped-query attention, RoPE) at 512 tokens on the corpus mixed with synthetic
passkey and needle prompts, then records held-out perplexity and passkey accuracy and saves the
weights (bfloat16 safetensors) with the tokenizer and ``training.json``.

``--steps N`` replaces the time budget by a step count, so that runs of different speed see the same tokens.
``--save-every N`` writes ``OUT_DIR/checkpoint.pt`` (weights, optimizer, data order, curve) every N steps;
a run whose OUT_DIR holds one resumes from it and trains on as the uninterrupted run would have.
``--attention NAME --option KEY=VALUE ...`` pretrains under any registered attention method (e.g.
``--attention select_merge --option block_size=32 --option top_k=4``, rotary positions on the selected
tokens by default); the held-out loss and passkey are measured under it too, and the saved model is the
plain transformers model (``longreach.extend`` it with the same method to use it as trained).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..cli import parse_options
from ..evals.passkey import passkey
from ..hf import extend, restore
from ..train.data import token_stream
from .corpus import read
from .data import Batches

ARCHITECTURE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 autocast on the GPU only: CPUs without bf16 matrix units run it some 20x slower than float32.
MIXED = DEVICE == "cuda"


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to peak/10 over the time budget."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def heldout_loss(model, stream: np.ndarray, length: int, windows: int, batch: int) -> float:
    """Mean next-token loss over ``windows`` disjoint windows of the held-out stream."""
    count = min(windows, len(stream) // (length + 1))
    rows = torch.from_numpy(stream[:count * (length + 1)].astype(np.int64)).view(count, length + 1)
    total = 0.0
    for start in range(0, count, batch):
        chunk = rows[start:start + batch].to(DEVICE)
        with torch.autocast(DEVICE, torch.bfloat16, enabled=MIXED):
            total += _loss(model, chunk).item() * len(chunk)
    return total / count


def _loss(model, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


def _progress(args: argparse.Namespace, step: int, elapsed: float) -> float:
    """The share of the budget spent: steps when ``--steps`` fixes them (equal budgets across runs), else time."""
    return step / args.steps if args.steps else elapsed / (args.minutes * 60)


CHECKPOINT = "checkpoint.pt"
# The arguments a resumed run must share with the checkpoint's run.
RECIPE = ("attention", "option", "steps", "minutes", "batch", "lr", "warmup", "retrieval", "seed")


def _recipe(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in RECIPE}


def _save(args: argparse.Namespace, model, optimizer, batches: Batches, step: int, curve: list, seconds: float
          ) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "curve": curve,
             "seconds": seconds, "data": batches.rng.getstate(), "torch": torch.get_rng_state(),
             "recipe": _recipe(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out / f"{CHECKPOINT}.tmp")
    (args.out / f"{CHECKPOINT}.tmp").replace(args.out / CHECKPOINT)  # a run killed mid-write keeps the last one


def _resume(args: argparse.Namespace, model, optimizer, batches: Batches) -> tuple[int, list, float]:
    """(step, curve, seconds) of the checkpoint in ``args.out``, loaded into the run; (0, [], 0.0) without one."""
    path = args.out / CHECKPOINT
    if not path.exists():
        return 0, [], 0.0
    state = torch.load(path, map_location=DEVICE, weights_only=False)
    changed = {k: (v, state["recipe"][k]) for k, v in _recipe(args).items() if state["recipe"][k] != v}
    if changed:
        raise ValueError(f"{path} was written by another recipe; " + ", ".join(
            f"--{k.replace('_', '-')} is {new!r}, the checkpoint's {old!r}" for k, (new, old) in changed.items())
            + ": use another OUT_DIR or the same arguments")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.rng.setstate(state["data"])
    torch.set_rng_state(state["torch"])
    print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"], state["curve"], state["seconds"]


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    started = time.time()
    stream = token_stream(tokenizer, (d["text"] for d in read(args.corpus / "train.jsonl.xz")))
    heldout = token_stream(tokenizer, (d["text"] for d in read(args.corpus / "heldout.jsonl.xz")))
    print(f"tokenised {len(stream):,} training and {len(heldout):,} held-out tokens in {time.time() - started:.0f} s",
          flush=True)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **ARCHITECTURE)
    model = LlamaForCausalLM(config).to(DEVICE)
    options = parse_options(tuple(args.option))
    if args.attention != "dense" or options:  # the dense recipe keeps transformers' own SDPA
        extend(model, attention=args.attention, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=DEVICE == "cuda")
    batches = Batches(tokenizer, stream, ARCHITECTURE["max_position_embeddings"], args.retrieval, args.seed)
    step, curve, done = _resume(args, model, optimizer, batches)
    start = time.time() - done
    while (progress := _progress(args, step, time.time() - start)) < 1.0:
        elapsed = time.time() - start
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, args.lr, args.warmup)
        rows = batches(args.batch).to(DEVICE, non_blocking=True)
        with torch.autocast(DEVICE, torch.bfloat16, enabled=MIXED):
            loss = _loss(model, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            curve.append({"step": step, "tokens": step * args.batch * batches.length, "seconds": round(elapsed, 1),
                          "loss": round(loss.item(), 4)})
            print(curve[-1], flush=True)
        step += 1
        if args.save_every and step % args.save_every == 0:
            _save(args, model, optimizer, batches, step, curve, time.time() - start)
    model.eval()
    loss = heldout_loss(model, heldout, batches.length, windows=2000, batch=64)
    records = passkey(model, tokenizer, args.passkey_lengths, [0.0, 0.25, 0.5, 0.75, 1.0], trials=20,
                      batch_size=20)
    result = {"architecture": ARCHITECTURE, "parameters": sum(p.numel() for p in model.parameters()),
              "attention": args.attention, "options": options, "steps": step, "batch": args.batch,
              "length": batches.length,
              "tokens": step * args.batch * batches.length, "seconds": round(time.time() - start, 1),
              "training_tokens_unique": int(len(stream)), "retrieval_share": args.retrieval, "peak_lr": args.lr,
              "heldout_loss": loss, "heldout_perplexity": math.exp(loss), "passkey": records, "loss_curve": curve}
    restore(model).to(torch.bfloat16).save_pretrained(args.out, max_shard_size="15MB")
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=6.0, help="time budget (unless --steps is given)")
    parser.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of --minutes")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--retrieval", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: none)")
    parser.add_argument("--attention", default="dense", help="registered attention method to pretrain under")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="the method's options")
    parser.add_argument("--passkey-lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[128, 256, 512, 1024, 2048])
    args = parser.parse_args()
    if args.save_every < 0:
        parser.error(f"--save-every must be >= 0, got {args.save_every}")
    result = train(args)
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=1))


if __name__ == "__main__":
    main()
