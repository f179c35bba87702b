"""Decode cost of the static caches on a real model and a real prompt, and token_select's selection reuse.

Run on the device: ``python benchmarks/decode_real.py OUT --model smollm2 --contexts 128k,1m``. Each
context gets a needle prompt in held-out text (as ``longreach needle`` builds it); the prompt is prefilled
through ``--prefill`` attention (dense, or select_merge where a dense prefill is too slow), its keys go
into a static cache (``full``, or ``token_select`` with ``--top-k``, ``--n-init``, ``--n-local``), and
``longreach.decode.GraphDecoder`` decodes ``--steps`` greedy tokens from a CUDA graph (eagerly on the
CPU). Per policy and context: the median milliseconds per token, the share of steps whose selection was
reused (one token_select run per ``--thresholds`` value, 1.0 reusing only for an identical query; summed
over layers), the cache's GiB, and whether the greedy answer is the needle's key (``benchmarks/decode.py``
measures the same caches on random weights, where consecutive queries are unrelated and no selection is
reused). Writes ``OUT/decode_real.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import longreach
from longreach.cache.static import make_static_cache
from longreach.cli import DTYPES, parse_lengths, parse_options
from longreach.decode import GraphDecoder, prefill
from longreach.evals import prompts
from longreach.evals.retrieval import answered, haystack_ids
from longreach.pretrained import load_pretrained
from longreach.reference_model import haystack_texts


def needle_prompt(tokenizer, length: int, seed: int) -> prompts.Prompt:
    documents = prompts.encode_documents(tokenizer, haystack_texts())
    separator = prompts.encode(tokenizer, prompts.DOCUMENT_SEPARATOR)
    rng = random.Random(seed)
    return prompts.needle(tokenizer, length, 0.5, rng, haystack_ids(documents, length, rng, separator))


def step_ms(decoder: GraphDecoder, steps: int, cuda: bool) -> tuple[float, list[int]]:
    """Median milliseconds per decoded token (capture's warm-up tokens, already decoded, not timed) and the
    tokens decoded."""
    times, tokens, warm = [], [], len(decoder.pending)
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens.append(int(decoder.step()[0, 0]))
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[warm:]), tokens


def run(model, tokenizer, context: int, args) -> list[dict]:
    cuda = next(model.parameters()).device.type == "cuda"
    prompt = needle_prompt(tokenizer, context, args.seed)
    ids = torch.tensor([prompt.ids], device=next(model.parameters()).device)
    selection = {"top_k": args.top_k, "n_init": args.n_init, "n_local": args.n_local}
    records = []
    runs = [("full", {})] + [("token_select", {**selection, "threshold": t}) for t in args.thresholds]
    for policy, options in runs:
        longreach.extend(model, attention=args.prefill, **parse_options(tuple(args.option)))
        cache = make_static_cache(policy, model.config.num_hidden_layers, len(prompt.ids) + args.steps, **options)
        cache.wired = True
        first = prefill(model, ids, cache)
        longreach.extend(model, attention="dense")  # the static cache attends by itself; dense keeps positions
        decoder = GraphDecoder(model, cache, first, len(prompt.ids))
        if cuda:
            decoder.capture()
        latency, tokens = step_ms(decoder, args.steps, cuda)
        text = tokenizer.decode([int(first[0, 0]), *tokens])
        layers = cache.layers
        reuse = sum(layer.reuses for layer in layers) / max(1, sum(layer.selections for layer in layers))
        gib = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)) / 2**30
        records.append({"policy": policy, "context": context, "latency_ms": latency, "steps": args.steps,
                        "selection_reuse": reuse if policy == "token_select" else None, "cache_gib": gib,
                        "answer": text, "correct": answered(text, prompt.key), "options": options,
                        "prefill": args.prefill})
        print(records[-1], flush=True)
        del decoder, cache
        if cuda:
            torch.cuda.empty_cache()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--contexts", type=parse_lengths, default=[131072])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefill", default="dense", help="attention method of the prompt's pass")
    parser.add_argument("--option", action="append", default=[], help="prefill method option KEY=VALUE")
    parser.add_argument("--top-k", type=int, default=2048)
    parser.add_argument("--n-init", type=int, default=128)
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--thresholds", type=lambda s: [float(t) for t in s.split(",")], default=[0.9, 1.0],
                        help="token_select's reuse thresholds, one run each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype], device=device)
    records = [r for context in args.contexts for r in run(model, tokenizer, context, args)]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    (args.out / "decode_real.json").write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
