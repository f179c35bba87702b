"""Weights and optimizer state sharded over the sequence-parallel ranks (FSDP2, ``fully_shard``).

Each decoder layer and the decoder become FSDP units over the ranks that split every row: a rank
stores 1/N of each weight and of its optimizer state, gathers a layer's weights just before using
them and frees them after. FSDP reduce-scatters gradients as means over the ranks; the step needs
their sum (each rank's loss is its share of the row's mean), so :func:`summed` multiplies them back
(a custom divide factor would need NCCL's PreMulSum, which gloo lacks). Checkpoints hold whole
tensors, gathered on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..parallel import SequenceParallel


def shard_model(model: nn.Module, sp: SequenceParallel) -> None:
    """``fully_shard`` each decoder layer of the peft ``model`` and the decoder over ``sp``'s ranks.

    The embeddings (tied to the head, which the chunked loss reads outside the decoder's forward) and
    the final norm stay whole on every rank, their gradients summed as without sharding. Trainable
    float32 weights beside 16-bit frozen ones are gathered and computed in the frozen dtype (FSDP
    gathers one dtype per unit); their gradients are reduced and stepped in float32."""
    decoder = model.get_base_model().get_decoder()
    mesh = DeviceMesh.from_group(sp.group or dist.group.WORLD, next(model.parameters()).device.type)
    frozen = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
    policy = MixedPrecisionPolicy(param_dtype=frozen, reduce_dtype=torch.float32)
    inside = {id(p) for p in decoder.layers.parameters()}
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(decoder, mesh=mesh, mp_policy=policy,
                ignored_params={p for p in decoder.parameters() if id(p) not in inside})


def summed(grads: list[torch.Tensor], ranks: int) -> None:
    """FSDP's mean-reduced gradient shards ``grads`` turned into sums over ``ranks``, in place."""
    for g in grads:
        g.mul_(ranks)


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, sp: SequenceParallel) -> None:
    """``torch.nn.utils.clip_grad_norm_`` over whole gradients (the same on every rank) and sharded ones
    (each rank its shard), which it will not take together: the norm over both, the same scale on both."""
    if not grads:
        return
    shards = [g.to_local() for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    zero = torch.zeros((), device=shards[0].device if shards else plain[0].device)  # NCCL reduces on the GPU
    squares = torch.stack([g.float().square().sum() for g in shards]).sum() if shards else zero
    dist.all_reduce(squares, group=sp.group)
    if plain:
        squares = squares + torch.stack([g.float().square().sum() for g in plain]).sum().to(squares.device)
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in shards + plain:
        g.mul_(scale.to(g.device))


def whole(x):
    """A sharded tensor gathered whole (a collective: every rank calls it); any other value as it is."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def placed_like(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) as ``like`` holds it: this rank's shard where ``like`` is sharded."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
    return value


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``: into this rank's shard where ``param`` is sharded."""
    if isinstance(param, DTensor):
        param.to_local().copy_(placed_like(param, value).to_local())
    else:
        param.copy_(value)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole (collective)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`optimizer_state`'s whole tensors, each placed as its parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(state, state={i: {k: placed_like(params[i], v) if torch.is_tensor(v) and v.shape == params[i].shape
                                   else v for k, v in s.items()} for i, s in state["state"].items()})
    optimizer.load_state_dict(state)
