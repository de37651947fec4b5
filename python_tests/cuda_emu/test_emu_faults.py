"""Fault injection: the bugs of emu_plants.py, planted in a temporary copy of csrc/, each caught
by the emulated checks with its kind and line; without the plant the same check passes.

All plants are in one build, torch.ops.apl_kernels_emu_planted.  The read past
the row end is only visible to AddressSanitizer: test_emu_asan.py plants it.
"""
import re

import pytest
import torch

import emu_build
from emu_helpers import assert_bit_identical, env
from test_cuda_kernels import _views, check, make
from apl_kernels import LossSpec
from apl_kernels.spec import REDUCTIONS
from emu_plants import DEADLOCK, PLANTS, line_of


@pytest.fixture(scope="session")
def planted(emu_build_dir, planted_csrc):
    """(the planted op, the planted csrc/ copy)."""
    emu_build.build(emu_build_dir, emu_build.PLANTED, csrc=planted_csrc)
    return torch.ops.apl_kernels_emu_planted.fused_loss, planted_csrc


def runner(op, plant: int, schedules=("forward", "reverse")):
    """A `run` for test_cuda_kernels.check: the planted op with plant `plant` switched on."""
    def run(logits, target, loss, reduction="mean"):
        spec = LossSpec.from_name(loss)
        outs = []
        for s in schedules:
            with env(CUDA_EMU_PLANT=str(plant), CUDA_EMU_SCHEDULE=s):
                outs.append(op(logits, target, *spec.op_args(), REDUCTIONS[reduction], -100, True))
        for o in outs[1:]:
            assert_bit_identical(outs[0], o, f"plant {plant}: {schedules[0]} vs the other schedules")
        return outs[0]
    return run


def small_case():
    return make(173, 100, torch.float32, device="cpu")  # 173 one-warp blocks, 32 lanes per row


def count_case():
    """Mean over 2100 rows of 10 (66 blocks of 32 rows): more labels than one round of loads a thread,
    so the one-block count kernel (1024 threads) runs before the loss kernel."""
    return make(2100, 10, torch.float32, device="cpu")


def caught(op, plant, logits, target, loss="nce+rce", reduction="mean"):
    """The failure the checks raise with the plant switched on; the same checks pass without it."""
    check(logits, target, loss, reduction, run=runner(op, 0))
    with pytest.raises((RuntimeError, AssertionError)) as info:
        check(logits, target, loss, reduction, run=runner(op, plant))
    return str(info.value)


def test_removed_syncthreads(planted):
    """Without the barrier after the ticket, threads read is_last before thread 0 writes it:
    in reverse order they exit, and thread 0 waits alone at the next barrier."""
    op, csrc = planted
    msg = caught(op, 1, *small_case())
    assert re.search(r"barrier after exit|exit while others wait at a barrier", msg), msg
    assert line_of(csrc, PLANTS["removed_syncthreads"]) in msg, msg


def test_exit_while_others_wait_at_a_barrier(planted):
    """Warps 1-31 of the count kernel return before its barrier; warp 0 waits there (forward order)."""
    op, csrc = planted
    msg = caught(op, 11, *count_case())
    assert "exit while others wait at a barrier" in msg, msg
    assert "block (0,0,0) thread (32,0,0) exited" in msg, msg
    file, line = line_of(csrc, PLANTS["exit_before_barrier"]).rsplit(":", 1)
    assert f"wait at __syncthreads at {file}:{int(line) + 1}" in msg, msg  # the barrier below the plant


def test_off_by_one_ticket(planted):
    """The second-to-last block sums the partials: it reads the last one before it is written (poisoned: NaN)."""
    op, _ = planted
    msg = caught(op, 2, *small_case())
    assert "loss" in msg.lower() or "not close" in msg.lower(), msg


def test_half_width_butterfly(planted):
    op, _ = planted
    msg = caught(op, 3, *small_case())
    assert "not close" in msg.lower(), msg


def test_shuffle_under_divergent_branch(planted):
    """Only odd lanes shuffle: an even lane is at the barrier while its warp waits for it."""
    op, csrc = planted
    msg = caught(op, 4, *count_case())
    assert "divergent warp collective" in msg, msg
    assert line_of(csrc, PLANTS["divergent_shuffle"]) in msg, msg
    assert re.search(r"block \(0,0,0\) thread \(\d+,0,0\)", msg), msg


def test_deadlock_lists_every_wait(planted):
    """Lane 0 waits at __syncwarp(0x3) for lane 1, which went on to the shuffle."""
    op, csrc = planted
    msg = caught(op, DEADLOCK, *count_case())
    assert "deadlock" in msg, msg
    site = line_of(csrc, PLANTS["divergent_shuffle"])
    assert f"thread 0 waits at __syncwarp(mask 0x00000003) at {site}" in msg, msg
    assert f"threads 1-31 waits at __shfl_xor_sync(mask 0xffffffff) at {site}" in msg, msg


def test_forced_misalignment(planted):
    op, csrc = planted
    logits = _views(16, 999, torch.float32, device="cpu")["column_offset_1"]
    target = torch.randint(0, 999, (16,))
    msg = caught(op, 5, logits, target)
    assert "misaligned load" in msg and "__ldg of 16 bytes" in msg, msg
    assert line_of(csrc, PLANTS["forced_misalignment"]) in msg, msg


def test_segfault_in_kernel(planted):
    op, csrc = planted
    logits, target = make(4, 2000, torch.float32, device="cpu", ignore_frac=0.0)
    msg = caught(op, 7, logits, target)
    assert "SIGSEGV in a kernel" in msg and "block (1,0,0) thread" in msg, msg
    assert re.search(rf"{re.escape(str(csrc))}/cuda/apl_cuda_(large_k\.cu|common\.cuh):\d+", msg), msg


def test_shared_memory_limit_enforced(planted):
    """Without cudaFuncSetAttribute a launch over 48 KB of dynamic shared memory fails, as on the GPU.
    (fp64: the only test of this build whose large-K kernel asks for more than 48 KB.)"""
    op, _ = planted
    logits, target = make(3, 20000, torch.float64, device="cpu")
    with pytest.raises(RuntimeError, match="invalid argument"):
        runner(op, 8, schedules=("forward",))(logits, target, "nce+rce")
    check(logits, target, "nce+rce", run=runner(op, 0))


def test_divergent_syncthreads(planted):
    op, csrc = planted
    msg = caught(op, 9, *small_case())
    assert "divergent __syncthreads" in msg, msg
    site = line_of(csrc, PLANTS["divergent_syncthreads"])
    file, line = site.rsplit(":", 1)
    assert site in msg and f"{file}:{int(line) + 1}" in msg, msg


def test_missing_cp_async_wait(planted):
    """Pass 1 reads its cached slots back without waiting for their cp.async copies: under the
    forward schedule the copies are still in flight (the slots hold poison) and the threads exit
    with them pending, a fault that names the copy."""
    op, csrc = planted
    logits, target = make(2, 60000, torch.float32, device="cpu", ignore_frac=0.0)
    msg = caught(op, 12, logits, target, loss="nce+mae")
    assert "exit with cp.async copies not waited for" in msg and "thread (0,0,0): 28 issued" in msg, msg
    common = csrc / "cuda" / "apl_cuda_common.cuh"
    site = [i + 1 for i, line in enumerate(common.read_text().splitlines()) if "CUDA_EMU_ASYNC_COPY16(smem" in line]
    assert f"the last at {common}:{site[0]}" in msg, msg   # the copy helper's emulated line


def test_cp_async_before_the_slot_is_read(planted):
    """Pass 3 refills a slot with the next row before it reads the slot for this row's gradient:
    under the reverse schedule the copy lands at once, so the gradient of a block's first row is
    computed from its second row's logits."""
    op, _ = planted
    logits, target = make(140, 60000, torch.float32, device="cpu", ignore_frac=0.0, seed=7)
    msg = caught(op, 13, logits, target, loss="nce+mae")
    assert "bit-identical" in msg or "not close" in msg.lower(), msg
