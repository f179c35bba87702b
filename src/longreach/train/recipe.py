"""The fine-tuning configuration and the model preparation it implies (peft LoRA, trainable parts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..clex import STARTS
from ..hf import enable_checkpointing, extend, head_dim, peft_wrap
from ..parallel import SequenceParallel
from ..positions import CRDNTK

CRD_NTK = "crd_ntk"
CLEX = "clex"


@dataclass
class FinetuneConfig:
    """What to train and how. ``position="crd_ntk"`` draws an NTK factor and cyclic position offset
    per step (:class:`longreach.positions.CRDNTK`, period = max_factor x the model's trained length);
    ``position="clex"`` trains CLEX's frequency dynamics with the adapters, drawing t in 1..max_factor
    per forward (:class:`longreach.clex.Clex`; dense attention, which rotates in PyTorch), its
    parameters at ``clex_learning_rate`` (default: ``learning_rate``): their drift is integrated over t, so
    a step that suits the adapters can move the frequencies at t = 16 many-fold.
    ``clex_start`` picks the scaling its untrained dynamics follow: ``"ntk"`` (the authors') or ``"yarn"``.
    ``offload_activations`` keeps the tensors saved for backward (with checkpointing: each layer's
    input) in pinned host memory, so GPU memory no longer grows with layers x length.
    ``sequence_parallel`` (from :func:`longreach.parallel.sequence_parallel`, one per process) splits
    each row's positions over the group's ranks: Ulysses attention, each rank's loss share, and the
    gradients summed over the ranks before every optimizer step; with ``shard_weights`` those ranks also
    split every weight and its optimizer state (FSDP2, :mod:`longreach.train.sharding`)."""

    length: int
    steps: int
    attention: str = "select_merge"
    attention_options: dict = field(default_factory=dict)
    position: str | None = CRD_NTK
    factor: float | None = None
    max_factor: float = 16.0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    trainable: tuple[str, ...] = ("embed", "norm")
    learning_rate: float = 2e-5
    clex_learning_rate: float | None = None
    clex_start: str = "ntk"
    warmup: int = 20
    batch_size: int = 1
    accumulation: int = 1
    checkpointing: bool = True
    offload_activations: bool = False
    loss_chunk: int = 1024
    seed: int = 0
    sequence_parallel: SequenceParallel | None = None
    shard_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("length", "steps", "batch_size", "accumulation", "lora_rank", "loss_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "clex_learning_rate"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.clex_learning_rate is not None and self.position != CLEX:
            raise ValueError(f"clex_learning_rate applies to position='clex' only, got position={self.position!r}")
        if self.clex_start not in STARTS:
            raise ValueError(f"clex_start must be one of {STARTS}, got {self.clex_start!r}")
        if self.clex_start != "ntk" and self.position != CLEX:
            raise ValueError(f"clex_start applies to position='clex' only, got position={self.position!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.shard_weights and (self.sequence_parallel is None or self.position == CLEX):
            raise ValueError("shard_weights splits the weights over the sequence-parallel ranks: it needs "
                             "sequence_parallel, and position 'clex' (whose scheme saves whole tensors) is not "
                             f"supported with it; got sequence_parallel={self.sequence_parallel}, "
                             f"position={self.position!r}")
        if self.position == CLEX and self.attention != "dense":
            raise ValueError(f"position 'clex' learns its frequencies through the rotary PyTorch applies, which "
                             f"attention='dense' does; the kernels of {self.attention!r} rotate in Triton")


def _position_kwargs(config: FinetuneConfig, trained: int, factor: float | None) -> dict:
    if config.position is None:
        return {}
    if config.position == CRD_NTK:
        return {"position": "ntk", "factor": factor or 1.0}
    if config.position == "truncated":
        return {"position": "truncated"}
    if config.position == CLEX:
        return {"position": CLEX, "max_factor": config.max_factor, "start": config.clex_start}
    return {"position": config.position, "factor": config.factor or max(1.0, config.length / trained)}


def configure(base: nn.Module, config: FinetuneConfig, factor: float | None = None) -> None:
    """(Re)apply the attention method and position scheme to the un-wrapped model; a fixed scheme's
    factor defaults to training length / trained length, CRD-NTK's is the step's draw."""
    position = _position_kwargs(config, base.config.max_position_embeddings, factor)
    parallel = {"sequence_parallel": config.sequence_parallel} if config.sequence_parallel else {}
    extend(base, attention=config.attention, **position, **config.attention_options, **parallel)


def crd_sampler(base: nn.Module, config: FinetuneConfig) -> CRDNTK | None:
    if config.position != CRD_NTK:
        return None
    cfg = base.config
    dim = head_dim(cfg)
    base_freq = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    period = int(config.max_factor * cfg.max_position_embeddings)  # the range the NTK factors are drawn to cover
    return CRDNTK(dim=dim, base=float(base_freq), period=period, max_factor=config.max_factor,
                  growth_steps=max(1, config.steps), seed=config.seed)


def prepare(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Configure ``model`` for long context, wrap it with LoRA adapters (peft) on ``lora_targets``, drawn
    from ``seed``, and make the parameters named by ``trainable`` (embeddings, norms) trainable too.
    Returns the peft model."""
    from peft import LoraConfig

    configure(model, config)
    if config.checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
    compute_dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    # The adapters' random start from config.seed: runs repeat, and sequence-parallel ranks (each its
    # own process) start from the same adapters.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        peft_model = peft_wrap(model, lora)
    for name, param in peft_model.named_parameters():
        if any(part in name for part in config.trainable) or (config.position == CLEX and ".clex." in name):
            param.requires_grad_(True)
            param.data = param.data.float()
    if compute_dtype != torch.float32:
        # float32 master embeddings would otherwise make the residual stream, and so every
        # checkpointed activation, float32: twice the memory of a bf16 model.
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.to(compute_dtype))
    if config.shard_weights:
        from .sharding import shard_model

        shard_model(peft_model, config.sequence_parallel)
    return peft_model


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
