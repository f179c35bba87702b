"""Would blocks shared by a layer's heads reach the needle more often? Recall of select_merge's `shared` option,
simulated from each (layer, head)'s ranking of the key blocks on needle prompts.

    python benchmarks/selection_votes.py OUT --lengths 8k,32k --depths 0.1,0.5,0.9 [--shared 2,4]

For each needle prompt (the ones ``longreach needle`` builds, seed 0), one prefill under select_merge's defaults;
at every layer the prompt's last query block's scores (:func:`select_blocks`'s default score, from the library's
own summary and score functions) rank the candidate key blocks per query head, and the best 32 are kept. Recall is
the share of (layer, head) pairs whose kept blocks hold a block of the needle's key: each head's best ``top_k``
(the default), or, as the library picks them (``select_merge.with_shared``), the ``c`` blocks most often among
the heads' best two plus its best ``top_k - c`` of the others (``shared=c``).
Writes ``OUT/selection_votes.json`` (the rankings and the recalls). ``--rescore FILE`` recomputes the recalls of
such a file from its stored rankings, without a prefill, as the library picks now.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
from pathlib import Path
from unittest import mock

import torch
from selection_recall import SELECT, key_blocks, select_blocks  # the library function, before any patch

import longreach
from longreach.cli import parse_lengths
from longreach.evals import prompts
from longreach.evals.retrieval import haystack_ids
from longreach.pretrained import load_pretrained
from longreach.reference_model import haystack_texts

BLOCK, TOP_K, KEPT = 64, 8, 32
DEFAULTS = {name: param.default for name, param in inspect.signature(SELECT.select_merge).parameters.items()}


def last_block_scores(q: torch.Tensor, k: torch.Tensor, rope, score: str,
                      representatives: int = DEFAULTS["representatives"]) -> torch.Tensor:
    """(heads, key blocks) scores by ``score`` (with ``representatives`` parts a block) of the prompt's last query
    block, summarised and turned as the default selection does it, -inf for the blocks that are not candidates
    (the sinks, the local ones)."""
    b, h, length, d = q.shape
    n_k = -(-length // BLOCK)
    q_bar = SELECT.block_means(q[:, :, (n_k - 1) * BLOCK:], BLOCK, 0, DEFAULTS["query_rows"])
    q_bar = rope.rotate(q_bar, q_bar.new_full((1,), DEFAULTS["score_distance"]))
    summary = SELECT.key_summary(k, BLOCK, score, representatives)
    part = SELECT.summary_rows(score, BLOCK, representatives)
    scores = SELECT.block_scores(q_bar.view(b, k.shape[1], h // k.shape[1], 1, d), summary, score, n_k,
                                 part)[0].flatten(0, 1)[:, 0]
    candidate = (torch.arange(n_k) >= DEFAULTS["sink"]) & (torch.arange(n_k) < n_k - 1 - DEFAULTS["local"])
    return scores.masked_fill(~candidate, float("-inf"))


class Ranking:
    """Stands in for ``select_blocks``: selects as it does and records the last query block's best KEPT blocks."""

    def __init__(self):
        self.layers = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, **options) -> torch.Tensor:
        scores = last_block_scores(q, k, options["rope"], DEFAULTS["score"])
        self.layers.append(scores.topk(KEPT, -1).indices.tolist())
        return select_blocks(q, k, **options)


def needle_prefills(model_name: str, lengths: list[int], depths: list[float], recorder: type, device: str):
    """For each needle prompt (seed 0), one prefill of ``model_name`` (float32, select_merge at its defaults) with
    a fresh ``recorder()`` standing in for ``select_blocks``; yields (length, depth, the needle's blocks, recorder)."""
    model, tokenizer = load_pretrained(model_name, dtype=torch.float32, device=device)
    longreach.extend(model, attention="select_merge")
    documents = prompts.encode_documents(tokenizer, haystack_texts())
    separator = prompts.encode(tokenizer, prompts.DOCUMENT_SEPARATOR)
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"0/{length}/{depth}")
            prompt = prompts.needle(tokenizer, length, depth, rng, haystack_ids(documents, length, rng, separator))
            seen = recorder()
            with mock.patch.object(SELECT, "select_blocks", seen), torch.no_grad():
                model(torch.tensor([prompt.ids], device=device), use_cache=False, logits_to_keep=1)
            yield length, depth, key_blocks(tokenizer, prompt, BLOCK), seen


def recall(layers: list, needle: list[int], shared: int) -> float:
    """Share of (layer, head) pairs whose picks (:func:`with_shared`'s, from their rankings) hold a needle block."""
    rankings = torch.tensor(layers)[:, None, :, None]  # (layers, 1, heads, 1, KEPT): a batch per layer
    n_k = int(rankings.max()) + 1
    picks = [SELECT.with_shared(lambda n, r=r: r[..., :n], TOP_K, shared, n_k) for r in rankings]
    return torch.isin(torch.stack(picks), torch.tensor(needle)).any(-1).double().mean().item()


def rescore(path: Path, shares: list[int], out: Path) -> None:
    """Writes ``path``'s result to ``out`` with each record's recalls computed again from its stored rankings."""
    result = json.loads(path.read_text())
    for record in result["records"]:
        record["recall"] = {f"shared={c}": recall(record["rankings"], record["needle_blocks"], c) for c in shares}
        print({key: record[key] for key in ("length", "depth", "recall")})
    out.write_text(json.dumps({**result, "rescored_from": str(path)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", type=parse_lengths, default=[8192])
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--shared", default="2,4")
    parser.add_argument("--rescore", type=Path, help="a selection_votes.json whose rankings to score again")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    shares = [0] + [int(c) for c in args.shared.split(",")]
    if args.rescore:
        rescore(args.rescore, shares, args.out / "selection_votes.json")
        return
    records = []
    depths = [float(x) for x in args.depths.split(",")]
    for length, depth, needle, ranking in needle_prefills(args.model, args.lengths, depths, Ranking, device):
        row = {"length": length, "depth": depth, "needle_blocks": needle,
               "recall": {f"shared={c}": recall(ranking.layers, needle, c) for c in shares}}
        print(row, flush=True)
        records.append({**row, "rankings": ranking.layers})
        (args.out / "selection_votes.json").write_text(json.dumps({"model": args.model, "device": device,
                                                                   "records": records}) + "\n")

if __name__ == "__main__":
    main()
