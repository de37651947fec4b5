"""The GPU session in one command: environment, build, GPU tests, compute-sanitizer,
benchmarks, ncu and a one-screen summary, each step under a deadline.

    bash bench/gpu_session.sh "$OUT" --budget 540     # on the GPU machine (device tool: run)
    bash bench/gpu_session.sh OUT --dry-run            # the plan, with a time estimate per step
    bash bench/gpu_session.sh OUT --cpu-check          # every step that can run here, in a no-GPU form
    python -m bench.gpu_session --summarize OUT        # the summary again, from a fetched OUT

Steps, in order (--steps / --skip choose; the order is fixed: what the goals table
needs first, so that a short budget cuts the sanitizers and extras, not the figures):
  env           nvidia-smi, python/torch/triton/CUDA versions, nvcc, ncu, compute-sanitizer
  build         MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 APL_BUILD_CUDA=1
                pip install --no-build-isolation --no-deps --no-index -e .   (timed; never -r requirements.txt)
  tests         pytest -m gpu -x -q python_tests, each test capped (bench.pytest_time_cap)
  kernels       bench.kernels at the goal shapes (bf16 128x10, 1024x100, 256x1000, 8192x131072;
                ce, nce+rce, nce+mae, nfl+rce; reference, cuda, triton, F.cross_entropy)
  epochs        bench.epochs: cnn8, batch 128, AMP bf16, synthetic data, every robust pair, 3 epochs
  memcheck      compute-sanitizer --tool memcheck on bench.gpu_kernels_once (every kernel variant once)
  ncu           ncu --clock-control none: DRAM bytes and occupancy of the headline kernels
                (nce+rce bf16 [8192, 131072], triton and cuda), against bench/results/roofline-sm90.json
  racecheck     compute-sanitizer --tool racecheck on the same program as memcheck (one call per variant and dtype)
  sweep         bench.gpu_sweep: the large-K launch knobs one at a time at the headline (fwd+bwd)
  compiled      bench.kernels, backend compiled (torch.compile of the reference), same matrix, fwd and fwd+bwd
  triton-suite  python_tests/triton/test_triton_kernels.py on the GPU (not marked gpu, so not in `tests`)
  summary       tests passed/failed, sanitizer findings, every GPU goal measured (and predicted)

Budget: a step starts only if at least its minimum ("need") is left; it runs until
its cap or until only the minima of the later steps are left, whichever comes first
(build alone may use everything: nothing after it works without it).  A step that
fails or times out does not stop the later ones.  Each step's output goes to its
own log; OUT ends up with at most 8 files (the device tool brings back no more):

  OUT/summary.txt     the one-screen summary (also printed last)
  OUT/session.log     every step's command, output, exit status and time, in order
  OUT/logs.tar.gz     the same logs, one file per step, plus steps.json (for --summarize)
  OUT/results.json    bench.kernels and bench.epochs records (bench.goals reads it)
  OUT/sweep.json      bench.gpu_sweep's records

--cpu-check runs here what the GPU run would run: the same programs with --device cpu
and small shapes, pytest with its flags (the GPU tests skip), the build as
`pip install --dry-run` (the editable install here is left alone), and the
sanitizer and ncu steps without the tool (a line says so), so that a typo
cannot cost device time.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 540          # the device tool allows 600 s per command; 60 s for start-up and slack
CPU_CHECK_BUDGET_S = 3600       # the CPU check's default: its steps run on 2 slow cores
CPU_CHECK_CAP_SCALE = 5         # ... so each step's cap is this many times the GPU one
SUMMARY_RESERVE_S = 10          # kept back for the summary and the last packing of the logs
INT_GRACE_S = 8                 # after SIGINT, at a step's deadline: pytest then prints what ran and failed
TERM_GRACE_S = 10               # between SIGTERM and SIGKILL of a step's process group
ROOFLINE_PATH = os.path.join("bench", "results", "roofline-sm90.json")

GOAL_SHAPES = "128x10,1024x100,256x1000,8192x131072"
GOAL_LOSSES = "ce,nce+rce,nce+mae,nfl+rce"
ROBUST_PAIRS = "nce+rce,nce+mae,nfl+rce,nfl+mae,ngce+rce,ngce+mae"
HEADLINE = {"loss": "nce+rce", "dtype": "bf16", "B": 8192, "K": 131072}
# Kernel names as ncu reports them -> backend (apl_kernels/triton/kernels.py, csrc/cuda/apl_cuda_large_k.cu).
NCU_KERNELS = {"chunked_kernel": "triton", "large_k_fixed": "cuda", "large_k_kernel": "cuda"}
# The ncu step's runs, in order (one CSV block each): both backends, then CUDA with its large-K
# prefetch of the next row off (an A/B of the roofline's serial-passes bound).
NCU_RUNS = ("", "APL_CUDA_PREFETCH=0")
NCU_METRICS = {
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "gpu__time_duration.sum": "time_ns",
    "launch__registers_per_thread": "registers",
}
TEST_CAP_S = 120                # per test (bench.pytest_time_cap)
XDIST_WORKERS = 16              # GPU tests in parallel when pytest-xdist is there (Triton compiles are
                                # CPU-bound; the H200 machine has 16 cores)


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Command:
    argv: list
    env: dict = dataclasses.field(default_factory=dict)
    tool: str = ""              # a program that may be missing (nvidia-smi, ncu, ...): then a line, not a failure
    note: str = ""              # printed before the command in the log
    ok_codes: tuple = (0,)
    label: str = ""             # shown instead of a long `python -c` script
    fallback: bool = False      # runs only if the command before it failed

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        argv = self.argv
        if self.label and "-c" in argv:
            argv = argv[:argv.index("-c") + 1] + [f"<{self.label}>"]
        return (env + " " if env else "") + shlex.join(argv)


@dataclasses.dataclass
class Step:
    name: str
    what: str
    estimate_s: float           # typical on the H200 machine (a guess until a session measures it)
    cap_s: float                # never longer
    need_s: float               # not started with less left; held back for it by the earlier steps
    commands: list
    protect_later: bool = True  # False: may use the whole budget (the build)
    optional: bool = False      # no time is held back for it: it runs on what the others leave


@dataclasses.dataclass
class Settings:
    out: str
    cpu_check: bool = False
    tiny: bool = False
    budget_s: float = DEFAULT_BUDGET_S
    python: str = sys.executable
    test_cap_s: float = TEST_CAP_S
    maxfail: int = 1
    xdist_workers: int = XDIST_WORKERS


def _py(settings: Settings, *args, **kw) -> Command:
    return Command([settings.python, *args], **kw)


ENV_SCRIPT = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
except Exception as error:
    info["torch_error"] = repr(error)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as error:
    info["triton_error"] = repr(error)
for name in ("pytest", "xdist", "pytest_timeout"):
    try:
        module = __import__(name)
        info[name] = getattr(module, "__version__", "present")
    except Exception:
        info[name] = None
info["cpus"] = os.cpu_count()
print("ENV " + json.dumps(info))
"""

BUILD_INFO_SCRIPT = ("import json, apl_kernels; print('BUILD_INFO ' + json.dumps(apl_kernels.build_info(), "
                     "default=str))")


def build_steps(s: Settings) -> list:
    """The session's steps for these settings (GPU or the CPU check; tiny: small workloads)."""
    out = os.path.abspath(s.out)
    results = os.path.join(out, "results.json")
    device = "cpu" if s.cpu_check else "cuda"
    steps = []

    # --- env
    env_cmds = [
        Command(["nvidia-smi"], tool="nvidia-smi"),
        Command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,"
                 "clocks.mem,power.draw,temperature.gpu,compute_mode", "--format=csv"], tool="nvidia-smi"),
        _py(s, "-c", ENV_SCRIPT, label="script: versions and device as JSON"),
        Command(["nvcc", "--version"], tool="nvcc"),
        Command(["ncu", "--version"], tool="ncu"),
        Command(["compute-sanitizer", "--version"], tool="compute-sanitizer"),
        Command(["nproc"], tool="nproc"),
        Command(["free", "-g"], tool="free"),
        Command(["git", "rev-parse", "HEAD"], tool="git", ok_codes=(0, 128)),
    ]
    steps.append(Step("env", "environment and versions", 10, 40, 5, env_cmds))

    # --- build
    pip = ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    build_env = {"MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0", "APL_BUILD_CUDA": "1"}
    if s.cpu_check:
        # The editable install of this machine stays as it is: pip resolves and runs setup.py's
        # metadata stage (flags, setup.py imports) without building or installing anything.
        build = [_py(s, *pip, "--dry-run", env={**build_env, "APL_BUILD_CUDA": "auto", "MAX_JOBS": "1"},
                     note="CPU check: `pip install --dry-run` (checks the flags and setup.py, builds nothing)")]
    else:
        # If pip itself is the problem (an old setuptools without editable builds, say),
        # the same build in place; after a compile error it fails the same way.
        build = [_py(s, *pip, env=build_env),
                 _py(s, "setup.py", "build_ext", "--inplace", env=build_env, fallback=True,
                     note="pip failed: the same build with setup.py build_ext --inplace")]
    build.append(_py(s, "-c", BUILD_INFO_SCRIPT, label="script: apl_kernels.build_info() as JSON"))
    # Estimates and caps below: the H200 machine, 2026-11-30 (bench/results/h200-2026-11-30/):
    # build 58-60 s, tests 167 s for 63% of them (8 workers), kernels ~165 s, epochs 98 s,
    # memcheck 73 s, ncu 22 s, racecheck 13 s, triton-suite 73 s for 89% of it.
    steps.append(Step("build", "build the extension (timed)", 60, 240, 45, build, protect_later=False))

    # --- tests
    pytest = ["-m", "pytest", "-q", "-p", "bench.pytest_time_cap", "--time-cap", f"{s.test_cap_s:g}",
              "-o", f"faulthandler_timeout={s.test_cap_s + 30:g}", "--continue-on-collection-errors",
              "-p", "no:cacheprovider"]
    pytest += ["-x"] if s.maxfail == 1 else [f"--maxfail={s.maxfail}"]
    if not s.cpu_check and s.xdist_workers > 1 and importlib.util.find_spec("xdist") is not None:
        pytest += ["-n", str(s.xdist_workers)]
    targets = ["python_tests/test_cuda_kernels.py"] if s.tiny else ["python_tests"]
    # pytest exits 5 when no test was collected: on the GPU a failure, in the CPU check the
    # expected outcome of a module that skips itself without a GPU.
    collected_none = (0, 5) if s.cpu_check else (0,)
    steps.append(Step("tests", "pytest -m gpu (GPU tests; each capped)", 170, 240, 60,
                      [_py(s, *pytest, "-m", "gpu", *targets, ok_codes=collected_none)]))

    # --- compute-sanitizer
    once = ["-m", "bench.gpu_kernels_once", "--device", device]
    if s.cpu_check:
        # One call per variant and dtype (--quick) on 4 rows: the CPU kernel, and Triton's
        # interpreter on the Triton variants unless tiny.
        once += ["--quick", "--max-rows", "4"] + (["--backends", "cpu", "--dtypes", "fp32"] if s.tiny else [])
        interp = {} if s.tiny else {"TRITON_INTERPRET": "1"}
        note = "CPU check: compute-sanitizer is not run; its program runs alone"
        mem = [Command([], tool="compute-sanitizer", note=note), _py(s, *once, env=interp)]
        race = [Command([], tool="compute-sanitizer", note=note), _py(s, *once, env=interp)]
    else:
        sanitizer = ["compute-sanitizer", "--error-exitcode", "86", "--print-limit", "200",
                     "--target-processes", "application-only"]
        # Without the caching allocator every tensor is its own cudaMalloc, so that
        # memcheck sees an access past a tensor's end (in a pool it would land in a neighbour).
        mem = [Command([*sanitizer, "--tool", "memcheck", s.python, *once],
                       env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, tool="compute-sanitizer")]
        race = [Command([*sanitizer, "--tool", "racecheck", "--racecheck-report", "all", s.python, *once, "--quick"],
                        tool="compute-sanitizer")]
    steps.append(Step("memcheck", "compute-sanitizer memcheck, every kernel variant once", 75, 110, 30, mem))
    steps.append(Step("racecheck", "compute-sanitizer racecheck, every kernel variant once", 15, 45, 10, race))

    # --- benchmarks
    if s.cpu_check:
        matrix = ["--device", "cpu", "--quick", "--threads", "1", "--dtypes", "fp32", "--shapes", "8x10,64x100"]
        matrix += ["--losses", "nce+rce", "--passes", "fwd+bwd"] if s.tiny else ["--losses", GOAL_LOSSES]
        eager = ["reference", "cpu", "F.cross_entropy"]
    else:
        matrix = ["--device", "cuda", "--dtypes", "bf16", "--shapes", "128x10,1024x100" if s.tiny else GOAL_SHAPES,
                  "--losses", GOAL_LOSSES]
        eager = ["reference", "cuda", "triton", "F.cross_entropy"]
    kernels = ["-m", "bench.kernels", *matrix, "--out", results, "--no-plots"]
    steps.append(Step("kernels", "bench.kernels at the goal shapes, every backend", 165, 210, 60,
                      [_py(s, *kernels, "--backends", ",".join(eager))]))
    if s.cpu_check:
        epochs = ["--device", "cpu", "--batch-size", "8", "--epochs", "2", "--steps", "1", "--losses", "nce+rce"]
    else:
        epochs = ["--device", "cuda", "--batch-size", "128", "--epochs", "3",
                  "--losses", "nce+rce" if s.tiny else ROBUST_PAIRS] + (["--steps", "20"] if s.tiny else [])
    steps.append(Step("epochs", "bench.epochs: cnn8, batch 128, AMP bf16, synthetic, reference vs auto", 100, 130, 40,
                      [_py(s, "-m", "bench.epochs", "--models", "cnn8", "--amp", "bf16", "--synthetic", *epochs,
                           "--out", results)]))

    # --- ncu
    head = ["-m", "bench.gpu_kernels_once", "--headline", "--device", device, "--loss", HEADLINE["loss"],
            "--dtype", HEADLINE["dtype"]]
    if s.cpu_check:
        ncu = [Command([], tool="ncu", note="CPU check: ncu is not run; its program runs alone, on a small shape"),
               _py(s, *head, "--backends", "cpu", "--shape", "64x1000")]
    else:
        shape = "1024x131072" if s.tiny else f"{HEADLINE['B']}x{HEADLINE['K']}"
        profile = ["ncu", "--clock-control", "none", "--target-processes", "all",
                   "--kernel-name", "regex:" + "|".join(NCU_KERNELS), "--metrics", ",".join(NCU_METRICS),
                   "--csv", "--page", "raw", "--print-units", "base", "--launch-count"]
        ncu = [Command([*profile, "2", s.python, *head, "--backends", "triton,cuda", "--shape", shape], tool="ncu"),
               Command([*profile, "1", s.python, *head, "--backends", "cuda", "--shape", shape],
                       env=dict([NCU_RUNS[1].split("=")]), tool="ncu", note=f"the CUDA kernel with {NCU_RUNS[1]}")]
    steps.append(Step("ncu", "ncu: DRAM bytes and occupancy of the headline kernels (and CUDA without its prefetch)",
                      25, 60, 20, ncu))

    # --- optional extras, last
    # The large-K launch knobs one at a time (bench.gpu_sweep): which redesign moves the headline.
    sweep_out = os.path.join(s.out, "sweep.json")
    if s.cpu_check:   # the Triton configurations interpreted on a small fp32 shape; CUDA is unavailable here
        sweep = [_py(s, "-m", "bench.gpu_sweep", "--device", "cpu", "--shape", "2x10000" if s.tiny else "8x20000",
                     "--dtype", "fp32", "--losses", "ce", "--quick", "--out", sweep_out, env={"TRITON_INTERPRET": "1"})]
    else:
        sweep = [_py(s, "-m", "bench.gpu_sweep", "--device", "cuda", "--out", sweep_out)]
    steps.append(Step("sweep", "bench.gpu_sweep: the large-K launch knobs at the headline, fwd+bwd", 90, 150, 40,
                      sweep, optional=True))
    compiled = [_py(s, *kernels, "--backends", "compiled", "--passes", "fwd,fwd+bwd")]
    if s.cpu_check:
        compiled = [_py(s, "-m", "bench.kernels", "--device", "cpu", "--quick", "--threads", "1", "--dtypes", "fp32",
                        "--shapes", "8x10", "--losses", "nce+rce", "--passes", "fwd+bwd", "--backends", "compiled",
                        "--out", results, "--no-plots")]
    steps.append(Step("compiled", "bench.kernels, torch.compile of the reference (fwd, fwd+bwd)", 110, 150, 50,
                      compiled, optional=True))
    suite = [*pytest, "python_tests/triton/test_triton_kernels.py"]
    if s.cpu_check:
        suite.append("--collect-only")  # under the interpreter this is CI's job; here the flags are checked
    steps.append(Step("triton-suite", "the Triton test suite on the GPU", 90, 120, 40, [_py(s, *suite)],
                      optional=True))
    if s.cpu_check:
        for step in steps:
            step.cap_s *= CPU_CHECK_CAP_SCALE
    return sorted(steps, key=lambda step: STEP_NAMES.index(step.name))


# The order: what the goals table needs comes first (the tests, then the benchmarks),
# the sanitizers and ncu after, the optional extras last; --budget cuts from the end.
STEP_NAMES = ("env", "build", "tests", "kernels", "epochs", "memcheck", "ncu", "racecheck", "sweep", "compiled",
              "triton-suite")


def step_window(step: Step, left_s: float, later_need_s: float) -> Optional[float]:
    """Seconds step may run with left_s left of the budget (the summary's reserve already
    taken off) and later_need_s the sum of the minima of the steps after it; None: skip it.

    A step starts only if its own minimum is left; it may then run until its cap or until
    only the later steps' minima are left, but never less than its own minimum."""
    if left_s < step.need_s:
        return None
    if not step.protect_later:
        return min(step.cap_s, left_s)
    return min(step.cap_s, max(step.need_s, left_s - later_need_s))


def held_back(later: list) -> float:
    """Seconds an earlier step leaves for the later ones: their minima, optional steps not counted."""
    return sum(s.need_s for s in later if not s.optional)


def plan_times(steps: list, budget_s: float, took: Optional[dict] = None) -> list:
    """[(step, window or None)] if each step takes its estimate (or took[name]): the dry-run's forecast."""
    took = took or {}
    left = budget_s - SUMMARY_RESERVE_S
    rows = []
    for i, step in enumerate(steps):
        window = step_window(step, left, held_back(steps[i + 1:]))
        rows.append((step, window))
        if window is not None:
            left -= min(window, took.get(step.name, step.estimate_s))
    return rows


# ----------------------------------------------------------------------------- running

@dataclasses.dataclass
class StepResult:
    name: str
    status: str                 # ok, failed, timeout, skipped, interrupted
    seconds: float = 0.0
    note: str = ""
    commands: list = dataclasses.field(default_factory=list)  # [{"cmd", "rc", "seconds"}]


def run_command(cmd: Command, log, deadline: float, settings: Settings) -> dict:
    """Run one command with its output appended to `log` (an open binary file); kill its
    process group at `deadline` (time.monotonic()).  Returns {"cmd", "rc", "seconds", "status"}."""
    record = {"cmd": cmd.shell(), "tool": cmd.tool, "rc": None, "seconds": 0.0, "status": "ok"}
    if cmd.note:
        log.write(f"# {cmd.note}\n".encode())
    if cmd.tool and shutil.which(cmd.tool) is None:
        record["status"] = "missing"
        line = f"skipped: {cmd.tool} not found on PATH" + (" (CPU check)" if settings.cpu_check else "")
        log.write((line + "\n").encode())
        log.flush()
        return record
    if not cmd.argv:        # a note only (the CPU check's stand-in for a GPU tool)
        log.flush()
        return record
    log.write(f"$ {cmd.shell()}\n".encode())
    log.flush()
    env = dict(os.environ)
    env.update(cmd.env)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.monotonic()
    remaining = deadline - start
    if remaining <= 0:
        record.update(status="timeout")
        log.write(b"not started: the step's deadline has passed\n")
        return record
    try:
        proc = subprocess.Popen(cmd.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as error:
        record.update(status="failed", rc=127)
        log.write(f"cannot start: {error}\n".encode())
        return record
    global _running
    _running = proc
    try:
        proc.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        record["status"] = "timeout"
        log.write(f"\n[killed at the step's deadline, after {time.monotonic() - start:.0f} s]\n".encode())
    finally:
        _running = None
    record["rc"] = proc.returncode
    record["seconds"] = round(time.monotonic() - start, 1)
    if record["status"] == "ok" and proc.returncode not in cmd.ok_codes:
        record["status"] = "failed"
    log.write(f"[exit status {proc.returncode}, {record['seconds']} s]\n\n".encode())
    log.flush()
    return record


_running: Optional[subprocess.Popen] = None   # the step command now running (its own process group)


def _on_sigterm(signum, frame):
    """Killed from outside (a time limit): end the running step's process group, which
    a kill of this process would not reach, and unwind so that the summary is written."""
    if _running is not None:
        try:
            os.killpg(_running.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    # SIGINT first: pytest (and xdist's controller) answer it with the summary of the tests
    # run so far, which a killed test step would otherwise lose.
    for sig, wait in ((signal.SIGINT, INT_GRACE_S), (signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, window_s: float, log_path: str, settings: Settings) -> StepResult:
    deadline = time.monotonic() + window_s
    start = time.monotonic()
    result = StepResult(step.name, "ok")
    with open(log_path, "ab") as log:
        log.write(f"===== {step.name}: {step.what} (window {window_s:.0f} s)\n".encode())
        failures = []
        for cmd in step.commands:
            if cmd.fallback and not (failures and failures[-1] == len(result.commands) - 1):
                continue    # the command before it did not fail
            record = run_command(cmd, log, deadline, settings)
            result.commands.append(record)
            if record["status"] == "timeout":
                result.status = "timeout"
                break
            if cmd.fallback and record["status"] == "ok":
                failures.pop()  # the fallback did what the failed command should have done
            if record["status"] == "failed" or \
                    (record["status"] == "missing" and not settings.cpu_check and step.name != "env"):
                failures.append(len(result.commands) - 1)  # on the GPU machine the tools should be there
        if result.status != "timeout" and failures:
            result.status = "failed"
    result.seconds = round(time.monotonic() - start, 1)
    return result


class Session:
    """Runs the steps, keeps OUT up to date after each one (session.log, logs.tar.gz)."""

    def __init__(self, settings: Settings, steps: list, selected: list):
        self.settings, self.steps, self.selected = settings, steps, selected
        self.out = os.path.abspath(settings.out)
        self.logs = tempfile.mkdtemp(prefix="apl-gpu-session-")
        self.results: list = []
        self.started = time.monotonic()

    def log_path(self, index: int, name: str) -> str:
        return os.path.join(self.logs, f"{index:02d}-{name}.log")

    def run(self) -> list:
        os.makedirs(self.out, exist_ok=True)
        for name in ("session.log",):
            open(os.path.join(self.out, name), "w").close()
        budget_end = self.started + self.settings.budget_s - SUMMARY_RESERVE_S
        chosen = [s for s in self.steps if s.name in self.selected]
        for index, step in enumerate(self.steps, 1):
            if step.name not in self.selected:
                continue
            later = chosen[chosen.index(step) + 1:]
            left = budget_end - time.monotonic()
            window = step_window(step, left, held_back(later))
            elapsed = time.monotonic() - self.started
            if window is None:
                result = StepResult(step.name, "skipped", note=f"budget: {max(left, 0):.0f} s left, "
                                                               f"needs at least {step.need_s:.0f} s")
                with open(self.log_path(index, step.name), "w") as f:
                    f.write(f"===== {step.name}: {result.note}\n")
                _say(f"[{elapsed:5.0f} s] {step.name:<12} skipped ({result.note})")
            else:
                _say(f"[{elapsed:5.0f} s] {step.name:<12} started (window {window:.0f} s, estimate "
                     f"{step.estimate_s:.0f} s): {step.what}")
                try:
                    result = run_step(step, window, self.log_path(index, step.name), self.settings)
                except BaseException:   # SIGTERM (see _on_sigterm), Ctrl-C: record what was running
                    self.results.append(StepResult(step.name, "interrupted",
                                                   round(time.monotonic() - self.started - elapsed, 1),
                                                   note="the session was stopped during this step"))
                    self.save(index, step.name)
                    raise
                _say(f"[{time.monotonic() - self.started:5.0f} s] {step.name:<12} {result.status} "
                     f"after {result.seconds:.0f} s")
                if result.status in ("failed", "timeout"):
                    _say(_tail(self.log_path(index, step.name), 8, indent="    | "))
            self.results.append(result)
            self.save(index, step.name)
        return self.results

    def save(self, index: int, name: str) -> None:
        """Append the step's log to OUT/session.log and repack OUT/logs.tar.gz (atomically)."""
        with open(os.path.join(self.logs, "steps.json"), "w") as f:
            json.dump({"settings": {"cpu_check": self.settings.cpu_check, "tiny": self.settings.tiny,
                                    "budget_s": self.settings.budget_s},
                       "elapsed_s": round(time.monotonic() - self.started, 1),
                       "steps": [dataclasses.asdict(r) for r in self.results]}, f, indent=1)
        path = self.log_path(index, name)
        with open(os.path.join(self.out, "session.log"), "ab") as dst, open(path, "rb") as src:
            shutil.copyfileobj(src, dst)
        pack_logs(self.logs, os.path.join(self.out, "logs.tar.gz"))

    def cleanup(self) -> None:
        shutil.rmtree(self.logs, ignore_errors=True)


def pack_logs(folder: str, target: str) -> None:
    tmp = target + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(folder)):
            tar.add(os.path.join(folder, name), arcname=os.path.join("logs", name))
    os.replace(tmp, target)


def _say(text: str) -> None:
    print(text, flush=True)


def _tail(path: str, lines: int, indent: str = "") -> str:
    try:
        with open(path, "rb") as f:
            text = f.read()[-20000:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(indent + line for line in text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- parsing the logs

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b")


def parse_pytest(text: str) -> dict:
    """Counts from pytest's last summary line, and the first failures' node ids."""
    counts = {}
    for line in reversed(text.splitlines()):
        stripped = line.strip("= \t")
        if re.search(r"\b(passed|failed|skipped|deselected|errors?|no tests ran|collected)\b", stripped) and \
                re.search(r"\bin [\d.]+s", stripped):
            collected = re.search(r"(\d+) tests? collected", stripped)
            if collected:
                counts["collected"] = int(collected.group(1))
            for number, kind in _PYTEST_COUNT.findall(stripped):
                kind = {"error": "errors", "warning": "warnings", "warnings": "warnings"}.get(kind, kind)
                counts[kind] = int(number)
            counts["found"] = True
            break
    failures = [m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", text, re.M)]
    counts["first_failures"] = failures[:3]
    counts["time_capped"] = "TestTimeCapExceeded" in text
    return counts


def parse_sanitizer(text: str) -> dict:
    """compute-sanitizer's closing lines: memcheck 'ERROR SUMMARY: N errors', racecheck
    'RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)'; and gpu_kernels_once's tally."""
    result = {}
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    if m:
        result["errors"] = int(m.group(1))
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        result.update(hazards=int(m.group(1)), race_errors=int(m.group(2)), race_warnings=int(m.group(3)))
    m = re.search(r"(\d+) calls, (\d+) failed", text)
    if m:
        result.update(calls=int(m.group(1)), calls_failed=int(m.group(2)))
    return result


_UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
          "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9, "%": 1, "": 1,
          "register/thread": 1, "register": 1}


def _ncu_number(text: str, unit: str) -> Optional[float]:
    text = text.strip().replace(",", "")  # ncu may group digits: "2,147,483,648"
    try:
        value = float(text)
    except ValueError:
        return None
    return value * _UNITS.get(unit.strip().lower(), 1)


def parse_ncu_csv(text: str) -> list:
    """Rows of `ncu --csv --page raw` (any --print-units): one dict per profiled kernel with
    kernel, backend, and the NCU_METRICS under their short names (bytes, ns, %)."""
    import csv
    lines = [line for line in text.splitlines() if line.startswith('"')]
    kernels, header, units, run = [], None, [], -1
    for row in csv.reader(lines):
        if row and row[0] == "ID":          # a new CSV block: the next of NCU_RUNS
            header, units, run = row, [], run + 1
            continue
        if header is None or len(row) != len(header):
            continue
        if row[0] == "" and not units:      # the units line under the header
            units = row
            continue
        cells = dict(zip(header, row))
        name = cells.get("Kernel Name", "")
        entry = {"kernel": name, "backend": next((b for k, b in NCU_KERNELS.items() if k in name), None),
                 "setting": NCU_RUNS[run] if run < len(NCU_RUNS) else f"run {run}"}
        for metric, short in NCU_METRICS.items():
            if metric in cells:
                unit = units[header.index(metric)] if units else ""
                entry[short] = _ncu_number(cells[metric], unit)
        kernels.append(entry)
    return kernels


def parse_env(text: str) -> dict:
    m = re.search(r"^ENV (\{.*\})$", text, re.M)
    try:
        return json.loads(m.group(1)) if m else {}
    except ValueError:
        return {}


def parse_build(text: str) -> dict:
    result = {}
    m = re.search(r"^BUILD_INFO (\{.*\})$", text, re.M)
    if m:
        try:
            result["build_info"] = json.loads(m.group(1))
        except ValueError:
            pass
    for key, pattern in (("pip", r"pip install"), ("fallback", r"setup\.py build_ext")):
        m = re.search(r"^\$ .*" + pattern + r".*\n(?:.*\n)*?\[exit status (-?\d+), ([\d.]+) s\]", text, re.M)
        if m:
            result[key + "_rc"], result[key + "_seconds"] = int(m.group(1)), float(m.group(2))
    return result


def load_roofline(path: str) -> list:
    """The records of bench.roofline's JSON (a list, or {"records": [...]}); [] if absent or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    records = data.get("records", []) if isinstance(data, dict) else data
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def roofline_for(records: list, backend: str, loss: str, dtype: str, B: int, K: int) -> Optional[dict]:
    for r in records:
        if (r.get("backend"), r.get("loss"), r.get("dtype"), r.get("B"), r.get("K")) == (backend, loss, dtype, B, K):
            return r
    return None


_GOAL_CONFIG = re.compile(r"^(triton|cuda) (\S+) (bf16|fp16|fp32|fp64) \[(\d+), ?(\d+)\]")


def predicted_pct(goal_name: str, roofline: list) -> Optional[float]:
    """The roofline's predicted % of copy bandwidth for a goal stated on one configuration."""
    m = _GOAL_CONFIG.match(goal_name)
    if not m or not roofline:
        return None
    r = roofline_for(roofline, m.group(1), m.group(2), m.group(3), int(m.group(4)), int(m.group(5)))
    return None if r is None else r.get("predicted_pct_copy")


# ----------------------------------------------------------------------------- the summary

def summarize(step_results: list, logs: dict, results_path: str, roofline: list, settings: dict,
              elapsed_s: Optional[float] = None) -> str:
    """The one-screen summary.  logs: {step name: its log text}."""
    env = parse_env(logs.get("env", ""))
    lines = []
    where = "CPU check (no GPU: GPU figures below are not measurements of a GPU)" if settings.get("cpu_check") \
        else env.get("gpu", "GPU not seen by torch")
    lines.append(f"GPU session summary: {where}")
    lines.append(f"  python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), "
                 f"triton {env.get('triton', '?')}; budget {settings.get('budget_s', '?'):g} s"
                 + (f", used {elapsed_s:.0f} s" if elapsed_s is not None else ""))
    lines.append("")
    lines.append(f"  {'step':<13}{'status':<9}{'time':>7}  note")
    for r in step_results:
        name, status = r["name"], r["status"]
        note = r.get("note") or _step_note(name, logs.get(name, ""), r)
        time_s = f"{r['seconds']:.0f} s" if status != "skipped" else "-"
        shout = status in ("failed", "timeout", "interrupted")
        lines.append(f"  {name:<13}{status.upper() if shout else status:<9}{time_s:>7}  "
                     f"{note}"[:160])
    ncu_lines = _ncu_summary(logs.get("ncu", ""), roofline)
    if ncu_lines:
        lines += ["", f"ncu, {HEADLINE['loss']} {HEADLINE['dtype']} [{HEADLINE['B']}, {HEADLINE['K']}] fwd+bwd "
                      "(one launch each, --clock-control none):"] + ncu_lines
    lines += [""] + _goal_lines(results_path, roofline, settings)
    return "\n".join(lines) + "\n"


def _step_note(name: str, text: str, record: dict) -> str:
    missing = [c.get("tool") or "?" for c in record.get("commands", []) if c.get("status") == "missing"]
    if name == "env":
        env = parse_env(text)
        note = f"{env.get('gpu') or 'no GPU'}; {env.get('cpus', '?')} CPUs"
        return note + (f"; not found: {', '.join(sorted(set(missing)))}" if missing else "")
    if name == "build":
        b = parse_build(text)
        info = b.get("build_info") or {}
        pip = f"pip {'ok' if b.get('pip_rc') == 0 else 'exit ' + str(b.get('pip_rc'))} in {b['pip_seconds']:.0f} s" \
            if "pip_seconds" in b else "pip did not finish"
        if "fallback_rc" in b:
            pip += (f", then setup.py build_ext {'ok' if b['fallback_rc'] == 0 else 'exit ' + str(b['fallback_rc'])}"
                    f" in {b['fallback_seconds']:.0f} s")
        built = (f"CUDA kernels for {info.get('cuda_arch_list')}" if info.get("cuda") else
                 f"no CUDA kernels ({info.get('extension_error') or 'CPU-only build'})") if info else \
            "apl_kernels.build_info() not read"
        return f"{pip}; {built}"
    if name in ("tests", "triton-suite"):
        p = parse_pytest(text)
        if not p.get("found"):
            return "no pytest summary line (see the log)"
        keys = ("passed", "failed", "errors", "skipped", "deselected", "collected")
        note = ", ".join(f"{p[k]} {k}" for k in keys if p.get(k)) or "no tests ran"
        if p["first_failures"]:
            note += "; first: " + p["first_failures"][0]
        if p["time_capped"]:
            note += "; a test hit the time cap"
        return note
    if name in ("memcheck", "racecheck"):
        s = parse_sanitizer(text)
        parts = []
        if "errors" in s and name == "memcheck":
            parts.append(f"{s['errors']} errors")
        if "hazards" in s:
            parts.append(f"{s['hazards']} hazards ({s['race_errors']} errors, {s['race_warnings']} warnings)")
        if "calls" in s:
            parts.append(f"{s['calls']} kernel calls, {s['calls_failed']} failed or wrong")
        if missing:
            parts.append("compute-sanitizer not run")
        return "; ".join(parts) or "no tally (see the log)"
    if name == "ncu":
        kernels = parse_ncu_csv(text)
        if kernels:
            return f"{len(kernels)} kernels profiled"
        return "ncu not run" if missing else "no ncu rows (see the log)"
    if name in ("kernels", "compiled", "epochs"):
        m = re.findall(r"^(\d+) (?:epoch )?records written", text, re.M)
        return f"{m[-1]} records" if m else "no records written (see the log)"
    if name == "sweep":
        m = re.findall(r"^(\d+) records -> ", text, re.M)
        fastest = re.findall(r"^fastest first, per loss:\n(.+)$", text, re.M)
        return (f"{m[-1]} configurations" + (f"; fastest: {' '.join(fastest[-1].split())}" if fastest else "")) \
            if m else "no sweep records (see the log)"
    return ""


def _ncu_summary(text: str, roofline: list) -> list:
    lines = []
    B, K = HEADLINE["B"], HEADLINE["K"]
    minimal = 2 * B * K * 2  # bf16: read the logits once, write the gradient once
    for k in parse_ncu_csv(text):
        read, write, ns = k.get("dram_read_bytes"), k.get("dram_write_bytes"), k.get("time_ns")
        parts = [f"{k['backend'] or '?'} {k['kernel'][:40]}" + (f" ({k['setting']})" if k.get("setting") else "")]
        if ns:
            parts.append(f"{ns / 1e6:.3f} ms")
        if read is not None and write is not None:
            total = read + write
            parts.append(f"DRAM {read / 1e9:.2f} GB read + {write / 1e9:.2f} GB written = {total / 1e9:.2f} GB "
                         f"({total / minimal:.2f}x the minimal {minimal / 1e9:.2f} GB")
            r = roofline_for(roofline, k["backend"], HEADLINE["loss"], HEADLINE["dtype"], B, K) if k["backend"] else None
            if r and r.get("hbm_bytes"):
                parts[-1] += f"; predicted {r['hbm_bytes'] / 1e9:.2f} GB"
            parts[-1] += ")"
            if ns:
                parts.append(f"{total / ns:.0f} GB/s")
        if k.get("achieved_occupancy_pct") is not None:
            occupancy = f"occupancy {k['achieved_occupancy_pct']:.0f}% achieved"
            if k.get("theoretical_occupancy_pct") is not None:
                occupancy += f" / {k['theoretical_occupancy_pct']:.0f}% theoretical"
            parts.append(occupancy)
        if k.get("registers") is not None:
            parts.append(f"{k['registers']:.0f} registers")
        lines.append("  " + ", ".join(parts))
    return lines


def _goal_lines(results_path: str, roofline: list, settings: dict) -> list:
    if not os.path.exists(results_path):
        return ["goals: no results.json (the benchmark steps did not run or wrote nothing)"]
    try:
        sys.path.insert(0, ROOT)
        from bench.common import load_results
        from bench.goals import evaluate, format_goal
        data = load_results(results_path)
        if data is None:
            return [f"goals: {results_path} is not a results file"]
        goals = evaluate(data)
    except Exception as error:  # noqa: BLE001 - the summary must not die on a broken results file
        return [f"goals: could not evaluate ({type(error).__name__}: {error})"]
    gpu_run = data["meta"].get("device") == "cuda"
    title = "goals (bench.goals on results.json" + ("; predicted: bench.roofline" if roofline else "") + "):"
    lines = [title]
    for goal in goals:
        if gpu_run and goal["goal"].startswith("cpu "):
            continue  # the CPU goals have their own results file
        line = "  " + format_goal(goal)
        predicted = predicted_pct(goal["goal"], roofline)
        if predicted is not None:
            line += f" [predicted {predicted:.1f}%]"
        lines.append(line)
    epochs = [r for r in data["records"] if r.get("kind") == "epoch" and r.get("backend") == "auto"]
    if epochs:
        lines.append("  epochs (auto): " + ", ".join(
            f"{r['loss']} {r['epoch_s_median']:.3g} s {r['speedup_vs_reference']:.2f}x" for r in epochs))
    if not gpu_run:
        lines.append("  (results of a CPU run: no GPU figure above was measured on a GPU)")
    return lines


def summary_from_out(out: str) -> str:
    """The summary of a finished (fetched) OUT folder: logs.tar.gz and results.json."""
    tar_path = os.path.join(out, "logs.tar.gz")
    logs, steps = {}, {"steps": [], "settings": {}}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            data = tar.extractfile(member).read().decode(errors="replace")
            base = os.path.basename(member.name)
            if base == "steps.json":
                steps = json.loads(data)
            else:
                m = re.match(r"\d+-(.+)\.log$", base)
                if m:
                    logs[m.group(1)] = data
    return summarize(steps["steps"], logs, os.path.join(out, "results.json"),
                     load_roofline(os.path.join(ROOT, ROOFLINE_PATH)), steps["settings"], steps.get("elapsed_s"))


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bash bench/gpu_session.sh  (or: python -m bench.gpu_session)",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="output folder (created; on the device machine: \"$OUT\")")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole session (default {DEFAULT_BUDGET_S:g}: the device tool's 600 s "
                             f"per command less start-up and slack; {CPU_CHECK_BUDGET_S:g} with --cpu-check); "
                             "later steps are skipped when it runs short")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (commands, estimates, "
                        "what the budget would skip) and exit; runs nothing, writes nothing")
    parser.add_argument("--cpu-check", action="store_true",
                        help="run every step that can run without a GPU, in its no-GPU form")
    parser.add_argument("--tiny", action="store_true", help="small workloads in every step (tests of this script)")
    parser.add_argument("--steps", help=f"comma list of steps to run (default all): {','.join(STEP_NAMES)}")
    parser.add_argument("--skip", help="comma list of steps not to run")
    parser.add_argument("--maxfail", type=int, default=1,
                        help="stop the pytest steps after this many failures (default 1: pytest -x)")
    parser.add_argument("--test-cap", type=float, default=TEST_CAP_S,
                        help="seconds one test may run before it fails (default %(default)s)")
    parser.add_argument("--summarize", action="store_true",
                        help="print the summary of an existing OUT (logs.tar.gz, results.json) and exit")
    return parser


USAGE = """

One call from a session that has the device tool (its command is at most 2,000
characters, 600 s; the working tree is copied there, $OUT comes back):

  run(command='bash bench/gpu_session.sh "$OUT" --budget 540', timeout_s=600)

then read OUT/summary.txt under files_at, and give the machine back unless a
rerun follows at once (a rerun on a fresh machine builds again: --skip what
already passed, e.g. --steps build,tests,kernels).
"""


def _selected(args) -> list:
    chosen = [s.strip() for s in args.steps.split(",")] if args.steps else list(STEP_NAMES)
    skipped = [s.strip() for s in args.skip.split(",")] if args.skip else []
    bad = [s for s in chosen + skipped if s not in STEP_NAMES]
    if bad:
        raise SystemExit(f"unknown step {bad}; the steps are {', '.join(STEP_NAMES)}")
    return [s for s in STEP_NAMES if s in chosen and s not in skipped]


def print_plan(steps: list, selected: list, settings: Settings, file=sys.stdout) -> None:
    chosen = [s for s in steps if s.name in selected]
    mode = "CPU check" if settings.cpu_check else "GPU"
    print(f"Plan ({mode}{', tiny' if settings.tiny else ''}), budget {settings.budget_s:g} s "
          f"({SUMMARY_RESERVE_S} s kept for the summary); estimates are for the H200 machine, guesses until a "
          "session measures them:", file=file)
    total = 0.0
    for step, window in plan_times(chosen, settings.budget_s):
        if window is None:
            verdict = "would be SKIPPED: too little budget left"
        else:
            verdict = f"window {window:.0f} s"
            total += min(window, step.estimate_s)
        print(f"\n  {step.name:<13} ~{step.estimate_s:>4.0f} s  (cap {step.cap_s:.0f} s, needs {step.need_s:.0f} s; "
              f"{verdict})  {step.what}", file=file)
        for cmd in step.commands:
            if cmd.note:
                print(f"      # {cmd.note}", file=file)
            if cmd.argv:
                print(f"      $ {cmd.shell()}", file=file)
    skipped = [s for s in steps if s.name not in selected]
    if skipped:
        print(f"\n  not selected: {', '.join(s.name for s in skipped)}", file=file)
    print(f"\n  total estimate ~{total + SUMMARY_RESERVE_S:.0f} s of the {settings.budget_s:g} s budget; "
          f"all selected steps at their estimates: ~{sum(s.estimate_s for s in chosen) + SUMMARY_RESERVE_S:.0f} s",
          file=file)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out:
        raise SystemExit("give the output folder: bash bench/gpu_session.sh OUT [--budget S] [--dry-run]")
    if args.summarize:
        text = summary_from_out(args.out)
        print(text, end="")
        return 0
    if args.budget is None:
        args.budget = CPU_CHECK_BUDGET_S if args.cpu_check else DEFAULT_BUDGET_S
    if args.budget <= 0:
        raise SystemExit(f"--budget must be positive, got {args.budget:g}")
    settings = Settings(out=args.out, cpu_check=args.cpu_check, tiny=args.tiny, budget_s=args.budget,
                        maxfail=args.maxfail, test_cap_s=args.test_cap)
    selected = _selected(args)
    steps = build_steps(settings)
    if args.dry_run:
        print_plan(steps, selected, settings)
        return 0
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        stale = [n for n in ("summary.txt", "session.log", "logs.tar.gz", "results.json")
                 if os.path.exists(os.path.join(out, n))]
        if stale:
            # results.json is merged into by the benchmarks: an old one would mix two sessions.
            raise SystemExit(f"{out} already holds a session ({', '.join(stale)}); give an empty or new folder")
    session = Session(settings, steps, selected)
    _say(f"GPU session{' (CPU check)' if settings.cpu_check else ''}: steps {', '.join(selected)}; "
         f"budget {settings.budget_s:g} s; output {out}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        session.run()
    finally:  # an interrupted session still gets its summary
        try:
            write_summary(session, steps, settings, out)
        finally:
            session.cleanup()
    bad = [r.name for r in session.results if r.status in ("failed", "timeout")]
    return 1 if bad else 0


def write_summary(session: Session, steps: list, settings: Settings, out: str) -> None:
    logs = {}
    for index, step in enumerate(steps, 1):
        path = session.log_path(index, step.name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                logs[step.name] = f.read()
    text = summarize([dataclasses.asdict(r) for r in session.results], logs, os.path.join(out, "results.json"),
                     load_roofline(os.path.join(ROOT, ROOFLINE_PATH)),
                     {"cpu_check": settings.cpu_check, "tiny": settings.tiny, "budget_s": settings.budget_s},
                     time.monotonic() - session.started)
    tmp = os.path.join(out, ".summary.txt.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "summary.txt"))
    print("\n" + text, end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
