"""A/B of the large-K launch knobs at the headline shape: which design lever moves the GPU figure.

    python -m bench.gpu_sweep --device cuda                   # on the GPU (a gpu_session step)
    python -m bench.gpu_sweep --device cpu --shape 8x20000    # the same plan here (Triton interpreted
                                                              # with TRITON_INTERPRET=1; CUDA skipped)

The H200 (2026-11-30) measured the fused fwd+bwd at bf16 [8192, 131072] at 35-48% of copy
bandwidth, with ncu showing one block per SM and no latency hiding (bench.roofline's `lat%`).
Each configuration below changes one knob the kernels already read, so a single GPU call
says which way to redesign:

  triton  module constants of apl_kernels/triton/kernels.py, set in this process:
          CHUNK (elements a loop step), CHUNK_STAGES (1: the chunk loops' loads not
          pipelined), CHUNK_WARPS (warps of a chunked program), and
          programs_per_sm, which replaces kernels._programs_in_flight (the grid: with two
          8-warp programs a SM, 2 x 132 rows overflow L2 and later passes re-read HBM);
  cuda    environment knobs read once per process, so each runs in a child process:
          APL_CUDA_PREFETCH (the next row's L2 prefetch) and APL_CUDA_SMEM_PER_BLOCK
          (the shared-memory row cache: half of it lets two 256-thread blocks share an SM,
          with more of the row streamed from L2).

Every configuration times the training step (forward with gradient, then backward, as
bench.kernels' fwd+bwd) with bench.common.time_ms and checks its loss against the default
configuration's (a knob must not change the result beyond rounding).  Prints one line per
configuration as it goes and a table sorted by time; --out writes the records to a JSON
file of their own ({"meta", "records"}; not a bench.kernels results file).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

from .common import base_meta, copy_gbps, parse_list, parse_shapes, time_ms, write_json_atomic

MiB = 1 << 20
# (backend, label, settings): triton settings are kernels.py constants, cuda ones environment variables.
SWEEP = (
    ("triton", "default", {}),
    ("triton", "chunk 4096 (8 warps)", {"CHUNK": {2: 4096, 4: 4096, 8: 2048}}),
    ("triton", "chunk 16384", {"CHUNK": {2: 16384, 4: 16384, 8: 2048}}),
    ("triton", "no pipelined loads (1 stage)", {"CHUNK_STAGES": 1}),
    ("triton", "8 warps, 1 program a SM", {"CHUNK_WARPS": 8}),
    ("triton", "8 warps, 2 programs a SM (rows overflow L2)", {"CHUNK_WARPS": 8, "programs_per_sm": 2}),
    ("cuda", "default", {}),
    ("cuda", "no next-row prefetch", {"APL_CUDA_PREFETCH": "0"}),
    ("cuda", "112 KB row cache (2 blocks a SM)", {"APL_CUDA_SMEM_PER_BLOCK": str(112 * 1024)}),
    ("cuda", "no row cache (all streamed)", {"APL_CUDA_SMEM_PER_BLOCK": "0"}),
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def triton_settings(settings: dict):
    """Set apl_kernels/triton/kernels.py constants for the block, then restore them
    ("programs_per_sm": n replaces the chunked grid's choice by n programs a SM)."""
    from apl_kernels.triton import kernels
    settings = dict(settings)
    per_sm = settings.pop("programs_per_sm", None)
    if per_sm is not None:
        def programs(device, row_bytes, rows, num_warps):
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            return max(1, min(rows, sms * per_sm))
        settings["_programs_in_flight"] = programs
    unknown = [name for name in settings if not hasattr(kernels, name)]
    if unknown:
        raise ValueError(f"apl_kernels.triton.kernels has no {unknown}")
    saved = {name: getattr(kernels, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(kernels, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def measure(backend: str, loss: str, dtype: str, shape, device: torch.device, quick: bool) -> dict:
    """Time one training step (fwd with gradient + backward) of `loss`; its loss value beside."""
    from apl_kernels import apl_loss
    B, K = shape
    # Drawn on the device (1G normals on the host would take seconds a configuration); the same
    # seed gives every configuration of a backend the same inputs.
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, K, generator=generator, device=device) * 3).to(DTYPES[dtype])
    target = torch.randint(0, K, (B,), generator=generator, device=device)
    x = logits.requires_grad_(True)

    def step():
        return torch.autograd.grad(apl_loss(x, target, loss, backend=backend, check_targets=False), x)

    value = float(apl_loss(logits.detach(), target, loss, backend=backend, check_targets=False))
    ms = time_ms(step, device, quick=quick)
    plan = None
    if backend == "triton":   # the regime, grid and block the launch chose
        from apl_kernels.triton import kernels
        plan = kernels.last_plan
    return {"ms": round(ms, 4), "loss_value": value, "plan": None if plan is None else list(plan)}


def _child(backend: str, loss: str, dtype: str, shape, device: str, quick: bool, env: dict) -> dict:
    """measure() in a child process with `env` added (knobs the extension reads once per process)."""
    args = [sys.executable, "-m", "bench.gpu_sweep", "--child", "--backend", backend, "--losses", loss,
            "--dtype", dtype, "--shape", f"{shape[0]}x{shape[1]}", "--device", device] + (["--quick"] if quick else [])
    run = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("SWEEP ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"exit {run.returncode}: {(run.stderr or run.stdout).strip()[-400:]}")
    return json.loads(lines[-1][len("SWEEP "):])


def run_sweep(args) -> list:
    from apl_kernels import backends as apl_backends
    device = torch.device(args.device)
    shape = parse_shapes(args.shape)[0]
    losses = parse_list(args.losses, what="loss")
    chosen = [c for c in SWEEP if c[0] in parse_list(args.backends, allowed=("triton", "cuda"), what="backend")]
    minimal_bytes = 2 * shape[0] * shape[1] * torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    copy = copy_gbps(device, minimal_bytes, quick=args.quick) if device.type == "cuda" else None
    print(f"sweep: {', '.join(losses)} {args.dtype} [{shape[0]}, {shape[1]}] fwd+bwd on {device}; "
          f"copy {copy and round(copy)} GB/s; {len(chosen)} configurations", flush=True)
    records, baseline = [], {}
    for backend, label, settings in chosen:
        reason = apl_backends.unavailable_reason(backend, device)
        for loss in losses:
            record = {"kind": "sweep", "backend": backend, "config": label, "settings": settings, "loss": loss,
                      "dtype": args.dtype, "B": shape[0], "K": shape[1], "pass": "fwd+bwd", "copy_gbps": copy}
            start = time.perf_counter()
            try:
                if reason is not None:
                    raise RuntimeError(f"unavailable: {reason}")
                if backend == "triton":
                    with triton_settings(settings):
                        record.update(measure(backend, loss, args.dtype, shape, device, args.quick))
                else:
                    record.update(_child(backend, loss, args.dtype, shape, args.device, args.quick, settings))
            except Exception as error:  # noqa: BLE001 -- one failed configuration must not stop the rest
                record["error"] = f"{type(error).__name__}: {error}"[:400]
            if "ms" in record:
                record["pct_copy"] = round(100 * minimal_bytes / (record["ms"] * 1e-3) / (copy * 1e9), 1) \
                    if copy else None
                base = baseline.setdefault((backend, loss), record["loss_value"])
                record["loss_matches_default"] = abs(record["loss_value"] - base) <= 1e-3 * max(1.0, abs(base))
            records.append(record)
            print(_line(record) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return records


def records_copy(records: list):
    return next((r["copy_gbps"] for r in records if r.get("copy_gbps")), None)


def _line(r: dict) -> str:
    head = f"  {r['backend']:<6} {r['loss']:<8} {r['config']:<44}"
    if "error" in r:
        return f"{head} FAILED {r['error']}"
    pct = "" if r.get("pct_copy") is None else f" {r['pct_copy']:5.1f}% copy"
    same = "" if r.get("loss_matches_default", True) else "  LOSS DIFFERS FROM THE DEFAULT"
    return f"{head} {r['ms']:9.4f} ms{pct}{same}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton needs TRITON_INTERPRET=1)")
    parser.add_argument("--losses", default="ce,nce+rce", help="comma list (default ce,nce+rce)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="8192x131072", help="BxK (default the headline 8192x131072)")
    parser.add_argument("--backends", default="triton,cuda", help="comma list of triton,cuda")
    parser.add_argument("--quick", action="store_true", help="shorter timing (tests)")
    parser.add_argument("--out", help="write the records to this JSON file (replaced atomically)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu with TRITON_INTERPRET=1)")
    if args.child:
        shape = parse_shapes(args.shape)[0]
        print("SWEEP " + json.dumps(measure(args.backend, args.losses, args.dtype, shape, torch.device(args.device),
                                            args.quick)), flush=True)
        return 0
    records = run_sweep(args)
    done = sorted((r for r in records if "ms" in r), key=lambda r: (r["loss"], r["ms"]))
    print("\nfastest first, per loss:")
    for r in done:
        print(_line(r))
    if args.out:
        meta = dict(base_meta(torch.device(args.device), "bench.gpu_sweep"), copy_gbps=records_copy(records))
        write_json_atomic(args.out, {"meta": meta, "records": records})
        print(f"{len(records)} records -> {args.out}")
    failed = [r for r in records if "error" in r and not r["error"].startswith("RuntimeError: unavailable")]
    wrong = [r for r in done if not r["loss_matches_default"]]
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
