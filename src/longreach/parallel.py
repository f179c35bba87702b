"""Ulysses sequence parallelism (Jacobs et al., 2023, DeepSpeed-Ulysses) around any attention method.

Each of N ranks holds 1/N of the sequence. Around the attention, an all-to-all turns the sequence
shards into head shards: every rank then holds the whole sequence for h/N query heads (and h_kv/N kv
heads, the same groups), runs the method unchanged on it with the whole sequence's positions, and a
second all-to-all turns the output back into sequence shards. Communication is torch.distributed's
``all_to_all_single`` over the given process group (gloo on the CPU, NCCL on GPUs); its gradient is
the same exchange run on the gradient, since with equal parts it is its own transpose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class SequenceParallel:
    """A process group over which each sequence is split in ``size`` equal, consecutive shards."""

    size: int
    rank: int
    group: dist.ProcessGroup | None = None


def sequence_parallel(size: int, group: dist.ProcessGroup | None = None) -> SequenceParallel:
    """The sequence-parallel setting of this process: ``size`` ranks of ``group`` (default: the world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_parallel: torch.distributed is not initialised (start with torchrun)")
    world = dist.get_world_size(group)
    if size != world:
        raise ValueError(f"sequence_parallel: size {size} must equal the group's {world} ranks; pass a group "
                         "of size ranks (torch.distributed.new_group) to combine it with data parallelism")
    return SequenceParallel(size, dist.get_rank(group), group)


def join(size: int, device: str) -> tuple[SequenceParallel, str]:
    """Join torchrun's process group (NCCL on CUDA, each rank on its local GPU; gloo on the CPU) as ``size``
    sequence-parallel ranks; returns the setting and this rank's device."""
    if "RANK" not in os.environ:
        raise ValueError(f"sequence parallel over {size} ranks: start the command with torchrun "
                         f"--nproc-per-node {size} (e.g. torchrun --nproc-per-node {size} -m longreach finetune ...)")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return sequence_parallel(size), device


def check_heads(heads: int, kv_heads: int, sp: SequenceParallel) -> None:
    """Heads and kv heads must split evenly over the ranks, so each rank keeps whole kv groups."""
    if heads % sp.size or kv_heads % sp.size:
        raise ValueError(f"sequence parallel over {sp.size} ranks: attention heads ({heads}) and kv heads "
                         f"({kv_heads}) must both be multiples of {sp.size}")


def shard(x: Tensor, sp: SequenceParallel, dim: int = 1) -> Tensor:
    """This rank's consecutive 1/N of ``x`` along ``dim`` (the sequence), which must divide evenly."""
    if x.shape[dim] % sp.size:
        raise ValueError(f"sequence parallel over {sp.size} ranks: the sequence length ({x.shape[dim]}) must be a "
                         f"multiple of {sp.size}; pad it")
    return x.chunk(sp.size, dim)[sp.rank]


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        x = x.contiguous()  # the exchange reads and writes plain row-major memory
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _exchange(x: Tensor, sp: SequenceParallel) -> Tensor:
    """all_to_all over dim 0 of x (N, ...): part i goes to rank i, part j of the result came from rank j."""
    return _Exchange.apply(x, sp.group)


def heads_from_sequence(x: Tensor, sp: SequenceParallel) -> Tensor:
    """(b, h, L/N, d) of this rank's sequence shard -> (b, h/N, L, d): the whole sequence, head slice ``rank``."""
    b, h, s, d = x.shape
    parts = _exchange(x.view(b, sp.size, h // sp.size, s, d).transpose(0, 1), sp)  # (N source shards, b, h/N, s, d)
    return parts.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * s, d)


def sequence_from_heads(x: Tensor, sp: SequenceParallel) -> Tensor:
    """The inverse of :func:`heads_from_sequence`: (b, h/N, L, d) -> (b, h, L/N, d)."""
    b, g, length, d = x.shape
    s = length // sp.size
    parts = _exchange(x.view(b, g, sp.size, s, d).permute(2, 0, 1, 3, 4), sp)  # (N head slices, b, h/N, s, d)
    return parts.transpose(0, 1).reshape(b, g * sp.size, s, d)


def local_heads(x: Tensor, sp: SequenceParallel) -> Tensor:
    """This rank's slice ``rank`` of the N equal head slices of x (b, h, L, d): (b, h/N, L, d)."""
    return x.chunk(sp.size, dim=1)[sp.rank]


def gather_heads(x: Tensor, sp: SequenceParallel) -> Tensor:
    """Every rank's head slice x (b, h/N, L, d), in rank order: (b, h, L, d) (inference: no gradient)."""
    parts = [torch.empty_like(x) for _ in range(sp.size)]
    dist.all_gather(parts, x.contiguous(), group=sp.group)
    return torch.cat(parts, dim=1)


def gather_positions(positions: Tensor, sp: SequenceParallel) -> Tensor:
    """(b, L/N) position ids of this rank's shard -> (b, L) of the whole sequence, in rank order."""
    parts = [torch.empty_like(positions) for _ in range(sp.size)]
    dist.all_gather(parts, positions.contiguous(), group=sp.group)
    return torch.cat(parts, dim=-1)
