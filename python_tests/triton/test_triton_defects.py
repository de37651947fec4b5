"""Issue 12 on the Triton backend: the backward's scale kernel, GradScaler in fp16,
double backward, independent gradients, overlapping rows in the in-place mode.

CPU tensors under TRITON_INTERPRET=1, CUDA tensors without it.  Each test names
the user action it guards.  About 20 s under the interpreter.
"""
import pytest
import torch

pytest.importorskip("triton")

from apl_kernels import LossSpec, apl_loss, backends  # noqa: E402
from apl_kernels.reference import reference_loss  # noqa: E402
from apl_kernels.spec import REDUCTIONS  # noqa: E402
from apl_kernels.triton.scale import scale_rows_  # noqa: E402

GRAD_SCALER_INIT = 65536.0   # torch.amp.GradScaler's initial scale; above the fp16 maximum 65504


# ------------------------------------------------------------------ the "scale unless 1" kernel
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_scale_kernel_multiplies_in_fp32(dtype, device):
    """grad * 65536 for an fp16 gradient of 1/B-sized entries stays finite (GradScaler step)."""
    g = torch.Generator().manual_seed(0)
    grad = (torch.randn(5, 1300, generator=g, dtype=torch.float64) * 1e-3).to(dtype).to(device)
    expected = (grad.double() * GRAD_SCALER_INIT).to(dtype)
    scale = torch.tensor(GRAD_SCALER_INIT, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device=device)
    assert scale_rows_(grad, scale) is grad
    assert torch.isfinite(grad).all()
    assert torch.equal(grad, expected)   # one rounding of the exact product


def test_scale_kernel_leaves_the_gradient_alone_at_1(device):
    """loss.backward() (grad_output 1): not a bit of the gradient changes, NaN payloads and -0 included."""
    grad = torch.randn(9, 70, device=device)
    grad[0, :3] = torch.tensor([float("nan"), -0.0, float("-inf")])
    before = grad.clone()
    scale_rows_(grad, torch.ones((), device=device))
    assert torch.equal(grad.view(torch.int32), before.view(torch.int32))


def test_scale_kernel_per_row_and_strided(device):
    """reduction="none" weights per row, an expanded grad_output (loss.sum().backward()), row strides."""
    base = torch.randn(7, 40, dtype=torch.float64, device=device)
    untouched = base.clone()
    grad = base[:, 3:33]                      # row stride 40, 30 columns
    weights = torch.tensor([1.0, 2.0, 1.0, float("nan"), 1.0, 0.0, -3.0], dtype=torch.float64, device=device)
    expected = grad * weights[:, None]
    scale_rows_(grad, weights)
    assert torch.equal(grad[~weights.isnan()], expected[~weights.isnan()]) and grad[3].isnan().all()
    assert torch.equal(base[:, :3], untouched[:, :3]) and torch.equal(base[:, 33:], untouched[:, 33:])
    ones = torch.ones((), dtype=torch.float64, device=device).expand(7)    # stride 0
    before = grad.clone()
    scale_rows_(grad, ones)
    assert torch.equal(grad[~weights.isnan()], before[~weights.isnan()])


def test_scale_kernel_rejects_bad_shapes(device):
    with pytest.raises(ValueError, match="unit column stride"):
        scale_rows_(torch.randn(4, 6, device=device).t(), torch.ones((), device=device))
    with pytest.raises(ValueError, match="0-dim or"):
        scale_rows_(torch.randn(4, 6, device=device), torch.ones(3, device=device))


# ------------------------------------------------------------------ GradScaler in fp16
@pytest.mark.parametrize("overwrite", (False, True), ids=("default", "overwrite_logits"))
def test_grad_scaler_fp16_gradient_is_finite(overwrite, device):
    """(loss * 65536).backward() with fp16 logits, as GradScaler does, gives finite, right gradients."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 10).to(device)
    x = torch.randn(64, 6, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    z = lin(x).half().detach().requires_grad_()
    h = z * 1.0                   # a non-leaf: overwrite_logits writes over it
    (apl_loss(h, y, "nce+rce", backend="triton", overwrite_logits=overwrite) * GRAD_SCALER_INIT).backward()
    zr = z.detach().float().requires_grad_()
    (reference_loss(zr, y, LossSpec.from_name("nce+rce")) * GRAD_SCALER_INIT).backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad.float(), zr.grad, rtol=4e-3, atol=1e-2)


# ------------------------------------------------------------------ double backward, aliasing
def test_gradient_penalty_second_derivative(device):
    """A gradient penalty through the Triton loss gets the right second derivative (was off by 70%)."""
    def weight_grad(backend):
        torch.manual_seed(1)
        lin = torch.nn.Linear(6, 7).double().to(device)
        x = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
        y = torch.tensor([0, 1, 2, -100, 4, 5, 6, 0, 3], device=device)
        (gx,) = torch.autograd.grad(apl_loss(lin(x), y, "nfl+rce", grad="exact", backend=backend), x,
                                    create_graph=True)
        gx.pow(2).sum().backward()
        return lin.weight.grad
    torch.testing.assert_close(weight_grad("triton"), weight_grad("reference"), rtol=1e-9, atol=1e-12)


def test_overwrite_logits_refuses_create_graph(device):
    """A gradient penalty with overwrite_logits=True raises: the logits it needs are gone."""
    lin = torch.nn.Linear(6, 7).to(device)
    x = torch.randn(5, 6, device=device, requires_grad=True)
    loss = apl_loss(lin(x), torch.zeros(5, dtype=torch.long, device=device), backend="triton",
                    overwrite_logits=True)
    with pytest.raises(RuntimeError, match="does not support create_graph"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_retain_graph_gradients_are_independent(device):
    """Two autograd.grad(..., retain_graph=True): the first gets the forward's buffer, the second a new one."""
    spec = LossSpec.from_name("nce+rce")
    z = torch.randn(8, 5, device=device, requires_grad=True)
    y = torch.randint(0, 5, (8,), device=device)
    loss, buffer = backends.fused_op("triton")(z, y, *spec.op_args(), REDUCTIONS["mean"], -100, True)
    (g1,) = torch.autograd.grad(loss, z, torch.tensor(3.0, device=device), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z, torch.tensor(3.0, device=device))
    assert g1.data_ptr() == buffer.data_ptr() and g2.data_ptr() != g1.data_ptr()
    g1 += g2
    zr = z.detach().clone().requires_grad_()
    (3 * reference_loss(zr, y, spec)).backward()
    torch.testing.assert_close(g2, zr.grad)
    torch.testing.assert_close(g1, 2 * zr.grad)


# ------------------------------------------------------------------ overlapping rows
def test_overwrite_logits_refuses_overlapping_rows(device):
    """overwrite_logits=True on expanded logits, whose rows share memory, raises instead of racing."""
    lin = torch.nn.Linear(6, 7).to(device)
    row = lin(torch.randn(1, 6, device=device))
    with pytest.raises(ValueError, match="do not overlap"):
        apl_loss(row.expand(4, 7), torch.zeros(4, dtype=torch.long, device=device), backend="triton",
                 overwrite_logits=True)
