"""How often token_select's selection cache reuses its top-k on a trained model, and what it costs.

Runs on the CPU: ``python benchmarks/selection_reuse.py --out DIR``. The shipped reference model
decodes continuations of held-out documents with token_select at each ``--thresholds`` value; the
share of steps (summed over layers) that reused the stored selection is recorded with how long the
continuations follow the full cache's (the share of tokens before they first depart from it) and
the passkey accuracy at 512 tokens under the same cache, against the full cache's accuracy.
Random-weight models (``decode.py``) reuse nothing: their consecutive queries are nearly orthogonal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import longreach
from longreach.evals import passkey
from longreach.hf import output_cache
from longreach.reference_model import heldout_texts, load_reference_model

DEPTHS = [0.2, 0.5, 0.8]


def continue_texts(model, tokenizer, prompt: int, new_tokens: int, documents: int) -> tuple[list, float]:
    """Greedy continuations of ``documents`` held-out texts (``prompt`` tokens each) and, under a
    token_select cache, the reused share of its selections (summed over layers)."""
    reuses = selections = 0
    continuations = []
    for text in heldout_texts()[:documents]:
        ids = tokenizer(text[: prompt * 20], return_tensors="pt").input_ids[:, :prompt]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        continuations.append(out.sequences[0, prompt:])
        layers = output_cache(out).layers
        reuses += sum(getattr(layer, "reuses", 0) for layer in layers)
        selections += sum(getattr(layer, "selections", 0) for layer in layers)
    return continuations, reuses / max(1, selections)


def agreement(ours: list, full: list) -> float:
    """Share of generated tokens before each continuation first departs from the full cache's."""
    same = 0
    for a, b in zip(ours, full, strict=True):
        n = min(len(a), len(b))
        departs = (a[:n] != b[:n]).nonzero()
        same += int(departs[0]) if len(departs) else n
    return same / sum(len(b) for b in full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--prompt", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_reference_model()
    options = dict(budget=args.budget, n_init=16, n_local=48)

    def accuracy() -> float:
        records = passkey(model, tokenizer, [512], DEPTHS, trials=args.trials, batch_size=args.trials)
        return sum(r["correct"] for r in records) / sum(r["trials"] for r in records)

    texts = (tokenizer, args.prompt, args.new_tokens, args.documents)
    full, _ = continue_texts(model, *texts)
    records = [{"cache": "full", "passkey_512": accuracy()}]
    for threshold in args.thresholds:
        longreach.extend(model, cache="token_select", threshold=threshold, **options)
        ours, reuse = continue_texts(model, *texts)
        records.append({"cache": "token_select", "threshold": threshold, **options, "selection_reuse": reuse,
                        "agreement_with_full": agreement(ours, full), "passkey_512": accuracy()})
        print(records[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "longreach reference model (12.6M, trained at 512)", "prompt_tokens": args.prompt,
            "new_tokens": args.new_tokens, "documents": args.documents, "passkey_trials": args.trials * len(DEPTHS)}
    (args.out / "selection_reuse.json").write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
