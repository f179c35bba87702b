"""Small model builders: tiny random configs of the supported architectures (tests, demos, benchmarks)."""

from __future__ import annotations

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(arch: str = "llama", *, vocab_size: int = 128, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, max_position: int = 256, **config: object) -> PreTrainedModel:
    """A randomly initialised causal LM of ``arch`` in float32, eval mode, SDPA attention."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    config_cls, model_cls = ARCHITECTURES[arch]
    cfg = config_cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, attn_implementation="sdpa", **config,
    )
    if arch == "mistral":
        cfg.sliding_window = None
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
