"""The loss specification: the one home of every loss parameter.

A loss is ``alpha * active + beta * passive`` (Ma et al., ICML 2020, "Normalized
Loss Functions for Deep Learning with Noisy Labels").  ``LossSpec`` holds the
choice of terms and every parameter (alpha, beta, gamma, q, A, grad mode); all
backends receive it unchanged.  The integer codes below are the ones the C++
header ``csrc/apl_loss_math.h`` and the Triton module use; a test checks that
they agree with the compiled extension.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

# Term codes shared with csrc/apl_loss_math.h and apl_kernels/triton/loss_math.py.
ACTIVE_TERMS = {"none": 0, "ce": 1, "fl": 2, "nce": 3, "nfl": 4, "gce": 5, "ngce": 6}
PASSIVE_TERMS = {"none": 0, "mae": 1, "rce": 2, "nmae": 3, "nrce": 4}
GRAD_MODES = {"official": 0, "exact": 1}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# Probabilities are clamped to [P_MIN, 1] by gce, ngce, rce and nrce.
P_MIN = 1e-7
# A = ln(1e-4): the official RCE clamps the one-hot label at 1e-4.
DEFAULT_A = math.log(1e-4)

# Familiar aliases: SCE is CE+RCE (Wang et al., 2019).
_ALIASES = {"sce": "ce+rce"}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which terms, and with which parameters.

    active:  one of ``ce fl nce nfl gce ngce`` or ``none``.
    passive: one of ``mae rce nmae nrce`` or ``none``.
    alpha, beta: weights of the active and passive term.
    gamma: focal exponent of ``fl`` and ``nfl``.
    q: exponent of ``gce`` and ``ngce``.
    A: the RCE constant, log of the clamped one-hot's zero entries (negative).
    grad: ``"official"`` treats every focal factor (1-p)^gamma as a constant,
        as the reference code of Ma et al. does; ``"exact"`` differentiates it.
    """

    active: str = "nce"
    passive: str = "rce"
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.5
    q: float = 0.7
    A: float = DEFAULT_A
    grad: str = "official"

    def __post_init__(self):
        if self.active not in ACTIVE_TERMS:
            raise ValueError(f"unknown active term {self.active!r}; expected one of {sorted(ACTIVE_TERMS)}")
        if self.passive not in PASSIVE_TERMS:
            raise ValueError(f"unknown passive term {self.passive!r}; expected one of {sorted(PASSIVE_TERMS)}")
        if self.active == "none" and self.passive == "none":
            raise ValueError("a loss needs at least one term: both active and passive are 'none'")
        if self.grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {self.grad!r}; expected 'official' or 'exact'")
        for name in ("alpha", "beta", "gamma", "q", "A"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if not 0 < self.q <= 1:
            raise ValueError(f"q must lie in (0, 1], got {self.q}")

    @classmethod
    def from_name(cls, name: str, **params: Optional[float]) -> "LossSpec":
        """Parse ``"nce+rce"``, ``"nfl+mae"``, ``"ce"``, ``"rce"``, ``"sce"``...

        Parameters given as ``None`` keep their defaults.
        """
        if not isinstance(name, str):
            raise TypeError(f"loss must be a string such as 'nce+rce', got {type(name).__name__}")
        key = _ALIASES.get(name.strip().lower(), name.strip().lower())
        parts = [p.strip() for p in key.split("+")]
        active, passive = "none", "none"
        for part in parts:
            if part in ACTIVE_TERMS and part != "none" and active == "none":
                active = part
            elif part in PASSIVE_TERMS and part != "none" and passive == "none":
                passive = part
            else:
                raise ValueError(
                    f"cannot parse loss {name!r}: expected an active term {sorted(set(ACTIVE_TERMS) - {'none'})}, "
                    f"a passive term {sorted(set(PASSIVE_TERMS) - {'none'})}, or one of each joined by '+'")
        given = {k: v for k, v in params.items() if v is not None}
        return cls(active=active, passive=passive, **given)

    @property
    def name(self) -> str:
        return "+".join(t for t in (self.active, self.passive) if t != "none")

    def op_args(self) -> tuple:
        """The spec as the positional arguments of the fused ops (see ops.py)."""
        return (ACTIVE_TERMS[self.active], PASSIVE_TERMS[self.passive], float(self.alpha), float(self.beta),
                float(self.gamma), float(self.q), float(self.A), GRAD_MODES[self.grad])
