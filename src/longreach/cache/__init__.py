"""KV-cache policies for generation: ``sinks`` (StreamingLLM), ``h2o`` (heavy hitters), ``token_select``.

``make_cache(name, num_layers, budget=..., ...)`` builds the transformers cache; ``longreach.extend(model,
cache=name, budget=...)`` makes ``generate`` use one. ``budget`` is the number of cached tokens a
step attends to: sinks and h2o keep exactly that many, token_select keeps all and attends to that many.
"""

from __future__ import annotations

from .layers import H2OLayer, PolicyCache, PolicyLayer, SinksLayer, TokenSelectLayer, cosine_threshold

OPTIONS = {
    "sinks": ("budget", "sink"),
    "h2o": ("budget", "recent"),
    "token_select": ("budget", "n_init", "n_local", "threshold"),
}


def policies() -> tuple[str, ...]:
    return tuple(OPTIONS)


def _whole(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or int(value) != value or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _layer(policy: str, budget: int, options: dict) -> PolicyLayer:
    if policy == "sinks":
        sink = _whole("sink", options.get("sink", min(4, budget - 1)), 0, budget - 1)
        return SinksLayer(budget, sink)
    if policy == "h2o":
        return H2OLayer(budget, _whole("recent", options.get("recent", budget // 2), 0, budget))
    n_init = _whole("n_init", options.get("n_init", min(128, budget // 16)), 0, budget)
    n_local = _whole("n_local", options.get("n_local", min(512, budget // 4)), 1, budget - n_init)
    return TokenSelectLayer(budget - n_init - n_local, n_init, n_local, cosine_threshold(options.get("threshold", 0.9)))


def make_cache(policy: str, num_layers: int, **options) -> PolicyCache:
    """A cache of ``policy`` for a model of ``num_layers`` (>= 1) layers; options as in :data:`OPTIONS`."""
    if policy not in OPTIONS:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {policies()}")
    unknown = sorted(set(options) - set(OPTIONS[policy]))
    if unknown:
        raise ValueError(f"cache policy {policy!r} takes options {OPTIONS[policy]}, not {unknown}")
    if "budget" not in options:
        raise ValueError(f"cache policy {policy!r} needs budget=<cached tokens per step, an integer >= 2>")
    budget = _whole("budget", options["budget"], 2)
    first = _layer(policy, budget, options)  # checks the options even for zero layers
    return PolicyCache([first] + [_layer(policy, budget, options) for _ in range(num_layers - 1)], policy)


__all__ = ["OPTIONS", "PolicyCache", "make_cache", "policies"]
