"""Attention methods by name: plain functions over (batch, heads, length, head_dim) tensors.

Every method has the signature ``fn(q, k, v, *, positions, rope, scale=None, **options) -> out``
(see :mod:`longreach.attention.core` for the conventions) and is listed here with its options,
their defaults and allowed values, so that bad options fail before any tensor is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .chunked import dca
from .core import Positions
from .dense import dense
from .select_merge import SCORES, VOTES, noncausal_select_merge, select_merge
from .self_extend import AUTO, self_extend
from .shifted import s2, sf
from .sinks import sinks
from .softplus import softplus

__all__ = ["METHODS", "Method", "Positions", "check_options", "get_method"]


@dataclass(frozen=True)
class Option:
    """An option's allowed values: an int/float range (and ``words`` besides), a bool, or a set of strings."""

    kind: type
    low: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    words: tuple[str, ...] = ()

    def check(self, method: str, name: str, value: Any) -> None:
        if (value is None and self.optional) or (isinstance(value, str) and value in self.words):
            return
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{method}: option {name!r} must be one of {self.choices}, got {value!r}")
            return
        number = (int,) if self.kind is int else (int, float)
        ok = isinstance(value, bool) if self.kind is bool else isinstance(value, number) and not isinstance(value, bool)
        if not ok:
            alternatives = "".join(f" or {word!r}" for word in self.words)
            raise ValueError(f"{method}: option {name!r} must be a {self.kind.__name__}{alternatives}, got {value!r}")
        if self.low is not None and not value >= self.low:
            raise ValueError(f"{method}: option {name!r} must be >= {self.low}, got {value!r}")


def _int(low: int, optional: bool = False) -> Option:
    return Option(int, low, optional=optional)


BLOCK = {"block_size": _int(1)}
TRAIN = {"train_length": _int(2)}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    options: dict[str, Option]
    summary: str
    # True where a head's pattern depends on its index among all heads (s2/sf shift half of them): a
    # sequence-parallel rank running a slice of the heads passes global_heads=(offset, total).
    head_patterned: bool = False
    # The method's form for non-causal self and cross attention, ``fn(q, k, v, *, scale=None, **options)`` over
    # q and k already rotated at their own positions; None where the method is defined only causally.
    noncausal: Callable[..., Any] | None = None

    def defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.fn).parameters
        return {name: params[name].default for name in self.options}


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("dense", dense, {"sliding_window": _int(1, optional=True)}, "dense causal softmax attention"),
        Method(
            "select_merge",
            select_merge,
            {**BLOCK, "top_k": _int(0), "local": _int(0), "sink": _int(0),
             "position_mode": Option(str, choices=("selected", "absolute")), "score": Option(str, choices=SCORES),
             "query_rows": _int(1, optional=True), "per_head": Option(bool), "representatives": _int(1),
             "vote": Option(str, choices=VOTES), "score_distance": _int(0, optional=True),
             "value_norm": Option(bool), "train_length": _int(2, optional=True), "shared": _int(0),
             "carry": _int(0), "prefilter": _int(0)},
            "correlation-aware select-and-merge block-sparse attention",
            noncausal=noncausal_select_merge,
        ),
        Method("s2", s2, {**BLOCK, "group_size": _int(2, optional=True), "shift": Option(bool)},
               "LongLoRA shifted sparse attention", head_patterned=True),
        Method("sf", sf, {**BLOCK, "group_size": _int(2, optional=True), "shift": Option(bool), "sink": _int(0)},
               "SinkLoRA sink-fixed shifted attention", head_patterned=True),
        Method("dca", dca, {**BLOCK, **TRAIN, "chunk_size": _int(2, optional=True),
                            "local_window": _int(0, optional=True), "mscale": Option(bool)}, "dual chunk attention"),
        Method("self_extend", self_extend, {**BLOCK, **TRAIN, "group_size": Option(int, 1, words=(AUTO,)),
                                            "window": _int(1, optional=True)}, "self-extend grouped positions"),
        Method("sinks", sinks, {**BLOCK, "sink": _int(0), "window": _int(1)}, "attention sinks + sliding window"),
        Method("softplus", softplus, {**BLOCK, **TRAIN, "power": Option(float, 1)},
               "softplus attention with l1 normalisation and re-weighting"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown attention method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError for an option the method does not take or a value outside its range."""
    method = get_method(name)
    for key, value in options.items():
        if key not in method.options:
            owners = sorted(m.name for m in METHODS.values() if key in m.options)
            hint = f"; it belongs to {owners}" if owners else ""
            raise ValueError(
                f"attention method {name!r} takes no option {key!r}{hint}; its options are {sorted(method.options)}"
            )
        method.options[key].check(name, key, value)
