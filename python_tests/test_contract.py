"""The loss contract, checked on every fused backend against the eager reference.

Each test takes the ``backend`` fixture (conftest.py): "cpu" always, "cuda" and
"triton" on a GPU.  The losses come from the term tables of apl_kernels/spec.py
(apl_testing.ALL_LOSSES): a new term is tested here without new test code.
Shapes are chosen so the CPU run stays fast on two cores: all term pairs on a
small shape, the shape and dtype sweeps on a few losses.
"""
import math

import pytest
import torch

from apl_kernels import LossSpec, apl_loss

from apl_testing import (ALL_LOSSES, PAPER_PAIRS, SHARED_Q_PAIRS, assert_close, check_against_reference,
                         expect_device_assert, loss_and_grad, make_inputs, make_spec, uses_gamma)

REDUCTIONS = ("mean", "sum", "none")
GRADS = ("official", "exact")
SOME_LOSSES = ("nce+rce", "nfl+rce", "ngce+nrce", "gce+mae", "fl+nmae", "ce", "nce+agce", "nce+nnce", "nce+amse",
               "nfl+nnfl", "ece+mae", "taylor+aul")
# The terms of the later papers (issue 14), alone and in their papers' pairs.
NEW_TERMS = ("ece", "taylor", "agce", "aul", "ael", "nnce", "nnfl", "amse")
NEW_LOSSES = NEW_TERMS + PAPER_PAIRS[5:]
# Their parameters away from the defaults (ece's default m = 1e5 clamps most rows).
NEW_PARAMS = dict(m=3.0, t=5, min_prob=1e-3, gamma=1.5)


def _loss_and_grad_modes():
    """Every loss; the two gradient modes only where they differ (terms reading gamma)."""
    return [pytest.param(loss, grad, id=f"{loss}-{grad}") for loss in ALL_LOSSES + SHARED_Q_PAIRS
            for grad in (GRADS if uses_gamma(loss) else GRADS[:1])]


def _grad_output(loss_shape, reduction, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss_shape if reduction == "none" else (), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,grad", _loss_and_grad_modes())
def test_every_loss(backend, loss, grad, reduction):
    """Every term alone and every active+passive pair; ignored rows; random grad_output."""
    spec = make_spec(loss, grad=grad)
    logits, target = make_inputs(9, 10, torch.float64, ignore_every=4, seed=len(loss))
    go = _grad_output((9,), reduction)
    check_against_reference(backend, logits, target, spec, reduction, grad_output=go)


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("loss", SOME_LOSSES)
def test_dtypes(backend, loss, dtype, grad):
    if grad == "exact" and not uses_gamma(loss):
        pytest.skip("the same as grad='official' for this loss")
    spec = LossSpec.from_name(loss, grad=grad)
    logits, target = make_inputs(33, 20, dtype, ignore_every=5)
    check_against_reference(backend, logits, target, spec, "mean", grad_output=_grad_output((), "mean"))
    check_against_reference(backend, logits, target, spec, "none", grad_output=_grad_output((33,), "none"))


@pytest.mark.parametrize("shape", [(1, 2), (7, 2), (128, 2), (1, 10), (1000, 10), (7, 100), (128, 100),
                                   (1000, 100), (1, 1000), (128, 1000), (1, 50257), (7, 50257)], ids=str)
@pytest.mark.parametrize("loss", ("nce+rce", "nfl+rce", "ngce+nrce"))
def test_shapes(backend, loss, shape):
    spec = LossSpec.from_name(loss)
    logits, target = make_inputs(*shape, torch.float32, ignore_every=3 if shape[0] > 1 else 0)
    check_against_reference(backend, logits, target, spec, "mean")


@pytest.mark.parametrize("shape", [(128, 1000), (7, 50257)], ids=str)
@pytest.mark.parametrize("loss", ("nce+mae", "gce+rce", "fl+nrce"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_shapes_more_losses(backend, loss, shape, dtype):
    spec = LossSpec.from_name(loss, grad="exact")
    logits, target = make_inputs(*shape, dtype, ignore_every=5)
    check_against_reference(backend, logits, target, spec, "sum")


@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ce"))
def test_parameters(backend, loss):
    """alpha, beta, gamma, q, A reach the kernel."""
    spec = LossSpec.from_name(loss, alpha=0.3, beta=2.5, gamma=1.7, q=0.35, A=-6.0, grad="exact")
    logits, target = make_inputs(16, 12, torch.float64)
    check_against_reference(backend, logits, target, spec, "mean")
    spec = LossSpec.from_name("ngce+nrce", alpha=1.5, beta=0.25, q=0.9)
    check_against_reference(backend, logits, target, spec, "sum")


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("gamma", (0.25, 1.0, 2.0))
@pytest.mark.parametrize("loss", ("nfl+rce", "nfl+mae", "fl"))
def test_focal_gamma_fp32(backend, loss, gamma, grad):
    """A gamma other than the default 1/2, in fp32: the CPU kernel computes (1-p)^(1/2)
    with sqrt and any other power with its own vector exp / log.  Wide rows, and
    narrow confident ones (p_k >= 1/2 takes the scalar path)."""
    spec = LossSpec.from_name(loss, gamma=gamma, grad=grad)
    for n, k, scale in [(64, 1000, 3.0), (64, 10, 8.0)]:
        logits, target = make_inputs(n, k, torch.float32, scale=scale, ignore_every=7)
        check_against_reference(backend, logits, target, spec, "mean")


@pytest.mark.parametrize("q", (0.1, 1.0))
@pytest.mark.parametrize("loss", ("ngce+rce", "ngce+mae", "gce"))
def test_gce_q_fp32(backend, loss, q):
    """q of the official ngce configs (0.1) and the edge 1, in fp32, where the CPU
    kernel takes p^q from its own vector exp / log."""
    spec = LossSpec.from_name(loss, q=q)
    for n, k, scale in [(64, 1000, 3.0), (64, 10, 8.0)]:
        logits, target = make_inputs(n, k, torch.float32, scale=scale, ignore_every=7)
        check_against_reference(backend, logits, target, spec, "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows(backend, reduction):
    spec = LossSpec.from_name("nfl+rce")
    logits, target = make_inputs(12, 6, torch.float64)
    target[[0, 5, 6, 11]] = -100
    loss, grad = check_against_reference(backend, logits, target, spec, reduction)
    assert (grad[[0, 5, 6, 11]] == 0).all()
    if reduction == "none":
        assert (loss[[0, 5, 6, 11]] == 0).all()
    # A custom ignore_index inside [0, K) is ignored, not a label.
    target = torch.tensor([3, 1, 3, 0, 2, 3, 5, 4, 3, 1, 0, 3])
    loss, grad = check_against_reference(backend, logits, target, spec, reduction, ignore_index=3)
    assert (grad[target == 3] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, reduction):
    """mean over zero kept rows is 0 with zero gradient, never NaN."""
    logits, _ = make_inputs(5, 7, torch.float32)
    target = torch.full((5,), -100)
    loss, grad = loss_and_grad(backend.name, logits.to(backend.device), target.to(backend.device),
                               LossSpec.from_name("nce+rce"), reduction)
    assert torch.equal(loss.cpu(), torch.zeros_like(loss.cpu()))
    assert torch.equal(grad.cpu(), torch.zeros(5, 7))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    logits = torch.empty(0, 10, device=backend.device, requires_grad=True)
    target = torch.empty(0, dtype=torch.long, device=backend.device)
    loss = apl_loss(logits, target, "nce+rce", reduction=reduction, backend=backend.name)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert logits.grad.shape == (0, 10)


def test_non_contiguous_logits(backend):
    spec = LossSpec.from_name("nce+rce", grad="exact")
    base, target = make_inputs(24, 40, torch.float64)
    target = target % 10
    views = {
        "column stride 2": base[:, ::2][:12, :10],            # stride(1) != 1: the API copies
        "row stride > K": base[:12, 5:15],                    # rows padded: the kernel reads them in place
        "transposed": base[:10, :12].t(),                     # column-major
        "every other row": base[::2, :10],
    }
    for name, logits in views.items():
        assert not logits.is_contiguous(), name
        check_against_reference(backend, logits, target[:logits.shape[0]], spec, "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_spatial_logits(backend, reduction):
    """[B, K, d1] and [B, K, d1, d2] logits, as cross_entropy takes them."""
    spec = LossSpec.from_name("nfl+mae")
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5, 4), (2, 6, 3, 2)]:
        logits = torch.randn(*shape, generator=g, dtype=torch.float64)
        target = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
        target.view(-1)[::5] = -100
        go = torch.randn(target.shape if reduction == "none" else (), generator=g, dtype=torch.float64)
        loss, _ = check_against_reference(backend, logits, target, spec, reduction, grad_output=go)
        assert loss.shape == (target.shape if reduction == "none" else ())


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("loss", ("ce+rce", "fl+mae", "nce+nrce", "nfl+rce", "gce+nmae", "ngce+rce"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_confident_and_extreme_rows(backend, loss, grad, dtype):
    """p_y -> 1 (exactly 1 in the dtype) and logits of +-1e4: finite, and as the reference."""
    spec = LossSpec.from_name(loss, grad=grad)
    logits, target = make_inputs(8, 6, torch.float64)
    logits[0, target[0]] += 40.0          # p_y = 1 - 1e-17: 1 in fp32 and fp64 alike
    logits[1, target[1]] += 15.0          # p_y close to 1, not equal
    logits[2] = torch.tensor([1e4, -1e4, 0.0, 1e4, -1e4, 5.0])
    logits[3] = torch.tensor([-1e4, -1e4, -1e4, -1e4, -1e4, 1e4])
    target[2], target[3] = 0, 5
    logits[4, target[4]] -= 60.0          # p_y below P_MIN: clamped
    logits[5, (target[5] + 1) % 6] += 12.0  # another class with p close to 1
    logits[6, (target[6] + 2) % 6] += 0.5   # with p around 1/2
    logits = logits.to(dtype)
    loss_value, grad_value = check_against_reference(backend, logits, target, spec, "none",
                                                     grad_output=_grad_output((8,), "none"))
    assert torch.isfinite(loss_value).all() and torch.isfinite(grad_value).all()


@pytest.mark.parametrize("loss", ("ce", "nce+rce", "fl+mae", "nfl+nrce", "gce+rce", "ngce+nmae"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_masked_classes(backend, loss, dtype):
    """-inf logits are classes with p = 0, as in the reference."""
    spec = LossSpec.from_name(loss)
    logits, target = make_inputs(6, 8, torch.float64)
    logits[:, [1, 6]] = -math.inf
    logits[2, :5] = -math.inf
    target = torch.tensor([0, 2, 6, 3, 4, 7])
    check_against_reference(backend, logits.to(dtype), target, spec, "none",
                            grad_output=_grad_output((6,), "none"))
    check_against_reference(backend, logits.to(dtype), target, spec, "mean")


@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ngce+nrce", "ce"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_finite_rows(backend, loss, reduction):
    """A NaN or +inf logit, or a row of only -inf, makes that row NaN; the others are unharmed."""
    spec = LossSpec.from_name(loss)
    logits, target = make_inputs(6, 5, torch.float32)
    logits[1, 3] = math.nan
    logits[3, 0] = math.inf
    logits[4] = -math.inf
    loss_value, grad = check_against_reference(backend, logits, target, spec, reduction)
    assert torch.isnan(grad[[1, 3, 4]]).all()
    assert torch.isfinite(grad[[0, 2, 5]]).all()
    if reduction == "none":
        assert torch.isnan(loss_value[[1, 3, 4]]).all() and torch.isfinite(loss_value[[0, 2, 5]]).all()
    else:
        assert torch.isnan(loss_value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_out_of_range_target_unchecked(backend, reduction):
    """With check_targets=False a bad label gives a NaN row on the CPU, never an out-of-bounds
    read; the GPU kernels stop with a device-side assert instead (the documented contract;
    the test expected NaN rows there until it first ran on a GPU)."""
    logits, target = make_inputs(5, 4, torch.float32)
    target[1], target[3] = 4, -7
    if backend.device == "cuda":
        expect_device_assert(f"x = torch.randn(5, 4, device='cuda', requires_grad=True)\n"
                             f"y = torch.tensor({target.tolist()}, device='cuda')\n"
                             f"apl_loss(x, y, 'nce+rce', reduction={reduction!r}, backend={backend.name!r}, "
                             f"check_targets=False)")
        return
    loss, grad = loss_and_grad(backend.name, logits.to(backend.device), target.to(backend.device),
                               LossSpec.from_name("nce+rce"), reduction, check_targets=False)
    loss, grad = loss.cpu(), grad.cpu()
    assert torch.isnan(grad[[1, 3]]).all() and torch.isfinite(grad[[0, 2, 4]]).all()
    if reduction == "none":
        assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2, 4]]).all()
    else:
        assert torch.isnan(loss)
    # The good rows are what the reference gives for them.
    keep = torch.tensor([0, 2, 4])
    ref_loss, ref_grad = loss_and_grad("reference", logits[keep], target[keep], LossSpec.from_name("nce+rce"),
                                       "sum" if reduction == "sum" else "none")
    if reduction == "mean":  # the bad rows count in the mean's denominator
        ref_grad = ref_grad / 5
    assert_close(grad[keep], ref_grad, torch.float32, "good rows")


def test_module_matches_functional(backend):
    from apl_kernels import APLLoss
    logits, target = make_inputs(10, 7, torch.float32, ignore_every=3)
    criterion = APLLoss("nfl+rce", alpha=2.0, beta=0.5, backend=backend.name)
    x = logits.to(backend.device).requires_grad_()
    criterion(x, target.to(backend.device)).backward()
    expected = check_against_reference(backend, logits, target, LossSpec.from_name("nfl+rce", alpha=2.0, beta=0.5))
    assert_close(x.grad, expected[1], torch.float32, "module grad")


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("loss", NEW_LOSSES)
def test_new_terms_parameters(backend, loss, dtype):
    """The new terms with parameters away from their defaults reach the kernel: a, q, m, t, min_prob, gamma."""
    a = {"agce": 0.6, "aul": 5.5, "ael": 2.5, "amse": 1.5}
    passive = loss.split("+")[-1]
    spec = LossSpec.from_name(loss, alpha=0.7, beta=1.3, grad="exact", a=a.get(passive), q=1.5 if passive in ("agce", "aul")
                              else None, **NEW_PARAMS)
    logits, target = make_inputs(40, 12, dtype, ignore_every=6)
    check_against_reference(backend, logits, target, spec, "none", grad_output=_grad_output((40,), "none"))


@pytest.mark.parametrize("shape", [(1, 2), (128, 2), (7, 100), (128, 1000), (7, 50257)], ids=str)
@pytest.mark.parametrize("loss", ("nce+agce", "nce+nnce", "nce+amse", "nfl+nnfl", "ece+mae", "ngce+amse", "fl+nnce"))
def test_new_terms_shapes(backend, loss, shape):
    """Vector paths, their segments around the label and the generic path, at every K."""
    spec = LossSpec.from_name(loss, m=3.0 if "ece" in loss else None)
    logits, target = make_inputs(*shape, torch.float32, ignore_every=3 if shape[0] > 1 else 0)
    check_against_reference(backend, logits, target, spec, "mean")


def _edge_rows(dtype):
    """p_y -> 1 (exactly 1), p_y -> 0, classes below every clamp, tied maxima, one-hot rows."""
    logits, target = make_inputs(10, 6, torch.float64, seed=5)
    logits[0, target[0]] += 40.0          # p_y = 1 in fp32 and fp64
    logits[1, target[1]] += 15.0          # p_y close to 1
    logits[2, target[2]] -= 60.0          # p_y below every clamp
    logits[3] = torch.tensor([2.0, 7.0, 7.0, 0.0, 7.0, -1.0])   # ties: the first is the argmax
    target[3] = 1
    logits[4] = logits[3]
    target[4] = 2                          # tied with the argmax, not it
    logits[5, :3] = -30.0                  # three classes below min_prob
    logits[6] = torch.tensor([1e4, 0.0, 0.0, 0.0, 0.0, 0.0])  # one-hot, gap 1e4
    target[6] = 0
    logits[7] = logits[6]
    target[7] = 3
    return logits.to(dtype), target


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("loss,params", [
    ("ece", dict(m=3.0)), ("ece+mae", dict(m=1e5)), ("ece", dict(m=1e8)), ("taylor", dict(t=1)),
    ("taylor", dict(t=40)), ("agce", dict(a=1e3, q=3.0)), ("agce", dict(a=1e-5, q=0.5)), ("aul", dict(a=1e3, q=3.0)),
    ("aul", dict(a=1.01, q=0.2)), ("ael", dict(a=1e3)), ("amse", dict(a=1e3)), ("nce+amse", dict(a=30.0)),
    ("nce+nnce", dict(min_prob=1e-7)), ("nnce", dict(min_prob=0.05)), ("nfl+nnfl", dict(min_prob=1e-7)),
    ("nnfl", dict(min_prob=0.05, gamma=2.0)),
], ids=str)
def test_new_terms_edge_rows(backend, loss, params, dtype):
    """The issue's edge cases: p_y -> 0 and 1, the clamps, argmax ties for ece, large a and q."""
    spec = LossSpec.from_name(loss, grad="exact", **params)
    logits, target = _edge_rows(dtype)
    loss_value, grad_value = check_against_reference(backend, logits, target, spec, "none",
                                                     grad_output=_grad_output((10,), "none"))
    assert torch.isfinite(loss_value).all() and torch.isfinite(grad_value).all()


@pytest.mark.parametrize("offset", (1e2, 1e4, 1e5))
def test_nce_loss_with_a_common_offset(backend, offset):
    """NCE's normaliser from z - max (issue 12, item 5): rows sharing a large offset
    keep the loss to ~1e-7 relative, as the reference (sum z - K lse gave 2e-4 at 1e4)."""
    logits, target = make_inputs(64, 1000, torch.float64, seed=2)
    logits = (logits + offset).float()
    spec = LossSpec.from_name("nce")
    loss, _ = loss_and_grad(backend.name, logits.to(backend.device), target.to(backend.device), spec, "none")
    truth, _ = loss_and_grad("reference", logits.double(), target, spec, "none")
    rel = ((loss.cpu().double() - truth) / truth).abs().max().item()
    assert rel < 1e-6, f"offset {offset}: relative loss error {rel:.2e}"


@pytest.mark.parametrize("loss", ("nce+rce", "nce+nrce"))
def test_one_hot_logits_gradient(backend, loss):
    """One-hot logits with a gap of 1e4 (issue 12, item 5): no gradient where the truth is 0.
    rce's label coefficient once absorbed nce's, 1e-7 in fp32 at the label."""
    logits = torch.zeros(2, 10)
    logits[:, 4] = 1e4
    target = torch.tensor([4, 7])
    spec = LossSpec.from_name(loss)
    _, grad = loss_and_grad(backend.name, logits.to(backend.device), target.to(backend.device), spec, "none")
    _, truth = loss_and_grad("reference", logits.double(), target, spec, "none")
    assert truth[0].abs().max() == 0
    assert (grad.cpu().double() - truth).abs().max().item() < 1e-11


def test_expect_device_assert_needs_the_bad_label_message():
    """The child-process check of the GPU assert tests: passes only when the child dies with
    the assert's message (here a stand-in error), fails when the child carries on."""
    stderr = expect_device_assert("raise RuntimeError('Assertion: a target is outside [0, K) and is not ignore_index')")
    assert "RuntimeError" in stderr
    with pytest.raises(AssertionError):
        expect_device_assert("x = torch.ones(3)")
