"""PREDICTED GPU speed of the fused losses on an H200, from their compiled sm_90 code (no GPU needed).

    python -m bench.roofline                 # the full matrix (a few minutes); writes bench/results/roofline-sm90.json
    python -m bench.roofline --subset ci     # one Triton and one CUDA configuration (CI smoke test)
    python -m bench.roofline --backends triton --losses nce+rce --dtypes bf16 --out /tmp/r.json

Nothing here is measured: every figure is a prediction from compiled code and the
H200's figures (constants of this module), and is labelled so.

Compile.  Every kernel variant the benchmark matrix of `bench.kernels` runs
(losses x shapes x bf16/fp32, mean reduction, gradient wanted) is compiled for
sm_90 with the GPU machine's toolchain:
  * Triton 3.6.0, installed beside the project's Triton for this tool alone:
        python -m pip install --target build/toolchains/triton-3.6.0 --no-deps triton==3.6.0
    (or APL_TRITON36_PATH=<folder holding triton/>).  Without it the project's own
    Triton compiles, and every figure says so.  The compile runs in a subprocess
    with that folder first on sys.path, and uses the specialisation the JIT really
    uses: Triton's own binder turns the launch's arguments (pointers aligned as
    torch allocates them, the ints N, K, strides, ignore_index of the shape) into
    divisibility hints and constexprs, exactly as a launch on the GPU would;
  * nvcc 13.0 for csrc/cuda (a cubin for sm_90 with the flags of setup.py).
The SASS comes from `cuobjdump -sass` (Triton's package carries one), registers,
stack (spills) and shared memory from `cuobjdump --dump-resource-usage`.

Count (bench/sass.py).  Loops are backward branches.  For each hot loop the
instructions of its body are counted and divided by the elements one thread
handles per iteration, derived from the kernel's block parameters (Triton:
BLOCK_K / threads per chunk, BLOCK_R x K / threads per tile; CUDA: the 16-byte
slots a thread loads per iteration, from the loads on the loop's path).  A row's
fixed work (reductions, finish_row) is spread over its elements.  A Triton row's
straight-line code is counted as run once a row, branches or not: the chunked
kernel's masked tail steps are compiled out (EVEN_K) where K is a multiple of the
chunk, as at the goal shapes, so that code the row skips is not counted.  The result,
`sass_per_element`, is thread-instructions per logit (warp-instructions per 32
logits).  Triton bodies are straight-line (per-element choices are predicated),
so the body's full count is what runs.  The CUDA kernels may keep branches in
their per-element code (the small-K kernel and the general large-K variant: edge
slots, the loss terms chosen at run time; large_k_fixed, the large-K kernel of the
benchmark's losses, has straight-line loop bodies, so there its two figures differ
by the once-per-row code only), so two figures bound what runs: `sass_per_element`, the cheapest path through each
loop body that still loads every element and runs one exp per element (a lower
bound: it may skip terms the loss needs), and `sass_per_element_static`, every
instruction of the bodies (an upper bound).  `predicted_pct_copy` comes from the
first (for CUDA an upper bound), `predicted_pct_copy_static` from the second.

Model: one training step's fwd+bwd as `loss.backward()` runs it.
  launches     the loss's own launches: the forward's kernels (label pre-pass,
               loss), the backward's kernels, and the host label check's with
               default arguments (none on CUDA tensors: the kernels check); not
               the ones_like seed of loss.backward(), which every loss pays
               (BACKWARD_SEED_LAUNCHES, in meta; bench.kernels leaves it out too);
  backward     read from the table BACKWARD: ops._backward scales the saved
               gradient in place with a "scale unless 1" kernel, one launch and
               no pass over [N, K] when grad_output is 1;
  hbm_bytes    the logits read once, the gradient written, the labels (twice with a pre-pass);
               a re-read (a later pass of a row, the backward reading the
               gradient) comes from L2 when what is in flight fits L2_BYTES, else
               from HBM (a cliff, no partial hits);
  extra_mem    bytes the step allocates (gradient buffers, the returned one
               included, and the small buffers) / logits bytes;
  time         forward: max(HBM bytes / copy bandwidth, warp-instructions / issue
               rate of the SMs it occupies, MUFU instructions (exp, log, square
               root) / the MUFU rate, 16 per clock per SM: `mufu_per_element`);
               the grid spreads over the SMs breadth first (grid_spread);
               backward: its bytes / copy bandwidth;
               one-block serial kernels (Triton's count and sum, CUDA's count):
               SERIAL_ITERATION_S (an assumption) per iteration of their loop.
               Launch overheads are left out (they dominate the small shapes, whose
               figures are bounds, not forecasts: see `launches`);
  predicted_pct_copy   minimal I/O (read logits + write gradient) / copy
               bandwidth, over that time: the figure `bench.kernels` reports as %copy.
  predicted_pct_copy_serial_passes   the same with no overlap between the
               passes of a row where one block (program) per SM runs them: each
               phase of the row (`phases`: pass 1 reads the logits, pass 2 re-reads
               the row on chip, pass 3 writes the gradient, the row's fixed work)
               takes max(its HBM bytes / the SMs' share of the bandwidth, its
               instructions / issue rate, its MUFU / MUFU rate), and the phases
               add up.  A bound for the case where an SM in a pass that moves no
               HBM bytes leaves its share idle (no SM pulls more than its share);
               several blocks per SM overlap, and the two figures agree.  Which of
               the two the GPU shows is for the GPU session's ncu step to say.
               CUDA large K prefetches each block's next row into L2 when its
               pass 1 loads are issued: the HBM bytes of the later phases, the
               next row's read among them, overlap as one span; the next row's
               pass 1 reads L2 in the previous row's pass 3 (large_k_fixed), or
               on its own (the general kernel: L2_READ_BYTES_S, an ASSUMPTION).
  predicted_pct_copy_latency   the H200 (2026-11-30) measured 35-48% at the headline where the
               two figures above said 69-100%: both backends run one block per SM there, and
               each iteration of a loop with global loads waits for them with nothing to
               overlap.  This figure models that: a row takes `waits_per_row` (the iterations,
               per thread, of its loops with global loads) x LOOP_LATENCY_S (CALIBRATED per
               backend on those measurements) plus its instructions, and the block's rows run
               one after another.  Loads issued as cp.async (LDGSTS: CUDA large_k_fixed's
               shared-memory fills, Triton's pipelined chunk loops) do not wait per iteration:
               a cp.async row waits once for its copies, a pipelined loop once a row for its
               first stages, and a tail held in registers only when it is loaded (ASSUMPTIONS:
               the calibration predates these kernels; the GPU session's sweep tests them).
               None where several blocks share an SM (they hide latency) or the kernel has no
               row loop.  The lower of the figures is the forecast.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from . import sass
from .common import GPU_DTYPES, GPU_SHAPES, LOSSES, write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "results", "roofline-sm90.json")
TRITON36_DEFAULT = os.path.join(REPO, "build", "toolchains", "triton-3.6.0")
CACHE_DIR = os.path.join(REPO, "build", "roofline")

# ----------------------------------------------------------------------------- the machine (H200, sm_90)
SMS = 132
ISSUE_PER_SM_CLOCK = 4          # warp-instructions per clock per SM (4 schedulers)
MUFU_PER_SM_CLOCK = 16          # MUFU results (ex2, lg2, sqrt, rcp) per clock per SM, compute capability 9.0
                                # (CUDA C++ Programming Guide, arithmetic instruction throughput)
CLOCK_HZ = 1.98e9
COPY_BYTES_S = 4.3e12           # measured device-to-device copy bandwidth of the H200 (KINDS.md / issue 13)
L2_BYTES = 50e6
L2_READ_BYTES_S = 8e12          # ASSUMPTION (not measured here): L2 to SM read bandwidth, all SMs together
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 233472            # 228 KB
SMEM_OPTIN_PER_BLOCK = 232448   # 227 KB, cudaDevAttrMaxSharedMemoryPerBlockOptin
SMEM_RESERVED_PER_BLOCK = 1024  # the runtime's share of each block
SERIAL_ITERATION_S = 1e-6       # ASSUMPTION: one dependent load per iteration of a one-program loop
# CALIBRATED on the H200 (2026-11-30, bench/results/nvidia-h200-2026-11-30.json), per backend: the
# time an iteration of a loop with global loads waits for them when one block per SM runs a row
# (nothing else on the SM to switch to).  Fitted to the measured fwd+bwd of ce, nce+mae, nce+rce, bf16
# [8192, 131072]: Triton's three give 0.77, 0.77, 0.60 us, CUDA's 1.24, 1.26, 1.26 us.  Why a CUDA wait
# costs more is not known (its waits are single 16-byte loads of the streamed tail, and the fused
# pass's batches, between block barriers); the fit is a description, the GPU the judge.
LOOP_LATENCY_S = {"triton": 0.75e-6, "cuda": 1.25e-6}

# ----------------------------------------------------------------------------- the code around the kernels
# What the model assumes the Python side does; update this table when the code changes.
# BACKWARD: ops._backward on a CUDA tensor: the first backward scales the forward's gradient buffer in
# place with the device-side "scale unless 1" kernel (apl_kernels/triton/scale.py), which returns early
# when grad_output is 1, as in `loss.backward()`: one launch, no pass over [N, K] (`passes`), no new
# [N, K] buffer (`buffers`).
BACKWARD = {
    "triton": {"launches": 1, "passes": 0, "buffers": 0, "host_syncs": 0},
    "cuda": {"launches": 1, "passes": 0, "buffers": 0, "host_syncs": 0},
}
BACKWARD_SEED_LAUNCHES = 1      # loss.backward() fills torch.ones_like(loss) (autograd._make_grads)
# The host-side label check with default arguments on CUDA tensors: none, the kernels assert on a bad
# label (functional._host_label_check).  check_targets="sync" would add ne, lt, ge, or, and (5
# elementwise kernels), any() (1 reduction) and `if` on it (1 host sync).
CHECK_TARGETS = {"launches": 0, "host_syncs": 0}

REDUCTION_MEAN = 1
# Launches the model counts but does not compile: one-program loops ("serial", timed per iteration),
# parallel passes over the labels ("prepass", whose bytes are counted and whose time is negligible) and
# memsets of a small workspace.
AUXILIARY_KINDS = ("serial", "prepass", "memset")
ELEMENT_BYTES = {"bf16": 2, "fp32": 4}
TORCH_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
CI_SUBSET = {"triton": [("nce+rce", "bf16", (8192, 131072))], "cuda": [("nce+rce", "bf16", (8192, 131072))]}


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _terms(loss: str):
    from apl_kernels.spec import ACTIVE_TERMS, PASSIVE_TERMS, LossSpec
    spec = LossSpec.from_name(loss)
    return ACTIVE_TERMS[spec.active], PASSIVE_TERMS[spec.passive], spec


# ----------------------------------------------------------------------------- plans: what each backend launches
@dataclasses.dataclass
class KernelRun:
    """One launch of the forward: which compiled variant, its grid, and how its per-element cost is read."""
    variant: str                 # key into the compiled variants
    grid: int
    warps: int                   # per block / program
    kind: str                    # "chunked", "single", "tiles", "small_k", "large_k", "serial", "prepass"
    params: dict                 # what the counting needs (BLOCK_K, BLOCK_R, group, cap...)
    serial_iterations: int = 0   # "serial": iterations of its one-program loop


def triton_plan(loss: str, dtype: str, B: int, K: int) -> List[KernelRun]:
    """The launches of apl_kernels/triton/kernels.launch for a mean-reduced loss with gradient, on an H200."""
    from apl_kernels.triton import kernels as tk
    active, passive, spec = _terms(loss)
    elem = ELEMENT_BYTES[dtype]
    block_k = _next_pow2(K)
    base = dict(ACTIVE=active, PASSIVE=passive, GRAD_MODE=0, GAMMA_HALF=spec.gamma == 0.5, REDUCTION=REDUCTION_MEAN,
                COMPUTE_GRAD=True)
    # kernels._labels_prepass: the labels checked (and counted, for mean) by up to COUNT_PROGRAMS programs.
    block = tk.LABEL_BLOCK.value
    count_programs = _cdiv(B, _cdiv(_cdiv(B, tk.COUNT_PROGRAMS.value), block) * block)
    prepass = KernelRun("triton _labels_kernel", count_programs, 4, "prepass", {})
    if block_k <= tk.RESIDENT_MAX_K[elem]:
        block_r = max(1, min(tk.TILE_ELEMS // block_k, _next_pow2(B)))
        tiles = _cdiv(B, block_r)
        single = tiles == 1 or tiles <= tk.SINGLE_MAX_TILES
        warps = max(1, min(16, block_r * block_k // 256))
        consts = dict(base, SINGLE=single, BLOCK_R=block_r, BLOCK_K=block_k)
        run = KernelRun(_triton_key("resident_kernel", dtype, consts, warps, B, K), 1 if single else tiles, warps,
                        "single" if single else "tiles", consts)
        return [run] if single else [prepass, run]
    chunk = min(tk.CHUNK[max(2, elem)], block_k)
    warps = tk.CHUNK_WARPS if chunk >= 8192 else 8
    # kernels._programs_in_flight with the H200's figures
    per_sm = max(1, min(max(1, 16 // warps), min(tk.L2_BUDGET, int(L2_BYTES) * 2 // 3) // max(1, SMS * K * elem)))
    programs = max(1, min(B, SMS * per_sm))
    consts = dict(base, NEEDS_PASS2=_needs_pass2(active, passive), BLOCK_K=chunk, STAGES=tk.CHUNK_STAGES,
                  EVEN_K=K % chunk == 0)
    run = KernelRun(_triton_key("chunked_kernel", dtype, consts, warps, B, K), programs, warps, "chunked", consts)
    return [prepass, run]


def _needs_pass2(active, passive) -> bool:
    from apl_kernels.triton import loss_math as lm
    return bool(lm.needs_second_pass(active, passive))


def _triton_key(kernel: str, dtype: str, consts: dict, warps: int, B: int, K: int) -> str:
    # The JIT specialises on N, K and the strides (divisibility by 16, value 1): part of the key.
    spec = "".join("D" if v % 16 == 0 else ("1" if v == 1 else "-") for v in (B, K))
    body = ",".join(f"{k}={v}" for k, v in sorted(consts.items()))
    return f"triton {kernel} {dtype} w{warps} {spec} {body}"


CUDA_SMALL_K_MAX = 1024   # apl_cuda_op.cu's small/large split (a literal there)


def cuda_constant(file: str, name: str) -> int:
    """`constexpr int[64_t] name = <integer product>;` of csrc/cuda/<file>: the host plan's constants
    are read from the kernels' source, not copied here."""
    with open(os.path.join(REPO, "csrc", "cuda", file)) as f:
        found = re.search(rf"constexpr\s+(?:int|int64_t)\s+{name}\s*=\s*([0-9\s*]+);", f.read())
    if not found:
        raise RuntimeError(f"csrc/cuda/{file} no longer defines `constexpr int {name} = ...;`: update bench/roofline.py")
    return math.prod(int(factor) for factor in found.group(1).split("*"))


CUDA_SPREAD_BYTES = cuda_constant("apl_cuda_small_k.cu", "kSpreadBytes")
CUDA_COUNT_LOADS_PER_THREAD = cuda_constant("apl_cuda_common.cuh", "kCountLoadsPerThread")
CUDA_TAIL_BATCH = cuda_constant("apl_cuda_large_k.cu", "kTailBatch")   # large_k_fixed's streamed-tail loads
CUDA_LOAD_BATCH = cuda_constant("apl_cuda_large_k.cu", "kLoadBatch")   # large_k_kernel's shared-memory fill
CUDA_SMALL_BLOCK = cuda_constant("apl_cuda_small_k.cu", "kSmallBlock")
CUDA_TINY_NV = cuda_constant("apl_cuda_small_k.cu", "kTinyNV")
CUDA_LARGE_BLOCK = cuda_constant("apl_cuda_large_k.cu", "kLargeBlockMax")
CUDA_TWO_PER_SM_THREADS = cuda_constant("apl_cuda_large_k.cu", "kTwoPerSmThreads")


def _tail_batches(streamed: int, threads: int) -> int:
    """Iterations (all threads) of large_k_fixed's streamed-tail loops over a row: thread t takes slots
    t, t + threads, ... of the tail, CUDA_TAIL_BATCH an iteration (the last one predicated)."""
    return sum(_cdiv(_cdiv(streamed - t, threads), CUDA_TAIL_BATCH) for t in range(min(threads, streamed)))


def _slot_elems(dtype: str) -> int:
    return 16 // ELEMENT_BYTES[dtype]


def cuda_plan(loss: str, dtype: str, B: int, K: int) -> List[KernelRun]:
    """The launches of csrc/cuda/apl_cuda_op.cu for a mean-reduced loss with gradient, on an H200."""
    active, passive, spec = _terms(loss)
    pow_terms = spec.active in ("nfl", "ngce")
    V = _slot_elems(dtype)
    max_slots = (K + 2 * V - 2) // V
    tname = {"bf16": "c10::BFloat16", "fp32": "float"}[dtype]
    elem = ELEMENT_BYTES[dtype]
    if K <= CUDA_SMALL_K_MAX:
        if max_slots <= CUDA_TINY_NV:
            nv, group = CUDA_TINY_NV, 1
        elif max_slots <= 32:
            nv, group = 1, 32
            while group // 2 >= max_slots:
                group //= 2
        else:
            nv, group = _cdiv((CUDA_SMALL_K_MAX + 2 * V - 2) // V, 32), 32
        # plan_small_k: blocks shrink (to one warp) until they cover 3/4 of the SMs, above 64 KB of logits.
        threads = CUDA_SMALL_BLOCK
        if B * K * elem > CUDA_SPREAD_BYTES:
            while threads // 2 >= max(32, group) and _cdiv(B, threads // group) < SMS * 3 // 4:
                threads //= 2
        grid = max(1, min(_cdiv(B, threads // group), SMS * 8))
        main = KernelRun(f"cuda small_k_kernel<{tname}, {nv}, {str(pow_terms).lower()}>", grid,
                         threads // 32, "small_k", {"group": group, "nv": nv, "V": V, "K": K})
    else:
        threads = CUDA_LARGE_BLOCK if max_slots >= 2048 else (256 if max_slots >= 512 else 128)   # block_threads
        cap = min(max_slots, (SMEM_OPTIN_PER_BLOCK - 2048) // 16)
        # plan_large_k: 256-thread blocks when two cached rows fit in an SM's shared memory (with the
        # kernel's static share, about 2 KB at most, and the runtime's 1 KB per block).
        if threads > CUDA_TWO_PER_SM_THREADS and 2 * (cap * 16 + 2048 + SMEM_RESERVED_PER_BLOCK) <= SMEM_PER_SM:
            threads = CUDA_TWO_PER_SM_THREADS
        # apl_cuda_large_k.cu: large_k_fixed (constant terms) for the losses of its shapes, the run-time-term
        # kernel (-1, -1) else.
        shapes = cuda_fixed_shapes(spec)
        variant = (f"cuda large_k_fixed<{tname}, {shapes[0]}, {shapes[1]}>" if shapes else
                   f"cuda large_k_kernel<{tname}, true, -1, -1>")     # the one general large-K variant
        # prefetch: each block's next row into L2 during a row's on-chip passes (APL_CUDA_PREFETCH, on);
        # fused_pass1: large_k_fixed reads that row (from L2) while its pass 3 writes this one's gradient.
        main = KernelRun(variant, 0, threads // 32, "large_k", {"cap": cap, "V": V, "K": K, "smem": cap * 16,
                                                    "threads": threads, "second_pass": _needs_pass2(active, passive),
                                                    "prefetch": True, "fused_pass1": bool(shapes)})
        grid = min(B, SMS)   # its grid (resident blocks) is set from occupancy later: one block per SM here
    threads = main.warps * 32
    # apl_cuda_op.cu: mean's count runs in the loss kernel (count_in_kernel) for one block, when the
    # blocks' re-reads of the labels cost little, or when they are one round of loads a thread
    # (kCountLoadsPerThread); else a count kernel first.  Several blocks (or a count kernel) need a
    # workspace: zeroed by a one-block count kernel, else by a memset.
    count_inside = grid == 1 or grid * 32 <= K * elem or B <= CUDA_COUNT_LOADS_PER_THREAD * threads
    runs = []
    if grid > 1 or not count_inside:
        if not count_inside and B <= 16384:   # kSingleBlockCount
            runs.append(KernelRun("cuda count_kept_kernel", 1, 32, "serial", {}, _cdiv(B, 1024 * 8)))
        else:
            runs.append(KernelRun("cuda workspace memset", 1, 1, "memset", {}))
            if not count_inside:
                runs.append(KernelRun("cuda count_kept_kernel", _cdiv(B, 4096), 8, "prepass", {}))
    return runs + [main]


# The shapes of the CUDA large-K kernel's constant-term variants, large_k_fixed<scalar_t, active, passive>
# (apl_cuda_large_k.cu: fixed_shapes and the pairs large_k_variant instantiates).
CUDA_FIXED_ACTIVE = {"ce": 0, "fl": 0, "gce": 0, "taylor": 0, "nce": 1, "nfl": 2, "ngce": 3}
CUDA_FIXED_PASSIVE = {"none": 0, "mae": 0, "nmae": 0, "agce": 0, "aul": 0, "ael": 0, "rce": 4, "nrce": 4,
                      "amse": 5, "nnce": 6}
CUDA_FIXED_PAIRS = {(0, 0), (1, 0), (1, 4), (1, 5), (1, 6), (2, 0), (2, 4), (3, 0)}


def cuda_fixed_shapes(spec):
    """(active, passive) shapes of the large_k_fixed variant that runs `spec`, or None (the general kernel)."""
    if spec.active == "nfl" and (spec.gamma != 0.5 or spec.grad != "official"):
        return None
    pair = (CUDA_FIXED_ACTIVE.get(spec.active), CUDA_FIXED_PASSIVE.get(spec.passive))
    return pair if pair in CUDA_FIXED_PAIRS else None


PLANS = {"triton": triton_plan, "cuda": cuda_plan}


# ----------------------------------------------------------------------------- toolchains and compiles
def triton36_path() -> Optional[str]:
    """The folder holding Triton 3.6.0's `triton/` package, or None."""
    path = os.environ.get("APL_TRITON36_PATH") or TRITON36_DEFAULT
    return path if os.path.isfile(os.path.join(path, "triton", "__init__.py")) else None


def _triton_version(path: Optional[str]) -> str:
    code = "import triton; print(triton.__version__)"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if path:
        code = f"import sys; sys.path.insert(0, {path!r}); " + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return out.stdout.strip() or "unknown"


_TRITON_WORKER = r"""
import json, os, subprocess, sys
toolchain = sys.argv[1]
if toolchain:
    sys.path.insert(0, toolchain)
sys.path.insert(1 if toolchain else 0, sys.argv[2])
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature
from apl_kernels.triton import kernels as tk
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
jobs = json.loads(sys.stdin.read())
out = {}
for job in jobs:
    try:
        fn = getattr(tk, job["kernel"])
        T = lambda name: MockTensor(getattr(torch, name))
        z, acc = T(job["dtype"]), T("float32")
        if job["kernel"] in ("_count_kernel",):
            args = (T("int64"), acc, job["N"], -100)
        elif job["kernel"] == "_sum_kernel":
            args = (acc, acc, acc, job["N"])
        else:
            N, K = job["N"], job["K"]
            args = (z, T("int64"), acc, z, acc, N, K, K, K, -100)
            # The LossSpec's scalars after these, read off the kernel's signature so a new parameter needs no
            # change here: floats as (hi, lo) pairs, integers (taylor's order) as themselves.
            spec = [p.name for p in fn.params[len(args):] if not p.is_constexpr]
            args += tuple(1.0 if n.endswith("_hi") else 0.0 if n.endswith("_lo") else 2 for n in spec)
        kwargs = dict(job["consts"], num_warps=job["warps"])
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        path = os.path.join(sys.argv[3], job["id"] + ".cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        result = {"sass": text, "usage": usage, "name": compiled.metadata.name, "shared": compiled.metadata.shared,
                  "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                  "divisible_by_16": [list(signature)[k[0]] for k, v in attrs.items() if v]}
        with open(job["cache"] + ".tmp", "w") as f:   # each result kept at once: an interrupted run resumes
            json.dump(result, f)
        os.replace(job["cache"] + ".tmp", job["cache"])
        out[job["id"]] = {"cached": True}
    except Exception as error:
        out[job["id"]] = {"error": repr(error)[:2000]}
print("RESULTS" + json.dumps(out))
"""


def compile_triton(jobs: List[dict], toolchain: Optional[str], version: str, workers: int) -> Dict[str, dict]:
    """Compile Triton variants for sm_90 in subprocesses (Triton `toolchain` first on sys.path)."""
    if not jobs:
        return {}
    # Cached by the toolchain and the kernels' source, so that a rerun only compiles what changed.
    digest = hashlib.sha256(f"{toolchain} {version}".encode())
    for name in ("kernels.py", "loss_math.py"):
        digest.update(open(os.path.join(REPO, "apl_kernels", "triton", name), "rb").read())
    digest.update(_TRITON_WORKER.encode())
    tag = digest.hexdigest()[:16]
    os.makedirs(CACHE_DIR, exist_ok=True)
    cache_path = lambda job: os.path.join(CACHE_DIR, "triton-%s-%s.json" % (tag, hashlib.sha256(
        json.dumps({k: v for k, v in job.items() if k != "id"}, sort_keys=True).encode()).hexdigest()[:16]))
    todo = [dict(job, cache=cache_path(job)) for job in jobs if not os.path.exists(cache_path(job))]
    todo.sort(key=lambda job: (job["kernel"] != "chunked_kernel", job["dtype"] != "bfloat16"))  # headline first
    errors = _compile_triton(todo, toolchain, workers) if todo else {}
    results: Dict[str, dict] = {}
    for job in jobs:
        try:
            with open(cache_path(job)) as f:
                results[job["id"]] = json.load(f)
        except (OSError, ValueError):
            results[job["id"]] = errors.get(job["id"]) or {"error": "no result"}
    return results


def _compile_triton(jobs: List[dict], toolchain: Optional[str], workers: int) -> Dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        shards = [jobs[i::workers] for i in range(workers) if jobs[i::workers]]

        def run(shard):
            proc = subprocess.run([sys.executable, "-c", _TRITON_WORKER, toolchain or "", REPO, tmp],
                                  input=json.dumps(shard), capture_output=True, text=True, env=env, timeout=1800)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS")]
            if not lines:
                raise RuntimeError(f"the Triton compile worker failed:\n{proc.stderr[-3000:]}")
            return json.loads(lines[0][len("RESULTS"):])

        with ThreadPoolExecutor(len(shards)) as pool:
            for part in pool.map(run, shards):
                results.update(part)
    return results


def nvcc_path() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_flags() -> List[str]:
    """nvcc flags of setup.py's CUDA build (torch's defaults, -O3), for sm_90 only."""
    import torch
    from torch.utils import cpp_extension
    flags = ["-cubin", "-arch=sm_90", "-O3", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS,
             "-I" + os.path.join(REPO, "csrc")]
    flags += ["-I" + p for p in cpp_extension.include_paths(device_type="cuda")]
    try:
        import nvidia
        flags += ["-I" + d for b in nvidia.__path__ for d in sorted(glob.glob(os.path.join(b, "cu[0-9]*", "include")))]
    except ImportError:
        pass
    del torch
    return flags


def _cuobjdump() -> Optional[str]:
    """A cuobjdump: the toolkit's, else the one Triton's package carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for folder in filter(None, (triton36_path(),)):
        path = os.path.join(folder, "triton", "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def compile_cuda(sources: List[str], workers: int) -> Dict[str, dict]:
    """{demangled kernel name: {sass, usage}} of csrc/cuda sources built for sm_90 (cached by content)."""
    nvcc, dump = nvcc_path(), _cuobjdump()
    if nvcc is None or dump is None:
        raise RuntimeError("nvcc or cuobjdump not found")
    flags = _cuda_flags()
    os.makedirs(CACHE_DIR, exist_ok=True)
    digest = hashlib.sha256(" ".join([nvcc] + flags).encode())
    for path in sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.[ch]*"), recursive=True)):
        digest.update(open(path, "rb").read())
    tag = digest.hexdigest()[:16]

    def build(source):
        cubin = os.path.join(CACHE_DIR, f"{os.path.basename(source)}.{tag}.cubin")
        if not os.path.exists(cubin):
            tmp = cubin + f".tmp{os.getpid()}"
            proc = subprocess.run([nvcc, *flags, "-o", tmp, source], capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-3000:]}")
            os.replace(tmp, cubin)
        text = subprocess.run([dump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([dump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        return text, usage

    out: Dict[str, dict] = {}
    with ThreadPoolExecutor(max(1, min(workers, len(sources)))) as pool:
        for text, usage in pool.map(build, sources):
            functions = sass.parse_sass(text)
            resources = sass.resource_usage(usage)
            names = _demangle(list(functions))
            for mangled, instructions in functions.items():
                out[names[mangled]] = {"instructions": instructions, "usage": resources.get(mangled, {}),
                                       "mangled": mangled}
    return out


def _demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for mangled, full in zip(names, out):
        # "void apl_cuda::(anonymous namespace)::large_k_kernel<c10::BFloat16, false>(apl_cuda::Args<...>, long)"
        match = re.search(r"(\w+)(<[^()]*>)?\(", full)
        short[mangled] = "cuda " + (match.group(1) + (match.group(2) or "") if match else full)
    return short


# ----------------------------------------------------------------------------- counting
def occupancy(regs: int, smem_block: int, warps: int) -> dict:
    """Blocks and warps per SM that registers, shared memory and the hardware limits allow."""
    regs_per_warp = _cdiv(max(regs, 1) * 32, 256) * 256
    limits = {"warps": MAX_WARPS_PER_SM // warps, "blocks": MAX_BLOCKS_PER_SM,
              "registers": REGS_PER_SM // (regs_per_warp * warps),
              "shared memory": SMEM_PER_SM // (smem_block + SMEM_RESERVED_PER_BLOCK)}
    blocks = max(0, min(limits.values()))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy_pct": round(100 * blocks * warps / MAX_WARPS_PER_SM, 1),
            "limited_by": min(limits, key=limits.get)}


def per_element(run: KernelRun, instructions: List[sass.Instruction], B: int, K: int) -> dict:
    """Thread-instructions per logit of a forward kernel, with the loops it was read from."""
    loops = sass.find_loops(instructions)
    top = sass.top_level(loops)
    size = sass.code_size(instructions)
    threads = run.warps * 32
    info = {"loops": [{"header": hex(l.header), "latch": hex(l.latch), "static": l.static,
                       "shortest": l.shortest, "load_bytes": l.loads, "store_bytes": l.stores,
                       "depth": sum(1 for p in loops if p.contains(l))} for l in loops]}
    if run.kind == "chunked":
        rows = [l for l in top if l.children]
        if len(rows) != 1:
            raise RuntimeError(f"{run.variant}: expected one row loop holding the chunk loops, found {len(rows)}")
        row = rows[0]
        chunk = run.params["BLOCK_K"]
        trips = _cdiv(K, chunk)
        per_row = sass.executed(row, lambda loop: trips)
        elements_per_thread = K / threads
        info["mufu_per_element"] = (_mufu(instructions, row) + sum((trips - 1) * _mufu(instructions, c)
                                                                   for c in row.children)) / elements_per_thread
        info["hot_loops"] = [{"static": c.static, "elements_per_thread": chunk / threads,
                              "per_element": round(c.static * threads / chunk, 2)} for c in row.children]
        info["sass_per_element"] = per_row / elements_per_thread
        # The chunk loops are the passes in order: the first reads the logits, the last writes the
        # gradient, a middle one (pass 2) re-reads the row; the rest of the row loop is its fixed work.
        passes = sorted(row.children, key=lambda l: l.header)
        roles = ["read"] + ["reread"] * (len(passes) - 2) + ["write"]
        phases = [_phase(role, trips * sass.executed(c, lambda loop: 1) / elements_per_thread,
                         trips * _mufu(instructions, c) / elements_per_thread) for role, c in zip(roles, passes)]
        fixed = info["sass_per_element"] - sum(p["sass_per_element"] for p in phases)
        fixed_mufu = info["mufu_per_element"] - sum(p["mufu_per_element"] for p in phases)
        info["phases"] = phases + [_phase("none", fixed, fixed_mufu)]
        info["count"] = "static"
        # A chunk loop with plain loads (LDG) uses them in the iteration that issued them: a wait every
        # iteration.  One software-pipelined by Triton (tl.range num_stages: cp.async, LDGSTS, into
        # shared memory stages) waits for its first stages only, once a row (ASSUMED: each iteration's
        # work covers the latency of the copies in flight; its barriers are counted as instructions).
        info["waits_per_row"] = sum(trips if c.loads.get("LDG") else 1 if c.loads.get("LDGSTS") else 0
                                    for c in passes)
    elif run.kind in ("single", "tiles"):
        block_r = run.params["BLOCK_R"]
        tiles = _cdiv(B, block_r)
        if run.kind == "single":
            # the tile loop (the largest) runs once per tile, the count loop once per 1024 rows
            tile_loop = max(top, key=lambda l: l.static) if top else None
            trips = lambda loop: tiles if loop is tile_loop else _cdiv(B, 1024)
            total = size - sum(l.static for l in top) + sum(trips(l) * sass.executed(l, lambda c: 1) for l in top)
            elements_per_thread = B * K / threads
        else:   # one tile per program
            total = size + sum(sass.executed(l, lambda c: 1) - l.static for l in top)
            elements_per_thread = min(block_r, B) * K / threads
        info["hot_loops"] = [{"static": total, "elements_per_thread": round(elements_per_thread, 3),
                              "per_element": round(total / elements_per_thread, 2)}]
        info["sass_per_element"] = total / elements_per_thread
        info["count"] = "static"
        info["mufu_per_element"] = info["sass_per_element"] * _mufu_share(instructions, top)
    elif run.kind == "small_k":
        info.update(_small_k(run, instructions, top, K))
        info["mufu_per_element"] = info["sass_per_element"] * _mufu_share(instructions, top)
    elif run.kind == "large_k":
        info.update(_large_k(run, instructions, top, K, threads))
    else:
        raise ValueError(run.kind)
    return info


# What each named per-slot loop of the large-K kernels moves: "read" the logits from HBM (pass 1),
# "reread" the row again (shared memory, the streamed tail from L2), "write" the gradient to HBM.
LARGE_K_PHASE = {"fill": "read", "tail_max": "read", "cached_max": "read",
                 "cached": "reread", "tail": "reread", "cached2": "reread", "tail2": "reread",
                 "grad": "write", "grad_cached": "write", "grad_tail": "write",
                 "grad_bytes_cached": "write", "grad_bytes_tail": "write",
                 # large_k_fixed: the next row's pass 1 runs with (and after) this row's pass 3
                 "grad_fused": "write", "grad_bytes_fused": "write",
                 "fill_next": "write", "tail_max_next": "write", "cached_max_next": "write"}


def _phase(io: str, sass_per_element: float, mufu_per_element: float) -> dict:
    """A phase of a row (`phases`): what it moves to or from HBM ("read" the logits, "write" the gradient,
    "reread" the row (HBM only when what is in flight overflows L2), "none": the row's fixed work) and
    its instructions per element of the row."""
    return {"io": io, "sass_per_element": sass_per_element, "mufu_per_element": mufu_per_element}


def _mufu(instructions, loop: sass.Loop) -> int:
    """MUFU instructions in a loop's body (its inner loops' bodies once)."""
    return sum(1 for i in instructions if loop.header <= i.address <= loop.latch and i.opcode.startswith("MUFU"))


def _mufu_share(instructions, loops) -> float:
    """The MUFU share of the instructions of some loops' bodies: the MUFU count of kernels counted as a
    whole (the one-program and tile kernels, small K), where the loops are not weighted one by one."""
    total = sum(l.static for l in loops)
    return sum(_mufu(instructions, l) for l in loops) / total if total else 0.0


CUDA_COUNT = ("shortest path that still loads each element and runs one exp per element (a lower bound: "
              "branches remain, and the path may skip some work the loss needs)")


_DOING: Dict[tuple, int] = {}


def _doing(instructions, loop: sass.Loop, elements: int, element_bytes: int) -> int:
    """Instructions of one iteration of `loop` on the cheapest path that does `elements` elements' work."""
    key = (id(instructions), loop.header, elements, element_bytes)
    if key not in _DOING:
        _DOING[key] = _doing_uncached(instructions, loop, elements, element_bytes)
    return _DOING[key]


def _doing_uncached(instructions, loop: sass.Loop, elements: int, element_bytes: int) -> int:
    body = [i for i in instructions if loop.header <= i.address <= loop.latch]
    exps = elements if any(i.opcode.startswith("MUFU.EX2") for i in body) else 0
    found = sass.shortest_doing(body, loop.latch, elements, element_bytes, exps)
    return loop.static if found is None else found


def small_k_row_loop(variant: str, top):
    """The row loop of the small-K kernel among its top-level loops: it reads logits and writes the
    gradient, and is entered first; nvcc may also lay out branches back into its body that look like
    further (even larger) top-level loops, and the count loops before it read labels only."""
    rows = [l for l in top if l.loads.get("LDG")]
    if not rows:
        raise RuntimeError(f"{variant}: no loop with global loads")
    writers = [l for l in rows if l.stores.get("STG")]
    return min(writers, key=lambda l: l.header) if writers else max(rows, key=lambda l: l.static)


def _small_k(run: KernelRun, instructions, top, K: int) -> dict:
    """Small-K CUDA kernel: its row loop, where a group of `group` lanes takes a row of K logits."""
    row = small_k_row_loop(run.variant, top)
    group, V = run.params["group"], run.params["V"]
    elements = min(_cdiv(K, group), run.params["nv"] * V)       # logits one lane holds
    merges = max(0, int(math.log2(group)))                      # butterfly steps of group_allreduce
    extra_lo = sum((merges - 1) * c.static for c in row.children) if merges else 0
    lo = _doing(instructions, row, elements, 16 // V) + extra_lo
    hi = sass.executed(row, lambda c: merges or 1)
    per_lane = K / group
    return {"hot_loops": [{"loop": "row", "cheapest_doing_the_work": lo, "static": hi,
                           "elements_per_thread": round(per_lane, 3)}],
            "sass_per_element": lo / per_lane, "sass_per_element_static": hi / per_lane, "count": CUDA_COUNT}


def _fixed_loops(run: KernelRun, instructions, children) -> Dict[str, sass.Loop]:
    """The per-slot loops of large_k_fixed (apl_cuda_large_k.cu) by what they do: pass 1 copies the
    cached slots into shared memory (cp.async: LDGSTS, no wait per iteration), reads the streamed tail
    for its max (every tail loop takes CUDA_TAIL_BATCH slots an iteration), then takes the max of the
    cached slots from shared memory; the sums of exp over the cached slots and the tail; pass 2 (shapes
    with sums) the same; pass 3 writes the gradient from the cached slots (`fused`: each slot then
    refilled by cp.async with the block's next row; then one by one) and the tail, with 16-byte stores
    (vec) or element by element (a gradient row whose alignment differs from the logits'); then the
    rest of the next row's pass 1 (a second copy of its loops, `_next`).  The block reductions (loads
    from shared memory only) are the rest of the row."""
    def count(loop, prefix):
        return sum(1 for i in instructions if loop.header <= i.address <= loop.latch and i.opcode.startswith(prefix))
    found: Dict[str, list] = {}
    for loop in sorted(children, key=lambda l: l.header):
        if not loop.loads:      # fill_row (ignored and bad rows)
            continue
        exp = count(loop, "MUFU.EX2") > 0
        if loop.stores.get("STG"):
            # one 16-byte store a slot, a tail iteration CUDA_TAIL_BATCH slots
            slots = CUDA_TAIL_BATCH if loop.loads.get("LDG") else 1
            vec = count(loop, "STG") <= slots
            kind = ("grad_" if vec else "grad_bytes_") + (
                "fused" if loop.loads.get("LDGSTS") else "tail" if loop.loads.get("LDG") else "cached")
        elif loop.loads.get("LDGSTS"):
            kind = "fill"
        elif loop.loads.get("LDG"):
            kind = "tail_sum" if exp else "tail_max"
        elif count(loop, "LDS.128"):
            kind = "cached_sum" if exp else "cached_max"
        else:
            continue
        found.setdefault(kind, []).append(loop)
    names = {"cached_sum": ("cached", "cached2"), "tail_sum": ("tail", "tail2"), "fill": ("fill", "fill_next"),
             "tail_max": ("tail_max", "tail_max_next"), "cached_max": ("cached_max", "cached_max_next")}
    out = {}
    for kind, loops in found.items():
        labels = names.get(kind, (kind,))
        if len(loops) > len(labels):
            raise RuntimeError(f"{run.variant}: {len(loops)} loops of kind {kind}: update bench/roofline.py _fixed_loops")
        out.update(zip(labels, loops))
    expected = {"fill", "tail_max", "cached_max", "cached", "tail", "grad_fused", "grad_cached", "grad_tail",
                "fill_next", "tail_max_next", "cached_max_next"}
    if run.params["second_pass"]:
        expected |= {"cached2", "tail2"}
    if not expected <= set(out):
        raise RuntimeError(f"{run.variant}: the row loop's structure changed (found {sorted(out)}, expected "
                           f"{sorted(expected)}): update bench/roofline.py _fixed_loops")
    return out


def _large_k(run: KernelRun, instructions, top, K: int, threads: int) -> dict:
    """Large-K CUDA kernel: the per-slot loops inside its row loop, each weighted by the slots it visits."""
    rows = [l for l in top if l.children]
    if len(rows) != 1:
        raise RuntimeError(f"{run.variant}: expected one row loop, found {len(rows)}")
    row = rows[0]
    V, cap = run.params["V"], run.params["cap"]
    elem = 16 // V
    slots = _cdiv(K + V - 1, V)
    cached, streamed = min(slots, cap), max(0, slots - cap)
    if "large_k_fixed" in run.variant:
        named = _fixed_loops(run, instructions, row.children)
        # Every row but a block's first has its pass 1 fused into the previous row's pass 3: each cached
        # slot's gradient written, then the slot refilled (cp.async) with the next row's; the next row's
        # pass 1 then reads the tail and takes the max of the cached slots from shared memory.  A tail of
        # at most CUDA_TAIL_BATCH slots a thread stays in registers from pass 1 on (TailSlots): the later
        # passes' tail work is counted by their streamed loops' instructions, without their waits.
        tail = _tail_batches(streamed, threads)             # the tail loops' iterations (all threads)
        held = streamed <= CUDA_TAIL_BATCH * threads
        second = run.params["second_pass"]
        visits = {"fill": 0, "tail_max": 0, "cached_max": 0, "fill_next": 0, "tail_max_next": tail,
                  "cached_max_next": cached, "cached": cached, "tail": tail,
                  "cached2": cached if second else 0, "tail2": tail if second else 0,
                  "grad_fused": cached, "grad_cached": 0, "grad_tail": tail,
                  "grad_bytes_fused": 0, "grad_bytes_cached": 0, "grad_bytes_tail": 0}
        names, loops = list(named), list(named.values())
        return _large_k_sum(run, instructions, row, names, loops, visits, threads, K, V, elem,
                            no_wait=("tail", "tail2", "grad_tail", "grad_bytes_tail") if held else ())
    # The loops of a row with loads, in source order (apl_cuda_large_k.cu): pass 1 fills shared memory
    # (CUDA_LOAD_BATCH slots per thread per iteration), sums exp over the cached slots, streams the tail; the block
    # reduction of the stats (a loop over warps); pass 2 (losses with normaliser sums) over the cached
    # slots and the tail; the block reduction of the sums (unrolled loop and remainder); pass 3, the
    # gradient.  (fill_row, for bad rows, has no loads.)  A change of that structure must update this.
    layout = ["fill", "cached", "tail", None, "cached2", "tail2", None, None, "grad"]
    loaded = [c for c in sorted(row.children, key=lambda l: l.header) if c.loads]
    if len(loaded) == 5 and not run.params["second_pass"]:   # a constant-term variant without pass 2
        layout = ["fill", "cached", "tail", None, "grad"]
    if len(loaded) != len(layout) or not loaded[0].stores.get("STS"):
        raise RuntimeError(f"{run.variant}: the row loop's structure changed ({len(loaded)} loops with loads, "
                           f"expected {len(layout)}): update bench/roofline.py _large_k")
    names = [n for n in layout if n]
    loops = [l for n, l in zip(layout, loaded) if n]
    second = run.params["second_pass"]
    visits = {"fill": cached / CUDA_LOAD_BATCH, "cached": cached, "tail": streamed, "cached2": cached if second else 0,
              "tail2": streamed if second else 0, "grad": slots}
    return _large_k_sum(run, instructions, row, names, loops, visits, threads, K, V, elem)


def _large_k_sum(run, instructions, row, names, loops, visits, threads, K, V, elem, no_wait=()) -> dict:
    """The large-K count from its named per-slot loops and how often each runs per row (all threads);
    the loops named in `no_wait` work on values already in registers."""
    children = sorted(row.children, key=lambda l: l.header)
    detail, lo, hi, mufu = [], 0.0, 0.0, 0.0
    per_thread = K / threads
    phases = {role: _phase(role, 0.0, 0.0) for role in ("read", "reread", "write")}
    for name, loop in zip(names, loops):
        fixed_kernel = "large_k_fixed" in run.variant
        tail_batch = fixed_kernel and name.startswith(("tail", "grad_tail", "grad_bytes_tail"))
        # slots an iteration: the general kernel fills shared memory CUDA_LOAD_BATCH at a time
        elements = V * (CUDA_LOAD_BATCH if name == "fill" and not fixed_kernel else CUDA_TAIL_BATCH if tail_batch else 1)
        cheap = _doing(instructions, loop, elements, elem)
        lo += visits[name] * cheap
        hi += visits[name] * loop.static
        mufu += visits[name] * _mufu(instructions, loop)
        phase = phases[LARGE_K_PHASE[name]]
        phase["sass_per_element"] += visits[name] * cheap / threads / per_thread
        phase["mufu_per_element"] += visits[name] * _mufu(instructions, loop) / threads / per_thread
        detail.append({"loop": name, "cheapest_doing_the_work": cheap, "static": loop.static,
                       "elements_per_iteration": elements, "per_element": round(cheap / elements, 2),
                       "runs": bool(visits[name])})
    # The rest of the row (row status, reductions, finish_row) runs once per row per thread; the prefetch
    # of the next row (CCTL.E.PF2, no loads) one iteration per 32 bytes of a row over the block.
    others = [c for c in children if c not in loops]
    prefetch = [c for c in others if any(i.opcode.startswith("CCTL") and ".PF" in i.opcode
                                         for i in instructions if c.header <= i.address <= c.latch)]
    fixed = row.shortest + sum(c.shortest for c in others if c.loads.get("LDS"))
    fixed += sum(c.static for c in prefetch) * K * elem / 32 / threads
    lo, hi = lo / threads + fixed, hi / threads + row.static - sum(l.static for l in loops)
    hi += sum(c.static for c in prefetch) * (K * elem / 32 / threads - 1)
    row_mufu = _mufu(instructions, row) - sum(_mufu(instructions, l) for l in loops)
    # A held tail's passes (no_wait) also run as straight code in the row body, one copy beside each
    # streamed loop, about one iteration of it (CUDA_TAIL_BATCH slots): counted once, by the loop's visits.
    held = [l for n, l in zip(names, loops) if n in no_wait]
    row_mufu -= sum(_mufu(instructions, l) for l in held)
    hi -= sum(l.static for l in held)
    mufu = mufu / threads + row_mufu
    # Iterations (per thread, per row) of the loops with global loads: each waits for its loads.  The
    # cp.async copies (LDGSTS) of a row are waited for once, after its pass 1 has issued them all.
    waits = sum(visits[name] / threads for name, loop in zip(names, loops)
                if loop.loads.get("LDG") and name not in no_wait)
    waits += any(loop.loads.get("LDGSTS") for loop in loops)
    return {"hot_loops": detail, "sass_per_element": lo / per_thread, "sass_per_element_static": hi / per_thread,
            "mufu_per_element": mufu / per_thread, "count": CUDA_COUNT, "waits_per_row": waits,
            "phases": list(phases.values()) + [_phase("none", fixed / per_thread, row_mufu / per_thread)]}


# ----------------------------------------------------------------------------- the model
def grid_spread(grid: int, warps: int, blocks_per_sm: int):
    """(SMs used, warps per SM) of a grid: the block scheduler gives every SM a block before it
    gives any a second one (breadth first), up to the occupancy limit."""
    per_sm = min(max(1, blocks_per_sm), math.ceil(grid / SMS))
    return min(SMS, grid), per_sm * warps


def model(backend: str, loss: str, dtype: str, B: int, K: int, runs: List[KernelRun], kernels: Dict[str, dict]) -> dict:
    """One record: launches, syncs, HBM bytes, extra memory and the predicted % of copy bandwidth."""
    elem = ELEMENT_BYTES[dtype]
    logits = B * K * elem
    labels = 8 * B
    back = BACKWARD[backend]
    main = [r for r in runs if r.kind not in AUXILIARY_KINDS][0]
    info = kernels[main.variant]
    prepasses = [r for r in runs if r.kind == "prepass"]

    # HBM traffic of the forward: logits once, gradient written once, labels (again in a label pre-pass).
    hbm = logits + logits + labels * (1 + len(prepasses))
    if main.kind == "chunked":
        passes = 3 if main.params["NEEDS_PASS2"] else 2
        in_flight = main.grid * K * elem
        if in_flight > L2_BYTES:     # the rows in flight overflow L2: later passes re-read HBM
            hbm += (passes - 1) * logits
    elif main.kind == "large_k":
        V, cap = main.params["V"], main.params["cap"]
        tail = max(0, _cdiv(K + V - 1, V) - cap) * 16
        reread = 2 + (1 if main.params["second_pass"] else 0)
        if main.grid * tail > L2_BYTES:
            hbm += reread * tail * B
    # The backward: reads the gradient (from L2 when it fits), writes a new one.
    bwd_bytes = back["passes"] * ((0 if logits <= L2_BYTES else logits) + logits)
    hbm_total = hbm + bwd_bytes

    # Issue: warp-instructions over the rate of the SMs the grid occupies.
    sms_used, warps_per_sm = grid_spread(main.grid, main.warps, info["occupancy"]["blocks_per_sm"])
    rate = sms_used * min(ISSUE_PER_SM_CLOCK, max(1, warps_per_sm)) * CLOCK_HZ
    issue_s = info["sass_per_element"] * B * K / 32 / rate
    # The MUFU unit (exps, logs, square roots) has its own, lower rate: 16 results per clock per SM.
    mufu_s = info.get("mufu_per_element", 0.0) * B * K / (MUFU_PER_SM_CLOCK * sms_used * CLOCK_HZ)
    issue_s, issue_bound = max(issue_s, mufu_s), ("MUFU" if mufu_s > issue_s else "issue")
    static = info.get("sass_per_element_static", info["sass_per_element"])
    issue_static_s = static * B * K / 32 / rate
    io_s = hbm / (COPY_BYTES_S * sms_used / SMS)
    serial_s = sum(r.serial_iterations for r in runs if r.kind == "serial") * SERIAL_ITERATION_S
    bwd_s = bwd_bytes / COPY_BYTES_S
    total_s = max(io_s, issue_s) + serial_s + bwd_s
    # One block a SM runs a row's passes one after another (barriers between them): a pass that moves
    # no HBM bytes leaves that SM's share of the bandwidth idle, unless other SMs pull more than their
    # share, which this bound assumes they cannot.  Several blocks a SM overlap: the same as above.
    passes_s = max(io_s, issue_s)
    if warps_per_sm == main.warps and info.get("phases"):
        bandwidth = COPY_BYTES_S * sms_used / SMS
        rereads = [p for p in info["phases"] if p["io"] in ("reread", "write")]
        spread = (hbm - 2 * logits - labels * (1 + len(prepasses))) / max(1, len(rereads))   # re-reads from HBM
        issue_per_element = B * K / 32 / rate
        mufu_per_element = B * K / (MUFU_PER_SM_CLOCK * sms_used * CLOCK_HZ)

        def phase_s(moved, phases):
            return max(moved / bandwidth, sum(p["sass_per_element"] for p in phases) * issue_per_element,
                       sum(p["mufu_per_element"] for p in phases) * mufu_per_element)
        if main.params.get("prefetch"):
            # The next row's HBM read overlaps this row's later phases (one span); pass 1 reads L2, on its
            # own unless it runs inside the previous row's pass 3 (fused_pass1: in the span too).
            first = [p for p in info["phases"] if p["io"] == "read"]
            later = [p for p in info["phases"] if p["io"] != "read"]
            from_l2 = 0.0 if main.params.get("fused_pass1") else logits / (L2_READ_BYTES_S * sms_used / SMS)
            passes_s = max(phase_s(labels, first), from_l2) + phase_s(2 * logits + spread * len(rereads), later)
        else:
            passes_s = sum(phase_s({"read": logits + labels, "write": logits + spread, "reread": spread,
                                    "none": 0}[p["io"]], [p]) for p in info["phases"])
    total_passes_s = max(passes_s, max(io_s, issue_s)) + serial_s + bwd_s
    # Exposed latency: with one block a SM and a row's loop iterations each waiting for their loads,
    # a row takes its waits x LOOP_LATENCY_S plus its instructions (no overlap), rows one after another.
    latency_s = None
    if warps_per_sm == main.warps and info.get("waits_per_row") is not None:
        row_issue_s = info["sass_per_element"] * K / 32 / (min(ISSUE_PER_SM_CLOCK, main.warps) * CLOCK_HZ)
        row_mufu_s = info.get("mufu_per_element", 0.0) * K / (MUFU_PER_SM_CLOCK * CLOCK_HZ)
        row_s = info["waits_per_row"] * LOOP_LATENCY_S[backend] + max(row_issue_s, row_mufu_s)
        latency_s = max(math.ceil(B / main.grid) * row_s, max(io_s, issue_s)) + serial_s + bwd_s
    total_static_s = max(io_s, issue_static_s, mufu_s) + serial_s + bwd_s
    minimal_s = 2 * logits / COPY_BYTES_S
    # Beside the gradient buffers: Triton's row losses and count (several programs), CUDA's workspace
    # (16-byte header and one partial per block); the loss itself.  Raw bytes (the allocator rounds up).
    # Triton: the pre-pass's ticket, partial counts and one partial loss per main program (fp32).
    small = (4 * (1 + prepasses[0].grid + main.grid) if prepasses else 0) if backend == "triton" \
        else 16 + 8 * main.grid
    extra = logits + back["buffers"] * logits + small + 4
    fwd_launches = len(runs)
    unchecked = fwd_launches + back["launches"]   # ours: autograd's seed fill (BACKWARD_SEED_LAUNCHES) aside
    return {
        "backend": backend, "loss": loss, "dtype": dtype, "B": B, "K": K,
        "launches": unchecked + CHECK_TARGETS["launches"],
        "launches_check_targets_false": unchecked,
        "host_syncs": CHECK_TARGETS["host_syncs"] + back["host_syncs"],
        "host_syncs_check_targets_false": back["host_syncs"],
        "hbm_bytes": int(hbm_total),
        "extra_mem_ratio": round(extra / logits, 3),
        "sass_per_element": round(info["sass_per_element"], 1),
        "sass_per_element_static": round(static, 1),
        "sass_count": info["count"],
        "mufu_per_element": round(info.get("mufu_per_element", 0.0), 2),
        "bound": issue_bound if issue_s > io_s else "I/O",
        "predicted_us": round(total_s * 1e6, 2),
        "predicted_pct_copy": round(100 * minimal_s / total_s, 1),
        # from the static count (every instruction of the loop bodies): CUDA's lower end
        "predicted_pct_copy_static": round(100 * minimal_s / total_static_s, 1),
        # with no overlap of a row's passes when one block a SM runs them (the phases one after another)
        "predicted_pct_copy_serial_passes": round(100 * minimal_s / total_passes_s, 1),
        # with each loop iteration's load latency exposed (LOOP_LATENCY_S, calibrated on the H200); None
        # where several blocks share an SM or the kernel has no row loop (the other figures stand)
        "predicted_pct_copy_latency": None if latency_s is None else round(100 * minimal_s / latency_s, 1),
        "waits_per_row": None if latency_s is None else round(info["waits_per_row"], 2),
        "kernel": main.variant,
        "toolchain": info["toolchain"],
    }


def _jobs(backends, losses, dtypes, shapes):
    """(configs, Triton compile jobs) of the matrix."""
    configs, jobs = [], {}
    for backend in backends:
        for loss in losses:
            for dtype in dtypes:
                for B, K in shapes:
                    runs = PLANS[backend](loss, dtype, B, K)
                    configs.append((backend, loss, dtype, B, K, runs))
                    if backend != "triton":
                        continue
                    for run in runs:
                        if run.kind not in AUXILIARY_KINDS and run.variant not in jobs:
                            kernel = run.variant.split()[1]
                            jobs[run.variant] = {"id": f"v{len(jobs)}", "kernel": kernel, "dtype": TORCH_DTYPES[dtype],
                                                 "consts": run.params, "warps": run.warps, "N": B, "K": K}
    return configs, jobs


def run(args) -> dict:
    t0 = time.perf_counter()
    backends = args.backends.split(",") if args.backends else list(PLANS)
    losses = args.losses.split(",") if args.losses else list(LOSSES)
    dtypes = args.dtypes.split(",") if args.dtypes else list(GPU_DTYPES)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes \
        else list(GPU_SHAPES)
    for value, allowed, what in ((backends, PLANS, "backend"), (losses, LOSSES, "loss"), (dtypes, ELEMENT_BYTES, "dtype")):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise SystemExit(f"unknown {what} {bad}; expected some of {sorted(allowed)}")
    if args.subset == "ci":
        configs = []
        for backend in backends:
            for loss, dtype, (B, K) in CI_SUBSET[backend]:
                configs.append((backend, loss, dtype, B, K, PLANS[backend](loss, dtype, B, K)))
        jobs = {}
        for backend, loss, dtype, B, K, runs in configs:
            for r in runs:
                if backend == "triton" and r.kind not in AUXILIARY_KINDS:
                    jobs[r.variant] = {"id": f"v{len(jobs)}", "kernel": r.variant.split()[1],
                                       "dtype": TORCH_DTYPES[dtype], "consts": r.params, "warps": r.warps,
                                       "N": B, "K": K}
    else:
        configs, jobs = _jobs(backends, losses, dtypes, shapes)

    meta = {"what": "PREDICTED, not measured: a roofline of the fused fwd+bwd from the compiled sm_90 code",
            "machine": {"name": "NVIDIA H200 (sm_90)", "sms": SMS, "issue_warp_instructions_per_sm_clock":
                        ISSUE_PER_SM_CLOCK, "clock_ghz": CLOCK_HZ / 1e9, "l2_bytes": L2_BYTES},
            "copy_bandwidth_assumed_gbps": COPY_BYTES_S / 1e9,
            "copy_bandwidth_source": "the H200's measured device-to-device copy bandwidth (issue 13)",
            "method": __doc__.split("\n\n", 3)[3].strip(),
            "backward_assumed": BACKWARD, "backward_seed_launches": BACKWARD_SEED_LAUNCHES,
            "check_targets_assumed": CHECK_TARGETS, "serial_iteration_s_assumed": SERIAL_ITERATION_S,
            "loop_latency_s_calibrated": LOOP_LATENCY_S,
            "subset": args.subset or "full", "toolchains": {}}
    kernels: Dict[str, dict] = {}
    workers = max(1, args.jobs)

    if "triton" in backends:
        path = triton36_path()
        version = _triton_version(path)
        if path and version != "3.6.0":
            print(f"warning: {path} holds Triton {version}, not 3.6.0", file=sys.stderr)
        label = f"triton {version}" + (" (build/toolchains)" if path else
                                       " (the project's; Triton 3.6.0 not found: install it with "
                                       "`python -m pip install --target build/toolchains/triton-3.6.0 "
                                       "--no-deps triton==3.6.0` or set APL_TRITON36_PATH)")
        if not path:
            print(f"warning: {label}", file=sys.stderr)
        meta["toolchains"]["triton"] = label
        print(f"compiling {len(jobs)} Triton variants for sm_90 with {label} (cached under "
              f"{os.path.relpath(CACHE_DIR, REPO)}) ...", flush=True)
        compiled = compile_triton(list(jobs.values()), path, version, workers)
        for variant, job in jobs.items():
            res = compiled.get(job["id"], {"error": "missing"})
            if "error" in res:
                raise SystemExit(f"{variant}: Triton compile failed: {res['error']}")
            functions = sass.parse_sass(res["sass"])
            name = res["name"] if res["name"] in functions else next(iter(functions))
            usage = sass.resource_usage(res["usage"]).get(name, {})
            kernels[variant] = {"instructions": functions[name], "usage": usage, "toolchain": label,
                                "shared": res["shared"], "specialisation": {"signature": res["signature"],
                                                   "divisible_by_16": res["divisible_by_16"]}}
    if "cuda" in backends:
        nvcc = nvcc_path()
        if nvcc is None:
            raise SystemExit("nvcc not found: the CUDA kernels cannot be compiled (set CUDA_HOME or drop --backends cuda)")
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        label = f"nvcc {version.split(',')[0].replace('Build ', '')} (-arch=sm_90 -O3)"
        meta["toolchains"]["cuda"] = label
        sources = [os.path.join(REPO, "csrc", "cuda", f) for f in ("apl_cuda_small_k.cu", "apl_cuda_large_k.cu")]
        needed = {r.variant.split(" ", 1)[1].split("<")[0] for c in configs if c[0] == "cuda" for r in c[5]}
        sources = [s for s in sources if any(os.path.basename(s) == f"apl_cuda_{n[:7]}.cu" for n in needed)]
        print(f"compiling {', '.join(os.path.relpath(s, REPO) for s in sources)} for sm_90 with {label} ...", flush=True)
        for name, res in compile_cuda(sources, workers).items():
            res["toolchain"] = label
            kernels[name] = res

    records, kernel_table, counted_cache = [], {}, {}
    for backend, loss, dtype, B, K, runs in configs:
        this = {}
        for r in runs:
            if r.kind in AUXILIARY_KINDS:
                continue
            if r.variant not in kernels:
                raise SystemExit(f"{r.variant} is not in the compiled code (found: {sorted(kernels)[:20]})")
            k = kernels[r.variant]
            static_smem = k["usage"].get("SHARED", 0)
            # Triton: the compiler's shared memory (the stages of pipelined loops, reduction scratch)
            dynamic_smem = r.params.get("smem", 0) if backend == "cuda" else k.get("shared", 0)
            if r.kind == "large_k":
                # As the host plan (csrc/cuda/apl_cuda_large_k.cu): the dynamic row cache gets the opt-in
                # maximum less the kernel's static shared memory (its reduction scratch) and 256 bytes.
                dynamic_smem = min(dynamic_smem, (SMEM_OPTIN_PER_BLOCK - static_smem - 256) // 16 * 16)
            smem = static_smem + dynamic_smem
            occ = occupancy(k["usage"].get("REG", 0), smem, r.warps)   # per launch: block sizes vary
            if r.kind == "large_k":
                r.grid = max(1, min(B, occ["blocks_per_sm"] * SMS))
            memo = (r.variant, json.dumps(r.params, sort_keys=True), B if r.kind == "single" else 0, K)
            if memo not in counted_cache:
                counted_cache[memo] = per_element(r, k["instructions"], B, K)
            counted = counted_cache[memo]
            this[r.variant] = {**counted, "occupancy": occ, "toolchain": k["toolchain"]}
            key = f"{r.variant} [{B},{K}]" + (" second pass on" if r.params.get("second_pass") else "")
            kernel_table[key] = {
                "toolchain": k["toolchain"], "registers": k["usage"].get("REG"), "stack_bytes": k["usage"].get("STACK"),
                "spills": bool(k["usage"].get("STACK", 0) or k["usage"].get("LOCAL", 0)),
                "shared_bytes": smem, "warps": r.warps, "grid": r.grid, **occ,
                "sass_per_element": round(counted["sass_per_element"], 2),
                "sass_per_element_static": round(counted.get("sass_per_element_static",
                                                             counted["sass_per_element"]), 2),
                "count": counted["count"], "hot_loops": counted["hot_loops"], "loops": counted["loops"],
                **({"specialisation": k["specialisation"]} if "specialisation" in k else {})}
        records.append(model(backend, loss, dtype, B, K, runs, this))
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    data = {"meta": meta, "records": records, "kernels": kernel_table}
    print_table(data)
    if args.out != "-":
        write_json_atomic(args.out, data)
        print(f"\n{len(records)} PREDICTED records -> {args.out} ({meta['seconds']} s)")
    return data


def print_table(data: dict, file=sys.stdout) -> None:
    meta = data["meta"]
    print(f"\nPREDICTED (not measured) fwd+bwd on an H200 from sm_90 SASS; copy bandwidth assumed "
          f"{meta['copy_bandwidth_assumed_gbps']:.0f} GB/s; toolchains: "
          + "; ".join(f"{k}: {v}" for k, v in meta["toolchains"].items()), file=file)
    header = (f"{'backend':<7} {'loss':<9} {'dtype':<5} {'shape':<15} {'lnch':>4} {'lnch*':>5} {'sync':>4} "
              f"{'HBM MB':>9} {'mem x':>6} {'SASS/el':>8} {'bound':>5} {'pred us':>9} {'pred %copy':>12} "
              f"{'serial%':>7} {'lat%':>5}")
    print(header, file=file)
    for r in data["records"]:
        print(f"{r['backend']:<7} {r['loss']:<9} {r['dtype']:<5} {'[%d,%d]' % (r['B'], r['K']):<15} "
              f"{r['launches']:>4} {r['launches_check_targets_false']:>5} {r['host_syncs']:>4} "
              f"{r['hbm_bytes'] / 1e6:>9.2f} {r['extra_mem_ratio']:>6.2f} {r['sass_per_element']:>8.1f} "
              f"{r['bound']:>5} {r['predicted_us']:>9.2f} {_pct(r):>12} "
              f"{r.get('predicted_pct_copy_serial_passes', r['predicted_pct_copy']):>7.1f} "
              f"{_latency(r):>5}", file=file)
    print("lnch: the loss's launches per fwd+bwd with default arguments (check_targets=True), autograd's "
          "ones_like seed aside; lnch*: with check_targets=False (train/, bench.kernels).  CUDA: SASS/el is a lower bound (the cheapest path that "
          "still loads and exps each element; branches remain), so its %copy is an upper "
          "bound, shown as a range down to the static count's.  serial%: with a row's passes one after another "
          "where one block a SM runs them (no overlap).  lat%: with each loop iteration's load latency exposed "
          "(one block a SM; LOOP_LATENCY_S calibrated on the H200, 2026-11-30), the forecast where it is "
          "lowest.  Launch overheads are not in 'pred us'.", file=file)


def _latency(r: dict) -> str:
    value = r.get("predicted_pct_copy_latency")
    return "-" if value is None else f"{value:.1f}"


def _pct(r: dict) -> str:
    if r["predicted_pct_copy_static"] == r["predicted_pct_copy"]:
        return f"{r['predicted_pct_copy']:.1f}"
    return f"{r['predicted_pct_copy_static']:.1f}-{r['predicted_pct_copy']:.1f}"


def load(path: str = DEFAULT_OUT) -> Optional[dict]:
    """The committed predictions, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.roofline",
        description="PREDICTED (not measured) H200 speed of the fused losses' fwd+bwd from their compiled sm_90 "
                    "code: SASS instructions per element, registers, spills, occupancy, launches, host syncs, HBM "
                    "bytes, extra memory, % of copy bandwidth.  Needs no GPU.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", choices=("ci",), help="ci: one Triton and one CUDA configuration (seconds "
                                                          "to a minute; the CUDA compile is cached under build/)")
    parser.add_argument("--backends", help="comma list of triton,cuda (default both)")
    parser.add_argument("--losses", help=f"comma list (default {','.join(LOSSES)})")
    parser.add_argument("--dtypes", help="comma list of bf16,fp32 (default both)")
    parser.add_argument("--shapes", help="comma list of BxK (default the GPU matrix of bench.kernels)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compiles run in parallel (default min(2, CPUs))")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON path ('-': none); default {DEFAULT_OUT}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
