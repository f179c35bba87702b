"""Long-context fine-tuning: LongLoRA's recipe (LoRA on attention + trainable embeddings and norms)
with longreach's attention methods, position schemes or the CRD-NTK sampler."""

from .loop import finetune
from .recipe import FinetuneConfig, prepare, trainable_parameters

__all__ = ["FinetuneConfig", "finetune", "prepare", "trainable_parameters"]
