"""Defects of issue 12 (adversarial testing), one test per defect, on every fused backend.

Each test names the user action it guards.  "cpu" always runs; "cuda" and
"triton" run on a GPU (the ``backend`` fixture); the Triton interpreter runs the
Triton-specific ones in ``triton/test_triton_defects.py``.  Under a minute on 2 CPU cores.
"""
import pytest
import torch

from apl_kernels import APLLoss, LossSpec, apl_loss, backends, functional
from apl_kernels.reference import reference_loss
from apl_kernels.spec import REDUCTIONS

from apl_testing import assert_close


def _reference_grad(z, y, spec, reduction="mean", grad_output=None):
    zr = z.detach().clone().requires_grad_()
    loss = reference_loss(zr, y, spec, reduction)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return zr.grad


# ------------------------------------------------------------------ 1. narrow label dtypes
@pytest.mark.parametrize("dtype, label, ignore_index", [(torch.uint8, 156, -100), (torch.int8, -56, 200)],
                         ids=("uint8", "int8"))
def test_narrow_label_dtypes_are_range_checked_in_int64(backend, dtype, label, ignore_index):
    """Training on labels kept compactly as uint8/int8: a bad label raises instead of a NaN loss.

    In uint8, ignore_index -100 wraps to 156 (and in int8, 200 wraps to -56), so
    a check in the labels' own dtype took the bad label for ignore_index.
    """
    logits = torch.randn(4, 10, device=backend.device)
    target = torch.tensor([1, 2, label, 3], dtype=dtype, device=backend.device)
    # The host check is the default on the CPU; on CUDA the kernels assert and "sync" asks for it.
    check = "sync" if backend.device == "cuda" else True
    with pytest.raises(ValueError, match=f"target value {label} is outside"):
        apl_loss(logits, target, ignore_index=ignore_index, backend=backend.name, check_targets=check)


# ------------------------------------------------------------------ 2. double backward
def _penalised_weight_grad(backend_name, device, spec, reduction):
    """A gradient penalty: gx = d loss / d x (create_graph), then ||gx||^2 backward into the weights."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 7).double().to(device)
    x = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 2, -100, 4, 5, 6, 0, 3], device=device)
    loss = apl_loss(lin(x), y, spec, reduction=reduction, backend=backend_name)
    weights = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
    (gx,) = torch.autograd.grad(loss, x, weights, create_graph=True)
    gx.pow(2).sum().backward()
    return lin.weight.grad, lin.bias.grad, x.grad


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ngce+nrce", "ce"))
def test_gradient_penalty_second_derivative(backend, loss, reduction):
    """A gradient penalty (WGAN-GP / input-gradient regularisation) gets the right second derivative.

    The part through the logits used to be dropped (weights' gradient off by 49%).
    """
    spec = LossSpec.from_name(loss, grad="exact")
    got = _penalised_weight_grad(backend.name, backend.device, spec, reduction)
    expected = _penalised_weight_grad("reference", backend.device, spec, reduction)
    for name, g, e in zip(("weight", "bias", "input"), got, expected):
        assert_close(g, e, torch.float64, f"{name} gradient of the penalty")


def test_double_backward_with_respect_to_logits(backend):
    """d/dz of ||d loss/dz||^2 for logits z, and loss.backward(create_graph=True), work and are right."""
    spec = LossSpec.from_name("nce+rce")
    z0 = torch.randn(6, 5, dtype=torch.float64, device=backend.device)
    y = torch.tensor([0, 1, 4, -100, 2, 3], device=backend.device)
    results = []
    for name in (backend.name, "reference"):
        z = z0.clone().requires_grad_()
        (gz,) = torch.autograd.grad(apl_loss(z, y, spec, backend=name), z, create_graph=True)
        (hz,) = torch.autograd.grad(gz.pow(2).sum(), z)
        w = z0.clone().requires_grad_()
        apl_loss(w, y, spec, backend=name).backward(create_graph=True)
        assert w.grad.requires_grad, "create_graph=True must give a differentiable gradient"
        (hw,) = torch.autograd.grad(w.grad.sin().sum(), w)
        results.append((gz, hz, w.grad, hw))
    for what, g, e in zip(("gradient", "penalty gradient", "create_graph gradient", "its gradient"), *results):
        assert_close(g, e, torch.float64, what)


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("loss", ("nfl+rce", "ngce+nmae"))
def test_gradgradcheck(loss, reduction):
    """Second derivatives of the CPU op against finite differences (exact grad mode)."""
    if backends.unavailable_reason("cpu", torch.device("cpu")) is not None:
        pytest.fail("the CPU kernel is part of every install")
    spec = LossSpec.from_name(loss, grad="exact")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 6, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.tensor([0, -100, 4, 2, 1])
    assert torch.autograd.gradgradcheck(lambda t: apl_loss(t, y, spec, reduction=reduction, backend="cpu"), (z,))


# ------------------------------------------------------------------ 3. independent gradients
def test_retain_graph_gradients_are_independent(backend):
    """Two autograd.grad(..., retain_graph=True) calls: `g1 += g2` must not double g2."""
    spec = LossSpec.from_name("nce+rce")
    z = torch.randn(8, 5, device=backend.device, requires_grad=True)
    y = torch.randint(0, 5, (8,), device=backend.device)
    loss = apl_loss(z, y, spec, backend=backend.name)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z, retain_graph=True)
    g1 += g2
    (g3,) = torch.autograd.grad(2 * loss, z)     # a third backward, scaled
    expected = _reference_grad(z, y, spec)
    assert_close(g2, expected, z.dtype, "second gradient after g1 += g2")
    assert_close(g1, 2 * expected, z.dtype, "g1 + g2")
    assert_close(g3, 2 * expected, z.dtype, "third gradient")


def test_hook_editing_the_gradient_in_place_does_not_leak_into_the_next_backward(backend):
    """A tensor hook that edits the gradient in place (clipping, masking) acts on that backward only."""
    spec = LossSpec.from_name("nce+rce")
    lin = torch.nn.Linear(4, 5).to(backend.device)
    x = torch.randn(8, 4, device=backend.device)
    y = torch.randint(0, 5, (8,), device=backend.device)
    z = lin(x)
    loss = apl_loss(z, y, spec, backend=backend.name)
    handle = z.register_hook(lambda g: g.zero_())
    loss.backward(retain_graph=True)
    assert lin.weight.grad.abs().max() == 0
    handle.remove()
    (gz,) = torch.autograd.grad(loss, z)
    assert_close(gz, _reference_grad(z, y, spec), z.dtype, "gradient after the hook's backward")


def test_second_backward_after_in_place_change_of_the_logits_raises(backend):
    """Changing the logits in place between two backwards: the first is right, the second says why it fails."""
    spec = LossSpec.from_name("nce+rce")
    z = torch.randn(8, 5, device=backend.device, requires_grad=True)
    h = z * 1.0
    y = torch.randint(0, 5, (8,), device=backend.device)
    loss = apl_loss(h, y, spec, backend=backend.name)
    expected = _reference_grad(h, y, spec)
    with torch.no_grad():
        h.add_(1.0)
    (g,) = torch.autograd.grad(loss, z, retain_graph=True)
    assert_close(g, expected, z.dtype, "first backward")
    with pytest.raises(RuntimeError, match="modified in place after the loss"):
        torch.autograd.grad(loss, z)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_first_backward_hands_over_the_forward_buffer(backend, reduction):
    """loss.backward() costs no second [N, K] buffer; a retain_graph backward gets a new one."""
    spec = LossSpec.from_name("nce+rce")
    op = backends.fused_op(backend.name)
    z = torch.randn(8, 5, device=backend.device, requires_grad=True)
    y = torch.randint(0, 5, (8,), device=backend.device)
    loss, buffer = op(z, y, *spec.op_args(), REDUCTIONS[reduction], -100, True)
    (g1,) = torch.autograd.grad(loss, z, torch.ones_like(loss), retain_graph=True)
    assert g1.data_ptr() == buffer.data_ptr()
    (g2,) = torch.autograd.grad(loss, z, torch.ones_like(loss))
    assert g2.data_ptr() != buffer.data_ptr()
    assert_close(g2, _reference_grad(z, y, spec, reduction), z.dtype, "recomputed gradient")


# ------------------------------------------------------------------ 6. torch.func
def test_torch_func_transforms():
    """torch.func.grad / jacrev / vmap (per-sample gradients) work with backend="auto"."""
    spec = LossSpec.from_name("nce+rce")
    z = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 4, -100, 2, 3])
    assert_close(torch.func.grad(lambda t: apl_loss(t, y, spec))(z), _reference_grad(z, y, spec),
                 torch.float64, "torch.func.grad")
    jac = torch.func.jacrev(lambda t: apl_loss(t, y, spec, reduction="none"))(z)
    assert_close(jac.sum(0), _reference_grad(z, y, spec, "none"), torch.float64,
                 "torch.func.jacrev")
    per_sample = torch.func.vmap(lambda t, label: apl_loss(t[None], label[None], spec))(z, y)
    assert_close(per_sample, reference_loss(z, y, spec, "none"), torch.float64, "vmap")
    batch = torch.stack((z, 2 * z))
    grads = torch.func.vmap(torch.func.grad(lambda t: apl_loss(t, y, spec)))(batch)
    assert_close(grads[1], _reference_grad(2 * z, y, spec), torch.float64, "vmap of grad")


@pytest.mark.parametrize("loss", ("nce+rce", "ece+mae", "nce+amse"))
def test_per_sample_gradients_with_batched_labels(loss):
    """vmap(grad) over samples AND their labels (per-example gradients for noise detection).

    F.one_hot read the labels' values for its range check, which vmap cannot do.
    """
    spec = LossSpec.from_name(loss)
    z = torch.randn(5, 4, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (5, 4))
    y[1, 2] = -100
    grads = torch.func.vmap(torch.func.grad(lambda t, labels: apl_loss(t, labels, spec)))(z, y)
    for i in range(5):
        assert_close(grads[i], _reference_grad(z[i], y[i], spec), torch.float64, f"sample batch {i}")
    with pytest.raises(RuntimeError, match="out of bounds"):   # a bad label is still refused under a transform
        torch.func.grad(lambda t: apl_loss(t, torch.tensor([0, 12, 1, 2]), spec))(torch.randn(4, 10))


def test_torch_func_with_an_explicit_fused_backend_names_the_limitation():
    y = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.grad(lambda t: apl_loss(t, y, backend="cpu"))(torch.randn(2, 3))


# ------------------------------------------------------------------ 7, 8, 13. clear errors
@pytest.mark.parametrize("ignore_index", (2**63, -2**63 - 1))
def test_ignore_index_outside_int64_is_named(ignore_index):
    """A config with an out-of-range ignore_index gets an error that says so."""
    with pytest.raises(ValueError, match="outside the int64 range"):
        apl_loss(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_meta_tensors_with_check_targets(reduction):
    """Shape inference on the meta device (model sizing, FSDP init) runs with the default check_targets."""
    logits = torch.randn(4, 3, device="meta", requires_grad=True)
    loss = apl_loss(logits, torch.zeros(4, dtype=torch.long, device="meta"), reduction=reduction)
    assert loss.device.type == "meta" and loss.shape == ((4,) if reduction == "none" else ())


@pytest.mark.parametrize("check_targets", (True, "sync"))
def test_bad_label_on_cpu_raises_a_value_error_naming_it(check_targets):
    """A label typo on the CPU: the default and "sync" both name the label before any kernel runs."""
    with pytest.raises(ValueError, match=r"target value 10 is outside \[0, 10\)"):
        apl_loss(torch.randn(3, 10), torch.tensor([0, 10, 2]), check_targets=check_targets)


def test_check_targets_false_leaves_a_bad_label_to_the_kernel():
    """check_targets=False: no host check; the CPU kernel gives the bad row a NaN loss, reads nothing out of bounds."""
    loss = apl_loss(torch.randn(3, 10), torch.tensor([0, 10, 2]), reduction="none", check_targets=False,
                    backend="cpu")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("value", ("yes", "async", 1, None))
def test_check_targets_value_is_validated(value):
    """A typo in check_targets is an error that lists the choices, not a silently skipped check."""
    with pytest.raises(ValueError, match="check_targets must be True, False or 'sync'"):
        apl_loss(torch.randn(2, 3), torch.tensor([0, 1]), check_targets=value)
    with pytest.raises(ValueError, match="check_targets must be True, False or 'sync'"):
        APLLoss("ce", check_targets=value)


@pytest.mark.parametrize("check_targets, device, host", [
    (True, "cpu", True), (True, "cuda", False), ("sync", "cpu", True), ("sync", "cuda", True),
    (False, "cpu", False), (False, "cuda", False)])
def test_default_label_check_never_syncs_on_cuda(check_targets, device, host):
    """The default path of a CUDA training step has no host sync: the kernels check the labels.

    (The kernels' device-side assert itself runs in the GPU tests, test_gpu_defects.py.)
    """
    assert functional._host_label_check(check_targets, torch.device(device)) is host


def test_overwrite_logits_refuses_overlapping_rows():
    """overwrite_logits=True on expanded logits (rows sharing memory) is refused before any write."""
    base = torch.randn(1, 10, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="do not overlap"):
        apl_loss(base.expand(4, 10), torch.zeros(4, dtype=torch.long), overwrite_logits=True)


# ------------------------------------------------------------------ 14. the tests' own tolerance
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_assert_close_checks_the_small_gradient_entries(dtype):
    """The contract tests catch wrong non-target entries of a wide row (K = 50257 in bf16).

    A tolerance of rtol x max|grad| let them be off by any amount below 1.6% of the target entry.
    """
    expected = torch.full((2, 50257), -1e-5 / 50257, dtype=torch.float64)
    expected[:, 7] = 1e-5                          # the target entry
    actual = expected.clone()
    actual[1, 100:200] *= 1.5                     # 50% off, far below rtol x max|grad|
    assert_close(expected.to(dtype), expected, dtype, "the expected gradient itself")
    with pytest.raises(AssertionError, match="100 of 100514 values differ"):
        assert_close(actual.to(dtype), expected, dtype, "a gradient with wrong small entries")


@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ngce+nrce", "ce", "rce"))
def test_double_backward_recovers_the_spec_from_the_op_arguments(loss):
    """A gradient penalty rebuilds the LossSpec from the op's arguments: every field must round-trip."""
    from apl_kernels.ops import spec_from_op_args
    spec = LossSpec.from_name(loss, alpha=0.3, beta=2.5, gamma=1.5, q=0.2, A=-3.0, grad="exact")
    assert spec_from_op_args(spec.op_args()) == spec
