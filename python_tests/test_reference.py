"""The oracle itself, checked against facts that do not come from its code:
plain-Python values of the issue's formulas, torch's cross_entropy, identities
of the normalised losses, and hand-derived gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from apl_kernels import LossSpec
from apl_kernels.reference import reference_loss
from apl_kernels.spec import DEFAULT_A, DEFAULTS, ECE_EPS, P_MIN, TERMS

from apl_testing import ACTIVES, ALL_LOSSES, PASSIVES

# Every term of the spec's tables, alone and in every active+passive pair.
SPEC_ACTIVES = tuple(n for n, t in TERMS.items() if t.side == "active")
SPEC_PASSIVES = tuple(n for n, t in TERMS.items() if t.side == "passive")
SPEC_LOSSES = SPEC_ACTIVES + SPEC_PASSIVES + tuple(f"{a}+{p}" for a in SPEC_ACTIVES for p in SPEC_PASSIVES)


def _python_loss(z, y, active, passive, alpha=1.0, beta=1.0, gamma=0.5, q=0.7, A=DEFAULT_A, a=1.0, m=0.0, t=1,
                 min_prob=1e-7):
    """The issues' formulas (the papers' official code, transcribed), one row, plain floats."""
    K = len(z)
    z_max = max(z)
    lse = z_max + math.log(sum(math.exp(v - z_max) for v in z))
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
        "ece": 0.0,
        "taylor": sum((1 - p[y]) ** j / j for j in range(1, t + 1)),
    }[active]
    if active == "ece":
        first_max = p.index(max(p))
        eps_p = [(p[k] + (m if k == first_max else 0.0)) / (m + 1) for k in range(K)]
        act = -math.log(max(eps_p[y], ECE_EPS))
    others = sum(clamp[k] for k in range(K) if k != y)
    A_nnce = -math.log(min_prob)
    shifted = [A_nnce + math.log(min(max(v, min_prob), 1.0)) for v in p]
    log_c = [max(v, math.log(min_prob)) for v in logp]
    f = [-(1 - math.exp(v)) ** gamma * v for v in log_c]
    A_nnfl = -(1 - min_prob) ** gamma * math.log(min_prob)
    pas = {"none": 0.0, "mae": 1 - p[y], "rce": -A * others, "nmae": (1 - p[y]) / (K - 1),
           "nrce": others / (K - 1),
           "agce": ((a + 1) ** q - (a + p[y]) ** q) / q,
           "aul": ((a - p[y]) ** q - (a - 1) ** q) / q,
           "ael": math.exp(-p[y] / a),
           "nnce": 1 - shifted[y] / sum(shifted),
           "nnfl": 1 - (A_nnfl - f[y]) / (K * A_nnfl - sum(f)),
           "amse": sum((p[k] - (a if k == y else 0.0)) ** 2 for k in range(K)) / K}[passive]
    return alpha * act + beta * pas


ROWS = [([0.3, -1.2, 2.0, 0.0], 2), ([5.0, -3.0, 0.5], 1), ([1.0, 1.0], 0), ([-2.0, 20.0, 0.1, -30.0, 3.0], 3)]


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_matches_python_formulas(loss):
    spec = LossSpec.from_name(loss, alpha=0.7, beta=1.3, gamma=1.5, q=0.4)
    for z, y in ROWS:
        got = reference_loss(torch.tensor([z], dtype=torch.float64), torch.tensor([y]), spec, "sum").item()
        expected = _python_loss(z, y, spec.active, spec.passive, 0.7, 1.3, 1.5, 0.4)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-14), (loss, z, y)


# Parameters away from every default, valid for every term that reads them.
_PARAMS = dict(alpha=0.7, beta=1.3, gamma=1.5, q=0.4, a=2.5, m=3.0, t=4, min_prob=1e-3)


@pytest.mark.parametrize("loss", SPEC_LOSSES)
def test_every_term_matches_python_formulas(loss):
    """Every term and pair of spec.TERMS, rows with clamped classes (p < min_prob) included."""
    spec = LossSpec.from_name(loss, **_PARAMS)
    rows = ROWS + [([9.0, 0.0, -1.0, 1.0, 2.0], 0), ([0.0, 9.0, -1.0, 9.0, 2.0], 3), ([4.0, 4.0, 1.0], 1)]
    for z, y in rows:
        got = reference_loss(torch.tensor([z], dtype=torch.float64), torch.tensor([y]), spec, "sum").item()
        expected = _python_loss(z, y, spec.active, spec.passive, **_PARAMS)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-14), (loss, z, y)


@pytest.mark.parametrize("term", tuple(TERMS))
def test_defaults_are_the_tables(term):
    """A parameter left unset takes its term's official default (spec.DEFAULTS)."""
    spec = LossSpec.from_name(term)
    for param in TERMS[term].params:
        assert getattr(spec, param) == DEFAULTS[(term, param)][0], (term, param)


def _label_only_grad(z, y, d_l_y):
    """d/dz_j of a loss of p_y alone, from its derivative d_l_y = dL/d(log p_y): d_l_y ([j=y] - p_j)."""
    p = torch.softmax(z, 0)
    return d_l_y * (F.one_hot(torch.tensor(y), z.numel()).double() - p)


@pytest.mark.parametrize("loss,params,d_l_y", [
    ("taylor", dict(t=3), lambda p, **_: -(1 - (1 - p) ** 3)),
    ("agce", dict(a=0.6, q=0.6), lambda p, a, q: -p * (a + p) ** (q - 1)),
    ("aul", dict(a=5.5, q=3.0), lambda p, a, q: -p * (a - p) ** (q - 1)),
    ("ael", dict(a=2.5), lambda p, a: -p * math.exp(-p / a) / a),
], ids=lambda v: v if isinstance(v, str) else "")
def test_label_only_gradients_by_hand(loss, params, d_l_y):
    z = torch.tensor([0.5, 2.0, -1.0, 0.3], dtype=torch.float64)
    x = z.clone()[None].requires_grad_()
    reference_loss(x, torch.tensor([2]), LossSpec.from_name(loss, **params), "sum").backward()
    p_y = torch.softmax(z, 0)[2].item()
    torch.testing.assert_close(x.grad[0], _label_only_grad(z, 2, d_l_y(p_y, **params)))


def test_ece_argmax_ties_take_the_first_index():
    """Tied largest logits: the first is the argmax (torch.argmax), and gets the m; no gradient through it."""
    m = 10.0
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(z[0], 0)
    for y, is_argmax in [(1, True), (2, False), (0, False)]:
        x = z.clone().requires_grad_()
        loss = reference_loss(x, torch.tensor([y]), LossSpec.from_name("ece", m=m), "sum")
        p_y = p[y].item()
        expected = -math.log((p_y + m) / (m + 1)) if is_argmax else -math.log(p_y / (m + 1))
        assert loss.item() == pytest.approx(expected, rel=1e-12)
        loss.backward()
        d_l_y = -p_y / (p_y + m) if is_argmax else -1.0
        torch.testing.assert_close(x.grad[0], _label_only_grad(z[0], y, d_l_y))


def test_ece_clamp():
    """p'_y below 1e-8 is clamped: loss -log 1e-8, zero gradient."""
    x = torch.tensor([[0.0, -30.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss = reference_loss(x, torch.tensor([1]), LossSpec.from_name("ece", m=1.0), "sum")
    assert loss.item() == pytest.approx(-math.log(ECE_EPS), rel=1e-12)
    loss.backward()
    assert (x.grad == 0).all()


def test_nnce_and_nnfl_clamped_label():
    """p_y below min_prob: the label's term is A + log min_prob = 0, so the loss is exactly 1."""
    x = torch.tensor([[0.0, -40.0, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    for loss in ("nnce", "nnfl"):
        value = reference_loss(x, torch.tensor([1]), LossSpec.from_name(loss), "sum")
        assert value.item() == 1.0


def test_nnfl_official_gradient_by_hand():
    """The official detaches: (1-p)^gamma is a constant in both the label's term and the normaliser.
    L = 1 - N/D, N = A - f_y, D = K A - sum f;  dL/dl_k = m_k w_k (N / D^2) ... with f'(l) = -w."""
    gamma, min_prob = 0.5, 1e-3
    z = torch.tensor([0.5, 2.0, -9.0, 0.3], dtype=torch.float64)  # class 2: p < min_prob, clamped
    y, K = 1, 4
    logp = torch.log_softmax(z, 0)
    live = logp >= math.log(min_prob)
    clog = logp.clamp(min=math.log(min_prob))
    w = (1 - clog.exp()) ** gamma
    f = -w * clog
    A = -(1 - min_prob) ** gamma * math.log(min_prob)
    N, D = A - f[y], K * A - f.sum()
    # dL/df_y = 1/D (through N), dL/df_k = -N/D^2 (through D); df_k/dl_k = -w_k where live.
    d_f = torch.full((K,), -N / D ** 2)
    d_f[y] += 1 / D
    g = d_f * (-w) * live.double()
    expected = g - torch.softmax(z, 0) * g.sum()
    x = z.clone()[None].requires_grad_()
    reference_loss(x, torch.tensor([y]), LossSpec.from_name("nnfl", gamma=gamma, min_prob=min_prob), "sum").backward()
    torch.testing.assert_close(x.grad[0], expected)


def test_new_identities():
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))

    def L(name, **kw):
        return reference_loss(x, y, LossSpec.from_name(name, **kw), "none")

    torch.testing.assert_close(L("poly1", beta=2.0), L("ce") + 2.0 * L("mae"))
    torch.testing.assert_close(L("taylor", t=1), L("mae"))
    torch.testing.assert_close(L("ece", m=0.0), L("ce"))                      # no p_y below 1e-8 here
    p = torch.softmax(x, 1)
    mse = ((p - F.one_hot(y, 5).double()) ** 2).mean(dim=1)
    torch.testing.assert_close(L("amse", a=1.0), mse)
    torch.testing.assert_close(L("agce", a=0.5, q=1.0), L("mae"))            # q = 1: (a+1) - (a+p_y)
    torch.testing.assert_close(L("nce+nnce", alpha=2.0, beta=3.0), 2.0 * L("nce") + 3.0 * L("nnce"))
    # Taylor of high order tends to CE.
    torch.testing.assert_close(L("taylor", t=MAX_ORDER), L("ce"), rtol=1e-6, atol=1e-6)


MAX_ORDER = 1000


@pytest.mark.parametrize("loss,params", [
    ("agce", dict(a=1e3, q=3.0)), ("agce", dict(a=1e-5, q=0.5)), ("aul", dict(a=1e3, q=3.0)),
    ("aul", dict(a=1.0001, q=0.1)), ("ael", dict(a=1e3)), ("amse", dict(a=1e3)), ("ece", dict(m=1e8)),
    ("taylor", dict(t=50)), ("nnce", dict(min_prob=0.1)), ("nnfl", dict(min_prob=0.1, gamma=3.0)),
], ids=str)
def test_large_parameters_and_extreme_rows(loss, params):
    """Large a, q and m; p_y -> 0 and -> 1: finite, and as the plain formulas (fp64)."""
    spec = LossSpec.from_name(loss, **params)
    rows = [([0.0, 40.0, 1.0], 1), ([0.0, -40.0, 1.0], 1), ([3.0, 3.0, 3.0], 2), ([0.2, 0.1, -0.3], 0)]
    x = torch.tensor([z for z, _ in rows], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([t for _, t in rows])
    loss_rows = reference_loss(x, y, spec, "none")
    loss_rows.sum().backward()
    assert torch.isfinite(loss_rows).all() and torch.isfinite(x.grad).all()
    full = dict(_PARAMS, alpha=1.0, beta=1.0, **params)
    for i, (z, t) in enumerate(rows):
        assert loss_rows[i].item() == pytest.approx(_python_loss(z, t, spec.active, spec.passive, **full),
                                                    rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss", SPEC_LOSSES[:len(SPEC_ACTIVES) + len(SPEC_PASSIVES)] +
                         ("nce+agce", "nce+aul", "nce+ael", "nce+nnce", "nfl+nnfl", "nce+amse", "nfl+amse", "ece+mae"))
def test_gradcheck_every_term(loss):
    """fp64 gradcheck of every term (the official focal detaches are not a gradient: exact mode there)."""
    grad = "exact" if any(t in ("fl", "nfl", "nnfl") for t in loss.split("+")) else "official"
    spec = LossSpec.from_name(loss, grad=grad, **({"q": 0.5} if loss in ("agce", "aul") else {}))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, -100, 4, 2])
    assert torch.autograd.gradcheck(lambda t: reference_loss(t, y, spec, "mean"), (x,), fast_mode=True)


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
    assert set(SPEC_ACTIVES) == {"ce", "fl", "nce", "nfl", "gce", "ngce", "ece", "taylor"}
    assert set(SPEC_PASSIVES) == {"mae", "rce", "nmae", "nrce", "agce", "aul", "ael", "nnce", "nnfl", "amse"}
    assert len(SPEC_LOSSES) == 8 + 10 + 80
    assert set(ACTIVES) <= set(SPEC_ACTIVES) and set(PASSIVES) <= set(SPEC_PASSIVES)
    assert set(ALL_LOSSES) <= set(SPEC_LOSSES)
