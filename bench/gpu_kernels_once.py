"""Every kernel variant once, on small inputs: the program that compute-sanitizer
(memcheck, racecheck) and ncu wrap in the GPU session (bench.gpu_session).

    python -m bench.gpu_kernels_once                     # every variant of the cuda and triton backends
    python -m bench.gpu_kernels_once --device cpu        # the same list on the CPU kernel (and Triton's
                                                         # interpreter under TRITON_INTERPRET=1): a dry run
    python -m bench.gpu_kernels_once --headline          # one fwd+bwd per backend at the headline shape
                                                         # (bf16 [8192, 131072], nce+rce), for ncu

A variant is one launch plan of a backend (CUDA: a thread per row, lanes per row,
wide rows, the row in shared memory, the row streamed; Triton: one program,
row-resident tiles, chunked rows, in place).  Each variant runs in every dtype
with four calls: nce+rce (mean, fwd+bwd), nfl+rce (the kernels' pow branch),
nce+rce reduction none, and nce+rce sum without a gradient (the forward-only
path).  Each result is compared with the float64 reference computed on the CPU
(so the sanitizer instruments only the kernels under test and a few small
copies); tolerances are loose: this is a smoke check, python_tests holds the
real ones.  One line per call; exit status 1 if any call failed or disagreed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# (loss rtol, gradient tolerance relative to the largest reference gradient)
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-3, 1e-3), torch.float16: (1e-3, 1e-2),
             torch.bfloat16: (1e-3, 5e-2)}
HEADLINE_SHAPE = (8192, 131072)


@dataclass(frozen=True)
class Variant:
    backend: str
    name: str
    B: int
    K: int                       # K for fp32/fp64; K16 for fp16/bf16 when it differs
    K16: int = 0
    env: dict = field(default_factory=dict)
    forced_chunk: int = 0        # Triton: kernels.force_chunked(...)
    overwrite: bool = False      # Triton: overwrite_logits=True

    def k_for(self, dtype: torch.dtype) -> int:
        return self.K16 if self.K16 and dtype in (torch.float16, torch.bfloat16) else self.K


# The launch plans of csrc/cuda/apl_cuda_small_k.cu and apl_cuda_large_k.cu.
CUDA_VARIANTS = (
    Variant("cuda", "small K, a thread per row", 1000, 10, K16=18),
    Variant("cuda", "small K, lanes per row (tiny rows off)", 1000, 10, K16=18, env={"APL_CUDA_TINY_ROWS": "0"}),
    Variant("cuda", "small K, lanes per row", 300, 100),
    Variant("cuda", "small K, wide rows", 300, 1000),
    Variant("cuda", "large K, row in shared memory", 64, 4099),
    # 140 rows over 132 one-block SMs: a block's second row copied in (cp.async) during its first
    # row's pass 3; fp32: a 600-slot tail held in registers; bf16: the whole row cached.
    Variant("cuda", "large K, next row copied in, tail in registers", 140, 60000),
    Variant("cuda", "large K, tail streamed", 16, 30011, env={"APL_CUDA_SMEM_PER_BLOCK": "4096"}),
    Variant("cuda", "large K, all streamed", 16, 5003, env={"APL_CUDA_SMEM_PER_BLOCK": "0"}),
)
# The regimes of apl_kernels/triton/kernels.py.
TRITON_VARIANTS = (
    Variant("triton", "one program", 128, 10),
    Variant("triton", "row-resident tiles", 1024, 100),
    Variant("triton", "chunked", 64, 20000),
    Variant("triton", "chunked, pipelined over 7 chunks", 16, 60000),
    Variant("triton", "chunked, small chunks", 33, 100, forced_chunk=16),
    Variant("triton", "in place (overwrite_logits)", 256, 1000, overwrite=True),
)
# (loss, reduction, with gradient)
CALLS = (("nce+rce", "mean", True), ("nfl+rce", "mean", True), ("nce+rce", "none", True),
         ("nce+rce", "sum", False))


@contextlib.contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _forced_chunk(block_k: int):
    if not block_k:
        yield
        return
    from apl_kernels.triton import kernels
    with kernels.force_chunked(block_k):
        yield


def _reference(logits, target, loss, reduction):
    from apl_kernels import LossSpec
    from apl_kernels.reference import reference_loss
    x = logits.detach().cpu().double().requires_grad_(True)
    out = reference_loss(x, target.cpu(), LossSpec.from_name(loss), reduction, -100)
    (out.sum() if reduction == "none" else out).backward()
    return out.detach(), x.grad


def run_call(variant: Variant, backend: str, device: torch.device, dtype: torch.dtype, loss: str,
             reduction: str, with_grad: bool, seed: int, max_rows: int = 0) -> str:
    """One call of one variant; returns '' when it agrees with the reference, else what went wrong."""
    from apl_kernels import apl_loss
    K = variant.k_for(dtype)
    B = min(variant.B, max_rows) if max_rows else variant.B
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K, generator=g) * 4).to(dtype)
    target = torch.randint(0, K, (B,), generator=g)
    target[::7] = -100  # some ignored rows
    logits, target = logits.to(device), target.to(device)
    with _environment(variant.env), _forced_chunk(variant.forced_chunk):
        if with_grad:
            leaf = logits.clone().requires_grad_(True)
            x = leaf * 1.0 if variant.overwrite else leaf  # overwrite_logits needs a non-leaf
            out = apl_loss(x, target, loss, reduction=reduction, backend=backend, check_targets=False,
                           overwrite_logits=variant.overwrite)
            (out.sum() if reduction == "none" else out).backward()
            grad = leaf.grad
        else:
            with torch.no_grad():
                out = apl_loss(logits, target, loss, reduction=reduction, backend=backend, check_targets=False)
            grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ref_out, ref_grad = _reference(logits, target, loss, reduction)
    loss_rtol, grad_tol = TOLERANCE[dtype]
    problems = []
    got = out.detach().cpu().double()
    if not torch.allclose(got, ref_out, rtol=loss_rtol, atol=loss_rtol * max(1.0, ref_out.abs().max().item())):
        problems.append(f"loss differs by {(got - ref_out).abs().max().item():.3g}")
    if grad is not None:
        grad = grad.cpu().double()
        scale = ref_grad.abs().max().item() or 1.0
        error = (grad - ref_grad).abs().max().item()
        if not error <= grad_tol * scale:  # NaN fails too
            problems.append(f"gradient differs by {error:.3g} (max |grad| {scale:.3g})")
    return "; ".join(problems)


def variants_for(device: torch.device, backends: list) -> list:
    """(variant, backend that runs it) pairs.  On the CPU the CUDA variants' shapes run
    on the CPU kernel (their knobs do nothing there): the point is to exercise this script."""
    pairs = []
    for variant in CUDA_VARIANTS + TRITON_VARIANTS:
        if device.type == "cuda":
            if variant.backend in backends:
                pairs.append((variant, variant.backend))
        elif variant.backend == "cuda" and "cpu" in backends:
            pairs.append((variant, "cpu"))
        elif variant.backend == "triton" and "triton" in backends:
            pairs.append((variant, "triton"))
    return pairs


def run_all(device: torch.device, backends: list, dtypes: list, calls=CALLS, max_rows: int = 0) -> int:
    from apl_kernels import backends as apl_backends
    failures = ran = 0
    start = time.perf_counter()
    for backend in dict.fromkeys(backends):
        reason = apl_backends.unavailable_reason(backend, device)
        if reason is not None:
            print(f"backend {backend}: FAILED, unavailable: {reason}", flush=True)
            failures += 1
    for variant, backend in variants_for(device, backends):
        if apl_backends.unavailable_reason(backend, device) is not None:
            continue
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for index, (loss, reduction, with_grad) in enumerate(calls):
                rows = min(variant.B, max_rows) if max_rows else variant.B
                label = (f"{backend:<6} {variant.name:<40} {dtype_name:<4} [{rows},{variant.k_for(dtype)}] "
                         f"{loss} {reduction}{' fwd+bwd' if with_grad else ' fwd'}")
                try:
                    problem = run_call(variant, backend, device, dtype, loss, reduction, with_grad, seed=index,
                                       max_rows=max_rows)
                except Exception as error:  # noqa: BLE001 - report every variant, then exit 1
                    problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                ran += 1
                if problem:
                    failures += 1
                print(f"{'FAILED' if problem else 'ok    '} {label}{'  -- ' + problem if problem else ''}",
                      flush=True)
    print(f"{ran} calls, {failures} failed, {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failures or not ran else 0


def run_headline(device: torch.device, backends: list, shape, dtype_name: str, loss: str) -> int:
    """One forward+backward per backend at the headline shape (ncu profiles these launches)."""
    from apl_kernels import apl_loss
    from apl_kernels import backends as apl_backends
    B, K = shape
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    logits = (torch.randn(B, K, device=device) * 3).to(dtype)
    target = torch.randint(0, K, (B,), device=device)
    status = 0
    for backend in backends:
        reason = apl_backends.unavailable_reason(backend, device)
        if reason is not None:
            print(f"headline {backend}: FAILED, unavailable: {reason}", flush=True)
            status = 1
            continue
        x = logits.detach().requires_grad_(True)
        try:
            out = apl_loss(x, target, loss, backend=backend, check_targets=False)
            out.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            finite = bool(torch.isfinite(out).item()) and bool(torch.isfinite(x.grad).all().item())
        except Exception as error:  # noqa: BLE001
            print(f"headline {backend}: FAILED, {type(error).__name__}: {error}"[:400], flush=True)
            status = 1
            continue
        print(f"headline {backend} {loss} {dtype_name} [{B},{K}]: loss {out.item():.6g}"
              f"{'' if finite else ' FAILED: not finite'}", flush=True)
        status |= 0 if finite else 1
        x.grad = None
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_kernels_once", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--backends",
                        help="comma list (default: cuda,triton on a GPU; cpu, plus triton under TRITON_INTERPRET=1, "
                             "on the CPU)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,fp64", help="comma list of fp32,bf16,fp16,fp64")
    parser.add_argument("--quick", action="store_true",
                        help="one call per variant and dtype (nce+rce mean fwd+bwd) instead of four")
    parser.add_argument("--max-rows", type=int, default=0,
                        help="at most this many rows per call (0: each variant's own; a small number makes the "
                             "CPU dry run fast, but then some variants no longer take their launch plan)")
    parser.add_argument("--headline", action="store_true",
                        help="only one fwd+bwd per backend at --shape (for ncu)")
    parser.add_argument("--shape", default=f"{HEADLINE_SHAPE[0]}x{HEADLINE_SHAPE[1]}",
                        help="BxK of --headline (default %(default)s)")
    parser.add_argument("--dtype", default="bf16", help="dtype of --headline (default bf16)")
    parser.add_argument("--loss", default="nce+rce", help="loss of --headline (default nce+rce)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    elif device.type == "cuda":
        backends = ["cuda", "triton"]
    else:
        backends = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes + [args.dtype] if d not in DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype {bad}; expected some of {', '.join(DTYPES)}")
    if args.headline:
        try:
            B, K = (int(v) for v in args.shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"cannot parse --shape {args.shape!r}; write it as BxK, e.g. 8192x131072")
        return run_headline(device, backends, (B, K), args.dtype, args.loss)
    if args.max_rows < 0:
        raise SystemExit(f"--max-rows must be >= 0, got {args.max_rows}")
    return run_all(device, backends, dtypes, CALLS[:1] if args.quick else CALLS, max_rows=args.max_rows)


if __name__ == "__main__":
    sys.exit(main())
