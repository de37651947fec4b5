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
