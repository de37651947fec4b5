"""Runs in a subprocess with libasan preloaded (test_emu_asan.py): builds the ASan variant of the
emulated op from a planted csrc/ copy (plants switched off unless CUDA_EMU_PLANT is set) and
runs a subset of the emulated checks.

    python asan_runner.py BUILD_DIR PLANTED_CSRC subset     -> prints "ASAN SUBSET PASSED <n>"
    python asan_runner.py BUILD_DIR PLANTED_CSRC read_past  -> ASan aborts (the test expects it)
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
# libasan is already loaded; the compilers this process starts must not get it.
os.environ.pop("LD_PRELOAD", None)

import torch  # noqa: E402

import emu_build  # noqa: E402
from emu_helpers import env  # noqa: E402
from test_cuda_kernels import _views, check, make  # noqa: E402
from apl_kernels import LossSpec  # noqa: E402
from apl_kernels.spec import REDUCTIONS  # noqa: E402


def run_asan(logits, target, loss, reduction="mean"):
    spec = LossSpec.from_name(loss)
    with env(CUDA_EMU_SCHEDULE="forward"):
        return torch.ops.apl_kernels_emu_asan.fused_loss(logits, target, *spec.op_args(), REDUCTIONS[reduction],
                                                         -100, True)


def subset():
    """Every kernel variant once, on exact-size tensors (a read past the last row hits ASan's red zone)."""
    n = 0
    cases = [  # (N, K, dtype, loss, reduction)
        (37, 13, torch.float32, "nce+rce", "mean"),     # tiny rows: a thread per row
        (37, 13, torch.float16, "nfl+nmae", "none"),
        (37, 100, torch.bfloat16, "ngce+nrce", "sum"),  # one slot per lane
        (37, 61, torch.float64, "nfl+rce", "mean"),
        (9, 1000, torch.float32, "ngce+mae", "mean"),   # wide small-K
        (9, 4099, torch.float32, "nce+rce", "mean"),    # large K, in shared memory
        (5, 3001, torch.float64, "fl+nrce", "none"),
    ]
    for N, K, dtype, loss, reduction in cases:
        logits, target = make(N, K, dtype, device="cpu")
        check(logits, target, loss, reduction, run=run_asan)
        n += 1
    with env(APL_CUDA_SMEM_PER_BLOCK="4096"):  # the streamed tail
        logits, target = make(3, 30011, torch.bfloat16, device="cpu")
        check(logits, target, "nfl+nmae", run=run_asan)
        n += 1
    for name, logits in _views(8, 37, torch.float16, device="cpu").items():  # misaligned rows
        check(logits, torch.randint(0, 37, (8,)), "nce+rce", run=run_asan)
        n += 1
    print(f"ASAN SUBSET PASSED {n}", flush=True)


def read_past():
    """7 contiguous rows of 13 floats (91, not a multiple of 4): the last slot of the last row is partial,
    and the plant reads one element more, past the end of the allocation."""
    logits, target = make(7, 13, torch.float32, device="cpu", ignore_frac=0.0)
    with env(CUDA_EMU_PLANT="6"):
        run_asan(logits, target, "nce+rce")
    print("READ PAST THE ROW END NOT CAUGHT", flush=True)


if __name__ == "__main__":
    build_dir, csrc, mode = sys.argv[1:4]
    emu_build.build(Path(build_dir), emu_build.ASAN, csrc=Path(csrc))
    {"subset": subset, "read_past": read_past}[mode]()
