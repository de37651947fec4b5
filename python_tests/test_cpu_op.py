"""The CPU op called directly: schema, dtypes, the gradient folded into the
forward, threads, strides, the C++ argument checks and the path of rows with few classes."""
import math

import pytest
import torch

from apl_kernels import LossSpec
from apl_kernels.spec import REDUCTIONS

from apl_testing import (ALL_LOSSES, assert_close, compare_with_reference, make_inputs, make_spec,
                         reference_loss_and_grad)

op = torch.ops.apl_kernels.fused_loss.default


def _call(x, y, spec=LossSpec(), reduction="mean", ignore_index=-100, compute_grad=True):
    return op(x, y, *spec.op_args(), REDUCTIONS[reduction], ignore_index, compute_grad)


def test_schema():
    schema = str(op._schema)
    assert schema.startswith("apl_kernels::fused_loss(Tensor logits, Tensor target, int active, int passive, "
                             "float alpha, float beta, float gamma, float q, float A, int grad_mode, float a, "
                             "float m, int t, float min_prob, int reduction, int ignore_index, bool compute_grad) "
                             "-> (Tensor loss, Tensor grad)")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_output_dtypes_and_shapes(dtype, reduction):
    x, y = make_inputs(6, 5, dtype)
    loss, grad = _call(x, y, reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ((6,) if reduction == "none" else ())
    assert grad.dtype == dtype and grad.shape == (6, 5) and grad.is_contiguous()
    _, no_grad = _call(x, y, reduction=reduction, compute_grad=False)
    assert no_grad.numel() == 0
    loss2, _ = _call(x, y, reduction=reduction, compute_grad=False)
    assert torch.equal(loss, loss2)


@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_forward_gradient_has_the_reduction_weight(reduction):
    """grad = d(sum of the reduced loss)/d logits: 1/count for mean, count of kept rows."""
    x, y = make_inputs(10, 7, torch.float64, ignore_every=3)
    spec = LossSpec.from_name("nfl+rce")
    loss, grad = _call(x, y, spec, reduction)
    ref_loss, ref_grad = reference_loss_and_grad(x, y, spec, reduction)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


def test_unit_grad_output_needs_no_pass():
    """backward with grad_output == 1 returns the forward's gradient itself."""
    x, y = make_inputs(8, 6, torch.float32)
    x.requires_grad_()
    loss, grad = _call(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert g.data_ptr() == grad.data_ptr()
    loss, grad = _call(x, y)
    expected = 0.5 * grad      # before the backward, which scales the buffer in place
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(0.5))
    assert_close(g2, expected, torch.float32, "scaled")


def test_large_gradient_is_an_ordinary_tensor():
    """The gradient comes from the allocator that advises huge pages and caches freed buffers
    (csrc/cpu/grad_buffer.cpp): still right, resizable, and seen by torch.profiler."""
    x, y = make_inputs(1024, 1100, torch.float32)  # 4.3 MiB
    spec = LossSpec.from_name("nce+rce")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, grad = _call(x, y, spec)
    allocated = sum(e.cpu_memory_usage for e in prof.key_averages() if e.key == "apl_kernels::fused_loss")
    assert allocated >= grad.numel() * grad.element_size()
    ref_loss, ref_grad = reference_loss_and_grad(x.double(), y, spec, "mean")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
    before = grad.clone()
    grad.resize_(2048, 1100)  # reallocates through the same allocator, keeping the contents
    assert torch.equal(grad[:1024], before)
    grad[1024:] = 1.0
    assert grad.sum().isfinite()


def test_freed_gradient_buffer_is_reused():
    """A freed gradient goes to the cache of csrc/cpu/grad_buffer.cpp and comes back for the next
    gradient of its size, even when malloc has handed its memory to another tensor meanwhile."""
    x, y = make_inputs(512, 1100, torch.float32)   # 2.1 MiB
    _, grad = _call(x, y)
    first = grad.data_ptr()
    del grad
    other = torch.empty(512 * 1100)   # what malloc would give the freed block to
    _, grad = _call(x, y)
    assert grad.data_ptr() == first and other.data_ptr() != first


def test_reused_gradient_buffer_is_overwritten():
    """A reused buffer holds the last gradient: every entry is written again, ignored rows (0) and
    rows with a label out of range (NaN, never read) included."""
    x, y = make_inputs(64, 300, torch.float32)
    for _ in range(2):
        _, grad = _call(x * 5, y, reduction="sum")
        assert (grad != 0).all()
        del grad
    bad = y.clone()
    bad[::2] = -100
    bad[1::4] = 300
    loss, grad = _call(x, bad, reduction="none")
    assert torch.equal(grad[::2], torch.zeros_like(grad[::2])) and grad[1::4].isnan().all()
    ref_loss, ref_grad = reference_loss_and_grad(x.double()[3::4], bad[3::4], LossSpec(), "none")
    assert_close(grad[3::4], ref_grad, torch.float32, "grad")


def test_deterministic_across_thread_counts():
    x, y = make_inputs(3000, 50, torch.float32, ignore_every=7)
    spec = LossSpec.from_name("nce+rce")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_call(x, y, spec))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_row_stride_read_in_place():
    base, y = make_inputs(16, 30, torch.float64)
    x = base[:, 3:13]  # stride (30, 1)
    y = y % 10
    loss, grad = _call(x, y, reduction="none")
    ref_loss, ref_grad = reference_loss_and_grad(x.contiguous(), y, LossSpec(), "none")
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


def test_cpp_argument_checks():
    x, y = make_inputs(4, 6, torch.float32)
    with pytest.raises(RuntimeError, match="stride"):
        _call(x.t().contiguous().t(), y)
    with pytest.raises(RuntimeError, match="int64"):
        _call(x, y.int())
    with pytest.raises(RuntimeError, match="target must be"):
        _call(x, y[:3])
    with pytest.raises(RuntimeError, match="K >= 2"):
        _call(x[:, :1], y)
    extra = (1.0, 0.0, 1, 1e-7)  # a, m, t, min_prob
    with pytest.raises(RuntimeError, match="active"):
        op(x, y, 9, 0, 1.0, 1.0, 0.5, 0.7, -9.2, 0, *extra, 1, -100, True)
    with pytest.raises(RuntimeError, match="passive"):
        op(x, y, 0, 11, 1.0, 1.0, 0.5, 0.7, -9.2, 0, *extra, 1, -100, True)
    with pytest.raises(RuntimeError, match="both terms"):
        op(x, y, 0, 0, 1.0, 1.0, 0.5, 0.7, -9.2, 0, *extra, 1, -100, True)
    with pytest.raises(RuntimeError, match="reduction"):
        op(x, y, 3, 2, 1.0, 1.0, 0.5, 0.7, -9.2, 0, *extra, 5, -100, True)
    with pytest.raises(RuntimeError, match="Taylor order"):
        op(x, y, 1, 0, 1.0, 1.0, 0.5, 0.7, -9.2, 0, 1.0, 0.0, 0, 1e-7, 1, -100, True)


def test_large_k_half():
    """fp16 logits with K = 50257: fp32 accumulation keeps the sums accurate."""
    x, y = make_inputs(4, 50257, torch.float16)
    spec = LossSpec.from_name("nce+rce")
    loss, grad = _call(x, y, spec)
    compare_with_reference(loss, grad, x, y, spec, "mean", label="fp16 K=50257")


# Rows of K <= 16 classes take the kernel's tile path (csrc/cpu/fused_rows_impl.h,
# small_k_tile: 16 rows at a time, one per vector lane, from a transposed copy).
# 37 rows leave a short last tile; the special rows sit inside tiles.
SMALL_K_ROWS = 37


def _small_k_inputs(k, dtype, row_stride_pad=0, non_finite=False):
    """[37, k] logits (a column slice of a wider tensor if row_stride_pad) with
    ignored rows, a masked class, and with non_finite NaN, +inf and all -inf rows."""
    wide, target = make_inputs(SMALL_K_ROWS, k + row_stride_pad, torch.float64, seed=k, ignore_every=4)
    wide[3, 0] = -math.inf  # a class with p = 0 (label elsewhere: make sure)
    target[3] = 1
    if non_finite:
        wide[6, k - 1] = math.nan
        wide[10, 0] = math.inf
        wide[18, :k] = -math.inf  # second tile
        wide[35, 1] = math.nan    # the short last tile
    logits = wide.to(dtype)[:, :k]
    target = target % k if row_stride_pad else target
    target[::4] = -100
    return logits, target


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_small_k_tiles_every_loss(loss):
    """Every term and pair at K = 3 in fp64, special rows included, per row."""
    spec = make_spec(loss, m=3.0) if loss.startswith("ece") else make_spec(loss)
    x, y = _small_k_inputs(3, torch.float64, non_finite=True)
    row_loss, grad = _call(x, y, spec, "none")
    ref_loss, ref_grad = reference_loss_and_grad(x, y, spec, "none")
    assert_close(row_loss, ref_loss, torch.float64, f"{loss} loss")
    assert_close(grad, ref_grad, torch.float64, f"{loss} grad")
    assert torch.isnan(row_loss[[6, 10, 18, 35]]).all() and torch.isnan(grad[[6, 10, 18, 35]]).all()


@pytest.mark.parametrize("k", (2, 7, 16, 17))  # 17: the first K of the per-row path
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("loss", ("ce", "nce+rce", "nfl+nnfl", "ngce+amse"))
def test_small_k_tiles_dtypes_strides_reductions(k, dtype, loss):
    spec = make_spec(loss)
    for pad in (0, 5):
        x, y = _small_k_inputs(k, dtype, row_stride_pad=pad)
        for reduction in REDUCTIONS:
            loss_value, grad = _call(x, y, spec, reduction)
            compare_with_reference(loss_value, grad, x, y, spec, reduction,
                                   label=f"{loss} K={k} {dtype} row stride {x.stride(0)} {reduction}")


def test_small_k_out_of_range_labels():
    """Unchecked bad labels inside a tile: their rows are NaN, the other rows unchanged."""
    x, y = _small_k_inputs(4, torch.float32)
    bad = y.clone()
    bad[[2, 20]] = torch.tensor([4, -3])
    spec = LossSpec.from_name("nce+rce")
    row_loss, grad = _call(x, bad, spec, "none")
    assert torch.isnan(row_loss[[2, 20]]).all() and torch.isnan(grad[[2, 20]]).all()
    keep = torch.tensor([i for i in range(SMALL_K_ROWS) if i not in (2, 20)])
    good_loss, good_grad = _call(x[keep], y[keep], spec, "none")
    assert torch.equal(row_loss[keep], good_loss) and torch.equal(grad[keep], good_grad)
