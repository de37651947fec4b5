"""The oracle itself, checked against facts that do not come from its code:
plain-Python values of the issue's formulas, torch's cross_entropy, identities
of the normalised losses, and hand-derived gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from apl_kernels import LossSpec
from apl_kernels.reference import reference_loss
from apl_kernels.spec import DEFAULT_A, P_MIN

from apl_testing import ACTIVES, ALL_LOSSES, PASSIVES


def _python_loss(z, y, active, passive, alpha=1.0, beta=1.0, gamma=0.5, q=0.7, A=DEFAULT_A):
    """The issue's formulas, one row, plain floats."""
    K = len(z)
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    logp = [v - lse for v in z]
    p = [math.exp(v) for v in logp]
    clamp = [min(max(v, P_MIN), 1.0) for v in p]
    focal = [-(1 - p[k]) ** gamma * logp[k] for k in range(K)]
    act = {
        "none": 0.0,
        "ce": -logp[y],
        "fl": focal[y],
        "nce": -logp[y] / -sum(logp),
        "nfl": focal[y] / sum(focal),
        "gce": (1 - clamp[y] ** q) / q,
        "ngce": (1 - clamp[y] ** q) / (K - sum(c ** q for c in clamp)),
    }[active]
    others = sum(clamp[k] for k in range(K) if k != y)
    pas = {"none": 0.0, "mae": 1 - p[y], "rce": -A * others, "nmae": (1 - p[y]) / (K - 1),
           "nrce": others / (K - 1)}[passive]
    return alpha * act + beta * pas


ROWS = [([0.3, -1.2, 2.0, 0.0], 2), ([5.0, -3.0, 0.5], 1), ([1.0, 1.0], 0), ([-2.0, 20.0, 0.1, -30.0, 3.0], 3)]


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_matches_python_formulas(loss):
    spec = LossSpec.from_name(loss, alpha=0.7, beta=1.3, gamma=1.5, q=0.4)
    for z, y in ROWS:
        got = reference_loss(torch.tensor([z], dtype=torch.float64), torch.tensor([y]), spec, "sum").item()
        expected = _python_loss(z, y, spec.active, spec.passive, 0.7, 1.3, 1.5, 0.4)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-14), (loss, z, y)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_ce_is_cross_entropy(reduction):
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 4))
    y[0, 1] = y[2, 3] = -100
    got = reference_loss(x, y, LossSpec.from_name("ce"), reduction)
    torch.testing.assert_close(got, F.cross_entropy(x, y, reduction=reduction, ignore_index=-100))


def test_identities():
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))

    def L(name, **kw):
        return reference_loss(x, y, LossSpec.from_name(name, **kw), "none")

    torch.testing.assert_close(L("fl", gamma=0.0), L("ce"))
    torch.testing.assert_close(L("gce", q=1.0), L("mae"))           # no p_y below P_MIN here
    torch.testing.assert_close(L("nmae"), L("mae") / 4)
    torch.testing.assert_close(L("rce"), -DEFAULT_A * L("mae"))     # unclamped: sum_{k!=y} p_k = 1 - p_y
    torch.testing.assert_close(L("nrce"), L("mae") / 4)
    torch.testing.assert_close(L("sce"), L("ce") + L("rce"))
    torch.testing.assert_close(L("nce+rce", alpha=0.5, beta=3.0), 0.5 * L("nce") + 3.0 * L("rce"))


@pytest.mark.parametrize("active", ("nce", "nfl", "ngce"))
def test_normalised_losses_sum_to_one_over_labels(active):
    """sum_y L(z, y) = 1 for the normalised losses (no clamping at these logits)."""
    x = torch.randn(1, 7, dtype=torch.float64).expand(7, 7)
    total = reference_loss(x, torch.arange(7), LossSpec.from_name(active), "sum")
    assert total.item() == pytest.approx(1.0, rel=1e-12)


def test_clamping():
    """p_k below P_MIN count as P_MIN in rce, gce and ngce, with zero gradient."""
    x = torch.tensor([[0.0, -40.0, -50.0]], dtype=torch.float64, requires_grad=True)  # p_1, p_2 < 1e-7
    rce = reference_loss(x, torch.tensor([0]), LossSpec.from_name("rce"), "sum")
    assert rce.item() == pytest.approx(-DEFAULT_A * 2 * P_MIN, rel=1e-12)
    rce.backward()
    assert x.grad.abs().max().item() < 1e-15
    gce = reference_loss(x.detach(), torch.tensor([2]), LossSpec.from_name("gce", q=0.5), "sum")
    assert gce.item() == pytest.approx((1 - P_MIN ** 0.5) / 0.5, rel=1e-12)


def _fl_official_grad(z, y, gamma):
    """d/dz_j of -(1-p_y)^gamma log p_y with the factor constant: -(1-p_y)^gamma ([j=y] - p_j)."""
    p = torch.softmax(z, 0)
    onehot = F.one_hot(torch.tensor(y), z.numel()).double()
    return -(1 - p[y]) ** gamma * (onehot - p)


def _fl_exact_grad(z, y, gamma):
    """The chain rule by hand: d f(l_y)/dl_y * d l_y/dz_j, f'(l) = -(1-p)^g + g (1-p)^(g-1) p l."""
    p = torch.softmax(z, 0)
    l_y = torch.log_softmax(z, 0)[y]
    py = p[y]
    d = -(1 - py) ** gamma + gamma * (1 - py) ** (gamma - 1) * py * l_y
    onehot = F.one_hot(torch.tensor(y), z.numel()).double()
    return d * (onehot - p)


@pytest.mark.parametrize("grad", ("official", "exact"))
def test_focal_gradient_modes(grad):
    z = torch.tensor([0.5, 2.0, -1.0, 0.3], dtype=torch.float64)
    x = z.clone()[None].requires_grad_()
    reference_loss(x, torch.tensor([1]), LossSpec.from_name("fl", gamma=2.0, grad=grad), "sum").backward()
    expected = (_fl_official_grad if grad == "official" else _fl_exact_grad)(z, 1, 2.0)
    torch.testing.assert_close(x.grad[0], expected)


def test_forward_identical_in_both_modes():
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (5,))
    for loss in ALL_LOSSES:
        a = reference_loss(x, y, LossSpec.from_name(loss, grad="official"), "none")
        b = reference_loss(x, y, LossSpec.from_name(loss, grad="exact"), "none")
        assert torch.equal(a, b), loss


@pytest.mark.parametrize("active", ("fl", "nfl"))
def test_exact_gradient_finite_when_confident(active):
    x = torch.tensor([[50.0, 0.0, -1.0], [0.0, 0.0, 800.0]], dtype=torch.float64, requires_grad=True)
    loss = reference_loss(x, torch.tensor([0, 2]), LossSpec.from_name(active, grad="exact"), "sum")
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ce"))
def test_gradcheck_reference(loss):
    for grad in ("official", "exact"):
        spec = LossSpec.from_name(loss, grad=grad)
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0, -100, 4, 2])
        if grad == "exact" or spec.active not in ("fl", "nfl"):
            assert torch.autograd.gradcheck(lambda t: reference_loss(t, y, spec, "mean"), (x,))


def test_ignored_rows_and_empty_mean():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 2, -100])
    spec = LossSpec.from_name("nce+rce")
    per_row = reference_loss(x, y, spec, "none")
    assert per_row[1].item() == 0 and per_row[3].item() == 0
    mean = reference_loss(x, y, spec, "mean")
    assert mean.item() == pytest.approx(per_row.sum().item() / 2)
    mean.backward()
    assert (x.grad[[1, 3]] == 0).all()
    x.grad = None
    empty = reference_loss(x, torch.full((4,), -100), spec, "mean")
    empty.backward()
    assert empty.item() == 0 and (x.grad == 0).all()


def test_half_inputs_give_fp32_loss():
    x = torch.randn(3, 4).to(torch.bfloat16)
    loss = reference_loss(x, torch.tensor([0, 1, 2]), LossSpec(), "none")
    assert loss.dtype == torch.float32


def test_every_term_is_covered():
    assert set(ACTIVES) == {"ce", "fl", "nce", "nfl", "gce", "ngce"}
    assert set(PASSIVES) == {"mae", "rce", "nmae", "nrce"}
    assert len(ALL_LOSSES) == 6 + 4 + 24
