"""Time and peak memory of a model's forward (and forward + backward) pass per attention method and length."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .memory import PeakMemory
from .retrieval import Progress


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``run``, each waited for on the device."""
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _step(model, ids: torch.Tensor, backward: bool) -> None:
    if backward:
        out = model(input_ids=ids, logits_to_keep=1)
        out.logits.float().sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)


def measure(model, length: int, *, backward: bool, repeats: int = 3, seed: int = 0) -> dict:
    """Median seconds over ``repeats`` timed runs (after one warm-up) and the peak extra memory of one run.

    A run that does not fit on the device is recorded with ``error: "out of memory"`` and no timings."""
    if length < 1 or repeats < 1:
        raise ValueError(f"length and repeats must be >= 1, got {length} and {repeats}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device)
    mode = "forward+backward" if backward else "forward"
    try:
        _step(model, ids, backward)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"length": length, "mode": mode, "seconds": None, "tokens_per_second": None, "peak_mib": None,
                "device": str(device), "error": "out of memory"}
    with PeakMemory(device) as peak:
        _step(model, ids, backward)
    seconds = median_seconds(lambda: _step(model, ids, backward), device, repeats)
    return {"length": length, "mode": mode, "seconds": seconds,
            "tokens_per_second": length / seconds, "peak_mib": None if peak.bytes is None else peak.bytes / 2**20,
            "device": str(device)}


def efficiency(model, lengths: Sequence[int], *, backward: bool = True, repeats: int = 3,
               progress: Progress | None = None) -> list[dict]:
    """Records of :func:`measure` for each length, forward and (with ``backward``) forward + backward."""
    if not lengths or any(int(n) != n or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    records = []
    for length in lengths:
        for with_backward in (False, True) if backward else (False,):
            records.append(measure(model, length, backward=with_backward, repeats=repeats))
            if progress is not None:
                progress(1)
    return records
