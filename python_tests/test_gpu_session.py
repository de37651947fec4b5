"""bench.gpu_session, the one-command GPU session, tested without a GPU: the plan
and its time budget, the runner (deadlines, skips, failures that do not stop the
rest), the log parsers and summary on hand-made inputs, and one end-to-end run
of the CPU check on tiny settings (about a minute on 2 cores: ~10 Python
processes that import torch)."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import gpu_kernels_once, gpu_session, gpu_sweep  # noqa: E402
from bench.gpu_session import Command, Settings, Step  # noqa: E402


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench.gpu_session", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the plan

def test_dry_run_prints_every_step_with_an_estimate_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _run(str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in gpu_session.STEP_NAMES:
        assert f"\n  {name} " in text, name
    assert text.count(" s  (cap ") == len(gpu_session.STEP_NAMES)  # "~ 150 s  (cap 330 s, ..." per step
    # The commands the issue prescribes, as they will run on the device.
    assert "MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 APL_BUILD_CUDA=1" in text
    assert "pip install --no-build-isolation --no-deps --no-index -e ." in text
    assert "requirements.txt" not in text
    assert "-m pytest" in text and " -x -m gpu python_tests" in text and "--time-cap 120" in text
    assert "compute-sanitizer" in text and "--tool memcheck" in text and "--tool racecheck" in text
    assert "ncu --clock-control none" in text and "dram__bytes_read.sum,dram__bytes_write.sum" in text
    assert "--shapes 128x10,1024x100,256x1000,8192x131072" in text and "--dtypes bf16" in text
    assert "--models cnn8 --amp bf16 --synthetic" in text and "--batch-size 128" in text
    assert "total estimate" in text
    assert not out.exists()


def test_dry_run_with_a_small_budget_says_what_would_be_skipped(tmp_path):
    full = _run(str(tmp_path), "--dry-run").stdout
    short = _run(str(tmp_path), "--dry-run", "--budget", "200").stdout
    core = ("env", "build", "tests", "memcheck", "racecheck", "kernels", "epochs", "ncu")
    # The default budget fits the core steps at their estimates; a short one does not.
    skipped_full = [line.split()[0] for line in full.splitlines() if "would be SKIPPED" in line]
    assert not set(core) & set(skipped_full), skipped_full
    skipped_short = [line.split()[0] for line in short.splitlines() if "would be SKIPPED" in line]
    assert "ncu" in skipped_short and "env" not in skipped_short and "build" not in skipped_short


def test_cpu_check_plan_leaves_the_editable_install_alone(tmp_path):
    text = _run(str(tmp_path), "--dry-run", "--cpu-check").stdout
    assert "--dry-run" in text.split("build", 1)[1].split("tests", 1)[0]  # pip install --dry-run
    assert "8192x131072" not in text  # the no-GPU form runs small shapes
    assert "--device cpu" in text and "--device cuda" not in text
    # 2 slow cores: a longer default budget and caps than on the device
    assert f"budget {gpu_session.CPU_CHECK_BUDGET_S} s" in text and "(cap 1050 s," in text  # tests: 210 s x 5


def test_unknown_step_and_bad_budget_are_refused(tmp_path):
    result = _run(str(tmp_path), "--dry-run", "--steps", "env,bulid")
    assert result.returncode != 0 and "unknown step ['bulid']" in result.stderr
    result = _run(str(tmp_path), "--budget", "0")
    assert result.returncode != 0 and "--budget must be positive" in result.stderr


def _step(name, need, cap, optional=False, protect=True, estimate=None):
    return Step(name, name, estimate if estimate is not None else need, cap, need, [], protect_later=protect,
                optional=optional)


def test_step_window_holds_back_the_later_minima():
    step = _step("a", need=10, cap=100)
    assert gpu_session.step_window(step, left_s=200, later_need_s=50) == 100      # capped
    assert gpu_session.step_window(step, left_s=120, later_need_s=50) == 70       # leaves 50 for later
    assert gpu_session.step_window(step, left_s=30, later_need_s=50) == 10        # never under its own need
    assert gpu_session.step_window(step, left_s=9, later_need_s=0) is None        # skipped
    build = _step("build", need=10, cap=300, protect=False)
    assert gpu_session.step_window(build, left_s=120, later_need_s=100) == 120   # may take everything


def test_plan_times_skips_later_steps_and_holds_nothing_for_optional_ones():
    steps = [_step("a", 10, 100, estimate=80), _step("b", 30, 60), _step("c", 50, 60, optional=True)]
    # b's 30 s are held back from a; c is optional, so nothing is held for it.
    assert gpu_session.held_back(steps[1:]) == 30
    rows = dict((s.name, w) for s, w in gpu_session.plan_times(steps, budget_s=gpu_session.SUMMARY_RESERVE_S + 120))
    assert rows["a"] == 90 and rows["b"] == 40 and rows["c"] is None


# ----------------------------------------------------------------------------- the runner

def _py(code):
    return Command([sys.executable, "-c", code])


def test_session_runs_on_after_failures_kills_at_the_deadline_and_skips_when_short(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "TERM_GRACE_S", 2)
    steps = [
        Step("env", "fails", 1, 10, 1, [_py("print('first'); raise SystemExit(3)")]),
        Step("build", "hangs", 1, 1.5, 1, [_py("import time; print('started', flush=True); time.sleep(60)")]),
        Step("tests", "runs after both", 1, 10, 1, [_py("print('still running')")]),
        Step("memcheck", "needs more than is left", 1, 10, 1000, [_py("print('never')")]),
        Step("ncu", "a tool that is not there", 1, 10, 1, [Command(["no-such-tool-xyz"], tool="no-such-tool-xyz")]),
    ]
    settings = Settings(out=str(tmp_path / "out"), budget_s=gpu_session.SUMMARY_RESERVE_S + 60)
    session = gpu_session.Session(settings, steps, [s.name for s in steps])
    start = time.monotonic()
    try:
        results = {r.name: r for r in session.run()}
    finally:
        session.cleanup()
    assert time.monotonic() - start < 30  # the sleeping step was killed, not waited for
    assert results["env"].status == "failed" and results["env"].commands[0]["rc"] == 3
    assert results["build"].status == "timeout"
    assert results["tests"].status == "ok"
    assert results["memcheck"].status == "skipped" and "budget" in results["memcheck"].note
    assert results["ncu"].status == "failed"  # on the GPU machine a missing tool is a failure
    log = (tmp_path / "out" / "session.log").read_text()
    assert "first" in log and "started" in log and "still running" in log and "never" not in log
    assert "[exit status 3," in log and "killed at the step's deadline" in log
    assert "skipped: no-such-tool-xyz not found on PATH" in log
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        names = sorted(os.path.basename(n) for n in tar.getnames())
        steps_json = json.load(tar.extractfile("logs/steps.json"))
    assert names == ["01-env.log", "02-build.log", "03-tests.log", "04-memcheck.log", "05-ncu.log", "steps.json"]
    assert [s["status"] for s in steps_json["steps"]] == ["failed", "timeout", "ok", "skipped", "failed"]


def test_a_fallback_runs_only_after_a_failure_and_can_rescue_the_step(tmp_path):
    fallback = Command([sys.executable, "-c", "print('fallback' + ' ran')"], fallback=True)
    steps = [Step("env", "first fails", 1, 10, 1, [_py("raise SystemExit(1)"), fallback]),
             Step("build", "first works", 1, 10, 1, [_py("print('fine')"), fallback])]
    session = gpu_session.Session(Settings(out=str(tmp_path / "out")), steps, ["env", "build"])
    try:
        results = {r.name: r for r in session.run()}
    finally:
        session.cleanup()
    assert results["env"].status == "ok" and len(results["env"].commands) == 2
    assert results["build"].status == "ok" and len(results["build"].commands) == 1
    assert (tmp_path / "out" / "session.log").read_text().count("fallback ran") == 1


def test_a_session_stopped_from_outside_still_writes_its_summary(tmp_path):
    """A time limit that kills the session (SIGTERM) still leaves summary.txt saying where it stopped."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_session", str(out), "--cpu-check", "--steps", "env"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (out / "session.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # inside the env step (its Python probe imports torch: seconds)
    proc.terminate()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    summary = (out / "summary.txt").read_text()
    assert "env          INTERRUPTED" in summary and "stopped during this step" in summary


# ----------------------------------------------------------------------------- parsers, on hand-made inputs

def test_parse_pytest_summary_lines():
    text = textwrap.dedent("""\
        ....F
        FAILED python_tests/test_cuda_kernels.py::test_small_k[nce+rce-10-torch.bfloat16] - AssertionError: x
        ERROR python_tests/test_cpu_op.py - AttributeError: no op
        ====== 1 failed, 120 passed, 7 skipped, 879 deselected, 1 error in 93.21s (0:01:33) ======
        """)
    p = gpu_session.parse_pytest(text)
    assert (p["passed"], p["failed"], p["skipped"], p["deselected"], p["errors"]) == (120, 1, 7, 879, 1)
    assert p["first_failures"][0] == "python_tests/test_cuda_kernels.py::test_small_k[nce+rce-10-torch.bfloat16]"
    assert not p["time_capped"]
    quiet = gpu_session.parse_pytest("....\nE   bench.pytest_time_cap.TestTimeCapExceeded: x\n"
                                     "1 failed, 4 passed in 1.20s\n")
    assert quiet["passed"] == 4 and quiet["failed"] == 1 and quiet["time_capped"]
    assert not gpu_session.parse_pytest("no summary here").get("found")
    collect = gpu_session.parse_pytest("332 tests collected in 2.10s\n")
    assert collect["found"] and collect["collected"] == 332


def test_parse_sanitizer_tallies():
    memcheck = ("ok     cuda   small K ...\n========= Invalid __global__ read of size 16 bytes\n"
                "95 calls, 1 failed, 12.0 s\n========= ERROR SUMMARY: 3 errors\n")
    assert gpu_session.parse_sanitizer(memcheck) == {"errors": 3, "calls": 95, "calls_failed": 1}
    race = "48 calls, 0 failed, 3.1 s\n========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    s = gpu_session.parse_sanitizer(race)
    assert (s["hazards"], s["race_errors"], s["race_warnings"], s["calls"]) == (2, 1, 1, 48)


NCU_CSV = textwrap.dedent("""\
    ==PROF== Connected to process 4242 (/usr/bin/python3.12)
    headline triton nce+rce bf16 [8192,131072]: loss 11.2
    ==PROF== Profiling "chunked_kernel" - 0: 0%....50%....100% - 3 passes
    "ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__registers_per_thread","sm__maximum_warps_per_active_cycle_pct","sm__warps_active.avg.pct_of_peak_sustained_active"
    "","","","","","","","","","","","Gbyte","Mbyte","usecond","register/thread","%","%"
    "0","4242","python3.12","127.0.0.1","chunked_kernel","1","7","(512, 1, 1)","(132, 1, 1)","0","9.0","2.15","2,148.00","1,010.5","128","50","47.3"
    "1","4242","python3.12","127.0.0.1","void large_k_kernel<c10::BFloat16, false>(Args<c10::BFloat16>, long)","1","7","(512, 1, 1)","(8192, 1, 1)","0","9.0","2.147483648","2,147.483648","950","40","100","88.1"
    ==PROF== Disconnected from process 4242
    the CUDA kernel with APL_CUDA_PREFETCH=0
    "ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum"
    "","","","","","","","","","","","Gbyte","Gbyte","msecond"
    "0","4243","python3.12","127.0.0.1","void large_k_fixed<c10::BFloat16, 1, 4>(Args<c10::BFloat16>, long)","1","7","(512, 1, 1)","(132, 1, 1)","0","9.0","2.2","2.1","1.25"
    """)


def test_parse_ncu_csv_converts_units_and_names_the_backend():
    rows = gpu_session.parse_ncu_csv(NCU_CSV)
    assert [(r["backend"], r["setting"]) for r in rows] == [("triton", ""), ("cuda", ""),
                                                            ("cuda", "APL_CUDA_PREFETCH=0")]
    triton, cuda, unfetched = rows
    assert unfetched["dram_read_bytes"] == pytest.approx(2.2e9) and unfetched["time_ns"] == pytest.approx(1.25e6)
    assert triton["dram_read_bytes"] == pytest.approx(2.15e9) and triton["dram_write_bytes"] == pytest.approx(2.148e9)
    assert triton["time_ns"] == pytest.approx(1_010_500) and triton["achieved_occupancy_pct"] == pytest.approx(47.3)
    assert cuda["dram_read_bytes"] == pytest.approx(2**31) and cuda["dram_write_bytes"] == pytest.approx(2**31)
    assert cuda["time_ns"] == pytest.approx(950_000) and cuda["theoretical_occupancy_pct"] == 100
    assert gpu_session.parse_ncu_csv("==PROF== ERR_NVGPUCTRPERM\n") == []


def _goal_results(path, triton_pct=90.0, cuda_pct=80.0):
    B, K = 8192, 131072

    def kernel(backend, pct, loss="nce+rce", ms=1.0, b=B, k=K, launches=None):
        return {"kind": "kernel", "loss": loss, "B": b, "K": k, "dtype": "bf16", "backend": backend,
                "pass": "fwd+bwd", "ms": ms, "gbps": 4000.0, "pct_copy_bw": pct, "peak_mem_ratio": 1.0,
                "launches": launches}
    records = [kernel("triton", triton_pct), kernel("cuda", cuda_pct),
               {"kind": "epoch", "loss": "nce+rce", "model": "cnn8", "amp": "bf16", "backend": "auto",
                "data": "synthetic", "epoch_s_median": 0.8, "speedup_vs_reference": 1.25}]
    meta = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "command": "x",
            "date": "2026-12-01", "copy_gbps": 4300.0, "device": "cuda"}
    path.write_text(json.dumps({"meta": meta, "records": records}))


def test_summary_of_hand_made_logs_with_goals_and_roofline(tmp_path):
    results = tmp_path / "results.json"
    _goal_results(results)
    roofline = [{"backend": "triton", "loss": "nce+rce", "dtype": "bf16", "B": 8192, "K": 131072,
                 "predicted_pct_copy": 93.0, "hbm_bytes": 4294967296}]
    logs = {
        "env": 'ENV {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0", '
               '"gpu": "NVIDIA H200", "cpus": 16}\n',
        "build": ('$ MAX_JOBS=16 python3 -m pip install --no-build-isolation -e .\nSuccessfully installed\n'
                  '[exit status 0, 142.5 s]\n\n$ python3 -c <script>\nBUILD_INFO {"cuda": true, '
                  '"cuda_arch_list": "9.0"}\n[exit status 0, 3.0 s]\n'),
        "tests": "FAILED python_tests/test_cuda_kernels.py::test_side_stream - x\n1 failed, 1200 passed, "
                 "2 skipped in 130.0s\n",
        "memcheck": "95 calls, 0 failed, 30.0 s\n========= ERROR SUMMARY: 0 errors\n",
        "ncu": NCU_CSV,
    }
    steps = [{"name": n, "status": "failed" if n == "tests" else "ok", "seconds": 10.0, "note": "", "commands": []}
             for n in logs]
    steps.append({"name": "compiled", "status": "skipped", "seconds": 0.0, "note": "budget: 5 s left, needs at "
                  "least 50 s", "commands": []})
    text = gpu_session.summarize(steps, logs, str(results), roofline, {"budget_s": 540}, elapsed_s=500)
    assert "GPU session summary: NVIDIA H200" in text and "used 500 s" in text
    assert "pip ok in 142 s; CUDA kernels for 9.0" in text
    assert "FAILED" in text and "1200 passed, 1 failed, 2 skipped; first: " \
        "python_tests/test_cuda_kernels.py::test_side_stream" in text
    assert "0 errors; 95 kernel calls, 0 failed or wrong" in text
    assert "compiled     skipped" in text and "budget: 5 s left" in text
    # ncu against the minimal traffic and the roofline's prediction
    assert "DRAM 2.15 GB read + 2.15 GB written = 4.30 GB (1.00x the minimal 4.29 GB; predicted 4.29 GB)" in text
    assert "occupancy 47% achieved / 50% theoretical" in text
    # goals from bench.goals, the prediction beside the measured figure
    lines = text.splitlines()
    triton = next(line for line in lines if "triton nce+rce bf16 [8192, 131072]" in line)
    assert triton.lstrip().startswith("MET") and "90.00%" in triton and "[predicted 93.0%]" in triton
    cuda = next(line for line in lines if "cuda nce+rce bf16 [8192, 131072]" in line)
    assert cuda.lstrip().startswith("MISSED") and "predicted" not in cuda
    assert "nce+rce 0.8 s 1.25x" in text
    assert not any(line.lstrip().startswith(("NOT MEASURED  cpu", "MET           cpu")) for line in lines)
    assert len(lines) <= 45  # one screen


def test_roofline_file_shapes(tmp_path):
    record = {"backend": "cuda", "loss": "nce+rce", "dtype": "bf16", "B": 8192, "K": 131072,
              "predicted_pct_copy": 95.5, "hbm_bytes": 1}
    (tmp_path / "list.json").write_text(json.dumps([record]))
    (tmp_path / "dict.json").write_text(json.dumps({"meta": {}, "records": [record]}))
    (tmp_path / "bad.json").write_text("{not json")
    for name in ("list.json", "dict.json"):
        roofline = gpu_session.load_roofline(str(tmp_path / name))
        assert gpu_session.predicted_pct("cuda nce+rce bf16 [8192, 131072] fwd+bwd >= 90%", roofline) == 95.5
        assert gpu_session.predicted_pct("triton nce+rce bf16 [8192, 131072] fwd+bwd", roofline) is None
    assert gpu_session.load_roofline(str(tmp_path / "bad.json")) == []
    assert gpu_session.load_roofline(str(tmp_path / "absent.json")) == []


# ----------------------------------------------------------------------------- what the GPU commands name

def test_the_knobs_and_kernel_names_the_session_relies_on_exist():
    """A renamed env knob would make two CUDA variants the same launch plan; a renamed
    kernel would leave ncu's filter matching nothing."""
    def source(*parts):
        with open(os.path.join(ROOT, *parts)) as f:
            return f.read()
    cuda = "".join(source("csrc", "cuda", f) for f in ("apl_cuda_small_k.cu", "apl_cuda_large_k.cu", "apl_cuda_op.cu"))
    knobs = [knob for variant in gpu_kernels_once.CUDA_VARIANTS for knob in variant.env]
    for knob in knobs + [setting.split("=")[0] for setting in gpu_session.NCU_RUNS if setting]:
        assert f'getenv("{knob}")' in cuda, knob
    assert "def chunked_kernel(" in source("apl_kernels", "triton", "kernels.py")
    for name in gpu_session.NCU_KERNELS:
        assert f"{name}(" in cuda or f"def {name}(" in source("apl_kernels", "triton", "kernels.py"), name
    # The kernels that run the headline are the ones ncu's filter keeps (large_k_fixed since its variants).
    from bench import roofline
    h = gpu_session.HEADLINE
    for plan in (roofline.triton_plan, roofline.cuda_plan):
        main = plan(h["loss"], h["dtype"], h["B"], h["K"])[-1].variant
        assert any(name in main for name in gpu_session.NCU_KERNELS), main


def test_time_cap_fails_a_slow_test_and_spares_a_quick_one(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                           "def test_slow():\n    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    # Without the cap the sleep would outlast the timeout (TimeoutExpired fails the test).
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "bench.pytest_time_cap", "--time-cap", "1",
                             "-p", "no:cacheprovider", "test_slow.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "1 failed, 1 passed" in result.stdout and "TestTimeCapExceeded" in result.stdout
    assert "test_slow.py::test_slow ran longer than the cap of 1 s" in result.stdout


def test_a_test_step_killed_at_its_deadline_still_logs_pytest_summary(tmp_path, monkeypatch):
    """The deadline sends SIGINT first: pytest prints the tests that passed and failed so far,
    which a SIGTERM would lose (it was lost before: the log ended at the last dot)."""
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_fails():\n    assert 1 == 2\n\n"
                                           "def test_hangs():\n    time.sleep(600)\n")
    monkeypatch.setattr(gpu_session, "TERM_GRACE_S", 2)
    pytest_cmd = Command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path / "test_hang.py")])
    steps = [Step("tests", "one test hangs", 1, 6, 1, [pytest_cmd])]
    session = gpu_session.Session(Settings(out=str(tmp_path / "out"), budget_s=gpu_session.SUMMARY_RESERVE_S + 60),
                                  steps, ["tests"])
    try:
        results = session.run()
    finally:
        session.cleanup()
    assert results[0].status == "timeout"
    log = (tmp_path / "out" / "session.log").read_text()
    assert "KeyboardInterrupt" in log and "FAILED" in log and "test_fails" in log and "1 failed" in log, log


# ----------------------------------------------------------------------------- the CPU check, end to end

def _step_table(summary: str) -> list:
    """The summary's step lines: after the '  step  status' header, up to the first blank line."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "status"]) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session") / "out"
    # compiled (torch.compile on 2 cores), racecheck (memcheck's program again) and triton-suite
    # (tests' flags on another file) are left out to keep this under about a minute.
    result = _run(str(out), "--cpu-check", "--tiny", "--skip", "compiled,racecheck,triton-suite", timeout=900)
    return out, result


def test_cpu_check_runs_every_step_it_can(cpu_check):
    out, result = cpu_check
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary in result.stdout  # printed last, and written
    steps = {line.split()[0]: line.split()[1] for line in _step_table(summary)}
    assert steps == {"env": "ok", "build": "ok", "tests": "ok", "memcheck": "ok", "kernels": "ok", "epochs": "ok",
                     "ncu": "ok", "sweep": "ok"}, summary
    assert "CPU check" in summary and "compute-sanitizer not run" in summary and "ncu not run" in summary
    log = (out / "session.log").read_text()
    assert "skipped: compute-sanitizer not found on PATH (CPU check)" in log or \
        "compute-sanitizer is not run" in log
    assert "Would install apl_kernels" in log  # pip's dry run, nothing installed
    assert "headline cpu nce+rce bf16 [64,1000]: loss" in log
    # the sweep: every Triton configuration timed, interpreted, with the default's loss
    sweep = json.loads((out / "sweep.json").read_text())["records"]
    triton = [r for r in sweep if r["backend"] == "triton"]
    assert [r["config"] for r in triton] == [c[1] for c in gpu_sweep.SWEEP if c[0] == "triton"], triton
    assert all("ms" in r and r["loss_matches_default"] for r in triton), triton
    assert {r["plan"][0] for r in triton} == {"chunked"}
    assert all(r["error"].startswith("RuntimeError: unavailable") for r in sweep if r["backend"] == "cuda")


def test_cpu_check_output_fits_what_the_device_tool_brings_back(cpu_check):
    out, _ = cpu_check
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert sorted(os.path.relpath(f, out) for f in files) == ["logs.tar.gz", "results.json", "session.log",
                                                              "summary.txt", "sweep.json"]
    assert all(os.path.getsize(f) < 16 << 20 for f in files)
    data = json.loads((out / "results.json").read_text())
    kinds = {r["kind"] for r in data["records"]}
    assert kinds == {"kernel", "epoch"}
    # --summarize rebuilds the same step table from the fetched files
    again = _run(str(out), "--summarize")
    assert again.returncode == 0
    assert [line.split()[:2] for line in _step_table(again.stdout)] == \
        [line.split()[:2] for line in _step_table((out / "summary.txt").read_text())]


def test_an_output_folder_of_an_earlier_session_is_refused(cpu_check):
    out, _ = cpu_check
    result = _run(str(out), "--cpu-check", "--steps", "env")
    assert result.returncode != 0 and "already holds a session" in result.stderr


# ----------------------------------------------------------------------------- bench.gpu_sweep

def test_sweep_child_process_reads_its_environment_and_returns_the_timing():
    """The CUDA configurations run in a child (their knobs are read once per process): the protocol,
    on the CPU kernel with an environment knob of its own."""
    from bench import gpu_sweep
    from apl_kernels import apl_loss
    got = gpu_sweep._child("cpu", "nce+rce", "fp32", (4, 50), "cpu", True, {"APL_CPU_ISA": "base"})
    assert got["ms"] > 0 and got["plan"] is None
    generator = torch.Generator().manual_seed(0)   # measure()'s inputs, rebuilt here
    logits = torch.randn(4, 50, generator=generator) * 3
    target = torch.randint(0, 50, (4,), generator=generator)
    expected = float(apl_loss(logits, target, "nce+rce", backend="reference"))
    assert got["loss_value"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(RuntimeError, match="exit"):
        gpu_sweep._child("no-such-backend", "nce+rce", "fp32", (4, 50), "cpu", True, {})


def test_sweep_triton_settings_are_restored_and_checked():
    pytest.importorskip("triton")
    from bench import gpu_sweep
    from apl_kernels.triton import kernels
    chunk, programs = kernels.CHUNK, kernels._programs_in_flight
    with gpu_sweep.triton_settings({"CHUNK": {2: 4096}, "programs_per_sm": 2}):
        assert kernels.CHUNK == {2: 4096}
        assert kernels._programs_in_flight(torch.device("cpu"), 1 << 20, 1000, 8) == 2
    assert kernels.CHUNK is chunk and kernels._programs_in_flight is programs
    with pytest.raises(ValueError, match="no \\['NO_SUCH_KNOB'\\]"):
        with gpu_sweep.triton_settings({"NO_SUCH_KNOB": 1}):
            pass
