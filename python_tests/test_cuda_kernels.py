"""The CUDA kernels against the reference: both kernel paths, odd layouts, huge
tensors, CUDA graphs and torch.compile.  Marker `gpu`: skipped without a CUDA
device or without a CUDA build of apl_kernels._C.

The same cases run on the CPU, on the CUDA emulator, in
python_tests/cuda_emu/test_emu_kernels.py, which imports the tables and checks
below (so this module imports without a GPU)."""
import math

import pytest
import torch

import apl_kernels
from apl_kernels import LossSpec, apl_loss
from apl_kernels.reference import reference_loss
from apl_testing import assert_close

def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    info = apl_kernels.build_info()
    if not info["cuda"]:
        return f"apl_kernels was built without CUDA kernels ({info['extension_error'] or 'CPU-only build'})"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOSSES = ["nce+rce", "nfl+nmae", "ngce+nrce", "ce", "fl+mae", "gce+rce", "nce+mae"]
# (loss rtol, grad rtol): gradients are stored in the logits' dtype.
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.float16: (2e-4, 4e-3),
       torch.bfloat16: (2e-4, 2e-2)}


def make(N, K, dtype, *, scale=4.0, ignore_frac=0.1, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(N, K, generator=g, device=device) * scale).to(dtype)
    target = torch.randint(0, K, (N,), generator=g, device=device)
    ignored = torch.rand(N, generator=g, device=device) < ignore_frac
    return logits, torch.where(ignored, torch.full_like(target, -100), target)


def run_cuda(logits, target, loss, reduction="mean", **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = apl_loss(x, target, loss, reduction=reduction, backend="cuda", **kw)
    (out.sum() if reduction == "none" else out).backward()
    return out.detach(), x.grad


def run_reference(logits, target, loss, reduction="mean", ignore_index=-100):
    x = logits.detach().double().requires_grad_(True)
    out = reference_loss(x, target, LossSpec.from_name(loss), reduction, ignore_index)
    (out.sum() if reduction == "none" else out).backward()
    return out.detach(), x.grad


def check(logits, target, loss, reduction="mean", rows=None, run=run_cuda):
    """`run` (the CUDA kernel) vs the fp64 reference (on `rows` only, if given, to keep huge cases cheap)."""
    out, grad = run(logits, target, loss, reduction)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape and grad.is_contiguous()
    loss_rtol, grad_rtol = TOL[logits.dtype]
    if rows is not None:
        assert reduction == "none"
        logits, target, out, grad = logits[rows], target[rows], out[rows], grad[rows]
    ref_out, ref_grad = run_reference(logits, target, loss, reduction)
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    loss_scale = max(ref_out.abs().max().item(), 1.0) if ref_out.numel() else 1.0
    torch.testing.assert_close(out.double(), ref_out, rtol=loss_rtol, atol=loss_rtol * 1e-2 * loss_scale)
    # Each element against its own magnitude (apl_testing.TOLERANCES): a bound of
    # rtol x max|grad| would leave the small non-target entries of a large K unchecked.
    assert_close(grad, ref_grad, logits.dtype, f"{loss} {reduction} {tuple(logits.shape)} gradient")


# ---------------------------------------------------------------- both kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [2, 3, 10, 31, 62, 100, 257, 1000, 1024])
@pytest.mark.parametrize("loss", LOSSES)
def test_small_k(K, dtype, loss):
    logits, target = make(173, K, dtype)
    check(logits, target, loss)


@pytest.mark.parametrize("tiny", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [2, 7, 10, 16, 18])
def test_tiny_rows_both_layouts(monkeypatch, K, dtype, tiny):
    """K up to 10 (fp32) / 18 (16-bit): a thread per row, or (APL_CUDA_TINY_ROWS=0) lanes per row."""
    monkeypatch.setenv("APL_CUDA_TINY_ROWS", tiny)
    logits, target = make(1000, K, dtype)
    for loss in ("nce+rce", "nfl+nmae", "ngce+nrce"):
        check(logits, target, loss)
    check(logits, target, "nce+rce", "none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K", [10, 1000, 5000])
def test_reductions(K, reduction):
    logits, target = make(300, K, torch.float32)
    check(logits, target, "nce+rce", reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1025, 4099, 20000])
@pytest.mark.parametrize("loss", ["nce+rce", "nfl+mae", "ngce+nrce", "ce"])
def test_large_k_smem_resident(K, dtype, loss):
    logits, target = make(700 if K < 5000 else 60, K, dtype)
    check(logits, target, loss)


@pytest.mark.parametrize("smem", ["0", "4096", "40000"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_k_streamed_tail(monkeypatch, smem, dtype):
    """Rows longer than the shared memory allowed: the tail is re-read in each pass."""
    monkeypatch.setenv("APL_CUDA_SMEM_PER_BLOCK", smem)
    logits, target = make(50, 30011, dtype)
    for loss in ("nce+rce", "nfl+nmae", "ngce+mae"):
        check(logits, target, loss)


@pytest.mark.parametrize("loss", ["ce", "nce+rce", "nfl+rce", "ngce+mae", "nce+nnce", "nce+amse"])
def test_large_k_rows_with_a_large_offset(loss):
    """Rows offset by 1e4: large_k_fixed's exps are 2^(z log2 e - c) with c = max log2 e rounded, whose
    rounding (up to 5e-4 in the exponent here) is taken back once per row (ShiftedExp2).  The CUDA
    emulator runs this device form too (test_emu_kernels.py), with exact stand-ins for MUFU."""
    logits, target = make(64, 20000, torch.float32)
    check(logits + 1e4, target, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_longer_than_shared_memory(dtype):
    logits, target = make(6, 300_001, dtype, ignore_frac=0.0)
    check(logits, target, "nce+rce")


def test_many_rows_grid_loops():
    logits, target = make(2_000_003, 3, torch.bfloat16)
    check(logits, target, "nce+rce", "none", rows=slice(-5000, None))
    check(logits, target, "nce+rce", "mean")


# ---------------------------------------------------------------- layouts
def _views(N, K, dtype, device="cuda"):
    """Logits with odd storage offsets and row strides (16-byte alignment broken)."""
    base = torch.randn(N + 2, K + 7, device=device).mul(4).to(dtype)
    flat = torch.randn(N * K + 3, device=device).mul(4).to(dtype)
    return {
        "column_offset_1": base[1:N + 1, 1:K + 1],
        "column_offset_3_stride": base[:N, 3:K + 3],
        "flat_offset": flat[3:].view(N, K),
        "every_other_row": torch.randn(2 * N, K + 1, device=device).mul(4).to(dtype)[::2, :K],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [5, 13, 37, 999, 1031, 5003])
def test_misaligned_rows(K, dtype):
    for name, logits in _views(64, K, dtype).items():
        assert logits.stride(1) == 1
        target = torch.randint(0, K, (64,), device="cuda")
        check(logits, target, "nce+rce")
        check(logits, target, "ngce+mae")


def test_nd_logits():
    logits = torch.randn(4, 11, 5, 3, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, 11, (4, 5, 3), device="cuda")
    out, grad = run_cuda(logits, target, "nce+rce")
    x = logits.detach().double().requires_grad_(True)
    ref = reference_loss(x, target, LossSpec.from_name("nce+rce"), "mean", -100)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-4, atol=1e-6)
    assert_close(grad, x.grad, logits.dtype, "nce+rce N-D gradient")


# ---------------------------------------------------------------- targets
_BAD_TARGET_SCRIPT = """
import torch
from apl_kernels import LossSpec
from apl_kernels.spec import REDUCTIONS
K = {K}
logits = torch.randn(20, K, device="cuda")
target = torch.randint(0, K, (20,), device="cuda")
target[7] = K
loss, grad = torch.ops.apl_kernels.fused_loss(logits, target, *LossSpec.from_name("nce+rce").op_args(),
                                              REDUCTIONS["mean"], -100, True)
try:
    torch.cuda.synchronize()
except RuntimeError as e:
    print("RAISED", e)
"""


@pytest.mark.parametrize("K", [10, 3000])
def test_bad_target_is_a_device_side_assert(K):
    """A label outside [0, K) that is not ignore_index: a device-side assert, as F.cross_entropy
    (no host sync).  It poisons the CUDA context, so it runs in a child process."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _BAD_TARGET_SCRIPT.format(K=K)], capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert "RAISED" in out and "device-side assert" in out, out
    assert "outside [0, K)" in out or "Assertion" in out, out


def test_default_path_is_one_launch():
    """[128, 10] mean, gradient wanted: the op queues one kernel (it counts the kept rows itself)
    and no memset or copy."""
    from torch.profiler import ProfilerActivity, profile
    from apl_kernels.spec import REDUCTIONS
    logits, target = make(128, 10, torch.float32)
    args = (*LossSpec.from_name("nce+rce").op_args(), REDUCTIONS["mean"], -100, True)
    torch.ops.apl_kernels.fused_loss(logits, target, *args)  # warm-up (plans, attributes)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.ops.apl_kernels.fused_loss(logits, target, *args)
        torch.cuda.synchronize()
    device_ops = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(device_ops) == 1 and "small_k_kernel" in device_ops[0], device_ops


@pytest.mark.parametrize("K", [10, 3000])
def test_all_rows_ignored(K):
    logits = torch.randn(9, K, device="cuda")
    target = torch.full((9,), -100, device="cuda")
    for reduction in ("mean", "sum"):
        out, grad = run_cuda(logits, target, "nce+rce", reduction)
        assert out.item() == 0.0 and grad.eq(0).all()


def test_empty_batch():
    for reduction in ("mean", "sum", "none"):
        out, grad = run_cuda(torch.randn(0, 10, device="cuda"), torch.zeros(0, dtype=torch.long, device="cuda"),
                             "nce+rce", reduction)
        assert grad.shape == (0, 10)
        if reduction != "none":
            assert out.item() == 0.0


def test_ignore_index_inside_range():
    logits, target = make(50, 10, torch.float32, ignore_frac=0.0)
    out, grad = run_cuda(logits, target, "nce+rce", "none", ignore_index=0)
    ref_out, ref_grad = run_reference(logits, target, "nce+rce", "none", ignore_index=0)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-4, atol=1e-6)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("K", [10, 1000, 30000])
def test_deterministic(K):
    logits, target = make(5000 if K < 30000 else 200, K, torch.bfloat16)
    a = run_cuda(logits, target, "nfl+rce")
    b = run_cuda(logits, target, "nfl+rce")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_side_stream():
    logits, target = make(1000, 500, torch.float32)
    expected = run_cuda(logits, target, "nce+rce")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run_cuda(logits, target, "nce+rce")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


@pytest.mark.parametrize("K", [10, 4000])
def test_cuda_graph_capture(K):
    """Forward and backward captured once, replayed on new data: no host sync inside."""
    logits, target = make(256, K, torch.float32)
    x = logits.clone().requires_grad_(True)
    static_target = target.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        for _ in range(2):
            x.grad = None
            apl_loss(x, static_target, "nce+rce", backend="cuda").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = apl_loss(x, static_target, "nce+rce", backend="cuda")
        static_loss.backward()
    for seed in (1, 2):
        new_logits, new_target = make(256, K, torch.float32, seed=seed)
        with torch.no_grad():
            x.copy_(new_logits)
        static_target.copy_(new_target)
        graph.replay()
        ref_out, ref_grad = run_reference(new_logits, new_target, "nce+rce")
        torch.testing.assert_close(static_loss.detach().double(), ref_out, rtol=2e-4, atol=1e-6)
        assert_close(x.grad, ref_grad, torch.float32, f"graph replay {seed} gradient")


def test_torch_compile_training_step():
    """Model and loss in one fullgraph-compiled function; the backward runs the op's autograd."""
    torch._dynamo.reset()
    model = torch.nn.Linear(32, 100).cuda()
    eager_model = torch.nn.Linear(32, 100).cuda()
    eager_model.load_state_dict(model.state_dict())
    data = torch.randn(64, 32, device="cuda")
    target = torch.randint(0, 100, (64,), device="cuda")
    target[5] = -100

    compiled = torch.compile(lambda x, y: apl_loss(model(x), y, "nce+rce", backend="cuda"), fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the second step reuses the compiled graph on updated weights
        opt.zero_grad()
        loss = compiled(data, target)
        loss.backward()
        eager_model.zero_grad()
        eager_loss = apl_loss(eager_model(data), target, "nce+rce", backend="cuda")
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.weight.grad, eager_model.weight.grad, rtol=1e-4, atol=1e-6)
        opt.step()
        with torch.no_grad():
            for p, q in zip(eager_model.parameters(), model.parameters()):
                p.copy_(q)


# ---------------------------------------------------------------- more than 2^31 elements
def _need_free(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


@pytest.mark.slow
@pytest.mark.parametrize("K", [1000, 65536])
def test_more_than_2_31_elements(K):
    N = 2**31 // K + 3
    _need_free(5 * N * K * 2 + 2**30)  # bf16 logits, a copy, grad, grad * grad_output
    torch.cuda.empty_cache()
    logits = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    logits.normal_(0, 4)
    target = torch.randint(0, K, (N,), device="cuda")
    rows = slice(N - 4, N)  # the rows beyond 2^31 elements
    check(logits, target, "nce+rce", "none", rows=rows)
    out, _ = run_cuda(logits, target, "nce+rce", "mean")
    assert math.isfinite(out.item())
