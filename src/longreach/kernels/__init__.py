"""Triton kernels; each is a drop-in for a reference in :mod:`longreach.attention` or
:mod:`longreach.cache` and tested against it.

Methods and cache policies take the kernel path on CUDA tensors when Triton is importable; elsewhere
they keep their PyTorch reference (CI runs the kernels on the CPU through TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ..attention.core import Positions
from ..positions import Rope

HAS_TRITON = importlib.util.find_spec("triton") is not None
HEAD_DIMS = (32, 64, 128)
BLOCK_SIZES = (16, 32, 64, 128)


def supports(q: Tensor, block_size: int) -> bool:
    """Whether the block-sparse kernel covers this head size, block size and dtype."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return q.shape[-1] in HEAD_DIMS and block_size in BLOCK_SIZES and q.dtype in dtypes


def enabled(x: Tensor) -> bool:
    """Triton importable, x on CUDA, and LONGREACH_REFERENCE=1 not asking for the references."""
    return HAS_TRITON and x.is_cuda and os.environ.get("LONGREACH_REFERENCE") != "1"


def use_kernel(q: Tensor, positions: Positions, block_size: int) -> bool:
    """Kernel path for CUDA tensors the kernel covers, without key padding (the kernel has no key
    mask), unless LONGREACH_REFERENCE=1 asks for the reference."""
    return enabled(q) and positions.key_mask is None and supports(q, block_size)


def decode_kernels(keys: Tensor) -> bool:
    """Whether the decode kernels (token_select's votes, attention over cache slots, the rotary pass)
    take a cache's keys: CUDA, a head size they cover, unless LONGREACH_REFERENCE=1."""
    return enabled(keys) and keys.shape[-1] in HEAD_DIMS


# Frame rules of :func:`framed_attention`: which position map scores each (query, key) pair.
DCA, SELF_EXTEND, SINKS = 1, 2, 3


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, *, positions: Positions, rope: Rope | None,
                 block_size: int, scale: float, merged_positions: bool = False, **rule: int) -> Tensor:
    """Run the kernel for a method's block table: rotary at merged positions inside the kernel, or
    q and k rotated here at their own positions."""
    from .block_sparse import block_sparse_attention
    from .rotary import rotate_frames

    if merged_positions:
        return block_sparse_attention(q, k, v, table, block_size=block_size, scale=scale, inv_freq=rope.inv_freq,
                                      rotary_scaling=rope.scaling, **rule)
    if rope is not None:
        q, k = rotate_frames(q, rope, [positions.query])[0], rotate_frames(k, rope, [positions.key])[0]
    return block_sparse_attention(q, k, v, table, block_size=block_size, scale=scale, **rule)


def framed_attention(q: Tensor, k: Tensor, v: Tensor, *, rope: Rope, query_maps: list[Tensor],
                     key_maps: list[Tensor], rule: int, span: int, positions: Positions, block_size: int,
                     scale: float, table: Tensor | None = None, **token_rule: int) -> Tensor:
    """Run the kernel for a method that scores each (query, key) pair under one of several position
    maps: q rotated under each of ``query_maps`` (b, Lq), k under each of ``key_maps`` (b, Lk), and
    ``rule`` (DCA, SELF_EXTEND or SINKS, with its ``span``) picking the map per pair. Without a
    ``table`` the attention is dense causal."""
    from .block_sparse import Frames, frame_attention
    from .rotary import rotate_frames

    frames = Frames(rule, span, positions.query, positions.key)
    return frame_attention(rotate_frames(q, rope, query_maps), rotate_frames(k, rope, key_maps), v, frames,
                           block_size=block_size, table=table, scale=scale, **token_rule)
