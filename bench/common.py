"""Shared pieces of the benchmark suite: the matrix, timing, device facts, the results file.

Results file (keep stable; tests in python_tests/test_bench_smoke.py check it):

    {"meta": {"gpu", "torch", "triton", "cuda", "command", "date", "copy_gbps", ...extra keys},
     "records": [
        {"kind": "kernel", "loss", "B", "K", "dtype", "backend", "pass", "ms", "gbps",
         "pct_copy_bw", "peak_mem_ratio", "launches"},
        {"kind": "epoch", "loss", "model", "amp", "backend", "data", "epoch_s_median",
         "speedup_vs_reference"}]}
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional

import torch

LOSSES = ("ce", "nce+rce", "nce+mae", "nfl+rce", "nfl+mae", "ngce+mae", "nce+agce", "nce+nnce", "nce+amse")
# Every loss of the package, for the epoch benchmark.
ALL_LOSSES = ("ce", "fl", "gce", "nce", "nfl", "ngce", "mae", "rce", "sce",
              "nce+rce", "nce+mae", "nfl+rce", "nfl+mae", "ngce+rce", "ngce+mae")
GPU_SHAPES = ((128, 10), (1024, 100), (256, 1000), (4096, 32000), (8192, 131072))
CPU_SHAPES = ((128, 10), (1024, 100), (4096, 1000))
QUICK_SHAPES = ((8, 10), (64, 100))
GPU_DTYPES = ("bf16", "fp32")
CPU_DTYPES = ("fp32",)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# "compiled" is torch.compile of the reference; "F.cross_entropy" runs for ce only.
BACKENDS = ("reference", "compiled", "cpu", "cuda", "triton", "F.cross_entropy")
FUSED_BACKENDS = ("cpu", "cuda", "triton")
PASSES = ("fwd", "bwd", "fwd+bwd")

KERNEL_KEYS = ("kind", "loss", "B", "K", "dtype", "backend", "pass", "ms", "gbps", "pct_copy_bw",
               "peak_mem_ratio", "launches")
# Kernel-record keys that files written before them lack (still valid without them).
KERNEL_OPTIONAL_KEYS = ("graph_ms",)
EPOCH_KEYS = ("kind", "loss", "model", "amp", "backend", "data", "epoch_s_median", "speedup_vs_reference")
META_KEYS = ("gpu", "torch", "triton", "cuda", "command", "date", "copy_gbps")

# The published measurements (tracked); a run writes there only when --out says so.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Where a run's results go by default: untracked (.gitignore), under the current directory.
DEFAULT_RESULTS_DIR = "bench-results"


# ----------------------------------------------------------------------------- parsing

def parse_list(text: Optional[str], allowed: Optional[Iterable[str]] = None, what: str = "value") -> Optional[list]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        allowed = tuple(allowed)
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"unknown {what} {bad}; expected some of {', '.join(allowed)}")
    return items


def parse_shapes(text: Optional[str]) -> Optional[list]:
    """'128x10,1024x100' -> [(128, 10), (1024, 100)]."""
    if text is None:
        return None
    shapes = []
    for item in parse_list(text):
        match = re.fullmatch(r"(\d+)[x,*:](\d+)", item.replace(" ", ""))
        if not match:
            raise SystemExit(f"cannot parse shape {item!r}; write it as BxK, e.g. 4096x1000")
        shapes.append((int(match.group(1)), int(match.group(2))))
    return shapes


# ----------------------------------------------------------------------------- device facts

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The `gpu` meta field: the GPU's name, or the CPU's name and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_name()} (CPU, {n} thread{'' if n == 1 else 's'})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_results_path(device: torch.device, quick: bool = False) -> str:
    """bench-results/<gpu-or-cpu-name>-<date>.json under the current directory,
    never the tracked bench/results (pass --out to publish there); smoke runs
    (--quick) go to the temporary directory."""
    if device.type == "cuda":
        name = slug(torch.cuda.get_device_name(device))
    else:
        name = "cpu-" + slug(cpu_name())
    folder = os.path.join(tempfile.gettempdir(), "apl_bench_quick") if quick else os.path.abspath(DEFAULT_RESULTS_DIR)
    return os.path.join(folder, f"{name}-{datetime.date.today().isoformat()}.json")


def triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def build_info() -> Optional[dict]:
    try:
        import apl_kernels
        return apl_kernels.build_info()
    except Exception as error:  # noqa: BLE001
        return {"error": repr(error)}


def git_state() -> Optional[str]:
    """The repository's commit, "+dirty" when the kernels' sources have uncommitted changes."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "apl_kernels", "setup.py"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def command_line(module: str) -> str:
    return " ".join(["python", "-m", module] + [shlex.quote(a) for a in sys.argv[1:]])


def base_meta(device: torch.device, module: str) -> dict:
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "command": command_line(module),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": None,
        "device": device.type,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "host_cpu": cpu_name(),
        "apl_kernels_build": build_info(),
        "git": git_state(),
        # The whole tree's commit and dirty flag, the start time and load (train records hold the same).
        "provenance": _provenance(),
        # Other processes on the machine make the numbers noisy; say how busy it was.
        "loadavg_start": _loadavg(),
    }


def _provenance() -> Optional[dict]:
    try:
        from train import provenance
    except ImportError:  # bench run from outside the repository
        return None
    return provenance.record()


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing

def warm_up(fn: Callable[[], object], device: torch.device, *, min_calls: int = 3,
            max_s: float = 15.0) -> None:
    """Call `fn` until its time settles: three calls in a row within 1.5x of the
    fastest so far.  torch.compile finishes lazily (kernel loading, the backward
    graph) over the first few calls, each far slower than the steady state."""
    best = float("inf")
    settled = calls = 0
    start = time.perf_counter()
    while settled < min_calls and time.perf_counter() - start < max_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - t0
        calls += 1
        settled = settled + 1 if took <= 1.5 * best else 0
        best = min(best, took)


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            min_time_s: float = 0.3, stat: str = "median") -> float:
    """Median time of one call of `fn` in milliseconds, after warm-up.

    GPU: triton.testing.do_bench (flushes L2 between calls; falls back to CUDA
    events without triton).  CPU: time.perf_counter, calls batched so each sample
    lasts >= 2 ms, samples taken for >= `min_time_s` and >= 9 of them; their
    median, or with stat="min" the fastest (used for the CPU copy reference).
    """
    warm_up(fn, device, max_s=0.1 if quick else 15.0)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, device, reps=10 if quick else 100)
        warmup, rep = (5, 20) if quick else (25, 150)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    return _time_cpu(fn, min_time_s=0.02 if quick else min_time_s, min_samples=5 if quick else 9, stat=stat)


# Logits up to this size get a CUDA-graph timing of fwd+bwd beside the eager one: there the eager
# time is the host's (Python, autograd, launches), and a graph replay shows the kernels' own.
GRAPH_MAX_BYTES = 1 << 20


def graph_replay_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> Optional[float]:
    """Median ms of `fn` captured once in a CUDA graph and replayed (GPU time without host
    overhead); None off CUDA, or when the capture fails (the reason printed)."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)   # warm-up off the capture stream, as torch.cuda.graph wants
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, device, quick=quick)
    except Exception as error:  # noqa: BLE001 -- the eager figure stands alone then
        print(f"  (CUDA graph capture failed: {type(error).__name__}: {error})"[:300], flush=True)
        return None


def _time_cuda_events(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# The CPU benchmarks' clock: "wall" (time.perf_counter) or "cpu" (time.process_time,
# CPU time of the whole process, all threads; with one thread it ignores how
# busy the machine is, which wall time on a shared machine does not).
CPU_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
cpu_clock = time.perf_counter


def set_cpu_clock(name: str) -> None:
    global cpu_clock
    cpu_clock = CPU_CLOCKS[name]


def _time_cpu(fn, *, min_time_s: float, min_samples: int, warmup: int = 1, stat: str = "median") -> float:
    for _ in range(warmup):
        fn()
    one = float("inf")
    for _ in range(3):  # the fastest of three, so one preempted call does not set the batch size
        t0 = cpu_clock()
        fn()
        one = min(one, cpu_clock() - t0)
    inner = max(1, int(0.002 / max(one, 1e-7)))
    samples = []
    start = cpu_clock()
    while len(samples) < min_samples or cpu_clock() - start < min_time_s:
        t0 = cpu_clock()
        for _ in range(inner):
            fn()
        samples.append((cpu_clock() - t0) / inner)
        if len(samples) >= 2000:
            break
    return (min(samples) if stat == "min" else statistics.median(samples)) * 1e3


def time_interleaved(fns: dict, *, quick: bool = False, min_time_s: float = 0.3) -> dict:
    """CPU: median ms of each callable, sampled in turn (the order rotating), so that
    a change in the machine's load affects all of them alike.  Call after warm-up.
    Each sample batches calls to >= 2 ms; >= `min_time_s` of samples per callable."""
    names = list(fns)
    inner = {}
    for name in names:
        one = float("inf")
        for _ in range(3):
            t0 = cpu_clock()
            fns[name]()
            one = min(one, cpu_clock() - t0)
        inner[name] = max(1, int(0.002 / max(one, 1e-7)))
    samples = {name: [] for name in names}
    spent = {name: 0.0 for name in names}
    min_samples, min_time_s = (5, 0.02) if quick else (9, min_time_s)
    rounds = 0
    while any(len(samples[n]) < min_samples or spent[n] < min_time_s for n in names) and rounds < 2000:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            fn, n = fns[name], inner[name]
            t0 = cpu_clock()
            for _ in range(n):
                fn()
            took = cpu_clock() - t0
            samples[name].append(took / n)
            spent[name] += took
        rounds += 1
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def copy_gbps(device: torch.device, nbytes: int, *, quick: bool = False) -> float:
    """Bandwidth of a plain copy of `nbytes` (read + write counted), GB/s."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
    return 2 * n * 4 / (ms * 1e6)


# ----------------------------------------------------------------------------- memory, launches

@contextlib.contextmanager
def quiet_native_stderr():
    """Send file descriptor 2 to /dev/null: the profiler's native library logs
    a few lines per session there (not controllable from Python)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory allocated by one call of `fn` above what was allocated before,
    counting what it returns (the gradient of a fwd+bwd).

    GPU: torch.cuda.max_memory_allocated delta.  CPU: the running sum of the
    allocation/free events recorded by torch.profiler (profile_memory=True),
    i.e. the same quantity for the CPU allocator.  None if it cannot be measured.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    try:
        from torch.profiler import ProfilerActivity, profile
        with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        current = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            current += event.nbytes()
            peak = max(peak, current)
        return int(peak)
    except Exception:  # noqa: BLE001 - the profiler's internals move between torch versions
        return None


AUTOGRAD_SEED_KERNEL = "FillFunctor"   # the name of the kernel that fills torch.ones_like's seed


def count_launches(fn: Callable[[], object], device: torch.device, reps: int = 5) -> Optional[float]:
    """Device activities (kernels, memsets, memcpys) per call, from torch.profiler; None on CPU.

    One fill kernel per call is left out when `fn` has one: the ones_like seed that
    loss.backward() makes (autograd._make_grads), which every loss pays, F.cross_entropy
    too; what remains are the loss's own launches.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
    # Device-side activities only; ranges of record_function mirrored on the GPU
    # timeline (user annotations) are not launches.
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and not getattr(e, "is_user_annotation", False)]
    if not names:
        return None  # no device activity recorded (CUPTI unavailable?): unknown, not zero
    return launches_per_call(names, reps)


def launches_per_call(names, reps: int) -> float:
    """Device activities per call of `reps` calls that ran `names`, less one seed fill per call."""
    seeds = min(reps, sum(1 for name in names if AUTOGRAD_SEED_KERNEL in name))
    per_call = (len(names) - seeds) / reps
    return int(per_call) if per_call == int(per_call) else round(per_call, 2)


# ----------------------------------------------------------------------------- results file

def record_key(record: dict) -> tuple:
    if record.get("kind") == "kernel":
        return ("kernel", record["loss"], record["B"], record["K"], record["dtype"], record["backend"],
                record["pass"])
    return ("epoch", record["loss"], record["model"], record["amp"], record["backend"], record["data"])


def load_results(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "meta" not in data or "records" not in data:
        return None
    return data


def write_json_atomic(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a results file is for everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ResultsWriter:
    """Writes one run's records into the results file at `path`, merged with what
    the file held when the run began; called after every configuration, so that
    an interrupted run (a time limit) keeps what it measured."""

    def __init__(self, path: str, *, replace_meta: bool):
        self.path, self.replace_meta = path, replace_meta
        self.old = load_results(path)

    def write(self, meta: dict, records: list) -> dict:
        data = _merged(copy.deepcopy(self.old), meta, records, self.replace_meta)
        write_json_atomic(self.path, data)
        return data


def merge_results(path: str, meta: dict, records: list, *, replace_meta: bool) -> dict:
    """Add `records` to the results file at `path` (created if absent), atomically."""
    return ResultsWriter(path, replace_meta=replace_meta).write(meta, records)


def _merged(old: Optional[dict], meta: dict, records: list, replace_meta: bool) -> dict:
    """`old` (or a new file) with `records` and this run's `meta` merged in.

    A record replaces an older one of the same configuration.  The kernel
    benchmark owns `meta` (replace_meta=True: `copy_gbps` and `date` become the
    latest run's; each record's pct_copy_bw used its own run's copy figure); the
    epoch benchmark only adds its keys.  meta["runs"] lists every run's command,
    date, copy bandwidth and machine load.
    """
    meta = copy.deepcopy(meta)
    run = {k: meta[k] for k in ("command", "date", "provenance", "copy_gbps", "threads", "loadavg_start",
                                "loadavg_end", "kernel_seconds", "epoch_seconds") if k in meta}
    if old is None:
        data = {"meta": dict(meta), "records": []}
        data["meta"]["commands"] = [meta["command"]]
        data["meta"]["runs"] = [run]
    else:
        data = old
        commands = data["meta"].get("commands", [data["meta"].get("command")])
        runs = data["meta"].get("runs", [])
        skipped = data["meta"].get("skipped", [])
        if replace_meta:
            keep_copy = meta.get("copy_gbps") is None
            copy_old = data["meta"].get("copy_gbps")
            data["meta"].update(meta)
            if keep_copy:
                data["meta"]["copy_gbps"] = copy_old
        else:
            # The file's meta describes the kernel run; this run adds its own keys
            # (epoch_*) and fills gaps, and is summarised in meta["runs"].
            for key, value in meta.items():
                if key.startswith("epoch_") or data["meta"].get(key) is None:
                    data["meta"][key] = value
        data["meta"]["commands"] = [c for c in commands if c] + [meta["command"]]
        data["meta"]["runs"] = runs + [run]
        # Skips of earlier runs stay listed (e.g. a bf16 run, then an fp32 run).
        seen = {json.dumps(x, sort_keys=True) for x in data["meta"].get("skipped", [])}
        data["meta"]["skipped"] = data["meta"].get("skipped", []) + [
            x for x in skipped if json.dumps(x, sort_keys=True) not in seen]
    new_keys = {record_key(r) for r in records}
    data["records"] = [r for r in data["records"] if record_key(r) not in new_keys] + list(records)
    return data


def validate_results(data: dict) -> list:
    """Problems with a results object's format (empty list: valid)."""
    problems = []
    if not isinstance(data, dict) or set(data) != {"meta", "records"}:
        return [f"top level must be an object with exactly 'meta' and 'records', got {type(data).__name__}"]
    missing = [k for k in META_KEYS if k not in data["meta"]]
    if missing:
        problems.append(f"meta lacks {missing}")
    if not isinstance(data["records"], list):
        return problems + ["records must be a list"]
    for i, r in enumerate(data["records"]):
        kind = r.get("kind") if isinstance(r, dict) else None
        keys = {"kernel": KERNEL_KEYS, "epoch": EPOCH_KEYS}.get(kind)
        if keys is None:
            problems.append(f"record {i}: unknown kind {kind!r}")
        elif not set(keys) <= set(r) <= set(keys) | (set(KERNEL_OPTIONAL_KEYS) if kind == "kernel" else set()):
            problems.append(f"record {i}: keys {sorted(r)} != {sorted(keys)}")
        elif kind == "kernel" and r["pass"] not in PASSES:
            problems.append(f"record {i}: pass {r['pass']!r}")
    return problems


def sig(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (tiny shapes have tiny GB/s)."""
    return float(f"{value:.{digits}g}")


def fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return format(value, spec)
    return str(value)
