"""Helpers of the foundation tests: run a loss on a backend, compare with the reference.

A module of its own name (python_tests/ holds several conftests).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import torch

from apl_kernels import LossSpec, apl_loss
from apl_kernels.reference import reference_loss
from apl_kernels.spec import TERMS

# Every term of spec.TERMS, and every pair of an active and a passive term:
# a term added there is tested on every backend without new test code.
ACTIVES = tuple(name for name, term in TERMS.items() if term.side == "active")
PASSIVES = tuple(name for name, term in TERMS.items() if term.side == "passive")
_PAIRS = tuple(f"{a}+{p}" for a in ACTIVES for p in PASSIVES)
# Pairs whose two terms both read q (gce/ngce with agce/aul): their official
# defaults differ, so LossSpec needs q given (make_spec gives 0.5).
SHARED_Q_PAIRS = tuple(pair for pair in _PAIRS if all("q" in TERMS[t].params for t in pair.split("+")))
# The losses that parse by name alone (all the others).
ALL_LOSSES = ACTIVES + PASSIVES + tuple(pair for pair in _PAIRS if pair not in SHARED_Q_PAIRS)
# The pairs of the papers (Ma et al.; ALFs; ANL; JAL; eps-softmax).
PAPER_PAIRS = ("nce+rce", "nfl+rce", "nce+mae", "nfl+mae", "ngce+mae", "nce+agce", "nce+aul", "nce+ael", "nce+nnce",
               "nfl+nnfl", "nce+amse", "nfl+amse", "ece+mae")


def uses_gamma(loss: str) -> bool:
    """Whether a loss reads gamma: only there do grad="official" and "exact" differ."""
    return any("gamma" in TERMS[t].params for t in loss.split("+"))


def make_spec(loss: str, **params) -> LossSpec:
    """``LossSpec.from_name``, with q = 0.5 where both terms read q and none is given
    (gce/ngce with agce/aul: their official defaults differ, so q must be explicit)."""
    terms = loss.split("+")
    if "q" not in params and sum("q" in TERMS[t].params for t in terms if t in TERMS) > 1:
        params["q"] = 0.5
    return LossSpec.from_name(loss, **params)

# |actual - expected| <= rtol |expected| + atol + cancel max|expected|, per logits dtype.
# rtol: a few roundings of the dtype (fp16/bf16: the math is fp32 in both, the
#   gradient is rounded to the dtype), so each element is checked against its
#   own magnitude, the small non-target gradient entries of a large K included.
# atol: a floor far below any entry that matters (fp16's: its subnormal spacing,
#   where rounding is absolute).
# cancel: some tens of roundings of the *compute* precision (fp32 for half
#   inputs) of the largest entry: where an entry is a difference of larger terms (the target
#   entry of a confident row: p_y (c_y - sum_k c_k p_k) with p_y near 1), fp32
#   math cannot do better.  The old atol of rtol x max|expected| (4e-3 x max in
#   bf16) left every small entry unchecked.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-15, cancel=1e-13),
    torch.float32: dict(rtol=2e-4, atol=1e-12, cancel=2e-6),
    torch.float16: dict(rtol=2e-3, atol=1.2e-7, cancel=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-12, cancel=2e-6),
}


def _finite_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| element by element, 0 where either is not finite."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs()
    return torch.where(torch.isfinite(a) & torch.isfinite(b), diff, torch.zeros_like(diff))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 extra_atol: float | torch.Tensor = 0.0) -> None:
    """NaN where the reference is NaN, the same infinities, finite values within tolerance.

    extra_atol: an absolute error also allowed, a number or one per element (the
    shape of `expected`), e.g. a multiple of the reference's own error.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()[:5]}, expected at {nan_e.nonzero().tolist()[:5]}"
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]) and not torch.isinf(a[~inf_e]).any(), f"{what}: infinities differ"
    finite = ~(nan_e | inf_e)
    if not finite.any():
        return
    extra = torch.as_tensor(extra_atol, dtype=torch.float64).cpu().expand(e.shape)[finite]
    a, e = a[finite], e[finite]
    tol = TOLERANCES[dtype]
    bound = tol["rtol"] * e.abs() + tol["atol"] + tol["cancel"] * e.abs().max() + extra
    err = (a - e).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: {int((err > bound).sum())} of {err.numel()} values differ; worst "
                                  f"{a[worst].item():.9g} vs {e[worst].item():.9g} (dtype {dtype})")


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend under test: its name for ``apl_loss`` and the device of its tensors."""
    name: str
    device: str

    def __str__(self):
        return self.name


def loss_and_grad(backend: str, logits: torch.Tensor, target: torch.Tensor, spec: LossSpec, reduction: str = "mean",
                  ignore_index: int = -100, grad_output: torch.Tensor | None = None, check_targets: bool = True):
    """The loss and d(grad_output . loss)/d logits of one backend ("reference" included)."""
    x = logits.detach().clone().requires_grad_()
    loss = apl_loss(x, target, spec, reduction=reduction, ignore_index=ignore_index, backend=backend,
                    check_targets=check_targets)
    if grad_output is None:
        loss.backward(torch.ones_like(loss))
    else:
        loss.backward(grad_output.to(loss.device, loss.dtype))
    return loss.detach(), x.grad


def reference_loss_and_grad(logits, target, spec, reduction="mean", ignore_index=-100, grad_output=None):
    """The oracle, on CPU, in the logits' dtype (the reference upcasts half inputs itself)."""
    x = logits.detach().cpu().clone().requires_grad_()
    loss = reference_loss(x, target.cpu(), spec, reduction, ignore_index)
    go = torch.ones_like(loss) if grad_output is None else grad_output.cpu().to(loss.dtype)
    loss.backward(go)
    return loss.detach(), x.grad


def compare_with_reference(loss, grad, logits, target, spec, reduction="mean", ignore_index=-100, grad_output=None,
                           label=""):
    """Compare a backend's loss and gradient with the reference on the same input."""
    dtype = logits.dtype
    ref_loss, ref_grad = reference_loss_and_grad(logits, target, spec, reduction, ignore_index, grad_output)
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_loss_dtype, f"loss dtype {loss.dtype}, expected {expected_loss_dtype}"
    assert grad.dtype == dtype, f"grad dtype {grad.dtype}, expected {dtype}"
    # Below fp64 some entries are ill-conditioned (rce: p_j (c - sum_k c p_k) cancels);
    # allow each a few times the error of the reference itself against its fp64 run.
    loss_noise = grad_noise = 0.0
    if dtype != torch.float64:
        truth_loss, truth_grad = reference_loss_and_grad(logits.double(), target, spec, reduction, ignore_index,
                                                         grad_output)
        loss_noise = 4 * _finite_diff(ref_loss, truth_loss)
        grad_noise = 4 * _finite_diff(ref_grad, truth_grad)
    assert_close(loss, ref_loss, dtype, f"loss of {label}", loss_noise)
    assert_close(grad, ref_grad, dtype, f"grad of {label}", grad_noise)


def check_against_reference(backend: Backend, logits, target, spec, reduction="mean", ignore_index=-100,
                            grad_output=None):
    """Run `backend` and the reference on the same input and compare loss and gradient."""
    dev = backend.device
    loss, grad = loss_and_grad(backend.name, logits.to(dev), target.to(dev), spec, reduction, ignore_index,
                               None if grad_output is None else grad_output.to(dev), check_targets=True)
    label = f"{backend} {spec.name} {spec.grad} {reduction} {logits.dtype} {tuple(logits.shape)}"
    compare_with_reference(loss, grad, logits, target, spec, reduction, ignore_index, grad_output, label)
    return loss, grad


def make_inputs(n: int, k: int, dtype=torch.float32, scale: float = 3.0, seed: int = 0, ignore_every: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, k, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = -100
    return logits, target


# What both GPU kernels' bad-label asserts say (csrc/cuda/apl_cuda_common.cuh row_status,
# apl_kernels/triton/kernels.py BAD_LABEL).
DEVICE_ASSERT_MESSAGE = "outside [0, K) and is not ignore_index"


def expect_device_assert(code: str) -> str:
    """Run `code` (after ``import torch`` and ``from apl_kernels import LossSpec, apl_loss``)
    in a child Python and check that a device-side assert with the bad-label message stops it.

    A device-side assert leaves the CUDA context unusable for the rest of the process, so
    the test that provokes one must not run it in pytest's own process (on xdist every later
    test of that worker would fail).  Returns the child's stderr.
    """
    program = ("import torch\nfrom apl_kernels import LossSpec, apl_loss\n" + code +
               "\ntorch.cuda.synchronize()\nprint('no error')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the test helpers too
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout + run.stderr[-2000:]
    assert DEVICE_ASSERT_MESSAGE in run.stderr, run.stderr[-2000:]
    return run.stderr
