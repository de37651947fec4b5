"""The shared backward: a scale of the saved gradient by grad_output."""
import pytest
import torch

import apl_kernels
from apl_kernels import backends


@pytest.mark.skipif(backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="the fused CPU kernel is not built")
def test_grad_scaler_scale_does_not_overflow_half_gradient():
    # GradScaler's initial scale 65536 exceeds the fp16 maximum (65504); the
    # gradient itself (scale / B * O(1)) fits, so it must stay finite.
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float16, requires_grad=True)
    target = torch.randint(0, 10, (64,))
    (apl_kernels.apl_loss(logits, target, "nce+rce", backend="cpu") * 65536.0).backward()
    fused = logits.grad.float()

    oracle = logits.detach().float().requires_grad_()
    (apl_kernels.apl_loss(oracle, target, "nce+rce", backend="reference") * 65536.0).backward()
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, oracle.grad, rtol=2e-3, atol=0.5)


@pytest.mark.skipif(backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="the fused CPU kernel is not built")
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_eager_calls_bypass_the_torch_library_autograd_wrapper(monkeypatch, reduction):
    """An eager fwd+bwd runs ops._EagerFusedLoss, the registered formula applied directly: torch.library's
    own wrapper runs fill_defaults, which reads the op's schema 17 times a call (0.1-0.25 ms of host time).
    The gradient is the reference's, and a second backward (retain_graph) still recomputes it."""
    import torch._library.utils as library_utils

    def refuse(*args, **kwargs):
        raise AssertionError("torch.library's autograd wrapper ran")

    monkeypatch.setattr(library_utils, "fill_defaults", refuse)
    torch.manual_seed(0)
    logits = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (12,))
    weights = torch.rand(12, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    loss = (apl_kernels.apl_loss(logits, target, "nce+rce", reduction=reduction, backend="cpu") * weights).sum()
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss, logits)
    oracle = logits.detach().requires_grad_()
    (apl_kernels.apl_loss(oracle, target, "nce+rce", reduction=reduction, backend="reference") * weights).sum().backward()
    torch.testing.assert_close(first, oracle.grad)
    torch.testing.assert_close(second, oracle.grad)
    assert first.data_ptr() != second.data_ptr()


@pytest.mark.skipif(backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="the fused CPU kernel is not built")
def test_grad_scaler_scale_per_row_half_gradient():
    # reduction="none" with GradScaler: grad_output is 65536 x per-row weights, an [N] fp32 tensor.
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float16, requires_grad=True)
    target = torch.randint(0, 10, (64,))
    weights = torch.rand(64) + 0.5
    per_row = apl_kernels.apl_loss(logits, target, "nfl+rce", reduction="none", backend="cpu")
    (per_row * weights * 65536.0 / 64).sum().backward()
    fused = logits.grad.float()

    oracle = logits.detach().float().requires_grad_()
    per_row = apl_kernels.apl_loss(oracle, target, "nfl+rce", reduction="none", backend="reference")
    (per_row * weights * 65536.0 / 64).sum().backward()
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, oracle.grad, rtol=2e-3, atol=0.5)


# ------------------------------------------------------------------ the C++ "scale unless 1" op
def test_cuda_scale_op_chosen_iff_its_cuda_kernel_is_registered():
    """ops.scale_gradient_ calls apl_kernels::scale_rows_ on CUDA tensors exactly when it has a CUDA kernel."""
    from apl_kernels import ops
    if ops._C is None:
        pytest.skip(f"apl_kernels._C did not import: {ops.EXTENSION_ERROR}")
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("apl_kernels::scale_rows_", "CUDA")
    assert ops._CUDA_SCALE_OP == registered == apl_kernels.build_info()["cuda"]


def _cuda_scale_op_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not apl_kernels.build_info()["cuda"]:
        return "the extension was built without CUDA"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_scale_op_reason() is not None, reason=str(_cuda_scale_op_reason()))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_cuda_scale_op_on_the_gpu(dtype):
    """torch.ops.apl_kernels.scale_rows_ on CUDA tensors against fp64 torch arithmetic: GradScaler's
    65536 (fp32 multiply), per-row scales with a stride and a NaN, rows with a stride, scale 1 bit for bit."""
    op = torch.ops.apl_kernels.scale_rows_
    g = torch.Generator().manual_seed(0)
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for N, K in ((128, 10), (5, 1300), (3, 9000), (3000, 7)):
        grad = (torch.randn(N, K, generator=g, dtype=torch.float64) * 1e-3).to(dtype).cuda()
        expected = (grad.double() * 65536.0).to(dtype)
        assert op(grad, torch.tensor(65536.0, dtype=scale_dtype, device="cuda")) is grad
        assert torch.equal(grad, expected)

        base = torch.randn(N, K + 5, generator=g, dtype=torch.float64).to(dtype).cuda()
        untouched = base.clone()
        rows = base[:, 2:2 + K]
        scales = torch.tensor([1.0, 2.0, -0.5, 0.0, 1.0, float("nan")], dtype=scale_dtype).repeat(N)[:2 * N]
        scale = scales.cuda()[::2]
        expected = (rows.double() * scale.double()[:, None]).to(dtype)
        op(rows, scale)
        torch.testing.assert_close(rows, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(base[:, :2], untouched[:, :2]) and torch.equal(base[:, 2 + K:], untouched[:, 2 + K:])

        before = base.clone()
        op(base, torch.ones((), dtype=scale_dtype, device="cuda"))
        assert torch.equal(base.view(torch.uint8), before.view(torch.uint8))
    with pytest.raises(RuntimeError, match="scale is on cpu"):
        op(torch.zeros(4, 6, device="cuda"), torch.ones(()))
    with pytest.raises(RuntimeError, match="unit column stride"):
        op(torch.zeros(4, 6, device="cuda").t(), torch.ones((), device="cuda"))
