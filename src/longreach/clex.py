"""CLEX: continuous length extrapolation (Chen, Li, Meng, Liang, Bing, 2023, arXiv 2310.16450).

The rotary log-frequencies z follow an ordinary differential equation in the length scaling factor t,

    dz/dt = f(z, t) = act((z + log w(t)) W_up) W_down + d/dt log w(t),    z(1) = log(model's frequencies),

where w(t) are NTK-scaled frequencies with alpha = 2t - 1 (the authors' time embedding; ``start="ntk"``)
or, with ``start="yarn"``, YaRN's NTK-by-parts frequencies at factor t (eqs. 17-20 of Peng et al.:
w_i(t) = theta_i ((1 - gamma_i) + gamma_i / t)), which divide every pair that does not complete a
rotation within the trained length by t, where NTK's alpha = 2t - 1 divides some of them by less. W_down
starts at zero, so an untrained scheme follows its start exactly and t = 1 is the model's own RoPE;
training learns the deviation. The equation is solved with fixed-step fourth-order Runge-Kutta, steps of
0.1 in t (the authors use torchdiffeq's rk4 with 0.01: in float32 both land within rounding, 4e-4 in z,
of a 0.001-step solution, even for dynamics that moved far from their start, and 0.01 made a fine-tuning
step 4.4 times yarn's). During fine-tuning each forward draws an integer t in [1, max_factor] and
spreads the sequence's tokens over positions [0, length * t) (sorted, distinct, first and last included)
with frequencies z(t) divided by length / trained length; at inference t = ceil(L / trained length),
capped at max_factor, and integer positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .positions import Rope, check_length, yarn_ramp

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "silu": F.silu}
STARTS = ("ntk", "yarn")


class Float32Buffers(nn.Module):
    """A module whose buffers (the model's frequencies, YaRN's ramp) follow a move to another device but not a
    cast: ``model.to(torch.bfloat16)`` would round them, and so every frequency z(t), by up to about 1 %."""

    def _apply(self, fn, recurse=True):
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in kept.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(self._buffers[name].device)
        return self


class Dynamics(Float32Buffers):
    """f(z, t) of the module docstring for frequencies of a head of ``dim`` and RoPE ``base``; the hidden
    layer has ``width`` x dim units (the authors' ``param_factor``); w(t) from ``start`` (YaRN's ramp needs
    the model's ``trained_length``)."""

    def __init__(self, dim: int, base: float, width: int = 1, activation: str = "tanh", start: str = "ntk",
                 trained_length: int | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"clex: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if start not in STARTS:
            raise ValueError(f"clex: start must be one of {STARTS}, got {start!r}")
        if start == "yarn" and trained_length is None:
            raise ValueError("clex: start='yarn' needs the model's trained_length")
        check_length(width, "width")
        self.dim, self.base, self.activation, self.start = dim, base, activation, start
        self.up = nn.Parameter(torch.empty(dim // 2, width * dim))
        self.down = nn.Parameter(torch.zeros(width * dim, dim // 2))
        nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))
        ramp = yarn_ramp(dim, base, trained_length) if start == "yarn" else torch.zeros(dim // 2)
        self.register_buffer("ramp", ramp, persistent=False)

    def ntk(self, t: float) -> tuple[Tensor, Tensor]:
        """log w(t) and d/dt log w(t) (each (dim/2,)): w_i = (base alpha^(d/(d-2)))^(-2i/d), alpha = 2t - 1."""
        alpha = max(1.0, 2.0 * t - 1.0)
        index = torch.arange(0, self.dim, 2, dtype=torch.float32, device=self.up.device)
        log_w = -(index / self.dim) * math.log(self.base) - index / (self.dim - 2) * math.log(alpha)
        return log_w, -index / (self.dim - 2) * 2.0 / alpha

    def yarn(self, t: float) -> tuple[Tensor, Tensor]:
        """log w(t) and d/dt log w(t): w_i = theta_i ((1 - gamma_i) + gamma_i / t), gamma YaRN's ramp."""
        index = torch.arange(0, self.dim, 2, dtype=torch.float32, device=self.up.device)
        share = (1 - self.ramp) + self.ramp / t
        return -(index / self.dim) * math.log(self.base) + share.log(), -self.ramp / (t * t * share)

    def forward(self, t: float, z: Tensor) -> Tensor:
        log_w, slope = self.ntk(t) if self.start == "ntk" else self.yarn(t)
        return ACTIVATIONS[self.activation]((z + log_w) @ self.up.float()) @ self.down.float() + slope


def rk4(f: Callable[[float, Tensor], Tensor], z: Tensor, t0: float, t1: float, step: float) -> Tensor:
    """z(t1) of dz/dt = f(t, z), z(t0) = z, by classical Runge-Kutta with steps of at most ``step``."""
    if step <= 0:
        raise ValueError(f"clex: step must be > 0, got {step}")
    n = max(1, math.ceil((t1 - t0) / step - 1e-9)) if t1 > t0 else 0
    h = (t1 - t0) / n if n else 0.0
    t = t0
    for _ in range(n):
        k1 = f(t, z)
        k2 = f(t + h / 2, z + h / 2 * k1)
        k3 = f(t + h / 2, z + h / 2 * k2)
        k4 = f(t + h, z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += h
    return z


class Clex(Float32Buffers):
    """The CLEX position scheme for a model's rotary frequencies ``inv_freq`` (dim/2,) of RoPE ``base``,
    trained at ``trained_length`` tokens.

    ``at(length)`` gives the frequencies for a sequence of ``length`` tokens (cached per t while the
    parameters are unchanged); :meth:`train_step` fixes a training draw (t and the position scale) whose
    frequencies carry gradients to the dynamics' parameters, until :meth:`end_training`. Draw once per
    forward: a backward frees the draw's graph.
    """

    def __init__(self, inv_freq: Tensor, base: float, trained_length: int, max_factor: int = 16, *, width: int = 1,
                 activation: str = "tanh", step: float = 0.1, start: str = "ntk"):
        super().__init__()
        check_length(trained_length, "trained_length")
        if isinstance(max_factor, bool) or int(max_factor) != max_factor or max_factor < 1:
            raise ValueError(f"clex: max_factor must be an integer >= 1, got {max_factor!r}")
        if not step > 0:
            raise ValueError(f"clex: step must be > 0, got {step}")
        self.dynamics = Dynamics(2 * inv_freq.numel(), base, width, activation, start, trained_length)
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.trained_length, self.max_factor, self.step = trained_length, int(max_factor), float(step)
        self.draw: tuple[int, float] | None = None
        self._cache: dict[tuple, Tensor] = {}

    def settings(self) -> dict:
        """What builds an equal scheme (besides the frequencies): saved with the parameters."""
        d = self.dynamics
        return {"base": d.base, "trained_length": self.trained_length, "max_factor": self.max_factor,
                "width": d.up.shape[1] // d.dim, "activation": d.activation, "step": self.step, "start": d.start}

    def factor_for(self, length: int) -> int:
        """Inference t for ``length`` tokens: ceil(length / trained length), between 1 and max_factor."""
        return min(self.max_factor, max(1, math.ceil(length / self.trained_length)))

    def frequencies(self, t: float) -> Tensor:
        """exp(z(t)) (dim/2,), float32, differentiable in the dynamics' parameters; t = 1 gives the
        model's own frequencies exactly."""
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 1 <= t <= self.max_factor:
            raise ValueError(f"clex: t must be a number in [1, max_factor={self.max_factor}], got {t!r}")
        if t == 1:
            return self.inv_freq
        return rk4(self.dynamics, self.inv_freq.log(), 1.0, float(t), self.step).exp()

    def _version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def at(self, length: int) -> Rope:
        if self.draw is not None:
            return Rope(self._cache["draw"])
        key = (self.factor_for(length), self._version())
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.frequencies(key[0])
        return Rope(self._cache[key])

    def train_step(self, length: int, generator: torch.Generator) -> Tensor:
        """Draw t uniformly from 1..max_factor for a training sequence of ``length`` tokens; returns its
        position ids (length,): sorted distinct positions in [0, length * t), 0 and length * t - 1 among
        them. Frequencies z(t) divided by length / trained length (at least 1) apply until the next draw."""
        check_length(length, "length")
        t = int(torch.randint(1, self.max_factor + 1, (1,), generator=generator))
        span = length * t
        inner = torch.randperm(span - 2, generator=generator)[: length - 2] + 1 if length > 2 else torch.zeros(0)
        positions = torch.cat([torch.tensor([0, span - 1][:length]), inner.long()]).sort().values
        self.draw = (t, max(1.0, length / self.trained_length))
        # Solved here, outside the model: a checkpointed layer must save the same tensors when recomputed.
        self._cache = {"draw": self.frequencies(t) / self.draw[1]}
        return positions

    def end_training(self) -> None:
        self.draw, self._cache = None, {}

    def save(self, path: str | Path) -> None:
        """Write the dynamics' parameters, the model's frequencies and :meth:`settings` to ``path``."""
        torch.save({"settings": self.settings(), "inv_freq": self.inv_freq.cpu(),
                    "dynamics": {k: v.detach().cpu() for k, v in self.dynamics.state_dict().items()}}, path)

    @classmethod
    def load(cls, path: str | Path, inv_freq: Tensor | None = None) -> Clex:
        """A scheme from :meth:`save`'s file, checked against the model's frequencies ``inv_freq`` (by default
        the file's own)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"clex state {str(path)!r} not found: fine-tune with position='clex' first "
                             "(its run writes clex.pt)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        inv_freq = state["inv_freq"] if inv_freq is None else inv_freq
        if state["inv_freq"].shape != inv_freq.shape or not torch.allclose(state["inv_freq"], inv_freq.float().cpu()):
            raise ValueError(f"clex state {str(path)!r} was trained for other rotary frequencies than this model's")
        scheme = cls(inv_freq, **state["settings"])
        scheme.dynamics.load_state_dict(state["dynamics"])
        return scheme
