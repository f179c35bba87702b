"""Rotary position schemes as pure functions over frequencies and positions.

Notation (as in the method notes): ``dim`` is the rotary head dimension d, ``base`` the RoPE base b,
theta_i = b^(-2i/d) for i = 0..d/2-1, ``factor`` the scale s and ``original_max_position`` the
pre-training length L. Every scheme returns a :class:`Rope`: the inverse frequencies (d/2,) and the
attention scaling that multiplies both cos and sin.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope:
    """Inverse frequencies ``inv_freq`` (d/2,) and the scaling applied to cos and sin.

    A static scheme ignores the sequence length; :meth:`at` exists so that static and dynamic
    schemes share one interface.
    """

    inv_freq: Tensor
    scaling: float = 1.0

    def at(self, seq_len: int) -> Rope:
        return self

    def to(self, device: torch.device | str) -> Rope:
        """The same frequencies on ``device``."""
        return Rope(self.inv_freq.to(device), self.scaling)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` (..., n, d) by ``positions`` (..., n) (broadcastable), half-split layout.

        cos/sin are formed in float32 and cast to x's dtype before the product, exactly as
        transformers' Llama does, so an unscaled model gives bit-identical rotations.
        """
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(x.dtype)
        sin = (emb.sin() * self.scaling).to(x.dtype)
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin


@dataclass(frozen=True)
class DynamicRope:
    """Dynamic NTK: frequencies recomputed from the current length (see :func:`dynamic_ntk`)."""

    dim: int
    base: float
    factor: float
    original_max_position: int

    def at(self, seq_len: int) -> Rope:
        return dynamic_ntk(self.dim, self.base, self.factor, self.original_max_position, seq_len)


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim!r}")


def check_factor(factor: float, name: str = "factor") -> float:
    """Validate a scale factor: a finite number > 0."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise ValueError(f"{name} must be a finite number > 0, got {factor!r}")
    if factor <= 0:
        raise ValueError(f"{name} must be > 0, got {factor!r}")
    return float(factor)


def check_length(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def default_inv_freq(dim: int, base: float) -> Tensor:
    """theta_i = b^(-2i/d), the un-scaled RoPE frequencies (Su et al., 2021, eq. 15)."""
    _check_dim(dim)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def default(dim: int, base: float) -> Rope:
    """Plain RoPE."""
    return Rope(default_inv_freq(dim, base))


def linear(dim: int, base: float, factor: float) -> Rope:
    """Position interpolation (Chen et al., 2023, eq. 4): f'(x, m) = f(x, m/s), i.e. theta_i / s."""
    factor = check_factor(factor)
    return Rope(default_inv_freq(dim, base) / factor)


def ntk(dim: int, base: float, factor: float) -> Rope:
    """NTK-aware base change: b' = b * s^(d/(d-2)), theta'_i = b'^(-2i/d).

    The highest frequency is unchanged and the lowest is divided by exactly s.
    """
    factor = check_factor(factor)
    _check_dim(dim)
    if dim == 2:
        raise ValueError("dim must be >= 4 for the NTK base change (exponent d/(d-2))")
    return default(dim, base * factor ** (dim / (dim - 2)))


def dynamic_ntk(dim: int, base: float, factor: float, original_max_position: int, seq_len: int) -> Rope:
    """Dynamic NTK: b' = b * (s * n / L - (s - 1))^(d/(d-2)) with n = max(seq_len, L).

    Inside the trained window (n <= L) the bracket is 1 and RoPE is unchanged.
    """
    factor = check_factor(factor)
    check_length(original_max_position, "original_max_position")
    n = max(int(seq_len), original_max_position)
    growth = factor * n / original_max_position - (factor - 1)
    return default(dim, base * growth ** (dim / (dim - 2)))


def yarn_ramp(dim: int, base: float, original_max_position: int, *, beta_fast: float = 32.0, beta_slow: float = 1.0,
              truncate: bool = True) -> Tensor:
    """YaRN's ramp gamma_i (dim/2,) float32 (eqs. 17-20): the share of pair i interpolated, 1 for pairs that make
    fewer than ``beta_slow`` rotations over the trained length, 0 for more than ``beta_fast``."""
    check_length(original_max_position, "original_max_position")
    if not 0 < beta_slow < beta_fast:
        raise ValueError(f"need 0 < beta_slow < beta_fast, got beta_slow={beta_slow}, beta_fast={beta_fast}")

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    return ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn(
    dim: int,
    base: float,
    factor: float,
    original_max_position: int,
    *,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> Rope:
    """YaRN (Peng et al., 2023, eqs. 17-23): NTK-by-parts interpolation plus a temperature.

    A pair i makes r_i = L * theta_i / (2 pi) rotations over L. Pairs with r_i > beta_fast keep
    theta_i, pairs with r_i < beta_slow get theta_i / s, and the ramp
    gamma_i = clamp((i - low) / (high - low), 0, 1) blends the two in between, where
    low/high = dim(beta) = d * ln(L / (2 pi beta)) / (2 ln b), floored/ceiled when ``truncate``.
    The attention temperature sqrt(1/t) = 0.1 ln s + 1 multiplies cos and sin.
    """
    factor = check_factor(factor)
    theta = default_inv_freq(dim, base)
    gamma = yarn_ramp(dim, base, original_max_position, beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)
    inv_freq = theta / factor * gamma + theta * (1 - gamma)
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return Rope(inv_freq, float(attention_factor))


def truncated(dim: int, base: float, cutoff: int) -> Rope:
    """Giraffe's truncated basis (Pal et al., 2023, sec. 3.3) with cutoff wavelength T tokens.

    With b = 2 pi / T and a = b / 8: theta_i is kept if theta_i >= b, set to rho = b / 16 if
    a <= theta_i < b, and set to 0 (no rotation) below a, so the model only sees frequencies
    that complete a cycle within T tokens plus one shared slow frequency.
    """
    check_length(cutoff, "cutoff")
    theta = default_inv_freq(dim, base)
    b = 2 * math.pi / cutoff
    a, rho = b / 8, b / 16
    out = torch.where(theta >= b, theta, torch.where(theta >= a, torch.full_like(theta, rho), torch.zeros_like(theta)))
    return Rope(out)


@dataclass(frozen=True)
class CRDStep:
    """One training step's positional augmentation: an NTK factor and cyclic, offset positions."""

    factor: float
    offset: int
    period: int
    rope: Rope = field(repr=False)

    def positions(self, length: int) -> Tensor:
        """Position ids (length,): (offset + t) mod period."""
        return (self.offset + torch.arange(length)) % self.period


@dataclass
class CRDNTK:
    """CRD-NTK sampler: cyclic, randomly truncated, dynamically growing NTK (Wang et al., 2024).

    The paper's exact definitions could not be read; this is longreach's reading of the name:
    - dynamically growing NTK: at step t the factor is drawn uniformly from [1, g_t] with
      g_t = 1 + (max_factor - 1) * min(1, (t + 1) / growth_steps), and frequencies use the NTK
      base change for that factor;
    - randomly truncated: each step starts its positions at an offset drawn uniformly from
      [0, period);
    - cyclic: position ids wrap modulo ``period``, so no id ever exceeds the range trained on.
    Iterating yields one :class:`CRDStep` per training step; the same seed gives the same steps.
    """

    dim: int
    base: float
    period: int
    max_factor: float = 16.0
    growth_steps: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        check_length(self.period, "period")
        check_length(self.growth_steps, "growth_steps")
        if check_factor(self.max_factor, "max_factor") < 1:
            raise ValueError(f"max_factor must be >= 1, got {self.max_factor!r}")

    def bound(self, step: int) -> float:
        """Largest factor that may be drawn at ``step`` (g_t)."""
        return 1.0 + (self.max_factor - 1.0) * min(1.0, (step + 1) / self.growth_steps)

    def __iter__(self) -> Iterator[CRDStep]:
        rng = random.Random(self.seed)
        step = 0
        while True:
            factor = rng.uniform(1.0, self.bound(step))
            offset = rng.randrange(self.period)
            yield CRDStep(factor, offset, self.period, ntk(self.dim, self.base, factor))
            step += 1


SCHEMES = ("linear", "ntk", "dynamic_ntk", "yarn", "truncated")
