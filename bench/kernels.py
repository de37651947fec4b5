"""Kernel benchmark: every backend of every loss over a matrix of shapes and dtypes.

    python -m bench.kernels                 # full matrix on the GPU if there is one, else the CPU matrix
    python -m bench.kernels --quick         # tiny shapes, seconds: a smoke test
    python -m bench.kernels --device cpu --losses nce+rce --shapes 4096x1000

Passes (each timed separately; the loss is reduced with "mean"):
  fwd      the loss with no gradient wanted (torch.no_grad), as in evaluation;
  bwd      torch.autograd.grad of an existing forward's loss (retain_graph; so
           torch.compile runs without buffer donation).  The
           fused backends compute the gradient inside their forward, so their
           bwd is only a scale by grad_output (free on the CPU when it is 1);
  fwd+bwd  the training step: forward with requires_grad, then the gradient.
Input validation is off (check_targets=False): it costs a host sync on the GPU
and is not part of the loss.

CPU clock and threads: by default wall clock (time.perf_counter) at torch's
default thread count, the time a user sees.  A run with --threads or
--clock cpu also times fwd+bwd that way, beside its own figures: one more line
per configuration, and meta["default_wall_fwd_bwd"].

Columns: median ms; GB/s on the minimal I/O (fwd: read the logits once; bwd:
write the gradient once; fwd+bwd: both); % of the copy bandwidth measured in
the same run (GPU: device-to-device copy of a 1 GiB buffer; CPU: fastest Tensor.copy_ of
the same logits tensor); peak extra memory / logits size, counting the returned
gradient (GPU: max_memory_allocated delta; CPU: torch.profiler allocation
events); device launches per fwd+bwd as training runs it, `loss.backward()` (GPU:
torch.profiler device activities: kernels, memsets, memcpys; none on the CPU).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

from . import common
from .common import BACKENDS, DTYPES, LOSSES, PASSES, fmt

MODULE = "bench.kernels"


class Skip(Exception):
    """A backend that cannot run this configuration; the message says why."""


def _import_package():
    try:
        import apl_kernels  # noqa: F401
        from apl_kernels import backends, reference
        return backends, reference
    except Exception as error:  # noqa: BLE001
        raise SystemExit(f"apl_kernels does not import ({error!r}); install it with "
                         "`pip install --no-build-isolation -e .` from the repository root")


def _setup_compile(device: torch.device = torch.device("cpu")):
    # Every configuration compiles its own graphs; keep dynamo from giving up.
    if device.type == "cpu":
        # No pool of compile workers: on a small CPU they would run beside the timed calls.
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    # The bwd pass calls backward many times on one graph (retain_graph), which a
    # graph with donated buffers refuses (checked at backward time).  Donation only
    # lets the backward reuse saved buffers for its outputs: times are those of the
    # default torch.compile, its peak memory may be somewhat higher.
    import torch._functorch.config as functorch_config  # not imported by `import torch` in 2.11
    functorch_config.donated_buffer = False
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)


def make_loss_fn(backend: str, loss: str, device: torch.device):
    """fn(logits, target) -> scalar loss for one backend, or raise Skip(reason)."""
    backends, reference = _import_package()
    from apl_kernels import LossSpec, fused_loss
    spec = LossSpec.from_name(loss)
    if backend == "F.cross_entropy":
        if loss != "ce":
            raise Skip("F.cross_entropy is the baseline of ce only")
        return lambda x, t: torch.nn.functional.cross_entropy(x, t)
    if backend == "compiled":
        def oracle(x, t):
            return reference.reference_loss(x, t, spec, "mean", -100)
        torch._dynamo.reset()  # one configuration's graphs at a time: memory, and no recompile limits
        return torch.compile(oracle, dynamic=False)
    if backend == "triton" and device.type != "cuda":
        raise Skip("triton needs a GPU (the interpreter on CPU is not a performance backend)")
    if backend != "reference":
        reason = backends.unavailable_reason(backend, device)
        if reason is not None:
            raise Skip(reason)
    return lambda x, t: fused_loss(x, t, spec, backend=backend, check_targets=False)


def make_pass_fns(loss_fn, logits, target):
    """The three timed callables; each returns what it produced (kept alive by the memory probe)."""
    x = logits.detach().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return loss_fn(logits, target)

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(x, target), x)

    out = loss_fn(x, target)

    def bwd():
        return torch.autograd.grad(out, x, retain_graph=True)

    def training_step():
        # The launch count's call: `loss.backward()`, as training runs it.
        x.grad = None
        loss_fn(x, target).backward()
        return x.grad

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "training_step": training_step}


def io_bytes(B: int, K: int, dtype: torch.dtype, pass_name: str) -> int:
    one = B * K * torch.finfo(dtype).bits // 8
    return 2 * one if pass_name == "fwd+bwd" else one


def _row(backend: str, results: dict, ref_ms, compiled_ms) -> str:
    fb = results.get("fwd+bwd", {})
    vs_ref = ref_ms / fb["ms"] if ref_ms and fb.get("ms") else None
    vs_comp = compiled_ms / fb["ms"] if compiled_ms and fb.get("ms") else None
    cells = [f"{backend:<16}",
             *(f"{fmt(results.get(p, {}).get('ms'), '.4f'):>9}" for p in PASSES),
             f"{fmt(fb.get('gbps'), '.1f'):>8}", f"{fmt(fb.get('pct_copy_bw'), '.1f'):>6}",
             f"{fmt(fb.get('peak_mem_ratio'), '.2f'):>6}", f"{fmt(fb.get('launches')):>5}",
             f"{fmt(vs_ref, '.2f'):>7}", f"{fmt(vs_comp, '.2f'):>7}"]
    return " ".join(cells)


def _fb(row):
    return row.get("fwd+bwd", {}).get("ms") if isinstance(row, dict) else None


def _print_row(backend, rows, *, ref_ms, compiled_ms):
    row = rows.get(backend)
    if row is None:
        return
    print("  " + (row if isinstance(row, str) else _row(backend, row, ref_ms, compiled_ms)), flush=True)


def _failed(backend, error, skipped, loss, B, K, dtype_name, gpu) -> str:
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    skipped.append({"backend": backend, "loss": loss, "B": B, "K": K, "dtype": dtype_name,
                    "reason": "failed: " + message})
    if gpu and isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    return f"{backend:<16} failed: {message}"


def _time_pass(fns: dict, device, args, rows, skipped, config) -> dict:
    """{backend: ms} of one pass; a backend that raises is reported and left out."""
    loss, B, K, dtype_name = config
    ok = {}
    for backend, fn in fns.items():
        try:
            if len(fns) == 1 or device.type == "cuda":
                ok[backend] = common.time_ms(fn, device, quick=args.quick, min_time_s=args.min_time)
            else:
                common.warm_up(fn, device, max_s=0.1 if args.quick else 15.0)
                ok[backend] = None
        except Exception as error:  # noqa: BLE001
            rows[backend] = _failed(backend, error, skipped, loss, B, K, dtype_name, device.type == "cuda")
    pending = {b: fns[b] for b, ms in ok.items() if ms is None}
    if pending:
        try:
            ok.update(common.time_interleaved(pending, quick=args.quick, min_time_s=args.min_time))
        except Exception as error:  # noqa: BLE001
            for backend in pending:
                ok.pop(backend)
                rows[backend] = _failed(backend, error, skipped, loss, B, K, dtype_name, False)
    return ok


def _time_default_wall(fns: dict, args, default_threads: int, meta: dict, config) -> str:
    """fwd+bwd of the configuration's working backends in wall clock at torch's default
    thread count, sampled in turn: kept in meta["default_wall_fwd_bwd"], returned as a line to print."""
    loss, B, K, dtype_name = config
    threads, clock = torch.get_num_threads(), common.cpu_clock
    torch.set_num_threads(default_threads)
    common.set_cpu_clock("wall")
    try:
        fb = {backend: f["fwd+bwd"] for backend, f in fns.items()}
        for fn in fb.values():
            common.warm_up(fn, torch.device("cpu"), max_s=0.1 if args.quick else 15.0)
        ms = common.time_interleaved(fb, quick=args.quick, min_time_s=args.min_time)
    except Exception as error:  # noqa: BLE001 - the run's own figures stand without it
        return f"  fwd+bwd, wall clock, {default_threads} threads: failed: {type(error).__name__}: {error}"
    finally:
        torch.set_num_threads(threads)
        common.cpu_clock = clock
    meta["default_wall_fwd_bwd"][f"{loss} {B}x{K} {dtype_name}"] = {
        "threads": default_threads, "loadavg": common._loadavg(), "ms": {b: common.sig(v) for b, v in ms.items()}}
    cells = [f"{b} {v:.4g} ms" for b, v in ms.items()]
    for base in ("compiled", "reference"):
        if "cpu" in ms and base in ms:
            cells.append(f"cpu {ms[base] / ms['cpu']:.2f}x {base}")
    return f"  fwd+bwd, wall clock, {default_threads} threads: " + ", ".join(cells)


HEADER = (f"{'backend':<16} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'GB/s':>8} {'%copy':>6} "
          f"{'mem x':>6} {'lnch':>5} {'x ref':>7} {'x comp':>7}")


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    _import_package()
    _setup_compile(device)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    common.set_cpu_clock(args.clock)
    # Also the user's view (wall clock, torch's default threads) when the run times otherwise.
    also_default_wall = not gpu and (args.clock != "wall" or torch.get_num_threads() != default_threads)

    losses = common.parse_list(args.losses, LOSSES + common.ALL_LOSSES, "loss") or \
        (["ce", "nce+rce"] if args.quick else list(LOSSES))
    shapes = common.parse_shapes(args.shapes) or \
        list(common.QUICK_SHAPES if args.quick else (common.GPU_SHAPES if gpu else common.CPU_SHAPES))
    dtypes = common.parse_list(args.dtypes, DTYPES, "dtype") or \
        list(common.GPU_DTYPES[:1] if (args.quick and gpu) else (common.GPU_DTYPES if gpu else common.CPU_DTYPES))
    backends = common.parse_list(args.backends, BACKENDS, "backend") or \
        [b for b in BACKENDS if not (args.quick and b == "compiled")]
    passes = common.parse_list(args.passes, PASSES, "pass") or list(PASSES)
    out_path = args.out or common.default_results_path(device, quick=args.quick)

    meta = common.base_meta(device, MODULE)
    meta.update({
        "kernel_matrix": {"losses": losses, "shapes": [list(s) for s in shapes], "dtypes": dtypes,
                          "backends": backends, "passes": passes, "quick": bool(args.quick)},
        "timing": ("triton.testing.do_bench median (L2 flushed), after warm-up" if gpu else
                   f"{'time.perf_counter (wall)' if args.clock == 'wall' else 'time.process_time (CPU time of all threads)'}"
                   f" median of batched calls (>= 2 ms per sample), after warm-up; "
                   f"the backends of a configuration sampled in turn; {torch.get_num_threads()} threads"),
        "cpu_clock": None if gpu else args.clock,
        "copy_kind": ("device-to-device copy (Tensor.copy_) of a 1 GiB buffer" if gpu else
                      "CPU memcpy (Tensor.copy_) of the same logits tensor, fastest sample, per shape: copy_gbps_by_shape"),
        "peak_mem_kind": ("torch.cuda.max_memory_allocated delta / logits bytes, gradient included" if gpu else
                          "peak of torch.profiler CPU allocation events / logits bytes, gradient included"),
        "launches_kind": ("torch.profiler device activities (kernels, memsets, memcpys) per fwd+bwd" if gpu
                          else "not measured on the CPU"),
        "check_targets": False,
        "reduction": "mean",
    })
    skipped = []
    records = []
    copy_sizes = {}

    print(f"apl_kernels kernel benchmark on {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']})")
    if gpu:
        meta["copy_gbps"] = common.sig(common.copy_gbps(device, (64 if args.quick else 1024) << 20, quick=args.quick))
        print(f"device-to-device copy bandwidth: {meta['copy_gbps']:.1f} GB/s")
    else:
        meta["copy_gbps_by_shape"] = {}
    if not gpu:
        threads = torch.get_num_threads()
        meta["default_threads"] = default_threads
        print(f"CPU timing: {'wall clock' if args.clock == 'wall' else 'CPU time of all threads'}, {threads} "
              f"thread{'' if threads == 1 else 's'} ({'torch default' if threads == default_threads else '--threads'})"
              + (f"; fwd+bwd also in wall clock at torch's default {default_threads} threads"
                 if also_default_wall else ""))
        if also_default_wall:
            meta["default_wall_fwd_bwd"] = {}
    print(f"results -> {out_path}")

    configs = [(loss, shape, dtype) for dtype in dtypes for shape in shapes for loss in losses]
    writer = common.ResultsWriter(out_path, replace_meta=True)
    t_start = time.perf_counter()
    for index, (loss, (B, K), dtype_name) in enumerate(configs, 1):
        dtype = DTYPES[dtype_name]
        nbytes = B * K * torch.finfo(dtype).bits // 8
        torch.manual_seed(index)
        logits = (torch.randn(B, K, device=device) * 3).to(dtype)
        target = torch.randint(0, K, (B,), device=device)
        if gpu:
            copy_bw = meta["copy_gbps"]
        else:
            shape_key = f"{B}x{K} {dtype_name}"
            copy_bw = meta["copy_gbps_by_shape"].get(shape_key)
            if copy_bw is None:
                dst = torch.empty_like(logits)
                # The fastest sample: the copy bandwidth the machine can reach, which a
                # median on a busy machine would understate.
                ms = common.time_ms(lambda: dst.copy_(logits), device, quick=args.quick,
                                    min_time_s=max(args.min_time, 0.5), stat="min")
                copy_bw = common.sig(2 * nbytes / (ms * 1e6))
                meta["copy_gbps_by_shape"][shape_key] = copy_bw
                copy_sizes[shape_key] = nbytes
                del dst
        elapsed = time.perf_counter() - t_start
        print(f"\n[{index}/{len(configs)}] {loss}  [{B}, {K}] {dtype_name}  "
              f"(logits {nbytes / 2**20:.3g} MiB, copy {copy_bw:.3g} GB/s, {elapsed:.0f} s elapsed)")
        print("  " + HEADER, flush=True)
        # On the CPU all backends of a configuration are timed together, sample by
        # sample in turn, so that the load of other processes hits them alike and
        # their ratios hold; on the GPU one backend at a time (memory at the big shapes).
        groups = [list(backends)] if not gpu else [[b] for b in backends]
        rows = {}
        for group in groups:
            fns = {}
            for backend in group:
                try:
                    fns[backend] = make_pass_fns(make_loss_fn(backend, loss, device), logits, target)
                except Skip as reason:
                    if not (backend == "F.cross_entropy" and loss != "ce"):
                        skipped.append({"backend": backend, "loss": loss, "B": B, "K": K, "dtype": dtype_name,
                                        "reason": str(reason)})
                        rows[backend] = f"{backend:<16} skipped: {reason}"
                except Exception as error:  # noqa: BLE001 - one failing backend must not end the run
                    rows[backend] = _failed(backend, error, skipped, loss, B, K, dtype_name, gpu)
            results = {backend: {} for backend in fns}
            for pass_name in passes:
                times = _time_pass({b: f[pass_name] for b, f in fns.items()}, device, args, rows, skipped,
                                   (loss, B, K, dtype_name))
                for backend, ms in times.items():
                    fn = fns[backend][pass_name]
                    try:
                        peak = None if args.no_memory else common.peak_extra_bytes(fn, device)
                        launches = None if (args.no_launches or pass_name != "fwd+bwd") else \
                            common.count_launches(fns[backend]["training_step"], device)
                    except Exception as error:  # noqa: BLE001
                        rows[backend] = _failed(backend, error, skipped, loss, B, K, dtype_name, gpu)
                        continue
                    graph_ms = common.graph_replay_ms(fn, device, quick=args.quick) \
                        if gpu and pass_name == "fwd+bwd" and nbytes <= common.GRAPH_MAX_BYTES else None
                    gbps = io_bytes(B, K, dtype, pass_name) / (ms * 1e6)
                    results[backend][pass_name] = {
                        "kind": "kernel", "loss": loss, "B": B, "K": K, "dtype": dtype_name, "backend": backend,
                        "pass": pass_name, "ms": common.sig(ms), "gbps": common.sig(gbps),
                        "pct_copy_bw": common.sig(100 * gbps / copy_bw) if copy_bw else None,
                        "peak_mem_ratio": None if peak is None else common.sig(peak / nbytes),
                        "launches": launches, "graph_ms": None if graph_ms is None else common.sig(graph_ms)}
                for backend in list(fns):
                    if backend in rows and "failed" in rows[backend]:
                        fns.pop(backend)  # failed in this pass: not timed further
            wall_line = _time_default_wall(fns, args, default_threads, meta, (loss, B, K, dtype_name)) \
                if also_default_wall and "fwd+bwd" in passes and fns else None
            for backend, res in results.items():
                if res.get("fwd+bwd", {}).get("graph_ms") is not None:
                    print(f"  {backend:<16} fwd+bwd as a CUDA graph replays it (kernels only, no host time): "
                          f"{res['fwd+bwd']['graph_ms'] * 1e3:.1f} us", flush=True)
                records.extend(res.values())
                if res and backend not in rows:
                    rows[backend] = res
            fns = results = None
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
            for backend in group:
                _print_row(backend, rows, ref_ms=_fb(rows.get("reference")), compiled_ms=_fb(rows.get("compiled")))
            if wall_line:
                print(wall_line, flush=True)
        del logits, target
        meta["skipped"] = skipped
        meta["kernel_seconds"] = round(time.perf_counter() - t_start, 1)
        meta["kernel_complete"] = index == len(configs)
        if not gpu and copy_sizes:
            # The headline copy figure on the CPU: that of the largest tensor copied.
            largest = max(copy_sizes, key=copy_sizes.get)
            meta["copy_gbps"] = meta["copy_gbps_by_shape"][largest]
            meta["copy_gbps_of"] = largest
        writer.write(meta, records)  # after every configuration: a cut-off run keeps its records
        if gpu:
            torch.cuda.empty_cache()

    meta["skipped"] = skipped
    meta["kernel_seconds"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_end"] = common._loadavg()

    from .goals import evaluate, format_goal
    data = writer.write(meta, records)
    goals = evaluate(data)
    data["meta"]["goals"] = goals
    common.write_json_atomic(out_path, data)

    print(f"\n{len(records)} records written to {out_path} ({meta['kernel_seconds']} s)")
    if skipped:
        reasons = sorted({(s['backend'], s['reason']) for s in skipped})
        print("skipped backends:")
        for backend, reason in reasons:
            print(f"  {backend}: {reason}")
    print("\nGoals measurable in this file:")
    for goal in goals:
        if goal["status"] != "not measured":
            print("  " + format_goal(goal))
    if not args.no_plots:
        from .plots import plot_results
        for path in plot_results(data, os.path.splitext(out_path)[0]):
            print(f"plot -> {path}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels",
        description=__doc__.split("\n\n", 1)[0] + " Prints a table per configuration, writes the results "
                    "JSON (bench-results/<gpu-or-cpu-name>-<date>.json under the current directory unless --out; "
                    "bench/results/ holds the published runs) and PNG plots next to it.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda if available).  The CPU matrix uses shapes "
                             "128x10,1024x100,4096x1000 and fp32.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: losses ce,nce+rce, shapes 8x10,64x100, one dtype, short timing, "
                             "no torch.compile (add it with --backends); results go to the temporary "
                             "directory unless --out")
    parser.add_argument("--losses", help=f"comma list (default {','.join(LOSSES)})")
    parser.add_argument("--shapes", help="comma list of BxK (default: the GPU or CPU matrix)")
    parser.add_argument("--dtypes", help="comma list of bf16,fp16,fp32,fp64 (default bf16,fp32 on GPU, fp32 on CPU)")
    parser.add_argument("--backends", help=f"comma list of {','.join(BACKENDS)} (default all; 'compiled' is "
                                           "torch.compile of the reference, compiled once outside the timing)")
    parser.add_argument("--passes", help="comma list of fwd,bwd,fwd+bwd (default all)")
    parser.add_argument("--out", help="results JSON path; records are merged into an existing file "
                                      "(same configuration replaced)")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="CPU: seconds of samples per timing (default 0.3)")
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU timing clock: wall (time.perf_counter, default) or cpu (time.process_time, "
                             "CPU time of all threads; with --threads 1 it is unaffected by other processes' "
                             "load on a shared machine)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    parser.add_argument("--no-launches", action="store_true", help="skip the profiler launch count (GPU)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
