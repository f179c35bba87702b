"""The glue to transformers models: attention registry, rotary hand-over, cache wiring, extend/restore.

(``longreach.cache`` subclasses transformers' cache classes; no other module touches a model's internals.)

How RoPE reaches the methods un-applied without copying model code: the model's rotary module is
swapped for one that returns cos = 1 and sin = 0 (stride-0 broadcasts), so the model's own
``apply_rotary_pos_emb`` leaves q and k unchanged. The registered attention function then gets the
un-rotated query and key (the cache stores keys as they arrive, so it holds un-rotated keys), the
``position_ids`` that transformers forwards, and the rope configured here, and hands all of it to
the method. Key positions are derived from the cache layout: slot j of a padded row holds the
position one more than slot j - 1, and the last slot holds the last query.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import cache as policies
from . import positions as pos
from .attention import METHODS, Positions, check_options, get_method
from .attention.select_merge import LayerChain
from .cache.sharded import HeadShardCache, HeadShardLayer
from .clex import Clex
from .parallel import (
    SequenceParallel,
    check_heads,
    gather_heads,
    gather_positions,
    heads_from_sequence,
    local_heads,
    sequence_from_heads,
)

PREFIX = "longreach_"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
TRAIN_LENGTH_OPTIONS = ("train_length",)

# transformers 5.x renamed the KV cache argument and output field from ``past_key_values`` to ``cache``
# (the old name warns, and is to be removed): every model call here uses the installed version's names.
_FORWARD_ARGS = inspect.signature(LlamaForCausalLM.forward).parameters
CACHE_ARG = "cache" if "cache" in _FORWARD_ARGS else "past_key_values"
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
# Older versions take the cache write positions explicitly; without them a static cache would be asked
# for its length (a host sync a CUDA graph cannot hold). Newer ones derive them from the cache.
TAKES_CACHE_POSITION = "cache_position" in _FORWARD_ARGS


def cache_kwargs(cache: Cache | None, cache_position: Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` (and, where the installed transformers takes it,
    ``cache_position``) to a model's forward under the installed version's names."""
    kwargs: dict[str, Any] = {CACHE_ARG: cache}
    if TAKES_CACHE_POSITION and cache_position is not None:
        kwargs["cache_position"] = cache_position
    return kwargs


def output_cache(output: Any) -> Cache | None:
    """The cache a model's forward (or ``generate(..., return_dict_in_generate=True)``) returned."""
    return getattr(output, CACHE_FIELD)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing (non-reentrant) on every decoder layer, by the installed version's name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def peft_wrap(model: PreTrainedModel, lora_config: Any) -> nn.Module:
    """``peft.get_peft_model``, without the deprecation warning peft's own
    ``model.is_gradient_checkpointing`` probe raises under transformers >= 5.2x (peft's call, not ours)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


@dataclass
class Setup:
    """What ``extend`` installed on a model, and what ``restore`` puts back."""

    method: str
    options: dict[str, Any]
    rope: pos.Rope | pos.DynamicRope
    position: str | None
    original_rotary: nn.Module
    original_attn: str | None
    cache: str | None = None
    cache_options: dict[str, Any] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    active: policies.PolicyCache | None = None
    parallel: SequenceParallel | None = None
    sharded: HeadShardCache | None = None
    chain: LayerChain = field(default_factory=LayerChain)  # select_merge's carry, from layer to layer


class UnappliedRotary(nn.Module):
    """Stands in for the model's rotary module: cos = 1, sin = 0, so q and k pass un-rotated."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        shape = (*position_ids.shape, self.head_dim)
        one = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        zero = torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)
        return one, zero


def _key_positions(query_pos: Tensor, k_len: int) -> Tensor:
    """(b, Lk) positions of the cached keys: consecutive, ending at the last query's position.

    This is how transformers numbers them: ``generate`` gives a left-padded row positions from its
    first real token on, a plain forward gives 0..L-1; both are consecutive along the cache.
    """
    offset = query_pos[:, -1:] - (k_len - 1)
    return torch.arange(k_len, device=query_pos.device) + offset


def _attention(name: str):
    method = get_method(name)

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0, position_ids: Tensor | None = None,
                  **kwargs: Any) -> tuple[Tensor, None]:
        setup: Setup | None = getattr(module, "_longreach", None)
        # The identity rotary multiplies q and k by float32 ones when the residual stream is float32
        # (trainable fp32 embeddings beside bf16 weights under autocast): that upcast is exact, undo it.
        query, key = query.to(value.dtype), key.to(value.dtype)
        if setup is not None and setup.sharded is not None:
            return _head_sharded(partial(attend, setup, module), setup.sharded.layers[module.layer_idx], query, key,
                                 value, attention_mask, scaling, position_ids, **kwargs)
        if setup is not None and setup.parallel is not None:
            return _ulysses(partial(attend, setup, module), setup.parallel, query, key, value, attention_mask,
                            scaling, position_ids, **kwargs)
        return attend(setup, module, query, key, value, attention_mask, scaling, position_ids, **kwargs)

    def attend(setup: Setup | None, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, scaling: float | None, position_ids: Tensor | None,
               **kwargs: Any) -> tuple[Tensor, None]:
        batch, _, q_len, _ = query.shape
        k_len = key.shape[2]
        if position_ids is None:
            position_ids = torch.arange(k_len - q_len, k_len, device=query.device)
        query_pos = position_ids.expand(batch, q_len)
        key_mask = None if attention_mask is None else attention_mask[:, -k_len:]
        # Without a cache the keys are the queries: their ids may be any (e.g. cyclic CRD-NTK) positions.
        key_pos = query_pos if q_len == k_len else _key_positions(query_pos, k_len)
        where = Positions(query_pos, key_pos, key_mask)
        options = dict(setup.options) if setup is not None else {}
        if setup is not None and setup.parallel is not None and method.head_patterned:  # this rank's heads
            sp, heads = setup.parallel, query.shape[1]
            options["global_heads"] = (sp.rank * heads, sp.size * heads)
        if options.get("carry"):
            options["link"] = setup.chain.link(module.layer_idx)
        if name == "dense" and kwargs.get("sliding_window") is not None:
            options.setdefault("sliding_window", kwargs["sliding_window"])
        rope = None
        if setup is not None:
            # Only a dynamic scheme needs the length (a host sync): static decoding graphs must not sync.
            rope = setup.rope if isinstance(setup.rope, pos.Rope) else setup.rope.at(int(key_pos.max()) + 1)
        layer = _policy_layer(setup, module, key)
        if layer is None:
            out = method.fn(query, key, value, positions=where, rope=rope, scale=scaling, **options)
        else:
            if key_mask is not None:
                raise ValueError(f"cache policy {setup.cache!r}: padded batches are not supported; generate "
                                 "prompts of equal length (or one at a time)")
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling

            def full(q: Tensor, k: Tensor, v: Tensor, positions: Positions) -> Tensor:
                return method.fn(q, k, v, positions=positions, rope=rope, scale=scale, **options)

            out = layer.attend(query, where, rope, scale, full)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _ulysses(attend, sp: SequenceParallel, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
             scaling: float | None, position_ids: Tensor | None, **kwargs: Any) -> tuple[Tensor, None]:
    """``attend`` over the whole sequence for this rank's heads, from and back to this rank's shard."""
    if attention_mask is not None or key.shape[2] != query.shape[2]:
        raise ValueError("sequence parallel: padded batches are not supported, nor a cache other than the one "
                         "sharded by kv head that a fresh caching forward creates; run unpadded rows, with no cache "
                         "or an empty one")
    if position_ids is None:
        raise ValueError("sequence parallel: pass each rank's global position_ids (its shard of 0..L-1)")
    key, value = (heads_from_sequence(t, sp) for t in (key, value))
    return _shard_queries(attend, sp, query, key, value, scaling, position_ids, **kwargs)


def _shard_queries(attend, sp: SequenceParallel, query: Tensor, key: Tensor, value: Tensor, scaling: float | None,
                   position_ids: Tensor, **kwargs: Any) -> tuple[Tensor, None]:
    """``attend`` for this rank's sequence shard of ``query`` (b, h, L/N, d), exchanged into its heads over
    the whole sequence and back, against ``key``/``value`` already in that form (b, h_kv/N, L, d)."""
    batch, _, shard_len, _ = query.shape
    positions = gather_positions(position_ids.expand(batch, shard_len), sp)
    out, _ = attend(heads_from_sequence(query, sp), key, value, None, scaling, positions, **kwargs)  # (b, L, h/N, d)
    return sequence_from_heads(out.transpose(1, 2), sp).transpose(1, 2).contiguous(), None


def _head_sharded(attend, layer: HeadShardLayer, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, scaling: float | None, position_ids: Tensor | None,
                  **kwargs: Any) -> tuple[Tensor, None]:
    """``attend`` against a :class:`HeadShardLayer`'s keys (this rank's kv heads, every token) for this rank's
    query heads: the prefill's sequence shard exchanged into them and back, or decoded tokens (the same on
    every rank) sliced to them, with every rank's head outputs gathered."""
    if attention_mask is not None:
        raise ValueError("sequence parallel: padded batches are not supported; run unpadded rows")
    if position_ids is None:
        raise ValueError("sequence parallel: pass position_ids (each rank's shard of 0..L-1 in the prefill, "
                         "the new tokens' positions after it)")
    sp, (batch, _, q_len, _) = layer.sp, query.shape
    if layer.replicated:
        out, _ = attend(local_heads(query, sp), key, value, None, scaling, position_ids.expand(batch, q_len), **kwargs)
        return gather_heads(out.transpose(1, 2), sp).transpose(1, 2).contiguous(), None
    return _shard_queries(attend, sp, query, key, value, scaling, position_ids, **kwargs)


def _policy_layer(setup: Setup | None, module: nn.Module, key: Tensor) -> policies.PolicyLayer | None:
    """The policy cache layer whose keys these are, when a policy cache is in use for this forward."""
    if setup is None or setup.active is None:
        return None
    layer = setup.active.layers[module.layer_idx]
    if key is not layer.keys:
        raise RuntimeError(f"cache policy {setup.active.policy!r} was handed to the model, but its attention "
                           "received keys from another cache: the policy would be silently ignored")
    return layer


def _use_policy_cache(setup: Setup, config: Any, module: nn.Module, args: tuple,
                      kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the backbone: give a caching forward the configured policy's cache in place of
    a new empty one (``generate`` then carries it from step to step), and let the attention layers find
    it. A configured policy must be the cache the forward uses: any other cache raises."""
    name = next((k for k in (CACHE_ARG, "past_key_values") if kwargs.get(k) is not None), CACHE_ARG)
    cache = kwargs.get(name)
    caching = kwargs.get("use_cache")
    caching = config.use_cache if caching is None else caching
    fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
    if setup.parallel is not None:  # a caching forward keeps its cache sharded by kv head
        if caching and fresh:
            cache = kwargs[name] = HeadShardCache(setup.parallel, config.num_hidden_layers)
        setup.sharded = cache if isinstance(cache, HeadShardCache) else None
        return args, kwargs
    if setup.cache is not None and caching and fresh:
        cache = policies.make_cache(setup.cache, config.num_hidden_layers, **setup.cache_options)
        kwargs[name] = cache
    if setup.cache is not None and cache is not None and getattr(cache, "policy", None) != setup.cache:
        raise ValueError(f"cache policy {setup.cache!r} is configured (longreach.extend(cache=...)) but this "
                         f"forward was given a {type(cache).__name__} with {cache.get_seq_length()} cached tokens; "
                         "pass no cache (or an empty one) to start the policy's, or extend(model, cache=None)")
    setup.active = cache if isinstance(cache, policies.PolicyCache) else None
    if setup.active is not None:
        setup.active.wired = True
    return args, kwargs


def _end_policy_cache(setup: Setup, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    setup.active = setup.sharded = None


def _padding_mask(*, kv_length: int, kv_offset: int = 0, attention_mask: Tensor | None = None,
                  **kwargs: Any) -> Tensor | None:
    """The compact mask our methods take: (b, kv_length) True for real keys, or None (no padding).

    transformers calls mask functions by keyword; the query's extent is ``q_length``/``q_offset`` in
    newer versions and ``cache_position`` in older ones, and neither matters to a key mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if mask.shape[-1] < kv_length:
        pad = mask.new_ones(mask.shape[0], kv_length - mask.shape[-1])
        mask = torch.cat([mask, pad], dim=-1)
    return None if bool(mask.all()) else mask


def register() -> None:
    """Register every method as attn_implementation ``longreach_<name>`` (idempotent)."""
    for name in METHODS:
        AttentionInterface.register(PREFIX + name, _attention(name))
        AttentionMaskInterface.register(PREFIX + name, _padding_mask)


def _backbone(model: PreTrainedModel) -> nn.Module:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"model: unsupported architecture {model_type!r}; supported are {SUPPORTED}")
    backbone = getattr(model, "model", model)
    if not hasattr(backbone, "rotary_emb") or not hasattr(backbone, "layers"):
        raise ValueError(f"model: {type(model).__name__} has no rotary_emb/layers backbone to configure")
    return backbone


def head_dim(config: Any) -> int:
    """A transformers config's attention head size (``head_dim``, or hidden size / heads where unset)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_basics(model: PreTrainedModel) -> tuple[int, float, int]:
    config = model.config
    params = config.rope_parameters or {}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("model: partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    return head_dim(config), float(params.get("rope_theta", 10000.0)), int(config.max_position_embeddings)


POSITION_OPTIONS = {
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic_ntk": ("factor", "original_max_position"),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "attention_factor"),
    "truncated": ("cutoff",),
    "clex": ("max_factor", "width", "activation", "step", "start", "state", "original_max_position"),
}


def _own_rotary(model: PreTrainedModel, backbone: nn.Module) -> nn.Module:
    setup: Setup | None = getattr(model, "_longreach", None)
    return backbone.rotary_emb if setup is None else setup.original_rotary


def _clex(model: PreTrainedModel, backbone: nn.Module, base: float, trained: int, options: dict[str, Any]) -> Clex:
    """A trained scheme from ``state=`` (a file :meth:`Clex.save` wrote), the model's current one when the
    settings match (so re-configuring keeps what was trained), or a new, untrained one."""
    inv_freq = _own_rotary(model, backbone).original_inv_freq.detach().float().cpu()
    device = next(model.parameters()).device
    if "state" in options:
        if len(options) > 1:
            extra = sorted(set(options) - {"state"})
            raise ValueError(f"position 'clex': state= brings its own settings; drop {extra}")
        return Clex.load(options.pop("state"), inv_freq).to(device)
    scheme = Clex(inv_freq, base, trained, **{k: options.pop(k) for k in list(options)})
    current = getattr(backbone, "clex", None)
    if isinstance(current, Clex) and current.settings() == scheme.settings():
        return current
    return scheme.to(device)


def _build_rope(model: PreTrainedModel, backbone: nn.Module, position: str | None,
                options: dict[str, Any]) -> pos.Rope | pos.DynamicRope | Clex:
    dim, base, max_pos = _rope_basics(model)
    if position is None:
        rope_type = (model.config.rope_parameters or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"model: its own rope_type {rope_type!r} is length-dependent; pass position=...")
        rotary = _own_rotary(model, backbone)
        return pos.Rope(rotary.original_inv_freq.detach().float().cpu(), float(rotary.attention_scaling))
    original = options.pop("original_max_position", max_pos)
    pos.check_length(original, "original_max_position")
    if position == "clex":
        return _clex(model, backbone, base, original, options)
    if position == "truncated":
        return pos.truncated(dim, base, options.pop("cutoff", original))
    if "factor" not in options:
        raise ValueError(f"position {position!r} needs factor=<number > 0>")
    factor = pos.check_factor(options.pop("factor"))
    if position == "linear":
        return pos.linear(dim, base, factor)
    if position == "ntk":
        return pos.ntk(dim, base, factor)
    if position == "dynamic_ntk":
        return pos.DynamicRope(dim, base, factor, original)
    return pos.yarn(dim, base, factor, original, **options)


def _split_options(position: str | None, method: str, options: dict[str, Any]) -> tuple[dict, dict]:
    allowed_position = POSITION_OPTIONS.get(position, ()) if position else ()
    rope_opts = {k: v for k, v in options.items() if k in allowed_position}
    attn_opts = {k: v for k, v in options.items() if k not in allowed_position}
    for key in attn_opts:
        if key not in METHODS[method].options:
            owners = sorted(n for n, names in POSITION_OPTIONS.items() if key in names)
            owners += sorted(m.name for m in METHODS.values() if key in m.options)
            hint = f"; it belongs to {owners}" if owners else ""
            raise ValueError(f"option {key!r} is not taken by position={position!r} or attention={method!r}{hint}")
    return rope_opts, attn_opts


def _attention_modules(backbone: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in backbone.layers]


def extend(model: PreTrainedModel, *, position: str | None = None, attention: str | None = None,
           cache: str | None = None, **options: Any) -> PreTrainedModel:
    """Configure a transformers causal LM in place for long context and return it.

    ``position``: a rotary scheme from :func:`position_schemes` (None keeps the model's own RoPE),
    with ``factor=``, ``original_max_position=`` (default: the config's max_position_embeddings)
    and the scheme's options. ``attention``: a method from :func:`attention_methods` (default
    ``dense``) with its options. ``cache``: a policy from :func:`longreach.cache.policies` with
    ``budget=`` and its options; every caching forward (``generate``) then starts one.
    ``sequence_parallel=``: a :class:`longreach.parallel.SequenceParallel`; each rank then passes its shard
    of the sequence and of the global position ids, and the method runs as Ulysses' local attention.
    Calling ``extend`` again replaces the earlier configuration.
    """
    if position is not None and position not in POSITION_OPTIONS:
        raise ValueError(f"unknown position scheme {position!r}; choose one of {sorted(POSITION_OPTIONS)} or None")
    method = "dense" if attention is None else attention
    get_method(method)
    backbone = _backbone(model)
    if getattr(model.config, "attention_dropout", 0.0):
        raise ValueError("model: attention_dropout > 0 is not supported by longreach attention methods")
    cache_keys = policies.OPTIONS.get(cache, ()) if cache is not None else ()
    cache_opts = {k: options.pop(k) for k in list(options) if k in cache_keys}
    if cache is not None:
        policies.make_cache(cache, 1, **cache_opts)
    parallel = options.pop("sequence_parallel", None)
    if parallel is not None:
        check_heads(model.config.num_attention_heads, model.config.num_key_value_heads, parallel)
        if cache is not None:
            raise ValueError("sequence_parallel: cache policies are not supported with sequence parallelism")
    rope_opts, attn_opts = _split_options(position, method, options)
    for key in TRAIN_LENGTH_OPTIONS:
        if key in METHODS[method].options and key not in attn_opts:
            attn_opts[key] = int(rope_opts.get("original_max_position", model.config.max_position_embeddings))
    check_options(method, attn_opts)
    if parallel is not None and attn_opts.get("carry"):
        raise ValueError("select_merge carry hands blocks from layer to layer over all heads, which a rank holding "
                         f"some of the heads does not see: set carry=0 (got {attn_opts['carry']}) with "
                         "sequence_parallel")
    rope = _build_rope(model, backbone, position, dict(rope_opts))
    device = next(model.parameters()).device
    if isinstance(rope, pos.Rope) and device.type != "meta":
        # Where the model is: copying pageable host memory to the GPU in every layer's call waits for the GPU.
        rope = rope.to(device)
    restore(model)
    if isinstance(rope, Clex):  # a submodule, so its parameters train, save and move with the model
        backbone.clex = rope
    register()
    setup = Setup(method, attn_opts, rope, position, backbone.rotary_emb, model.config._attn_implementation,
                  cache, cache_opts, parallel=parallel)
    # On the backbone, which creates the cache when none is given, whichever module the caller calls.
    setup.hooks = [backbone.register_forward_pre_hook(partial(_use_policy_cache, setup, model.config),
                                                      with_kwargs=True),
                   backbone.register_forward_hook(partial(_end_policy_cache, setup), with_kwargs=True)]
    backbone.rotary_emb = UnappliedRotary(_rope_basics(model)[0])
    for module in _attention_modules(backbone):
        module._longreach = setup
    model._longreach = setup
    model.set_attn_implementation(PREFIX + method)
    return model


def restore(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`extend`: the model's own rotary module and attention implementation come back."""
    setup: Setup | None = getattr(model, "_longreach", None)
    if setup is None:
        return model
    backbone = _backbone(model)
    backbone.rotary_emb = setup.original_rotary
    if hasattr(backbone, "clex"):
        del backbone.clex
    for hook in setup.hooks:
        hook.remove()
    for module in _attention_modules(backbone):
        del module._longreach
    del model._longreach
    model.set_attn_implementation(setup.original_attn or "sdpa")
    return model


def place_rope(model: PreTrainedModel, device: torch.device | str) -> pos.Rope:
    """Keep the configured frequencies on ``device``, so no step copies them from the host; returns them."""
    setup: Setup | None = getattr(model, "_longreach", None)
    if setup is None:
        raise ValueError("model: configure it with longreach.extend first")
    if not isinstance(setup.rope, pos.Rope):
        raise ValueError(f"position {setup.position!r} depends on the length (a host sync per step): "
                         "not available for static decoding")
    setup.rope = setup.rope.to(device)
    return setup.rope


def attention_of(model: PreTrainedModel) -> tuple[str, dict[str, Any], Any] | None:
    """The attention method, its options and the rotary frequencies extend configured on ``model``, or None."""
    setup: Setup | None = getattr(model, "_longreach", None)
    return None if setup is None else (setup.method, dict(setup.options), setup.rope)


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a transformers config's attention layers."""
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim(config)


def describe(model: PreTrainedModel) -> dict[str, Any] | None:
    """What extend configured on ``model`` (method, options, position scheme, cache policy), or None."""
    setup: Setup | None = getattr(model, "_longreach", None)
    if setup is None:
        return None
    return {"attention": setup.method, "options": setup.options, "position": setup.position, "cache": setup.cache,
            "cache_options": setup.cache_options}
