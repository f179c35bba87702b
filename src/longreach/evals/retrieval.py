"""Retrieval grids (passkey, needle): accuracy per (length, depth) cell from greedy answers."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence

import torch

from ..decode import check_chunk, forward_prompt
from ..hf import cache_kwargs, output_cache
from .fit import check_fits
from .prompts import Prompt, check_depth

MakePrompt = Callable[[int, float, random.Random], Prompt]
Progress = Callable[[int], None]


@torch.no_grad()
def greedy(model, ids: torch.Tensor, steps: int, chunk: int | None = None) -> torch.Tensor:
    """Greedy continuation of ``ids`` (b, L) for ``steps`` tokens through the model's KV cache: (b, steps);
    the prompt is prefilled ``chunk`` tokens at a time (:func:`longreach.decode.forward_prompt`)."""
    out = forward_prompt(model, ids, chunk)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1][:, None], use_cache=True, **cache_kwargs(output_cache(out)))
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def answered(text: str, key: str) -> bool:
    """Whether a generated continuation starts with exactly the key's digits."""
    found = re.match(r"\s*(\d+)", text)
    return found is not None and found.group(1) == key


def check_grid(lengths: Sequence[int], depths: Sequence[float], trials: int, batch_size: int) -> None:
    if not lengths or any(int(n) != n or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    if not depths:
        raise ValueError("depths must not be empty")
    for depth in depths:
        check_depth(depth)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def check_token_ids(model, largest: int) -> None:
    """Reject a tokenizer whose ids (``largest``: the largest one seen) the model cannot embed."""
    if largest >= model.config.vocab_size:
        raise ValueError(f"tokenizer yields token id {largest} but the model's vocab_size is "
                         f"{model.config.vocab_size}: the tokenizer does not belong to this model")


def evaluate(model, tokenizer, make_prompt: MakePrompt, lengths: Sequence[int], depths: Sequence[float], *,
             trials: int, seed: int = 0, batch_size: int = 8, progress: Progress | None = None,
             prefill_chunk: int | None = None) -> list[dict]:
    """Accuracy of greedy answers over a grid: one record per (length, depth) with ``trials`` prompts.

    Every prompt is built (and checked) before the model runs, so bad input fails at once. Cells use
    their own seeded generators: a cell's prompts do not depend on the rest of the grid.
    """
    check_grid(lengths, depths, trials, batch_size)
    check_chunk(prefill_chunk)
    check_fits(model, max(lengths), min(batch_size, trials), prefill_chunk)
    cells = {}
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}/{length}/{depth}")
            cells[length, depth] = [make_prompt(length, depth, rng) for _ in range(trials)]
    first = next(iter(cells.values()))[0]
    check_token_ids(model, max(first.ids + first.answer))
    device = next(model.parameters()).device
    records = []
    for (length, depth), prompts in cells.items():
        correct = 0
        clock = CellClock(device)
        for start in range(0, trials, batch_size):
            batch = prompts[start:start + batch_size]
            ids = torch.tensor([p.ids for p in batch], device=device)
            steps = max(len(p.answer) for p in batch) + 1
            for prompt, row in zip(batch, greedy(model, ids, steps, prefill_chunk).tolist(), strict=True):
                correct += answered(tokenizer.decode(row), prompt.key)
            if progress is not None:
                progress(len(batch))
        records.append({"length": length, "depth": depth, "trials": trials, "correct": correct,
                        "accuracy": correct / trials, **clock.read(trials)})
    return records


class CellClock:
    """Wall time per trial of a cell and, on CUDA, the cell's peak allocated memory."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.device, self.start = device, time.perf_counter()

    def read(self, trials: int) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        return {"seconds_per_trial": (time.perf_counter() - self.start) / trials, "peak_gib": peak}


def haystack_ids(documents: Sequence[list[int]], length: int, rng: random.Random,
                 separator: Sequence[int] = ()) -> list[int]:
    """``length`` tokens of real text, as NIAH/RULER build long haystacks from many essays: the documents
    in a random order, joined by ``separator``, read from a random place and round the end back to the
    start, so no token repeats while ``length`` is at most the texts' total."""
    total = sum(len(doc) for doc in documents) + len(separator) * len(documents)
    if length > total:
        raise ValueError(f"the haystack texts hold {total} tokens, fewer than the {length} asked for: "
                         "pass more text (needle's texts=, the CLI's --text)")
    order = list(documents)
    rng.shuffle(order)
    start, index, out = rng.randrange(total), 0, []
    while start >= len(order[index]) + len(separator):  # only the documents read are copied
        start -= len(order[index]) + len(separator)
        index += 1
    while len(out) < length:
        piece = [*order[index], *separator]
        out += piece[start:start + length - len(out)]
        start, index = 0, (index + 1) % len(order)
    return out
