"""CAB's four attention patterns: time and peak memory of one attention call, per implementation.

CAB (Zhang et al., 2023) benchmarks efficient attention as causal and non-causal self attention and
causal and non-causal cross attention. Here queries are (1, heads, L, head_dim); self attention has L
keys, cross attention ``key_ratio`` x L keys from another sequence. Causal cross attention aligns the
queries with the last L keys (query i sees keys up to i + Lk - L), as a prompt continued after a cache.

Implementations: PyTorch SDPA and FlexAttention as the dense baselines (compiled on CUDA), and an
attention method where it is defined on the pattern: every method on the causal ones, through its
function with contiguous positions and its rotary frequencies; on the non-causal ones only methods
with a non-causal form (:attr:`longreach.attention.Method.noncausal`), q and k taken as already rotated.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..attention import METHODS, Positions
from .efficiency import median_seconds
from .memory import PeakMemory
from .retrieval import Progress

PATTERNS = ("causal_self", "noncausal_self", "causal_cross", "noncausal_cross")
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def parse_patterns(spec: str) -> tuple[str, ...]:
    """``all`` or comma-separated names from :data:`PATTERNS`; ValueError names the allowed ones."""
    names = PATTERNS if spec == "all" else tuple(spec.split(","))
    if unknown := [n for n in names if n not in PATTERNS]:
        raise ValueError(f"--patterns: unknown {unknown}; choose 'all' or some of {', '.join(PATTERNS)}")
    return names


def key_length(pattern: str, q_len: int, key_ratio: int) -> int:
    return q_len * key_ratio if pattern.endswith("cross") else q_len


def sdpa(causal: bool) -> Attend:
    """SDPA with no mask tensor: ``is_causal`` for self attention, the lower-right causal bias for cross."""

    def attend(q, k, v):
        group = q.shape[1] > k.shape[1]
        if causal and q.shape[2] != k.shape[2]:
            mask = causal_lower_right(q.shape[2], k.shape[2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group)

    return attend


def flex(causal: bool) -> Attend:
    """FlexAttention with the pattern's block mask (lower-right causal), compiled on CUDA."""
    run = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    masks: dict = {}

    def block_mask(q_len: int, k_len: int, device: torch.device):
        # Built once per shape, as a user would: only the attention itself is timed.
        if (q_len, k_len, device) not in masks:
            offset = k_len - q_len
            masks[q_len, k_len, device] = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, q_len,
                                                            k_len, device=device)
        return masks[q_len, k_len, device]

    def attend(q, k, v):
        mask = block_mask(q.shape[2], k.shape[2], q.device) if causal else None
        if not torch.is_grad_enabled():  # Flex refuses inputs that require grad where it has no backward (CPU)
            q, k, v = q.detach(), k.detach(), v.detach()
        # Each pattern, length and grad mode is its own graph; past dynamo's default limit of 8 Flex would fall
        # back to its unfused path, which forms the whole score matrix.
        with torch._dynamo.config.patch(recompile_limit=256):
            return run(q, k, v, block_mask=mask, enable_gqa=q.shape[1] > k.shape[1])

    return attend


def baselines(pattern: str) -> dict[str, Attend]:
    causal = pattern.startswith("causal")
    return {"sdpa": sdpa(causal), "flex": flex(causal)}


def for_method(pattern: str, name: str, options: dict, rope) -> Attend | None:
    """The method ``name`` on ``pattern`` with its options, or None where it has no form for it."""
    entry = METHODS[name]
    if pattern.startswith("causal"):
        def attend(q, k, v):
            positions = Positions.contiguous(q.shape[0], q.shape[2], k.shape[2], q.device)
            return entry.fn(q, k, v, positions=positions, rope=rope, **options)

        return attend
    if entry.noncausal is None:
        return None
    # Options about positions (merged positions, train length) are causal notions the non-causal form lacks.
    accepted = inspect.signature(entry.noncausal).parameters
    kept = {key: value for key, value in options.items() if key in accepted}
    return lambda q, k, v: entry.noncausal(q, k, v, **kept)


def implementations(methods: dict[str, dict], rope, *, baseline: bool) -> Callable[[str], dict[str, Attend]]:
    """Per pattern: SDPA and Flex (with ``baseline``), then each method of ``methods`` (name -> options) that
    is defined on it."""

    def named(pattern: str) -> dict[str, Attend]:
        found = baselines(pattern) if baseline else {}
        for name, options in methods.items():
            if (attend := for_method(pattern, name, options, rope)) is not None:
                found[name] = attend
        return found

    return named


def _step(attend: Attend, q, k, v, backward: bool) -> None:
    if backward:
        attend(q, k, v).float().sum().backward()
        for x in (q, k, v):
            x.grad = None
    else:
        with torch.no_grad():
            attend(q, k, v)


def measure(attend: Attend, q, k, v, *, backward: bool, repeats: int) -> dict:
    """Median seconds of ``repeats`` timed calls after one warm-up, and the peak extra memory of one call; an
    implementation that runs out of memory or is not available on the device gets an ``error`` instead."""
    device = q.device
    try:
        _step(attend, q, k, v, backward)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"seconds": None, "peak_mib": None, "error": "out of memory"}
    except NotImplementedError as error:  # e.g. FlexAttention's backward on the CPU
        return {"seconds": None, "peak_mib": None, "error": str(error).splitlines()[0]}
    with PeakMemory(device) as peak:
        _step(attend, q, k, v, backward)
    seconds = median_seconds(lambda: _step(attend, q, k, v, backward), device, repeats)
    return {"seconds": seconds, "peak_mib": None if peak.bytes is None else peak.bytes / 2**20}


def pattern_efficiency(implementations: Callable[[str], dict[str, Attend]], lengths: Sequence[int], *,
                       patterns: Sequence[str] = PATTERNS, heads: int, kv_heads: int, head_dim: int,
                       key_ratio: int = 2, backward: bool = True, repeats: int = 3, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> list[dict]:
    """Records ``{pattern, impl, length, k_len, mode, seconds, tokens_per_second, peak_mib}`` for each pattern,
    query length and mode, and each implementation that ``implementations(pattern)`` names for the pattern."""
    if key_ratio < 1 or repeats < 1:
        raise ValueError(f"key_ratio and repeats must be >= 1, got {key_ratio} and {repeats}")
    if not lengths or any(int(n) != n or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    records = []
    generator = torch.Generator().manual_seed(0)
    for pattern in patterns:
        for length in lengths:
            k_len = key_length(pattern, length, key_ratio)
            q = torch.randn(1, heads, length, head_dim, generator=generator)
            k, v = (torch.randn(1, kv_heads, k_len, head_dim, generator=generator) for _ in range(2))
            q, k, v = (x.to(device, dtype).requires_grad_(backward) for x in (q, k, v))
            for impl, attend in implementations(pattern).items():
                for with_backward in (False, True) if backward else (False,):
                    rec = measure(attend, q, k, v, backward=with_backward, repeats=repeats)
                    seconds = rec["seconds"]
                    records.append({"pattern": pattern, "impl": impl, "length": length, "k_len": k_len,
                                    "mode": "forward+backward" if with_backward else "forward", **rec,
                                    "tokens_per_second": None if seconds is None else length / seconds,
                                    "device": str(device)})
            if progress is not None:
                progress(1)
    return records
