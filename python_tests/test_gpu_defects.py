"""GPU checks of issue 12 (items 4, 9 and 14): what only a GPU shows.

fp16 with GradScaler, a non-current device, Triton on a side stream, Triton's
count/sum at large N with mean reduction, the CUDA kernel's > 48 KB
shared-memory path under CUDA-graph capture, determinism over 20 runs, and the
backward's cost (one early-returning launch, no host sync).  Marker `gpu`:
skipped without a CUDA device; each backend skips where it is not built.
Well under a minute on an H200.
"""
import pytest
import torch

from apl_kernels import LossSpec, apl_loss, backends
from apl_kernels.reference import reference_loss

from apl_testing import assert_close, expect_device_assert

pytestmark = pytest.mark.gpu

GRAD_SCALER_INIT = 65536.0   # torch.amp.GradScaler's initial scale; above the fp16 maximum 65504


def _need(backend, device="cuda"):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


@pytest.fixture(params=("cuda", "triton"))
def gpu_backend(request):
    _need(request.param)
    return request.param


def _inputs(n, k, dtype, device="cuda", seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g) * 3).to(dtype).to(device)
    target = torch.randint(0, k, (n,), generator=g)
    target[::ignore_every] = -100
    return logits, target.to(device)


def _reference(logits, target, spec, reduction="mean", grad_output=1.0):
    """Loss and gradient of the oracle in fp64."""
    x = logits.detach().double().requires_grad_()
    loss = reference_loss(x, target, spec, reduction)
    (loss * grad_output).sum().backward()
    return loss.detach(), x.grad


def _check(loss, grad, logits, target, spec, reduction="mean", grad_output=1.0, what=""):
    ref_loss, ref_grad = _reference(logits, target, spec, reduction, grad_output)
    assert_close(loss, ref_loss, logits.dtype, f"loss {what}")
    assert_close(grad, ref_grad, logits.dtype, f"grad {what}")


# ------------------------------------------------------------------ item 4: GradScaler
@pytest.mark.parametrize("overwrite", (False, True), ids=("default", "overwrite_logits"))
def test_grad_scaler_fp16_step(gpu_backend, overwrite):
    """An AMP step with torch.amp.GradScaler (scale 65536) and fp16 logits: finite, right, scale kept.

    ATen's mul used to cast the 0-dim CUDA scale to fp16 (inf), and overwrite_logits
    did the same with scale.to(grad.dtype).
    """
    if overwrite and gpu_backend != "triton":
        pytest.skip("overwrite_logits=True is Triton only")
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 1000).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(256, 32, device="cuda")
    y = torch.randint(0, 1000, (256,), device="cuda")
    y[::7] = -100
    with torch.autocast("cuda", dtype=torch.float16):
        logits = model(x)
    assert logits.dtype == torch.float16
    if not overwrite:
        logits.retain_grad()
    spec = LossSpec.from_name("nce+rce")
    saved_logits = logits.detach().clone()
    loss = apl_loss(logits, y, spec, backend=gpu_backend, overwrite_logits=overwrite)
    scaler.scale(loss).backward()
    scaled_grad = logits.detach() if overwrite else logits.grad   # overwrite: the logits hold it
    assert torch.isfinite(scaled_grad).all()
    _, ref_grad = _reference(saved_logits, y, spec)
    assert_close(scaled_grad.double() / GRAD_SCALER_INIT, ref_grad, torch.float16, "scaled gradient / 65536")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == GRAD_SCALER_INIT, "GradScaler found an inf or NaN and backed off"


# ------------------------------------------------------------------ item 9: non-current device
@pytest.mark.parametrize("shape", [(64, 1000), (8, 20000)], ids=str)
def test_non_current_device(gpu_backend, shape):
    """Tensors on cuda:1 while cuda:0 is current (a DDP rank that never called set_device)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    spec = LossSpec.from_name("nce+rce")
    logits, target = _inputs(*shape, torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        x = logits.clone().requires_grad_()
        loss = apl_loss(x, target, spec, backend=gpu_backend)
        (3.0 * loss).backward()        # grad_output 3: the scale kernel runs on cuda:1 too
    torch.cuda.synchronize(1)
    assert loss.device == x.grad.device == torch.device("cuda:1")
    _check(loss.detach(), x.grad, logits, target, spec, grad_output=3.0, what="on cuda:1")


# ------------------------------------------------------------------ Triton on a side stream
@pytest.mark.parametrize("shape", [(4096, 1000), (64, 20000)], ids=str)
def test_triton_on_a_side_stream(shape):
    """Loss and backward on a user stream whose input is still being written: launches follow that stream."""
    _need("triton")
    spec = LossSpec.from_name("nfl+rce")
    logits, target = _inputs(*shape, torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)        # ~50 ms of GPU time queued on the side stream first
        x = logits.mul(1.0).requires_grad_()   # written on the side stream after the sleep
        loss = apl_loss(x, target, spec, backend="triton")
        (2.0 * loss).backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _check(loss.detach(), x.grad, logits, target, spec, grad_output=2.0, what="on a side stream")


# ------------------------------------------------------------------ Triton's count and sum at large N
@pytest.mark.parametrize("n, k", [(2**24 + 5, 2), (2**20 + 3, 40)], ids=str)
def test_triton_mean_over_many_rows(n, k):
    """Mean over 16M rows (a segmentation batch flattened): the kept-row count and the sum are right."""
    _need("triton")
    spec = LossSpec.from_name("nce+rce")
    logits, target = _inputs(n, k, torch.float32, ignore_every=3)
    x = logits.clone().requires_grad_()
    loss = apl_loss(x, target, spec, backend="triton")
    loss.backward()
    ref_loss, _ = _reference(logits, target, spec, "sum")
    kept = int((target != -100).sum())
    # a fixed-order fp32 sum of n terms: far within 1e-4 relative
    torch.testing.assert_close(loss.double(), ref_loss / kept, rtol=1e-4, atol=0.0)
    for rows in (slice(0, 1000), slice(n - 1000, n)):   # the gradient carries 1/count
        _, ref_rows = _reference(logits[rows], target[rows], spec, "sum", grad_output=1.0 / kept)
        assert_close(x.grad[rows], ref_rows, torch.float32, f"gradient rows {rows}")


# ------------------------------------------------------------------ > 48 KB shared memory under capture
@pytest.mark.parametrize("warm", (True, False), ids=("warmed", "first-call-in-capture"))
@pytest.mark.parametrize("k, dtype, loss_name", [(20000, torch.float32, "nce+rce"),
                                                 (40000, torch.float16, "gce+nmae")], ids=str)
def test_cuda_large_shared_memory_under_graph_capture(k, dtype, loss_name, warm):
    """CUDA-graph training step with rows over 48 KB (80 KB fp32): the opt-in shared-memory path captures.

    Without warm-up the kernel's first call (which raises the shared-memory limit) is inside the capture.
    """
    _need("cuda")
    spec = LossSpec.from_name(loss_name)
    logits, target = _inputs(64, k, dtype)
    x = logits.clone().requires_grad_()
    static_target = target.clone()
    from apl_kernels.triton.scale import scale_rows_
    # The backward's Triton kernel, JIT-compiled outside the capture for this very specialisation.
    scale_rows_(torch.zeros(64, k, dtype=dtype, device="cuda"), torch.ones((), device="cuda"))
    if warm:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                x.grad = None
                apl_loss(x, static_target, spec, backend="cuda").backward()
        torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = apl_loss(x, static_target, spec, backend="cuda")
        static_loss.backward()
    for seed in (1, 2):
        new_logits, new_target = _inputs(64, k, dtype, seed=seed)
        with torch.no_grad():
            x.copy_(new_logits)
        static_target.copy_(new_target)
        graph.replay()
        torch.cuda.synchronize()
        _check(static_loss.detach(), x.grad, new_logits, new_target, spec, what=f"replay {seed}")


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("shape, dtype", [((8192, 1000), torch.float32), ((16, 131072), torch.bfloat16),
                                          ((200000, 10), torch.float32)], ids=str)
def test_deterministic_over_20_runs(gpu_backend, shape, dtype):
    """Reproducible training: 20 runs of loss and gradient are bitwise equal (no atomics in reductions)."""
    spec = LossSpec.from_name("nce+rce")
    logits, target = _inputs(*shape, dtype)
    first = None
    for run in range(20):
        x = logits.clone().requires_grad_()
        loss = apl_loss(x, target, spec, backend=gpu_backend)
        (0.5 * loss).backward()
        if first is None:
            first = (loss.detach(), x.grad)
            continue
        assert torch.equal(loss, first[0]), f"run {run}: loss {loss.item()!r} != {first[0].item()!r}"
        assert torch.equal(x.grad, first[1]), f"run {run}: gradient differs"


# ------------------------------------------------------------------ the backward's cost (issue 13)
def _launches_without_sync(fn, with_result=False):
    """(device kernels, those not autograd's ones_like seed) of fn(), which must not sync with the host."""
    previous = torch.cuda.get_sync_debug_mode()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")     # any implicit host sync raises
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = (kernels, [name for name in kernels if "FillFunctor" not in name])
    return (launches, result) if with_result else launches


def test_backward_of_grad_output_1_is_one_early_return_launch_without_sync(gpu_backend):
    """loss.backward() in a training step: no pass over [N, K], no second buffer, no host sync."""
    spec = LossSpec.from_name("nce+rce")
    logits, target = _inputs(512, 1000, torch.bfloat16)
    x = logits.clone().requires_grad_()
    loss = apl_loss(x, target, spec, backend=gpu_backend)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    kernels, ours = _launches_without_sync(loss.backward)
    assert len(ours) == 1 and "_scale_rows_kernel" in ours[0], kernels
    assert torch.cuda.memory_allocated() <= allocated, "the backward allocated a new gradient buffer"
    _check(loss.detach(), x.grad, logits, target, spec)


# ------------------------------------------------------------------ the default path (issue 13)
def test_small_batch_default_step_is_two_launches_without_sync(gpu_backend):
    """A CIFAR-sized step, [128, 10] with default arguments: the forward kernel and the
    backward's scale kernel, no host sync (the labels are checked inside the kernel)."""
    logits, target = _inputs(128, 10, torch.float32)
    x = logits.clone().requires_grad_()
    apl_loss(x, target, "nce+rce", backend=gpu_backend).backward()     # compile / warm up
    x.grad = None
    torch.cuda.synchronize()
    def step():
        loss = apl_loss(x, target, "nce+rce", backend=gpu_backend)
        loss.backward()
        return loss
    (kernels, ours), loss = _launches_without_sync(step, with_result=True)
    assert len(ours) <= 2, kernels
    _check(loss.detach(), x.grad, logits, target, LossSpec.from_name("nce+rce"))


def test_small_batch_default_step_is_graph_capturable(gpu_backend):
    """The default-argument forward + backward captured in a CUDA graph and replayed on new data."""
    spec = LossSpec.from_name("nce+rce")
    logits, target = _inputs(128, 10, torch.float32)
    static_x = logits.clone().requires_grad_()
    static_y = target.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                         # warm up (compiles) outside the capture
        apl_loss(static_x, static_y, spec, backend=gpu_backend).backward()
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = apl_loss(static_x, static_y, spec, backend=gpu_backend)
        static_loss.backward()
    new_logits, new_target = _inputs(128, 10, torch.float32, seed=3)
    with torch.no_grad():
        static_x.copy_(new_logits)
    static_y.copy_(new_target)
    graph.replay()
    torch.cuda.synchronize()
    _check(static_loss.detach(), static_x.grad, new_logits, new_target, spec, what="after replay")


def test_bad_label_sync_check_names_it_on_cuda(gpu_backend):
    """check_targets="sync": the host check, a ValueError that names the label (one host sync)."""
    logits, target = _inputs(16, 10, torch.float32)
    target[3] = 10
    with pytest.raises(ValueError, match="target value 10 is outside"):
        apl_loss(logits, target, backend=gpu_backend, check_targets="sync")


def test_bad_label_default_is_a_device_side_assert(gpu_backend):
    """The default on CUDA: the kernel itself stops on a bad label, as F.cross_entropy does
    (in a child process: a device-side assert leaves the CUDA context unusable)."""
    expect_device_assert("y = torch.tensor([0, 10, 2], device='cuda')\n"
                         f"apl_loss(torch.randn(3, 10, device='cuda'), y, backend={gpu_backend!r})")
