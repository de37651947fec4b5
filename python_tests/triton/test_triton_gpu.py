"""GPU-only checks of the Triton backend: half precision, compile, CUDA graphs,
more than 2^31 elements, launch count.  Skipped without CUDA (and under the
interpreter, which runs CPU tensors), except the CPU test of the gradient check
itself (test_gradient_check_sees_one_wrong_small_entry).

Gradients are checked element by element against their own magnitude
(apl_testing.assert_close): a tolerance of rtol x max|grad| would leave every
small non-target entry of a large K unchecked in bf16."""
import pytest
import torch

pytest.importorskip("triton")

from apl_kernels import LossSpec, apl_loss  # noqa: E402
from apl_kernels.reference import reference_loss  # noqa: E402

from apl_testing import assert_close  # noqa: E402
from apl_triton_helpers import INTERPRET, regime  # noqa: E402

_GPU_MARKS = (pytest.mark.gpu,
              pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (no interpreter)"))


def _gpu(test):
    for mark in _GPU_MARKS:
        test = mark(test)
    return test


def _logits(n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, k, device="cuda", generator=g) * 3).to(dtype)


def _target(n, k, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randint(0, k, (n,), device="cuda", generator=g)
    y[::7] = -100
    return y


def _reference(x, y, spec, reduction="mean"):
    xr = x.detach().double().requires_grad_()
    loss = reference_loss(xr, y, spec, reduction)
    loss.sum().backward()
    return loss.detach(), xr.grad


@_gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("loss", ("nce+rce", "nce+mae", "nfl+rce", "ngce+nrce", "ce", "fl+mae"))
@pytest.mark.parametrize("shape", ((128, 10), (256, 1000), (300, 20000), (8, 131072)), ids=str)
def test_half_precision(loss, dtype, shape):
    """fp32 accumulation; loss in fp32, gradient in the logits' dtype, within its rounding."""
    x, y = _logits(*shape, dtype), _target(shape[0], shape[1])
    spec = LossSpec.from_name(loss)
    xt = x.clone().requires_grad_()
    got = apl_loss(xt, y, spec, backend="triton")
    got.backward()
    assert got.dtype == torch.float32 and xt.grad.dtype == dtype
    ref_loss, ref_grad = _reference(x, y, spec)
    torch.testing.assert_close(got.double(), ref_loss, rtol=1e-4, atol=1e-5)
    assert_close(xt.grad, ref_grad, dtype, f"{loss} {dtype} {shape} gradient")


@_gpu
@pytest.mark.parametrize("regime_name", ("single", "tiles", "chunked"))
def test_half_precision_forced_regimes(regime_name):
    x, y = _logits(64, 37, torch.bfloat16), _target(64, 37)
    spec = LossSpec.from_name("nfl+rce")
    xt = x.clone().requires_grad_()
    with regime(regime_name):
        got = apl_loss(xt, y, spec, backend="triton", reduction="none")
    got.sum().backward()
    ref_loss, ref_grad = _reference(x, y, spec, "none")
    torch.testing.assert_close(got.double(), ref_loss, rtol=1e-4, atol=1e-5)
    assert_close(xt.grad, ref_grad, torch.bfloat16, f"{regime_name} gradient")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 100)).cuda()


@_gpu
@pytest.mark.parametrize("overwrite", (False, True))
def test_compile_fullgraph_training_step(overwrite):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 32, device="cuda"), _target(256, 100)

    def loss_fn(x, y):
        return apl_loss(model(x), y, "nce+rce", backend="triton", overwrite_logits=overwrite)

    compiled = torch.compile(loss_fn, fullgraph=True)
    for _ in range(3):   # several steps: recompiles would show up as errors with fullgraph
        opt.zero_grad()
        loss = compiled(x, y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.zero_grad()
        ref = reference_loss(model(x), y, LossSpec.from_name("nce+rce"))
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        opt.step()


@_gpu
@pytest.mark.parametrize("shape", ((128, 10), (64, 50000)), ids=str)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_cuda_graph_capture(shape, reduction):
    """Forward + backward captured in a CUDA graph (no host sync), replayed on new data."""
    n, k = shape
    static_x = torch.zeros(n, k, device="cuda", requires_grad=True)
    static_y = torch.zeros(n, dtype=torch.long, device="cuda")
    weight = torch.rand(n if reduction == "none" else (), device="cuda") + 0.5
    spec = LossSpec.from_name("nfl+rce")

    def step():
        loss = apl_loss(static_x, static_y, spec, reduction=reduction, backend="triton", check_targets=False)
        (loss * weight).sum().backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):   # warm-up compiles the kernels outside the capture
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed in (3, 4):
        with torch.no_grad():
            static_x.copy_(_logits(n, k, torch.float32, seed))
            static_y.copy_(_target(n, k, seed + 10))
        graph.replay()
        torch.cuda.synchronize()
        xr = static_x.detach().double().requires_grad_()
        ref = reference_loss(xr, static_y, spec, reduction)
        (ref * weight.double()).sum().backward()
        torch.testing.assert_close(static_loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(static_x.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)


@_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on a non-current device)")
@pytest.mark.parametrize("shape", ((128, 10), (4096, 1000), (16, 50000)), ids=str)
def test_tensors_on_a_non_current_device(shape):
    """Logits on cuda:1 while cuda:0 is current: the launch runs on cuda:1 (device guard).

    Without the guard Triton launches on the current device with cuda:1 pointers
    (an illegal address or a wrong result); the three shapes take the single,
    tiles and chunked launch paths.
    """
    n, k = shape
    spec = LossSpec.from_name("nfl+rce")
    with torch.cuda.device(0):
        x = _logits(n, k, torch.float32).to("cuda:1").requires_grad_()
        y = _target(n, k).to("cuda:1")
        loss = apl_loss(x, y, spec, backend="triton")
        loss.backward()
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert loss.device == x.grad.device == torch.device("cuda:1")
    ref_loss, ref_grad = _reference(x.detach(), y, spec)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@_gpu
@pytest.mark.parametrize("k", (1000, 131072))
def test_more_than_2_31_elements(k):
    """int64 offsets: rows beyond element 2^31 are read and written at the right place."""
    n = (2 ** 31) // k + 64
    need = n * k * 2 * 3 + (2 << 30)   # bf16 logits, fused gradient, scaled x.grad + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    x.normal_(0, 3)
    y = torch.randint(0, k, (n,), device="cuda")
    x.requires_grad_()
    spec = LossSpec.from_name("nce+rce")
    loss = apl_loss(x, y, spec, reduction="none", backend="triton", check_targets=False)
    loss.sum().backward()
    for rows in (slice(0, 4), slice(n - 68, n)):   # before and beyond 2^31
        xr = x.detach()[rows].double().requires_grad_()
        ref = reference_loss(xr, y[rows], spec, "none")
        ref.sum().backward()
        torch.testing.assert_close(loss[rows].double(), ref.detach(), rtol=1e-4, atol=1e-5)
        assert_close(x.grad[rows], xr.grad, torch.bfloat16, f"rows {rows} gradient")


# Our kernels: the fused forward (one program at [128, 10]) and the backward's "scale unless 1".
OUR_KERNELS = ("resident_kernel", "chunked_kernel", "_labels_kernel", "_scale_rows_kernel")


@_gpu
def test_launch_count_small_batch():
    """[128, 10] forward + loss.backward() with default arguments: at most 2 launches of ours (the
    fused kernel and the backward's scale), no host sync; the only other kernel allowed is the
    ones_like fill autograd launches for loss.backward()'s seed."""
    x = _logits(128, 10, torch.float32).requires_grad_()
    y = _target(128, 10)
    for _ in range(2):   # compile outside the profile
        apl_loss(x, y, "nce+rce", backend="triton").backward()
    torch.cuda.synchronize()
    x.grad = None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")   # any host sync raises
        try:
            loss = apl_loss(x, y, "nce+rce", backend="triton")
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if any(k in n for k in OUR_KERNELS)]
    others = [n for n in names if n not in ours]
    assert 1 <= len(ours) <= 2, names
    assert len(others) <= 1 and all("fill" in n.lower() for n in others), names
    _, ref_grad = _reference(x.detach(), y, LossSpec.from_name("nce+rce"))
    assert_close(x.grad, ref_grad, torch.float32, "gradient")


@pytest.mark.no_device
def test_gradient_check_sees_one_wrong_small_entry():
    """The per-element check of these tests fails on one wrong non-target entry that
    rtol x max|grad| (the old tolerance) let through: bf16, nce+rce, [4, 4096] (CPU, ms)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 4096, generator=g, dtype=torch.float64) * 3).to(torch.bfloat16)
    y = torch.tensor([5, 100, 2000, 4095])
    _, ref_grad = _reference(x, y, LossSpec.from_name("nce+rce"))
    honest = ref_grad.to(torch.bfloat16)          # a kernel that only rounds its output
    assert_close(honest, ref_grad, torch.bfloat16, "honest gradient")
    wrong = honest.clone()
    wrong[1, 7] *= 1.5                            # a non-target entry, 50% off
    assert wrong[1, 7] != honest[1, 7] and 7 != y[1]
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(wrong.double(), ref_grad, rtol=2e-2, atol=2e-2 * scale)   # the old check: passes
    with pytest.raises(AssertionError, match="1 of 16384 values differ"):
        assert_close(wrong, ref_grad, torch.bfloat16, "planted error")


@_gpu
def test_mean_over_millions_of_rows_is_deterministic():
    """N-D logits flattened to 4M rows of K = 10, mean: the multi-program labels pre-pass and
    the fused sum of the tiles' partials give the reference's loss and gradient, bitwise the
    same in 20 runs (fixed order, no float atomics), in 2 launches of ours."""
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(64, 10, 256, 256, device="cuda", generator=g).requires_grad_()
    y = torch.randint(0, 10, (64, 256, 256), device="cuda", generator=g)
    y[:, ::3] = -100
    spec = LossSpec.from_name("nce+rce")
    losses, grads = [], []
    for _ in range(20):
        x.grad = None
        loss = apl_loss(x, y, spec, backend="triton")
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    assert all(torch.equal(l, losses[0]) for l in losses) and all(torch.equal(g, grads[0]) for g in grads)
    xr = x.detach().double().requires_grad_()
    ref = reference_loss(xr, y, spec)
    ref.backward()
    torch.testing.assert_close(losses[0].double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert_close(grads[0], xr.grad, torch.float32, "gradient")
    from torch.profiler import ProfilerActivity, profile
    x.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        apl_loss(x, y, spec, backend="triton", check_targets=False).backward(torch.ones((), device="cuda"))
        torch.cuda.synchronize()
    ours = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and any(k in e.name for k in OUR_KERNELS)]
    assert len(ours) == 3, ours   # labels pre-pass, tiles, the backward's scale
