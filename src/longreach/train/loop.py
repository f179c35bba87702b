"""The fine-tuning loop: chunked loss, gradient accumulation, CRD-NTK per step or CLEX per forward, resumable
checkpoints."""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ..loss import token_losses
from ..parallel import SequenceParallel, shard
from .recipe import FinetuneConfig, configure, crd_sampler, trainable_parameters
from .sharding import assign, clip_grad_norm, load_optimizer_state, optimizer_state, summed, whole

CHECKPOINT = "checkpoint.pt"
CLEX_STATE = "clex.pt"


def _autocast(base: torch.nn.Module, device: torch.device):
    frozen = next((p.dtype for p in base.parameters() if not p.requires_grad), torch.float32)
    if frozen in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=frozen)
    return nullcontext()


def _offload(config: FinetuneConfig, device: torch.device):
    if not config.offload_activations:
        return nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def sequence_loss(base: torch.nn.Module, rows: torch.Tensor, position_ids: torch.Tensor | None,
                  chunk: int, offload=None, sp: SequenceParallel | None = None) -> torch.Tensor:
    """Mean next-token loss of ``rows`` (b, L + 1); the (b, L, vocab) logits never exist at once.

    With ``sp`` this rank's share: its shard of the L positions, summed and divided by all b x L tokens,
    so the ranks' shares add up to the mean. ``offload`` (a saved-tensor hooks context) covers the
    decoder only: the loss's own checkpointed chunks must keep their saved tensors where they were made."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if sp is not None:
        if position_ids is None:
            position_ids = torch.arange(inputs.shape[1], device=rows.device)[None]
        inputs, targets, position_ids = (shard(t, sp) for t in (inputs, targets, position_ids.expand_as(inputs)))
    with offload or nullcontext():
        hidden = base.get_decoder()(input_ids=inputs, position_ids=position_ids).last_hidden_state
    losses = token_losses(hidden, base.get_output_embeddings(), targets, chunk)
    return losses.sum() / (rows.shape[0] * (rows.shape[1] - 1))


def _rows_for(step: int, micro: int, config: FinetuneConfig, order: torch.Tensor) -> torch.Tensor:
    start = ((step * config.accumulation + micro) * config.batch_size) % len(order)
    return order[torch.arange(start, start + config.batch_size) % len(order)]


def _parameter_groups(params: dict[str, torch.Tensor], config: FinetuneConfig) -> list[dict]:
    """AdamW groups, each with its ``peak_lr``: CLEX's dynamics at ``clex_learning_rate`` where set."""
    ode = [name for name in params if ".clex." in name] if config.clex_learning_rate is not None else []
    rest = [p for name, p in params.items() if name not in ode]
    groups = [{"params": rest, "lr": config.learning_rate, "peak_lr": config.learning_rate}]
    if ode:
        groups.append({"params": [params[name] for name in ode], "lr": config.clex_learning_rate,
                       "peak_lr": config.clex_learning_rate})
    return groups


def finetune(model: torch.nn.Module, rows: torch.Tensor, config: FinetuneConfig, *, out: str | Path | None = None,
             save_every: int = 0, progress: bool = True) -> list[dict]:
    """Train the trainable parameters of ``model`` (from :func:`prepare`) on ``rows`` (n, length + 1).

    Rows are visited in a seeded order; with ``out`` a checkpoint (trainable weights, optimizer, step,
    history) is written every ``save_every`` steps and at the end, and an existing one is resumed.
    Returns one record per step: loss, learning rate, CRD-NTK factor (CLEX: the last forward's t), tokens/s.
    A CLEX run also writes its trained scheme to ``out/clex.pt`` (:meth:`longreach.clex.Clex.save`).
    """
    if rows.ndim != 2 or rows.shape[1] != config.length + 1:
        raise ValueError(f"rows must be (n, length + 1) = (n, {config.length + 1}), got {tuple(rows.shape)}")
    out = None if out is None else Path(out)
    base = model.get_base_model()
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(_parameter_groups(params, config), weight_decay=0.0)
    history: list[dict] = []
    if out is not None and (out / CHECKPOINT).exists():
        state = torch.load(out / CHECKPOINT, map_location=device, weights_only=False)
        for name, tensor in state["params"].items():
            assign(params[name], tensor)
        load_optimizer_state(optimizer, state["optimizer"])
        history = state["history"]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))
    sampler = crd_sampler(base, config)
    draws = itertools.islice(iter(sampler), len(history), None) if sampler else None
    clex = getattr(base.get_decoder(), "clex", None)
    sp = config.sequence_parallel
    writes = out is not None and (sp is None or sp.rank == 0)  # the CLEX scheme's file
    model.train()
    bar = tqdm(range(len(history), config.steps), disable=not progress, desc="finetune", unit="step")
    for step in bar:
        started = time.perf_counter()
        position_ids, factor = None, None
        if draws is not None:
            draw = next(draws)
            factor = draw.factor
            configure(base, config, factor)
            position_ids = draw.positions(config.length).to(device)[None]
        warm = min(1.0, (step + 1) / max(1, config.warmup))
        lr = config.learning_rate * warm
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * warm
        total = 0.0
        for micro in range(config.accumulation):
            batch = rows[_rows_for(step, micro, config, order)].to(device)
            if clex is not None:
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * config.accumulation + micro)
                position_ids = clex.train_step(config.length, generator).to(device)[None]
                factor = clex.draw[0]
            with _autocast(base, device):
                loss = sequence_loss(base, batch, position_ids, config.loss_chunk, _offload(config, device), sp)
                loss = loss / config.accumulation
            loss.backward()
            total += loss.item()
        if sp is not None:  # each rank's gradients hold what flowed through its shard; the step needs their sum
            grads = [p.grad for p in params.values() if p.grad is not None]
            summed([g for g in grads if isinstance(g, DTensor)], sp.size)  # reduce-scattered as means
            total = _sum_over(sp, [g for g in grads if not isinstance(g, DTensor)], total)
        if config.shard_weights:  # implies sp: grads are this step's, summed
            clip_grad_norm(grads, 1.0, sp)
        else:
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        tokens = config.accumulation * config.batch_size * config.length
        history.append({"step": step, "loss": total, "lr": lr, "factor": factor, "seconds": seconds,
                        "tokens_per_second": tokens / seconds})
        bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tokens / seconds:,.0f}")
        if out is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == config.steps):
            _save(out, params, optimizer, history, sp)
    model.eval()
    if clex is not None:
        clex.end_training()
        if writes:
            clex.save(out / CLEX_STATE)
    return history


def _sum_over(sp: SequenceParallel, grads: list[torch.Tensor], loss: float) -> float:
    """Sum ``grads`` in place over the ranks of ``sp``; returns the summed ``loss``."""
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss], device=_device(sp))])
    dist.all_reduce(flat, group=sp.group)
    for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))
    return float(flat[-1])


def _device(sp: SequenceParallel) -> torch.device:
    """Where ``sp``'s backend communicates from: this rank's GPU under NCCL, else the CPU."""
    nccl = dist.get_backend(sp.group) == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def _save(out: Path, params: dict, optimizer: torch.optim.Optimizer, history: list[dict],
          sp: SequenceParallel | None) -> None:
    """Write the checkpoint (rank 0 of ``sp``); sharded tensors are gathered on every rank first, and no rank
    goes on before the file is complete (the next run of any rank may resume from it)."""
    writes, sharded = sp is None or sp.rank == 0, any(isinstance(p, DTensor) for p in params.values())
    if writes or sharded:
        state = {"params": {n: whole(p).detach().cpu() for n, p in params.items()},
                 "optimizer": optimizer_state(optimizer), "history": history}
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(out / CHECKPOINT)
    if sp is not None:
        dist.barrier(group=sp.group)
