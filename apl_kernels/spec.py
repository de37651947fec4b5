"""The loss specification: the one home of every loss parameter.

A loss is ``alpha * active + beta * passive`` (Ma et al., ICML 2020, "Normalized
Loss Functions for Deep Learning with Noisy Labels"; the later papers pair their
terms the same way).  ``LossSpec`` holds the choice of terms and every parameter;
all backends receive it unchanged, as ``op_args()``.  The integer codes below are
the ones the C++ header ``csrc/apl_loss_math.h`` and the Triton module use; a test
checks that they agree with the compiled extension.

The term tables (``TERMS``: side, parameters, formula, source) drive the
parser, the validation and the contract tests: a new term is a row here, a
branch in ``reference.py`` and its math in each backend.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

# Term codes shared with csrc/apl_loss_math.h and apl_kernels/triton/loss_math.py.
ACTIVE_TERMS = {"none": 0, "ce": 1, "fl": 2, "nce": 3, "nfl": 4, "gce": 5, "ngce": 6, "ece": 7, "taylor": 8}
PASSIVE_TERMS = {"none": 0, "mae": 1, "rce": 2, "nmae": 3, "nrce": 4, "agce": 5, "aul": 6, "ael": 7, "nnce": 8,
                 "nnfl": 9, "amse": 10}
GRAD_MODES = {"official": 0, "exact": 1}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# Probabilities are clamped to [P_MIN, 1] by gce, ngce, rce and nrce.
P_MIN = 1e-7
# A = ln(1e-4): the official RCE clamps the one-hot label at 1e-4.
DEFAULT_A = math.log(1e-4)
# ece clamps the epsilon-softmax probability of the label at this (eps-softmax losses.py, ECELoss eps).
ECE_EPS = 1e-8
# The largest Taylor order accepted (a loop of t steps per row in every kernel).
MAX_TAYLOR_ORDER = 1000


class Term(NamedTuple):
    side: str            # "active" or "passive"
    params: tuple        # the LossSpec fields the term reads (besides alpha / beta)
    formula: str         # loss of one row; p = softmax(z), y the label, K classes
    source: str          # where the definition comes from


TERMS = {
    "ce": Term("active", (), "-log p_y", "cross entropy"),
    "fl": Term("active", ("gamma",), "-(1-p_y)^gamma log p_y", "Lin et al. 2017; Ma et al. ICML 2020 code"),
    "nce": Term("active", (), "-log p_y / -sum_k log p_k", "Ma et al. ICML 2020 (NCELoss)"),
    "nfl": Term("active", ("gamma",), "-(1-p_y)^gamma log p_y / sum_k -(1-p_k)^gamma log p_k",
                "Ma et al. ICML 2020 (NormalizedFocalLoss)"),
    "gce": Term("active", ("q",), "(1 - clamp(p_y)^q) / q", "Zhang & Sabuncu 2018; Ma et al. code"),
    "ngce": Term("active", ("q",), "(1 - clamp(p_y)^q) / (K - sum_k clamp(p_k)^q)", "Ma et al. ICML 2020 (NGCELoss)"),
    "ece": Term("active", ("m",), "-log max(p'_y, 1e-8), p' = (p + m onehot(argmax p)) / (m + 1)",
                "Wang et al. NeurIPS 2024, cswjl/eps-softmax losses.py ECELoss"),
    "taylor": Term("active", ("t",), "sum_{j=1..t} (1 - p_y)^j / j", "Feng et al. IJCAI 2020 (Taylor cross entropy)"),
    "mae": Term("passive", (), "1 - p_y", "Ma et al. ICML 2020 (their code's MAELoss has scale 2)"),
    "rce": Term("passive", ("A",), "-A sum_{k!=y} clamp(p_k)", "Wang et al. 2019; Ma et al. code"),
    "nmae": Term("passive", (), "(1 - p_y) / (K - 1)", "Ma et al. ICML 2020"),
    "nrce": Term("passive", (), "sum_{k!=y} clamp(p_k) / (K - 1)", "Ma et al. ICML 2020"),
    "agce": Term("passive", ("a", "q"), "((a+1)^q - (a+p_y)^q) / q",
                 "Zhou et al. ICML 2021, hitcszx/ALFs lnl/losses.py AGCELoss"),
    "aul": Term("passive", ("a", "q"), "((a-p_y)^q - (a-1)^q) / q",
                "Zhou et al. ICML 2021, hitcszx/ALFs lnl/losses.py AUELoss"),
    "ael": Term("passive", ("a",), "exp(-p_y / a)", "Zhou et al. ICML 2021, hitcszx/ALFs lnl/losses.py AExpLoss"),
    "nnce": Term("passive", ("min_prob",),
                 "1 - (A + log c_y) / sum_k (A + log c_k), c = clamp(p, min_prob, 1), A = -log min_prob",
                 "Ye et al. NeurIPS 2023, Virusdoll/Active-Negative-Loss loss.py NormalizedNegativeCrossEntropy"),
    "nnfl": Term("passive", ("gamma", "min_prob"),
                 "1 - (A - f_y) / (K A - sum_k f_k), f_k = -(1-c_k)^gamma log c_k, log c = max(log p, log min_prob), "
                 "A = -(1-min_prob)^gamma log min_prob",
                 "Ye et al. NeurIPS 2023, Virusdoll/Active-Negative-Loss loss.py NormalizedNegativeFocalLoss"),
    "amse": Term("passive", ("a",), "(1/K) sum_k (p_k - a [k=y])^2",
                 "Wang et al. ICCV 2025 (JAL), cswjl/joint-asymmetric-loss losses.py AMSELoss"),
}
assert set(TERMS) == (set(ACTIVE_TERMS) | set(PASSIVE_TERMS)) - {"none"}
assert all((t.side == "active") == (name in ACTIVE_TERMS) for name, t in TERMS.items())

# Default of a parameter for the term that reads it: (value, source).  alpha and
# beta default to 1 for every loss.  A parameter that no term of the loss reads
# keeps FALLBACK (never used in the math, only passed along).
DEFAULTS = {
    ("fl", "gamma"): (0.5, "Ma et al. code, FocalLoss gamma=0.5"),
    ("nfl", "gamma"): (0.5, "Ma et al. code, NormalizedFocalLoss gamma=0.5"),
    ("nnfl", "gamma"): (0.5, "Active-Negative-Loss config/cifar10_anl_fl.json gamma=0.5"),
    ("gce", "q"): (0.7, "Ma et al. code, GCELoss q=0.7"),
    ("ngce", "q"): (0.7, "Ma et al. code, NGCELoss q=0.7"),
    ("agce", "q"): (2.0, "ALFs lnl/losses.py, AGCELoss(a=1, q=2)"),
    ("agce", "a"): (1.0, "ALFs lnl/losses.py, AGCELoss(a=1, q=2)"),
    ("aul", "q"): (0.9, "ALFs lnl/losses.py, AUELoss(a=1.5, q=0.9)"),
    ("aul", "a"): (1.5, "ALFs lnl/losses.py, AUELoss(a=1.5, q=0.9)"),
    ("ael", "a"): (3.0, "ALFs lnl/losses.py, AExpLoss(a=3)"),
    ("amse", "a"): (30.0, "JAL config.py, CIFAR-10 NCE+AMSE / NFL+AMSE a=30 (shared/reference/official-settings.md)"),
    ("ece", "m"): (1e5, "eps-softmax config.py, CIFAR-10 symmetric ECEandMAE m=1e5 (ECELoss has no default)"),
    ("taylor", "t"): (2, "our choice: the smallest order that is not MAE (t = 1 is 1 - p_y); no official code"),
    ("nnce", "min_prob"): (1e-7, "Active-Negative-Loss loss.py and configs, min_prob=1e-7"),
    ("nnfl", "min_prob"): (1e-7, "Active-Negative-Loss loss.py NormalizedNegativeFocalLoss(min_prob=1e-7)"),
    ("rce", "A"): (DEFAULT_A, "Ma et al. code, one-hot clamped at 1e-4: A = ln 1e-4"),
}
FALLBACK = {"gamma": 0.5, "q": 0.7, "A": DEFAULT_A, "a": 1.0, "m": 0.0, "t": 1, "min_prob": 1e-7}

# Familiar aliases: SCE is CE+RCE (Wang et al., 2019); Poly-1 (Leng et al., ICLR
# 2022) is CE + epsilon (1 - p_y), i.e. ce+mae with beta = epsilon.
_ALIASES = {"sce": "ce+rce", "poly1": "ce+mae"}

_FLOAT_PARAMS = ("alpha", "beta", "gamma", "q", "A", "a", "m", "min_prob")


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which terms, and with which parameters.

    active:  one of ``ce fl nce nfl gce ngce ece taylor`` or ``none``.
    passive: one of ``mae rce nmae nrce agce aul ael nnce nnfl amse`` or ``none``.
    alpha, beta: weights of the active and passive term (default 1).
    gamma: focal exponent of ``fl``, ``nfl`` and ``nnfl`` (default 0.5).
    q: exponent of ``gce``, ``ngce`` (in (0, 1], default 0.7), ``agce`` (> 0,
        default 2) and ``aul`` (> 0, default 0.9).
    A: the RCE constant, log of the clamped one-hot's zero entries (default ln 1e-4).
    a: the asymmetry parameter of ``agce`` (> 0, default 1), ``aul`` (> 1,
        default 1.5), ``ael`` (> 0, default 3) and ``amse`` (> 0, default 30).
    m: the epsilon-softmax weight of ``ece`` (>= 0, default 1e5).
    t: the order of ``taylor`` (an integer in [1, 1000], default 2).
    min_prob: the probability clamp of ``nnce`` and ``nnfl`` (in (0, 1), default 1e-7).
    grad: ``"official"`` treats every focal factor (1-p)^gamma as a constant,
        as the official code of nfl / nnfl does; ``"exact"`` differentiates it.

    A parameter left as None takes the official default of the term that reads
    it (``DEFAULTS`` names the source of each).  When both terms read ``q``
    (gce/ngce with agce/aul) their defaults differ, and ``q`` must be given.
    """

    active: str = "nce"
    passive: str = "rce"
    alpha: float = 1.0
    beta: float = 1.0
    gamma: Optional[float] = None
    q: Optional[float] = None
    A: Optional[float] = None
    grad: str = "official"
    a: Optional[float] = None
    m: Optional[float] = None
    t: Optional[int] = None
    min_prob: Optional[float] = None

    def __post_init__(self):
        if self.active not in ACTIVE_TERMS:
            raise ValueError(f"unknown active term {self.active!r}; expected one of {sorted(ACTIVE_TERMS)}")
        if self.passive not in PASSIVE_TERMS:
            raise ValueError(f"unknown passive term {self.passive!r}; expected one of {sorted(PASSIVE_TERMS)}")
        if self.active == "none" and self.passive == "none":
            raise ValueError("a loss needs at least one term: both active and passive are 'none'")
        if self.grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {self.grad!r}; expected 'official' or 'exact'")
        self._resolve_defaults()
        for name in _FLOAT_PARAMS:
            _check_number(name, getattr(self, name))
        if isinstance(self.t, bool) or not isinstance(self.t, int):
            raise ValueError(f"t (the Taylor order) must be an integer, got {self.t!r}")
        self._validate()

    def _resolve_defaults(self):
        terms = [t for t in (self.active, self.passive) if t != "none"]
        for param in FALLBACK:
            if getattr(self, param) is not None:
                continue
            defaults = {DEFAULTS[(t, param)][0] for t in terms if (t, param) in DEFAULTS}
            if len(defaults) > 1:
                raise ValueError(f"{self.name}: both terms read {param} and their official defaults differ "
                                 f"({sorted(defaults)}); pass {param} explicitly")
            object.__setattr__(self, param, defaults.pop() if defaults else FALLBACK[param])

    def _validate(self):
        uses = {p for t in (self.active, self.passive) if t != "none" for p in TERMS[t].params}
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.active in ("gce", "ngce") and not 0 < self.q <= 1:
            raise ValueError(f"q must lie in (0, 1] for {self.active}, got {self.q}")
        if self.passive in ("agce", "aul") and not self.q > 0:
            raise ValueError(f"q must be > 0 for {self.passive}, got {self.q}")
        if not self.q > 0:
            raise ValueError(f"q must be > 0, got {self.q}")
        if self.passive == "aul" and not self.a > 1:
            raise ValueError(f"a must be > 1 for aul (it takes (a-1)^q and (a-p_y)^q), got {self.a}")
        if self.passive in ("agce", "ael", "amse") and not self.a > 0:
            raise ValueError(f"a must be > 0 for {self.passive}, got {self.a}")
        if "m" in uses and not self.m >= 0:
            raise ValueError(f"m must be >= 0 for ece, got {self.m}")
        if "t" in uses and not 1 <= self.t <= MAX_TAYLOR_ORDER:
            raise ValueError(f"t (the Taylor order) must lie in [1, {MAX_TAYLOR_ORDER}], got {self.t}")
        if not 0 < self.min_prob < 1:
            raise ValueError(f"min_prob must lie in (0, 1), got {self.min_prob}")

    @classmethod
    def from_name(cls, name: str, **params) -> "LossSpec":
        """Parse ``"nce+rce"``, ``"nce+agce"``, ``"ece+mae"``, ``"ce"``, ``"nnce"``, ``"sce"``, ``"poly1"``...

        One active and one passive term, in either order, or one term alone.
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
        """The spec as the positional arguments of the fused ops (see ops.py):
        active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob."""
        return (ACTIVE_TERMS[self.active], PASSIVE_TERMS[self.passive], float(self.alpha), float(self.beta),
                float(self.gamma), float(self.q), float(self.A), GRAD_MODES[self.grad], float(self.a),
                float(self.m), int(self.t), float(self.min_prob))
