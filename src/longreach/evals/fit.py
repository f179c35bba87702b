"""Whether a prompt fits on the GPU, estimated before anything is allocated: its KV cache plus the
activations of one prefill chunk, against the device's free memory."""

from __future__ import annotations

import torch

from ..attention.core import TILE_ELEMENTS_CUDA
from ..hf import attention_shape

GIB = 2**30


def prompt_bytes(config, length: int, batch: int, chunk: int, element_bytes: int) -> tuple[int, int]:
    """(KV cache bytes, activation bytes) of a forward over ``length`` tokens in chunks of ``chunk``.

    The cache holds keys and values of every layer: layers x 2 x kv_heads x head_dim x length. One
    chunk's activations are bounded by the residual stream and attention projections (4 hidden + q, k,
    v) and the gated MLP (3 intermediate) per token, plus the attention methods' float32 score tiles.
    """
    heads, kv_heads, dim = attention_shape(config)
    cache = config.num_hidden_layers * 2 * kv_heads * dim * length * batch * element_bytes
    per_token = 4 * config.hidden_size + (heads + 2 * kv_heads) * dim
    per_token += 3 * getattr(config, "intermediate_size", 4 * config.hidden_size)
    activations = min(chunk, length) * batch * per_token * element_bytes + 4 * TILE_ELEMENTS_CUDA * 4
    return cache, activations


def shortfall(config, length: int, batch: int, chunk: int | None, element_bytes: int, free: int) -> str | None:
    """Why a prompt of ``length`` tokens (``batch`` rows, prefilled ``chunk`` tokens at a time; None: at once)
    does not fit in ``free`` bytes, or None when it does."""
    cache, activations = prompt_bytes(config, length, batch, chunk or length, element_bytes)
    if cache + activations <= free:
        return None
    hint = "a smaller prefill chunk, " if activations > free / 4 else ""
    return (f"length {length} x batch {batch} needs about {(cache + activations) / GIB:.1f} GiB (KV cache "
            f"{cache / GIB:.1f} GiB, activations {activations / GIB:.1f} GiB for prefill chunks of {chunk or length} "
            f"tokens) but the GPU has {free / GIB:.1f} GiB free: use {hint}a shorter length or a smaller batch")


def does_not_fit(model, length: int, batch: int, chunk: int | None) -> str | None:
    """Why a prompt would run out of the CUDA device's free memory now (:func:`shortfall`), or None; None on
    the CPU, where nothing is checked."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(param.device)[0]
    return shortfall(model.config, length, batch, chunk, param.element_size(), free)


def check_fits(model, length: int, batch: int, chunk: int | None) -> None:
    """Raise ValueError (:func:`does_not_fit`) before a prompt would run out of the CUDA device's free memory."""
    reason = does_not_fit(model, length, batch, chunk)
    if reason is not None:
        raise ValueError(reason)
