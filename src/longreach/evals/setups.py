"""Named model configurations to compare: ``baseline``, a position scheme, an attention method, or
``method+scheme`` (e.g. ``dca+yarn``), applied with :func:`longreach.extend`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .. import attention_methods, extend, position_schemes, restore

BASELINE = "baseline"
DEFAULT_COMPARISON = ("baseline", "linear", "ntk", "yarn", "dca", "self_extend")
LINEAR_COST = ("select_merge", "sinks")


def parse(spec: str) -> dict:
    """``extend`` keyword arguments of a setup name (no factor); ValueError names what is allowed."""
    if spec == BASELINE:
        return {}
    config: dict = {}
    for part in spec.split("+"):
        if part in attention_methods() and "attention" not in config:
            config["attention"] = part
        elif part in position_schemes() and "position" not in config:
            config["position"] = part
        else:
            raise ValueError(f"setup {spec!r}: {part!r} is not an attention method ({', '.join(attention_methods())}) "
                             f"or position scheme ({', '.join(position_schemes())}), or is given twice")
    return config


def linear_cost(spec: str) -> bool:
    """Whether the setup's attention costs time linear in the length (a bounded number of keys per query),
    so that a 1M-token prompt takes seconds rather than minutes."""
    return parse(spec).get("attention") in LINEAR_COST


def factor_for(model, lengths: Sequence[int]) -> float:
    """The rescaling factor that covers the longest length: max(1, ceil(longest / trained length))."""
    return float(max(1, math.ceil(max(lengths) / model.config.max_position_embeddings)))


def apply(model, spec: str, *, factor: float | None, lengths: Sequence[int], options: dict | None = None,
          cache: str | None = None) -> dict:
    """Configure ``model`` (from its loaded state) as ``spec``, generating with the ``cache`` policy if
    given (its options among ``options``); returns the configuration used."""
    config = parse(spec)
    restore(model)
    if "position" in config and config["position"] in ("linear", "ntk", "dynamic_ntk", "yarn"):
        config["factor"] = factor if factor is not None else factor_for(model, lengths)
    if cache is not None:
        config["cache"] = cache
    if config:
        extend(model, **config, **(options or {}))
    return config
