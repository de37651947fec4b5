"""pytest-benchmark groups of the kernels (not part of `pytest python_tests`).

    pytest bench/ --benchmark-only                       # CPU groups, plus GPU groups on a GPU
    pytest bench/ --benchmark-only -k cpu --benchmark-columns=median,iqr,rounds

Each group is one (loss, shape, dtype) with one benchmark per backend, timing
the training step fwd+bwd.  CPU: cpu vs reference vs compiled reference at
[4096, 1000], [128, 10] and [1000000, 2] (with F.cross_entropy for ce) fp32.
GPU: every backend at the GPU shapes, bf16.
The full matrix with bandwidth, memory and launches is `python -m bench.kernels`.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.common import GPU_SHAPES, warm_up  # noqa: E402
from bench.kernels import Skip, _setup_compile, make_loss_fn  # noqa: E402

CPU_CASES = [(loss, shape, backend)
             for loss in ("nce+rce", "nfl+rce")
             for shape in ((4096, 1000), (128, 10))
             for backend in ("cpu", "reference", "compiled")]
# Many rows of very few classes (the kernel's small-K tile path): at least as fast as the references.
CPU_CASES += [(loss, (1000000, 2), backend)
              for loss in ("ce", "nce+rce")
              for backend in ("cpu", "reference", "compiled", "F.cross_entropy")
              if backend != "F.cross_entropy" or loss == "ce"]
GPU_CASES = [(loss, shape, backend)
             for loss in ("ce", "nce+rce", "nfl+rce")
             for shape in GPU_SHAPES
             for backend in ("triton", "cuda", "compiled", "reference", "F.cross_entropy")
             if backend != "F.cross_entropy" or loss == "ce"]


def _fwd_bwd(loss, shape, dtype, backend, device):
    _setup_compile(device)
    try:
        loss_fn = make_loss_fn(backend, loss, device)
    except Skip as reason:
        pytest.skip(f"{backend}: {reason}")
    B, K = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(B, K, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, K, (B,), generator=gen).to(device)

    def step():
        return torch.autograd.grad(loss_fn(logits, target), logits)

    if device.type == "cuda":
        def step_synced():
            out = step()
            torch.cuda.synchronize(device)
            return out
        fn = step_synced
    else:
        fn = step
    warm_up(fn, device)  # torch.compile compiles here, outside the timing
    return fn


def _ids(case):
    loss, (B, K), backend = case
    return f"{loss}-{B}x{K}-{backend}"


@pytest.mark.parametrize("case", CPU_CASES, ids=[_ids(c) for c in CPU_CASES])
def test_cpu_fwd_bwd(benchmark, case):
    loss, shape, backend = case
    benchmark.group = f"cpu {loss} [{shape[0]},{shape[1]}] fp32 fwd+bwd"
    benchmark.extra_info.update(loss=loss, B=shape[0], K=shape[1], dtype="fp32", backend=backend)
    fn = _fwd_bwd(loss, shape, torch.float32, backend, torch.device("cpu"))
    benchmark(fn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=[_ids(c) for c in GPU_CASES])
def test_gpu_fwd_bwd_bf16(benchmark, case):
    loss, shape, backend = case
    benchmark.group = f"gpu {loss} [{shape[0]},{shape[1]}] bf16 fwd+bwd"
    benchmark.extra_info.update(loss=loss, B=shape[0], K=shape[1], dtype="bf16", backend=backend)
    fn = _fwd_bwd(loss, shape, torch.bfloat16, backend, torch.device("cuda"))
    benchmark(fn)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
