"""The CUDA "scale unless 1" op (csrc/cuda/apl_cuda_scale.cu, apl_kernels::scale_rows_) under the emulator.

grad[i, :] *= scale (0-dim) or scale[i] ([N]) in place, multiplied in fp32
(fp64 for fp64 gradients).  Expected values are plain torch arithmetic in fp64
on the inputs; the scales are chosen so that fp64 and fp32 products round alike
(power-of-two or few-bit scales), so every comparison is exact.  Each call runs
under the forward and reverse block orders, which must agree bit for bit.
A few seconds once the emulated op is built.
"""
import pytest
import torch

from emu_helpers import as_bytes, env

pytestmark = pytest.mark.usefixtures("emu_op")

GRAD_SCALER_INIT = 65536.0   # torch.amp.GradScaler's initial scale; above the fp16 maximum 65504


def scale_emulated(grad, scale):
    """torch.ops.apl_kernels_emu.scale_rows_(grad, scale) in place under two block orders; returns grad."""
    results = []
    for schedule in ("reverse", "forward"):   # the last one runs on `grad` itself
        target = grad
        if schedule == "reverse":             # a copy with the same strides
            target = torch.empty_strided(grad.shape, grad.stride(), dtype=grad.dtype).copy_(grad)
        with env(CUDA_EMU_SCHEDULE=schedule):
            out = torch.ops.apl_kernels_emu.scale_rows_(target, scale)
        assert out is target, "scale_rows_ returns its gradient argument"
        results.append(target)
    assert torch.equal(as_bytes(results[0]), as_bytes(results[1])), "block orders disagree"
    return grad


def fp64_expected(grad, scale):
    """grad * scale in fp64 (scale per row for [N]), rounded once to grad's dtype."""
    s = scale.double()
    return (grad.double() * (s[:, None] if s.dim() == 1 else s)).to(grad.dtype)


def randn(N, K, dtype, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g, dtype=torch.float64) * magnitude).to(dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_grad_scaler_scale_multiplies_in_fp32(dtype):
    """* 65536 (inf in fp16) of 1/B-sized gradient entries: finite, and the fp64 product rounded once."""
    grad = randn(5, 1300, dtype, magnitude=1e-3)   # 3 rows a block: 2 blocks
    scale = torch.tensor(GRAD_SCALER_INIT, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    expected = fp64_expected(grad, scale)
    scale_emulated(grad, scale)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_per_row_scale_with_stride_and_row_stride(dtype):
    """reduction "none": scale[i] per row, read with its stride; rows with a stride > K; the columns
    around the gradient are not touched."""
    N, K = 37, 45
    base = randn(N, K + 9, dtype, seed=1)
    untouched = base.clone()
    grad = base[:, 4:4 + K]                            # row stride K + 9, storage offset 4
    scales = torch.tensor([2.0, -3.0, 0.5, 0.0, 1.0, 1.25, -0.75], dtype=torch.float32)
    scale_storage = scales.repeat(11)[:2 * N].clone()  # scale = every second element: stride 2
    scale = scale_storage[::2]
    assert scale.stride() == (2,)
    expected = fp64_expected(grad, scale)
    scale_emulated(grad, scale)
    assert torch.equal(grad, expected)
    assert torch.equal(base[:, :4], untouched[:, :4]) and torch.equal(base[:, 4 + K:], untouched[:, 4 + K:])


def test_scale_one_leaves_every_bit_alone():
    """loss.backward() (grad_output 1): NaN payloads, -0 and inf unchanged, 0-dim and per-row (stride 0)."""
    grad = randn(300, 10, torch.float32, seed=2)
    grad[0, :4] = torch.tensor([float("nan"), -0.0, float("-inf"), 1e-45])
    grad.view(torch.int32)[1, 0] = 0x7FC12345                  # a NaN with a payload
    before = as_bytes(grad).clone()
    scale_emulated(grad, torch.ones(()))
    assert torch.equal(as_bytes(grad), before)
    scale_emulated(grad, torch.ones((), dtype=torch.float64).expand(300))
    assert torch.equal(as_bytes(grad), before)


def test_nan_scale_is_applied():
    """A NaN grad_output is not 1: it reaches the gradient (0-dim: every entry; per row: that row)."""
    grad = randn(9, 70, torch.float32, seed=3)
    expected = fp64_expected(grad, torch.tensor([1.0, 2.0, 1.0, 1.0, float("nan"), 1.0, 0.0, -3.0, 1.0]))
    per_row = grad.clone()
    scale_emulated(per_row, torch.tensor([1.0, 2.0, 1.0, 1.0, float("nan"), 1.0, 0.0, -3.0, 1.0]))
    assert per_row[4].isnan().all() and not per_row[torch.arange(9) != 4].isnan().any()
    assert torch.equal(per_row[torch.arange(9) != 4], expected[torch.arange(9) != 4])
    scale_emulated(grad, torch.tensor(float("nan")))
    assert grad.isnan().all()


@pytest.mark.parametrize("N, K", [(600, 10), (3, 5000), (2, 9000), (1, 1), (513, 1)])
def test_several_blocks_each_scale_its_own_rows(N, K):
    """More elements than a block covers (whole rows, or chunks of a long row): a block whose scales
    are all 1 skips, the others scale every element of their rows."""
    grad = randn(N, K, torch.float32, seed=4)
    scale = torch.ones(N)
    scale[N // 2] = 2.0
    scale[-1] = -0.5
    expected = fp64_expected(grad, scale)
    scale_emulated(grad, scale)
    assert torch.equal(grad, expected)
    whole = randn(N, K, torch.bfloat16, seed=5)
    expected = fp64_expected(whole, torch.tensor(4.0))
    scale_emulated(whole, torch.tensor(4.0))
    assert torch.equal(whole, expected)


def test_mixed_scale_dtypes_convert_the_scale_first():
    """An fp64 scale of an fp32 gradient is rounded to fp32 and multiplied in fp32 (as the Triton kernel)."""
    grad = randn(4, 33, torch.float32, seed=6)
    scale = torch.tensor(1.0 + 2.0 ** -40, dtype=torch.float64)  # not 1 in fp64, 1 in fp32
    before = grad.clone()
    scale_emulated(grad, scale)
    assert torch.equal(grad, before)
    half = randn(4, 33, torch.float16, seed=7, magnitude=1e-3)
    expected = fp64_expected(half, torch.tensor(GRAD_SCALER_INIT))
    scale_emulated(half, torch.tensor(GRAD_SCALER_INIT, dtype=torch.bfloat16))
    assert torch.equal(half, expected)


def test_empty_gradient():
    for grad in (torch.empty(0, 10), torch.empty(5, 0)):
        scale_emulated(grad, torch.tensor(2.0))


@pytest.mark.parametrize("grad, scale, message", [
    (torch.zeros(2, 3, 4), torch.ones(()), "2-D gradient with unit column stride"),
    (torch.zeros(4, 6).t(), torch.ones(()), "2-D gradient with unit column stride"),
    (torch.zeros(4, 6), torch.ones(3), r"scale must be 0-dim or \[4\]"),
    (torch.zeros(4, 6), torch.ones(4, 1), r"scale must be 0-dim or \[4\]"),
    (torch.zeros(4, 6, dtype=torch.int32), torch.ones(()), "must be float16, bfloat16, float32 or float64"),
    (torch.zeros(4, 6), torch.ones((), dtype=torch.int64), "must be float16, bfloat16, float32 or float64"),
    (torch.zeros(1, 6).expand(4, 6), torch.ones(()), "single memory location"),
], ids=["3-d", "column-stride", "scale-shape", "scale-2d", "int-grad", "int-scale", "overlapping-rows"])
def test_bad_input_is_refused_with_a_clear_error(grad, scale, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.apl_kernels_emu.scale_rows_(grad, scale)
