"""Smoke test of the benchmark suite: the CLIs run on tiny shapes on the CPU and
write a results JSON of the documented format.  Checks the format, not the speed."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import common, goals, kernels  # noqa: E402

KERNEL_KEYS = {"kind", "loss", "B", "K", "dtype", "backend", "pass", "ms", "gbps", "pct_copy_bw",
               "peak_mem_ratio", "launches"}
EPOCH_KEYS = {"kind", "loss", "model", "amp", "backend", "data", "epoch_s_median", "speedup_vs_reference"}
META_KEYS = {"gpu", "torch", "triton", "cuda", "command", "date", "copy_gbps"}


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _check_format(data):
    assert set(data) == {"meta", "records"}
    assert META_KEYS <= set(data["meta"])
    for record in data["records"]:
        keys = KERNEL_KEYS | {"graph_ms"} if record["kind"] == "kernel" else EPOCH_KEYS   # graph_ms: None off CUDA
        assert set(record) == keys, record
        assert record["kind"] != "kernel" or record["graph_ms"] is None
    assert common.validate_results(data) == []


def test_kernel_and_epoch_cli_write_valid_results(tmp_path):
    out = tmp_path / "results.json"
    stdout = _run(["bench.kernels", "--quick", "--device", "cpu", "--out", str(out)])
    assert "records written" in stdout
    data = json.loads(out.read_text())
    _check_format(data)
    kernel = [r for r in data["records"] if r["kind"] == "kernel"]
    assert {r["pass"] for r in kernel} == {"fwd", "bwd", "fwd+bwd"}
    assert {"reference", "F.cross_entropy"} <= {r["backend"] for r in kernel}
    for r in kernel:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["launches"] is None
        assert r["dtype"] == "fp32" and r["K"] in (10, 100)
    assert data["meta"]["copy_gbps"] > 0 and data["meta"]["device"] == "cpu"
    # A backend that cannot run is skipped with its reason, never recorded.
    from apl_kernels import backends
    for name in ("cpu", "cuda", "triton"):
        reason = backends.unavailable_reason(name, torch.device("cpu"))
        recorded = any(r["backend"] == name for r in kernel)
        if reason is not None or name == "triton":
            assert not recorded
            assert any(s["backend"] == name for s in data["meta"]["skipped"])
        else:
            assert recorded

    stdout = _run(["bench.epochs", "--quick", "--device", "cpu", "--out", str(out)])
    assert "epoch records written" in stdout
    assert "epoch 0 is warm-up (compilation, caches): left out of the median and the spread" in stdout
    assert "min-max" in stdout
    data = json.loads(out.read_text())
    _check_format(data)
    epochs = [r for r in data["records"] if r["kind"] == "epoch"]
    assert {r["backend"] for r in epochs} == {"reference", "auto"}
    assert all(r["data"] == "synthetic" and r["epoch_s_median"] > 0 for r in epochs)
    assert [r["speedup_vs_reference"] for r in epochs if r["backend"] == "reference"] == [1.0]
    # The epoch run was appended: the kernel records are still there.
    assert len([r for r in data["records"] if r["kind"] == "kernel"]) == len(kernel)
    assert len(data["meta"]["commands"]) == 2
    (detail,) = data["meta"]["epoch_details"]
    ratios = [r / a for r, a in zip(detail["epoch_s"]["reference"][1:], detail["epoch_s"]["auto"][1:])]
    assert detail["speedup_min"] == pytest.approx(min(ratios), rel=1e-3)
    assert detail["speedup_max"] == pytest.approx(max(ratios), rel=1e-3)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for run in data["meta"]["runs"]:  # each run's commit, dirty flag, start time and load
        assert run["provenance"]["git"]["commit"] == head and len(run["provenance"]["load_average"]) == 3

    stdout = _run(["bench.plots", str(out)])  # draws the epoch records too
    epochs_png = tmp_path / "results-epochs.png"
    assert str(epochs_png) in stdout and epochs_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stdout = _run(["bench.goals", str(out)])
    assert len([line for line in stdout.splitlines() if line.startswith("  ")]) == len(goals.evaluate(data))


def test_default_results_stay_out_of_the_tracked_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = common.default_results_path(torch.device("cpu"))
    assert not path.startswith(common.RESULTS_DIR)
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    assert ignored.returncode == 0, f"{path} would be tracked by git"


def test_cpu_run_at_other_threads_also_reports_default_wall_clock(tmp_path):
    """--threads 1 --clock cpu: fwd+bwd is also timed as users see it (wall clock, torch's default threads)."""
    out = tmp_path / "threads.json"
    stdout = _run(["bench.kernels", "--quick", "--device", "cpu", "--threads", "1", "--clock", "cpu",
                   "--losses", "ce", "--shapes", "8x10", "--backends", "reference,F.cross_entropy",
                   "--passes", "fwd+bwd", "--no-plots", "--out", str(out)])
    data = json.loads(out.read_text())
    _check_format(data)
    default = torch.get_num_threads()
    assert f"also in wall clock at torch's default {default} threads" in stdout
    assert f"fwd+bwd, wall clock, {default} threads: reference" in stdout
    wall = data["meta"]["default_wall_fwd_bwd"]["ce 8x10 fp32"]
    assert wall["threads"] == default == data["meta"]["default_threads"]
    assert set(wall["ms"]) == {"reference", "F.cross_entropy"} and min(wall["ms"].values()) > 0


def test_unavailable_extension_is_skipped_with_reason(tmp_path, monkeypatch):
    """Without the C++ extension the kernel benchmark still writes valid results."""
    from apl_kernels import ops
    monkeypatch.setattr(ops, "_C", None)
    # kernels.run sets compile options process-wide; give them back after the test.
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(torch._functorch.config, "donated_buffer", torch._functorch.config.donated_buffer)
    monkeypatch.setattr(inductor_config, "compile_threads", inductor_config.compile_threads)
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            monkeypatch.setattr(torch._dynamo.config, name, getattr(torch._dynamo.config, name))
    with pytest.raises(kernels.Skip, match="did not import"):
        kernels.make_loss_fn("cpu", "nce+rce", torch.device("cpu"))
    out = tmp_path / "no_ext.json"
    args = kernels.build_parser().parse_args(
        ["--quick", "--device", "cpu", "--losses", "nce+rce", "--shapes", "8x10", "--no-plots", "--out", str(out)])
    kernels.run(args)
    data = json.loads(out.read_text())
    _check_format(data)
    assert {r["backend"] for r in data["records"]} == {"reference"}
    assert any(s["backend"] == "cpu" and "did not import" in s["reason"] for s in data["meta"]["skipped"])


def test_merge_replaces_same_configuration(tmp_path):
    path = str(tmp_path / "m.json")
    meta = {k: None for k in META_KEYS}
    meta["command"] = "first"
    rec = {"kind": "epoch", "loss": "ce", "model": "cnn8", "amp": "bf16", "backend": "auto", "data": "synthetic",
           "epoch_s_median": 1.0, "speedup_vs_reference": 1.0}
    common.merge_results(path, meta, [rec], replace_meta=True)
    common.merge_results(path, dict(meta, command="second"), [dict(rec, epoch_s_median=2.0)], replace_meta=False)
    data = common.load_results(path)
    assert [r["epoch_s_median"] for r in data["records"]] == [2.0]
    assert data["meta"]["commands"] == ["first", "second"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def _k(backend, loss, B, K, dtype, ms, pass_="fwd+bwd", pct=None, mem=None, launches=None):
    return {"kind": "kernel", "loss": loss, "B": B, "K": K, "dtype": dtype, "backend": backend, "pass": pass_,
            "ms": ms, "gbps": 1.0, "pct_copy_bw": pct, "peak_mem_ratio": mem, "launches": launches}


def test_goals_logic_on_handmade_records():
    """The goal checker on made-up records (a test fixture, not a measurement)."""
    big = dict(B=8192, K=131072, dtype="bf16")
    records = [
        _k("triton", "nce+rce", ms=1.0, pct=90.0, mem=1.0, **big),
        _k("triton", "nce+mae", ms=1.0, pct=80.0, mem=1.05, **big),
        _k("cuda", "nce+rce", ms=0.9, pct=95.0, mem=1.2, **big),
        _k("compiled", "nce+rce", ms=3.0, **big),
        _k("triton", "ce", 128, 10, "bf16", ms=0.008, launches=2),
        _k("cuda", "ce", 128, 10, "bf16", ms=0.006, launches=1),
        _k("F.cross_entropy", "ce", 128, 10, "bf16", ms=0.02),
        _k("cpu", "nce+rce", 4096, 1000, "fp32", ms=10.0),
        _k("reference", "nce+rce", 4096, 1000, "fp32", ms=60.0),
        _k("compiled", "nce+rce", 4096, 1000, "fp32", ms=25.0),
        {"kind": "epoch", "loss": "nce+rce", "model": "cnn8", "amp": "bf16", "backend": "auto", "data": "synthetic",
         "epoch_s_median": 0.9, "speedup_vs_reference": 1.2},
        {"kind": "epoch", "loss": "nfl+mae", "model": "cnn8", "amp": "bf16", "backend": "auto", "data": "synthetic",
         "epoch_s_median": 1.1, "speedup_vs_reference": 1.05},
    ]
    data = {"meta": {"device": "cuda", "gpu": "test"}, "records": records}
    status = {g["goal"]: g for g in goals.evaluate(data)}

    def find(prefix):
        (goal,) = [g for name, g in status.items() if name.startswith(prefix)]
        return goal

    assert find("epoch speedup")["status"] == "missed" and "nfl+mae" in find("epoch speedup")["detail"]
    assert find("epoch time")["status"] == "missed"
    assert find("peak extra memory")["status"] == "missed"  # cuda 1.2x
    assert find("triton nce+rce bf16")["status"] == "met"
    assert find("triton nce+mae bf16")["status"] == "missed"
    assert find("triton nce+mae bf16")["margin_pct"] == pytest.approx(-5.9, abs=0.1)
    assert find("triton nfl+rce")["status"] == "not measured"
    assert find("triton [128, 10] fwd+bwd <= 2 launches")["status"] == "met"
    assert find("triton [128, 10] fwd+bwd <= 10 us")["status"] == "met"
    assert find("triton >= 2x")["status"] == "met"
    assert find("triton ce at least")["status"] == "met"
    assert find("cuda nce+rce")["status"] == "met"
    assert find("cuda fastest")["status"] == "met"
    assert find("cuda never")["status"] == "met"
    assert find("cpu nce+rce fp32 [4096,1000] fwd+bwd >= 5x")["status"] == "met"
    assert find("cpu nce+rce fp32 [4096,1000] fwd+bwd >= 3x")["status"] == "missed"  # 2.5x
    assert find("cpu nfl+rce fp32 [4096,1000] fwd+bwd >= 5x")["status"] == "not measured"
    # On a CPU run the GPU goals are reported as not applicable.
    cpu = goals.evaluate({"meta": {"device": "cpu"}, "records": records})
    assert {g["status"] for g in cpu if g["goal"].startswith("triton")} == {"n/a", "not measured"}


def test_tiny_time_goal_reads_the_graph_replay_where_measured():
    """At [128, 10] the eager fwd+bwd time is the host's; a run that measured the CUDA-graph replay
    (graph_ms) is judged by it, and the line says which one it used."""
    eager_only = [_k("triton", "ce", 128, 10, "bf16", ms=0.43, launches=2)]
    graphed = [dict(eager_only[0], graph_ms=0.006)]

    def tiny(records):
        (goal,) = [g for g in goals.evaluate({"meta": {"device": "cuda"}, "records": records})
                   if g["goal"] == "triton [128, 10] fwd+bwd <= 10 us"]
        return goal

    assert tiny(eager_only)["status"] == "missed" and "eager" in tiny(eager_only)["detail"]
    assert tiny(graphed)["status"] == "met" and "CUDA graph" in tiny(graphed)["detail"]
    assert tiny(graphed)["value"] == pytest.approx(6.0)
    # both record shapes are valid results
    assert common.validate_results({"meta": {k: None for k in common.META_KEYS}, "records": graphed + eager_only}) == []
    assert common.validate_results({"meta": {k: None for k in common.META_KEYS},
                                    "records": [dict(eager_only[0], bogus=1)]}) != []


def test_graph_replay_is_cuda_only():
    assert common.graph_replay_ms(lambda: None, torch.device("cpu")) is None
