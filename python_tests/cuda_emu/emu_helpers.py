"""Running the emulated op (torch.ops.apl_kernels_emu.fused_loss) under the emulator's schedules."""
from __future__ import annotations

import contextlib
import os

import torch

from apl_kernels import LossSpec
from apl_kernels.spec import REDUCTIONS

# Every check runs under these two orders and requires bit-identical outputs;
# test_emu_kernels.test_all_orders_bit_identical adds the other two.
SCHEDULES = ("forward", "reverse")
ALL_ORDERS = ("forward", "reverse", "random:12345", "roundrobin")


@contextlib.contextmanager
def env(**values):
    """Set environment variables (None: unset) for the block; the emulator reads them at each launch."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def emulated_op():
    return torch.ops.apl_kernels_emu.fused_loss


def run_once(logits, target, spec: LossSpec, reduction="mean", ignore_index=-100, schedule="forward",
             fibers="asm"):
    """The op's (loss, grad) under one schedule; grad is d loss.sum() / d logits, as the backward gives it."""
    with env(CUDA_EMU_SCHEDULE=schedule, CUDA_EMU_FIBERS=fibers):
        return emulated_op()(logits, target, *spec.op_args(), REDUCTIONS[reduction], ignore_index, True)


def as_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(a, b, what):
    for x, y, name in ((a[0], b[0], "loss"), (a[1], b[1], "grad")):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name} dtype/shape differ"
        # NaN == NaN bit for bit: compare the bytes.
        assert torch.equal(as_bytes(x), as_bytes(y)), (
            f"{what}: {name} is not bit-identical across schedules: a race, or an order-dependent reduction")


def run_emulated(logits, target, loss, reduction="mean", ignore_index=-100, schedules=SCHEDULES, **spec_kw):
    """Same contract as test_cuda_kernels.run_cuda, on CPU tensors: the op under every schedule of
    `schedules`, whose outputs must agree bit for bit; returns the first."""
    spec = loss if isinstance(loss, LossSpec) else LossSpec.from_name(loss, **spec_kw)
    results = [run_once(logits, target, spec, reduction, ignore_index, s) for s in schedules]
    for s, r in zip(schedules[1:], results[1:]):
        assert_bit_identical(results[0], r, f"{spec.name} {reduction} {tuple(logits.shape)} {logits.dtype}: "
                                            f"{schedules[0]} vs {s}")
    return results[0]
