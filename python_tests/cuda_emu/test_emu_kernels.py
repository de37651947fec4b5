"""The CUDA kernels of csrc/cuda/, unchanged, run on CPU tensors by a CUDA emulator.

No GPU is needed: emu_build.py compiles the real `csrc/cuda/*.cu` of this
checkout with g++ against include/cuda_emu.h (launches rewritten on a generated
copy, `#line` directives keep the original lines), into a build folder of the
test session, as the op `torch.ops.apl_kernels_emu.fused_loss` (its own
library and namespace, beside the real apl_kernels._C).  The emulator runs one
OS thread per block and one fiber per CUDA thread; fibers switch only at
`__syncthreads*` and warp collectives, in the order the schedule says
(CUDA_EMU_SCHEDULE = forward | reverse | random:SEED | roundrobin).  Deadlocks,
divergent barriers, exits while others wait at a barrier, shuffles outside
their mask, misaligned `__ldg` and SIGSEGV in a kernel fail the launch with a
message that names the block, the thread and the source line
(test_emu_faults.py plants each of them); so does a failed CUDA_KERNEL_ASSERT
(test_bad_target_is_a_device_side_assert).  cp.async copies (large_k_fixed's
shared-memory fills) land at the thread's wait under forward, random and
roundrobin, at issue under reverse: the two ends of what the hardware may do, so
a read of a slot before its copy's wait, or a copy over a slot not yet read,
breaks the bit-identity or the reference check; an exit with copies not waited
for is a fault.

Here: the cases of python_tests/test_cuda_kernels.py, with its tables and
checks, on CPU tensors, against the fp64 reference.  Each check runs the op
under two schedules (forward, reverse) and requires bit-identical outputs;
test_all_orders_bit_identical adds random:SEED and roundrobin, and the
ucontext fibers, on a subset.  test_every_term drives every loss of
apl_testing.ALL_LOSSES through every kernel variant, so a new term is tested
here as soon as it is in that table.  Shrunk against the GPU module: fewer rows
in the large-K and streamed cases, 2 x 1056 blocks (not 2 M rows) for the grid
loop; the 2^31-element case is left to the GPU.

Environment: CUDA_EMU_SCHEDULE (above); CUDA_EMU_FIBERS = asm (x86-64, the
default) | ucontext; CUDA_EMU_BUILD_DIR = a folder kept between runs (ninja
then recompiles only what changed; by default each test session builds afresh
in its own temporary folder); CUDA_EMU_PLANT (test_emu_faults.py only).
CUDA_EMU_KERNEL_ASSERT=0 compiles device asserts out (read at each launch);
CUDA_EMU_LAUNCH_LOG = a file that gets one line per kernel launch and memset.
Run alone: `python -m pytest -q python_tests/cuda_emu`.

Known gaps.  The emulator does not model:
- the weak memory model: every access is sequentially consistent, so a missing
  `__threadfence` is not detected;
- concurrency between blocks: blocks run one after another (in the schedule's
  order), so an inter-block race shows only as an order dependence;
- cooperative groups, cp.async / TMA / wgmma and inline PTX: emu_build refuses
  sources that use them (and their headers are `#error` stubs);
- the accuracy of the GPU's approximate instructions: the device math form of
  csrc/apl_loss_math.h runs here (emu_build defines APL_EMULATE_GPU_MATH: the
  fma-based exp arguments and per-row corrections of ShiftedExp2, the fast pow
  and 1 - exp, as under `__CUDA_ARCH__`), but its MUFU ex2 / lg2 / sqrt (inline
  PTX on the GPU) are libm's exp2f / log2f / sqrtf with the flush to zero of
  .ftz, and `__expf` and friends are libm's functions: the approximation error
  of a few ulp is the one thing of the math left to a GPU run
  (test_device_math_form checks that the device form is what was compiled).
  Other code under `#ifdef __CUDA_ARCH__` compiles in its host form (today
  large_k's packed bf16 / fp16 max: exact in either form);
- divergence inside a warp: lanes run independently between collectives and
  `__activemask()` is the warp's lanes that have not exited;
- static `__shared__` starts zeroed (a fresh thread_local per block), not
  poisoned like the dynamic shared memory (0xff bytes: NaN);
- registers and `__launch_bounds__` (not enforced), streams, events and CUDA
  graphs (a launch runs at once).
"""
import os

import pytest
import torch

import emu_build

from apl_testing import ALL_LOSSES, assert_close
from emu_helpers import ALL_ORDERS, assert_bit_identical, env, run_emulated, run_once
from test_cuda_kernels import DTYPES, LOSSES, _views, check, make, run_reference
from apl_kernels import LossSpec
from apl_kernels.reference import reference_loss
from apl_kernels.spec import REDUCTIONS

pytestmark = pytest.mark.usefixtures("emu_op")


def make_cpu(N, K, dtype, **kw):
    return make(N, K, dtype, device="cpu", **kw)


def check_emulated(logits, target, loss, reduction="mean", rows=None):
    check(logits, target, loss, reduction, rows, run=run_emulated)


# ---------------------------------------------------------------- both kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [2, 3, 10, 31, 62, 100, 257, 1000, 1024])
@pytest.mark.parametrize("loss", LOSSES)
def test_small_k(K, dtype, loss):
    logits, target = make_cpu(173, K, dtype)
    check_emulated(logits, target, loss)


@pytest.mark.parametrize("tiny", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [2, 7, 10, 16, 18])
def test_tiny_rows_both_layouts(K, dtype, tiny):
    with env(APL_CUDA_TINY_ROWS=tiny):
        logits, target = make_cpu(1000, K, dtype)
        for loss in ("nce+rce", "nfl+nmae", "ngce+nrce"):
            check_emulated(logits, target, loss)
        check_emulated(logits, target, "nce+rce", "none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K", [10, 1000, 5000])
def test_reductions(K, reduction):
    logits, target = make_cpu(300, K, torch.float32)
    check_emulated(logits, target, "nce+rce", reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1025, 4099, 20000])
@pytest.mark.parametrize("loss", ["nce+rce", "nfl+mae", "ngce+nrce", "ce"])
def test_large_k_smem_resident(K, dtype, loss):
    logits, target = make_cpu(24 if K < 5000 else 6, K, dtype)
    check_emulated(logits, target, loss)


@pytest.mark.parametrize("smem", ["0", "4096", "40000"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_k_streamed_tail(smem, dtype):
    """Rows longer than the shared memory allowed: the tail is re-read in each pass."""
    with env(APL_CUDA_SMEM_PER_BLOCK=smem):
        logits, target = make_cpu(5, 30011, dtype)
        for loss in ("nce+rce", "nfl+nmae", "ngce+mae"):
            check_emulated(logits, target, loss)


@pytest.mark.parametrize("past", [0, 1], ids=["held", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_k_tail_held_in_registers(tmp_path, dtype, past):
    """large_k_fixed keeps a thread's streamed tail in registers from pass 1 to pass 3 when no thread
    has more than kTailBatch (4) tail slots.  A 2500-slot cache (40000 bytes) and 256-thread blocks
    (two such caches fit an SM): ns - 2500 = 4 x 256 slots gives thread 0 exactly 4 (held), one slot
    more streams every pass.  In the offset view rows alternate between the two sides."""
    V = 16 // dtype.itemsize
    K = (2500 + 4 * 256 + past) * V
    with env(APL_CUDA_SMEM_PER_BLOCK="40000"):
        logits, target = make_cpu(5, K, dtype)
        got = queued(tmp_path, logits, target)
        assert got[-1].endswith("grid 5,1,1 block 256"), got   # the plan this case is sized for
        for loss in ("nce+rce", "nfl+mae"):
            check_emulated(logits, target, loss)
        torch.manual_seed(0)   # _views draws from the global generator
        check_emulated(_views(5, K - V // 2, dtype, device="cpu")["column_offset_1"], target % (K - V), "nce+rce")


@pytest.mark.parametrize("loss", ["ce", "nce+rce", "nfl+rce", "nfl+mae", "ngce+mae", "nce+nnce", "nce+amse"])
def test_large_k_rows_with_a_large_offset(loss):
    """Rows offset by 1e5: large_k_fixed's exps are 2^(z log2 e - c) with c = max log2 e rounded, whose
    rounding r (up to 2^-7 in the exponent here) ShiftedExp2 takes back once per row (unscale,
    log_offset, shifted_sum): the device math form runs here.  At offsets near 0, r is below fp32's
    tolerance; the GPU twin's 1e4 catches a lost unscale but only barely a lost log_offset (1 value
    of nfl+mae), 1e5 catches both (a 4x larger r, 2^-7 being also fp32's spacing of these logits)."""
    logits, target = make_cpu(6, 20000, torch.float32)
    check_emulated(logits + 1e5, target, loss)


@pytest.mark.parametrize("layout", ["contiguous", "column_offset_1"])
@pytest.mark.parametrize("loss", ["ce", "nce+mae", "nfl+mae"])
def test_large_k_next_row_loaded_in_pass_3(loss, layout):
    """fp32 rows of 60000 (240 KB, past the 227 KB cap): one block per SM, so 140 rows loop over 132
    blocks, and large_k_fixed loads a block's second row into shared memory while it writes the first
    row's gradient.  A third of the rows ignored (then the next row's pass 1 runs on its own); in the
    offset view (row stride K + 7) consecutive rows have different 16-byte shifts.  (Not rce here: among
    8.4 M probabilities one lands within fp32 rounding of its clamp at 1e-7, a step in the gradient.)"""
    N, K = 140, 60000
    logits, target = make_cpu(N, K, torch.float32, ignore_frac=0.3, seed=7)
    if layout != "contiguous":
        torch.manual_seed(0)   # _views draws from the global generator
        logits = _views(N, K, torch.float32, device="cpu")[layout]
    check_emulated(logits, target, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_longer_than_shared_memory(dtype):
    logits, target = make_cpu(2, 300_001, dtype, ignore_frac=0.0)
    check_emulated(logits, target, "nce+rce")


def test_many_rows_grid_loops():
    """More rows than 2 x 1056 blocks of 256 rows: every block loops over rows (2 M rows on the GPU)."""
    logits, target = make_cpu(2 * 1056 * 256 + 5, 3, torch.bfloat16)
    check_emulated(logits, target, "nce+rce", "none", rows=slice(-5000, None))
    check_emulated(logits, target, "nce+rce", "mean")


def test_large_k_grid_loops():
    """fp64 rows of 20000 take 160 KB of shared memory: one block per SM, so 140 rows loop over 132 blocks."""
    logits, target = make_cpu(140, 20000, torch.float64)
    check_emulated(logits, target, "nfl+rce", "sum")


# ---------------------------------------------------------------- every term
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K", [7, 60, 700, 3000])
@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_every_term(loss, K, dtype):
    """Every term and pair of apl_testing.ALL_LOSSES through the tiny-row, one-slot, wide and large-K kernels."""
    logits, target = make_cpu(40, K, dtype, seed=K)
    check_emulated(logits, target, loss)


@pytest.mark.parametrize("loss", ["nfl+rce", "ngce+nmae", "gce+rce"])
def test_exact_gradient_mode(loss):
    for K in (10, 500, 2000):
        logits, target = make_cpu(50, K, torch.float32)
        spec = LossSpec.from_name(loss, grad="exact")
        out, grad = run_emulated(logits, target, spec)
        x = logits.double().requires_grad_(True)
        ref = reference_loss(x, target, spec, "mean", -100)
        ref.backward()
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-4, atol=1e-6)
        assert_close(grad, x.grad, torch.float32, f"{loss} K={K} exact-mode gradient")


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [5, 13, 37, 999, 1031, 5003])
def test_misaligned_rows(K, dtype):
    N = 16
    for name, logits in _views(N, K, dtype, device="cpu").items():
        assert logits.stride(1) == 1
        target = torch.randint(0, K, (N,))
        check_emulated(logits, target, "nce+rce")
        check_emulated(logits, target, "ngce+mae")


# ---------------------------------------------------------------- targets
@pytest.mark.parametrize("K", [10, 3000])
def test_bad_target_is_a_device_side_assert(K):
    """A label outside [0, K) that is not ignore_index stops the kernel with a device-side assert
    (as F.cross_entropy), reported with its kind, block, thread and line."""
    logits, target = make_cpu(20, K, torch.float32, ignore_frac=0.0)
    target[7] = K
    with pytest.raises(RuntimeError) as info:
        run_once(logits, target, LossSpec.from_name("nce+rce"), "none")
    msg = str(info.value)
    assert "device-side assert" in msg and "outside [0, K)" in msg, msg
    # K = 10: one thread per row, row 7 is thread 7 of block 0; K = 3000: one block per row.
    where = "block (0,0,0) thread (7,0,0)" if K == 10 else "block (7,0,0) thread ("
    assert where in msg, msg
    source = emu_build.CSRC / "cuda" / "apl_cuda_common.cuh"
    line = next(i + 1 for i, text in enumerate(source.read_text().splitlines()) if "CUDA_KERNEL_ASSERT(" in text)
    assert f"{source}:{line}" in msg, msg
    target[7] = -5
    with pytest.raises(RuntimeError, match="device-side assert"):
        run_once(logits, target, LossSpec.from_name("nce+rce"), "mean")


@pytest.mark.parametrize("K", [10, 3000])
def test_bad_target_row_is_nan_without_asserts(K):
    """Where device asserts are compiled out (CUDA_EMU_KERNEL_ASSERT=0 here), a bad row is NaN."""
    logits, target = make_cpu(20, K, torch.float32, ignore_frac=0.0)
    target[3], target[7] = K, -5
    with env(CUDA_EMU_KERNEL_ASSERT="0"):
        out, grad = run_emulated(logits, target, "nce+rce", "none")
        mean, _ = run_emulated(logits, target, "nce+rce")
    bad = torch.zeros(20, dtype=torch.bool)
    bad[3] = bad[7] = True
    assert out[bad].isnan().all() and out[~bad].isfinite().all()
    assert grad[bad].isnan().all() and grad[~bad].isfinite().all()
    assert mean.isnan()


@pytest.mark.parametrize("K", [10, 3000])
def test_all_rows_ignored(K):
    logits = torch.randn(9, K)
    target = torch.full((9,), -100)
    for reduction in ("mean", "sum"):
        out, grad = run_emulated(logits, target, "nce+rce", reduction)
        assert out.item() == 0.0 and grad.eq(0).all()


def test_empty_batch():
    for reduction in ("mean", "sum", "none"):
        out, grad = run_emulated(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), "nce+rce", reduction)
        assert grad.shape == (0, 10)
        if reduction != "none":
            assert out.item() == 0.0


def test_ignore_index_inside_range():
    logits, target = make_cpu(50, 10, torch.float32, ignore_frac=0.0)
    out, grad = run_emulated(logits, target, "nce+rce", "none", ignore_index=0)
    ref_out, ref_grad = run_reference(logits, target, "nce+rce", "none", ignore_index=0)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-4, atol=1e-6)


def test_mean_over_many_blocks_counts_with_atomics():
    """N > 16384 and small K: the kept rows are counted by several blocks of the count kernel
    (memset, then atomicAdd)."""
    logits, target = make_cpu(20000, 3, torch.float32, ignore_frac=0.3)
    check_emulated(logits, target, "nce+rce", "mean")


def queued(tmp_path, logits, target, loss="nce+rce", reduction="mean"):
    """What the op queues on the stream: one 'kernel <file:line> grid x,y,z' or 'memset <bytes>' a line."""
    log = tmp_path / "launches.log"
    log.unlink(missing_ok=True)
    with env(CUDA_EMU_LAUNCH_LOG=str(log)):
        run_once(logits, target, LossSpec.from_name(loss), reduction)
    return log.read_text().splitlines()


def test_launches_of_the_reductions(tmp_path):
    """[128, 10] mean (the default path): one kernel, which counts the kept rows itself, and no memset.
    Several blocks: a memset of the 16-byte ticket header, and the count stays in the loss kernel
    while re-reading the labels is cheap next to the logits; else the count kernel runs first."""
    small = make_cpu(128, 10, torch.float32)
    for reduction in ("mean", "sum", "none"):
        got = queued(tmp_path, *small, reduction=reduction)
        assert len(got) == 1 and got[0].startswith("kernel ") and "apl_cuda_small_k.cu" in got[0], got
        assert got[0].endswith("grid 1,1,1 block 256"), got
    large = make_cpu(40, 3000, torch.float32)  # 40 blocks, one a row: 40 x 8 label bytes a block
    got = queued(tmp_path, *large)
    assert got[0] == "memset 16" and len(got) == 2 and "apl_cuda_large_k.cu" in got[1], got
    many = make_cpu(20000, 3, torch.float32)  # 157 blocks of 128 rows of 12 bytes: the count kernel
    got = queued(tmp_path, *many)
    assert [g.split()[0] for g in got] == ["memset", "kernel", "kernel"] and "apl_cuda_op.cu" in got[1], got
    assert got[2].endswith("grid 157,1,1 block 128"), got


@pytest.mark.parametrize("N, K, dtype, grid, block", [
    (256, 1000, torch.float32, 128, 64),     # a warp a row: 32 blocks of 256 threads would leave 100 SMs idle
    (256, 1000, torch.bfloat16, 128, 64),
    (1024, 100, torch.bfloat16, 128, 128),   # 16 lanes a row
    (1024, 100, torch.float32, 128, 256),    # 128 blocks of 256 threads already cover 3/4 of the SMs
    (128, 100, torch.float32, 16, 256),      # 51 KB of logits (under 64 KB): 256-thread blocks kept
])
def test_short_batches_spread_over_the_sms(tmp_path, N, K, dtype, grid, block):
    """Short batches of rows up to kSmallKMax: the small-K blocks shrink until the grid covers 3/4 of the
    132 SMs, and the labels (one round of loads a thread) are counted in the loss kernel: no count
    kernel, only the workspace memset of a several-block grid."""
    logits, target = make_cpu(N, K, dtype)
    got = queued(tmp_path, logits, target)
    kernels = [g for g in got if g.startswith("kernel")]
    assert len(kernels) == 1 and "apl_cuda_small_k.cu" in kernels[0], got
    assert kernels[0].endswith(f"grid {grid},1,1 block {block}"), got
    assert got[:-1] == (["memset 16"] if grid > 1 else []), got
    check_emulated(logits, target, "nce+rce")


@pytest.mark.parametrize("dtype, block", [(torch.bfloat16, 256), (torch.float32, 512)], ids=str)
def test_rows_that_fit_an_sm_twice_run_smaller_blocks(tmp_path, dtype, block):
    """K = 32000: a bf16 row (64 KB) fits an SM's shared memory twice, so the large-K blocks have 256
    threads (2-3 blocks an SM); an fp32 row (128 KB) does not, and keeps 512."""
    logits, target = make_cpu(6, 32000, dtype)
    got = queued(tmp_path, logits, target)
    assert "apl_cuda_large_k.cu" in got[-1] and got[-1].endswith(f"grid 6,1,1 block {block}"), got
    check_emulated(logits, target, "nce+rce")


@pytest.mark.parametrize("N, K, dtype", [(128, 10, "fp32"), (128, 100, "fp32"), (256, 1000, "fp32"),
                                         (256, 1000, "bf16"), (1024, 100, "bf16"), (2100, 1000, "bf16"),
                                         (20000, 3, "fp32"), (6, 32000, "bf16"), (6, 32000, "fp32")])
def test_roofline_plan_is_what_the_op_queues(tmp_path, N, K, dtype):
    """bench.roofline models the CUDA launches from its own copy of the host plan (cuda_plan): each
    launch's kind, source file and block size, and the small-K grid, as the emulated op queues them."""
    from bench import roofline
    plan = roofline.cuda_plan("nce+rce", dtype, N, K)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    got = [line.split() for line in queued(tmp_path, *make_cpu(N, K, torch_dtype))]
    where = {"serial": "apl_cuda_op.cu", "prepass": "apl_cuda_op.cu", "small_k": "apl_cuda_small_k.cu",
             "large_k": "apl_cuda_large_k.cu"}
    assert len(got) == len(plan), (got, plan)
    for line, run in zip(got, plan):
        if run.kind == "memset":
            assert line == ["memset", "16"], (got, plan)
            continue
        assert line[0] == "kernel" and os.path.basename(line[1]).startswith(where[run.kind]), (got, plan)
        assert int(line[-1]) == run.warps * 32, (got, plan)
        if run.kind in ("small_k", "serial"):
            assert line[3] == f"{run.grid},1,1", (got, plan)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("K", [10, 100, 1000, 4099])
def test_all_orders_bit_identical(K):
    """All four schedules, and the ucontext fibers, give the same bits (a race would not)."""
    logits, target = make_cpu(300 if K < 1000 else 40, K, torch.bfloat16, seed=K)
    for loss, reduction in (("nfl+rce", "mean"), ("nce+mae", "none")):
        spec = LossSpec.from_name(loss)
        first = run_once(logits, target, spec, reduction, schedule=ALL_ORDERS[0])
        for schedule in ALL_ORDERS[1:]:
            assert_bit_identical(first, run_once(logits, target, spec, reduction, schedule=schedule),
                                 f"{loss} K={K} forward vs {schedule}")
        assert_bit_identical(first, run_once(logits, target, spec, reduction, fibers="ucontext"),
                             f"{loss} K={K} asm vs ucontext fibers")


@pytest.mark.parametrize("K", [7, 60, 700, 3000])  # the tiny-row, one-slot, wide and large-K kernels
def test_device_math_form(K):
    """The emulator compiles the GPU's math form (emu_build defines APL_EMULATE_GPU_MATH): its
    exp is ex2.approx.ftz, which flushes a subnormal result to 0, so the gradient of a class
    90 below the row's max is exactly 0 (exp(-90) = 8.2e-40 < 2^-126).  The host form (expf)
    keeps it: p = exp(-90) / (K - 1) is a nonzero float subnormal for every K here."""
    logits = torch.zeros(1, K)
    logits[0, 1] = -90.0
    target = torch.zeros(1, dtype=torch.long)
    _, ref_grad = run_reference(logits, target, "ce", "sum")
    p_1 = ref_grad[0, 1].item()
    assert torch.finfo(torch.float32).smallest_normal > p_1 > 2.0 ** -149  # a nonzero subnormal in fp32
    _, grad = run_emulated(logits, target, "ce", "sum")
    assert grad[0, 1].item() == 0.0, (
        f"K={K}: the gradient of p = {p_1:.3g} is {grad[0, 1].item():.3g}, not flushed to 0: the emulator "
        "compiled the host math form of csrc/apl_loss_math.h (APL_EMULATE_GPU_MATH missing from emu_build?)")
    others = [0, *range(2, K)]
    torch.testing.assert_close(grad[0, others].double(), ref_grad[0, others], rtol=1e-5, atol=1e-7)


def test_loads_beside_the_real_extension():
    """Two libraries, two namespaces: the real CPU kernel (apl_kernels._C) and the emulated CUDA
    kernels both run, on the same input, and agree."""
    from apl_kernels import ops
    if ops._C is None:
        pytest.skip(f"apl_kernels._C is not built: {ops.EXTENSION_ERROR}")
    logits, target = make_cpu(64, 300, torch.float32)
    spec = LossSpec.from_name("nfl+rce")
    cpu_loss, cpu_grad = torch.ops.apl_kernels.fused_loss(logits, target, *spec.op_args(),
                                                          REDUCTIONS["mean"], -100, True)
    emu_loss, emu_grad = run_emulated(logits, target, spec)
    torch.testing.assert_close(emu_loss, cpu_loss, rtol=2e-5, atol=1e-6)
    assert_close(emu_grad, cpu_grad, torch.float32, "emulated vs CPU kernel gradient")


def test_bad_schedule_is_refused():
    logits, target = make_cpu(4, 10, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA_EMU_SCHEDULE=sideways"):
        run_once(logits, target, LossSpec.from_name("ce"), schedule="sideways")
