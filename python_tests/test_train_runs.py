"""Whole runs on a fabricated CIFAR-10, on the CPU: every model for 2 epochs,
bit-exact resume, the CLI, the sweep and report, and a 2-process gloo DDP run."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from train_helpers import ROOT, fabricate_cifar
from apl_kernels import backends
from train import cli, report, sweep
from train.models import build_model

# On the CPU even where a GPU exists: the DDP test is the gloo one, and resume is bit-exact there.
BASE = ["--batch-size", "16", "--no-download", "--backend", "reference", "--device", "cpu"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    fabricate_cifar(str(root), per_batch=10, test=10)  # 50 training images, 10 test images
    return str(root)


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_cifar")
    fabricate_cifar(str(root), per_batch=4, test=10)  # 20 training images: enough for resnet18 on 2 cores
    return str(root)


def train(argv):
    """One run in this process (saves the ~5 s of importing torch per run)."""
    assert cli.main(argv) == 0


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_flag_is_explained(capsys):
    for parser in (cli.build_parser(), sweep.build_parser()):
        for action in parser._actions:
            assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--stop-after", "--resume", "--noise-seed", "--amp", "--backend", "--compile", "--deterministic"):
        assert flag in text


def test_models_have_the_specified_structure():
    cnn = build_model("cnn8")
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 196, 196]
    assert all(c.kernel_size == (3, 3) for c in convs)
    linears = [m for m in cnn.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(3136, 256), (256, 10)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in cnn.modules()) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in cnn.modules()) == 1
    resnet = build_model("resnet18")
    # The CIFAR ResNet-18 (3x3 stem, no max-pool) has 11,173,962 parameters.
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962
    for model in (cnn, resnet):
        assert convs[1].weight.is_contiguous(memory_format=torch.channels_last)
        model.eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# cnn8 with the fused backend "auto" picks (the loss then sees bf16 logits), resnet18 with the reference.
@pytest.mark.parametrize("model, amp, loss, backend", [("cnn8", "bf16", "nfl+rce", "auto"),
                                                       ("resnet18", "off", "gce", "reference")])
def test_two_epoch_run(cifar, small_cifar, tmp_path, capsys, model, amp, loss, backend):
    out = str(tmp_path)
    n = 50 if model == "cnn8" else 20
    train(["--model", model, "--amp", amp, "--loss", loss, "--noise", "asym", "--rate", "0.5", "--epochs", "2",
           "--data", cifar if model == "cnn8" else small_cifar, "--out", out, "--seed", "3", "--noise-seed", "11",
           *BASE, "--backend", backend])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2")  # one line per epoch off a terminal
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[1]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi / 2)) / 2)
    for row in rows:
        assert row["epoch_time_s"] > 0 and row["eval_time_s"] > 0 and row["train_samples"] == n
        for key in ("train_loss", "noisy_acc", "clean_acc", "test_acc"):
            assert math.isfinite(row[key])
    with open(os.path.join(run_dir, "result.json")) as f:
        result = json.load(f)
    noise = result["noise"]
    assert noise["type"] == "asym" and noise["rate"] == 0.5 and noise["seed"] == 11
    # 5 source classes flip int(0.5 * n/10) of their n/10 samples each.
    assert noise["realised_rate"] > 0 and noise["realised_rate"] == pytest.approx(5 * int(0.5 * n / 10) / n)
    assert np.array(noise["transition"]).shape == (10, 10)
    assert result["final"]["test_acc"] == rows[-1]["test_acc"] and result["timing"]["epochs_timed"] == 2
    assert result["timing"]["first_epoch_s"] == rows[0]["epoch_time_s"]
    resolved = backends.resolve(backend, torch.device("cpu"))
    assert result["backend"] == resolved and result["model"] == model and result["loss"] == loss
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["loss_in_amp_dtype"] == (resolved != "reference")
    expected = {"nfl+rce": dict(alpha=1.0, beta=1.0, gamma=0.5), "gce": dict(q=0.7)}[loss]
    for key, value in expected.items():
        assert result["loss_spec"][key] == value
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)


def test_resume_is_bit_exact(cifar, tmp_path):
    common = ["--loss", "nce+rce", "--noise", "sym", "--rate", "0.4", "--epochs", "3", "--data", cifar,
              "--amp", "bf16", "--run-name", "r", *BASE]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train(common + ["--out", whole])
    train(common + ["--out", parts, "--stop-after", "1"])
    run_dir = os.path.join(parts, "r")
    assert not os.path.exists(os.path.join(run_dir, "result.json")) and len(read_rows(run_dir)) == 1
    assert cli.main(common + ["--out", parts]) == 2  # a checkpoint there: refuses to start over silently
    train(common + ["--out", parts, "--resume"])

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "eval_time_s")} for r in rows]
    assert strip(read_rows(run_dir)) == strip(read_rows(os.path.join(whole, "r")))
    a = torch.load(os.path.join(whole, "r", "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, buffers in a["optimizer"]["state"].items():
        assert torch.equal(buffers["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_sweep_skips_finished_runs_then_report(cifar, tmp_path, capsys):
    out = str(tmp_path / "runs")
    flags = ["--epochs", "2", "--data", cifar, "--out", out, *BASE]
    for loss in ("ce", "nce+rce"):
        for seed in ("0", "1"):
            train(["--loss", loss, "--noise", "sym", "--rate", "0.4", "--seed", seed, *flags])
    capsys.readouterr()
    grid = ["--noise-types", "sym", "--losses", "ce", "nce+rce", "--rates", "0.4", "--seeds", "0", "1", "2"]
    assert sweep.main(grid + ["--dry-run"] + flags) == 0
    listing = capsys.readouterr().out
    assert "6 runs, 4 finished, 2 to run" in listing and listing.count("[finished]") == 4
    # The cost comes from the epochs measured so far: each finished run's second epoch.
    assert "cost: 4 cnn8 cifar10 cpu epochs x" in listing and "median of 4 measured epochs" in listing
    assert sweep.main(grid + ["--workers", "2"] + flags) == 0  # the two seed-2 runs, as subprocesses
    progress = capsys.readouterr().out
    assert progress.count(": test accuracy ") == 2 and "s2" in progress and "; ETA " in progress

    written = report.make_report(out)
    finals = {}
    for d in os.listdir(out):
        if d != "report":
            with open(os.path.join(out, d, "result.json")) as f:
                r = json.load(f)
            finals.setdefault(r["loss"], []).append(r["final"]["test_acc"])
    assert sorted(len(v) for v in finals.values()) == [3, 3]
    (csv_path,) = [p for p in written["tables"] if p.endswith(".csv")]
    with open(csv_path) as f:
        rows = {row[0]: row for row in csv.reader(f)}
    assert rows["loss"] == ["loss", "official_data", "0.4_mean", "0.4_std", "0.4_n", "0.4_paper", "0.4_eps_softmax",
                            "0.4_eps_softmax_std"]
    for loss, paper in (("ce", "60.28"), ("nce+rce", "86.02")):  # published, Ma et al. Table
        _, official, mean, std, n, published = rows[loss][:6]
        # The fabricated data are marked: not the release's files, and a subset.
        assert official.startswith("no: md5 mismatch: data_batch_1") and "subset: 50 training" in official
        assert float(mean) == pytest.approx(np.mean(finals[loss]), abs=0.006)
        assert float(std) == pytest.approx(np.std(finals[loss], ddof=1), abs=0.006)
        assert n == "3" and published == paper
    with open([p for p in written["tables"] if p.endswith(".md")][0]) as f:
        markdown = f.read()
    assert "| NCE+RCE |" in markdown and "NOT THE OFFICIAL DATA" in markdown
    for line in markdown.splitlines():  # no number of ours beside a published one without the mark
        if "[" in line and line.startswith("| "):
            assert line.count("†") == line.count("["), line
    assert len(written["plots"]) == 3
    for png in written["plots"]:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(png) > 10_000


def test_ddp_gloo_two_processes(cifar, tmp_path):
    out = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
         "--noise", "sym", "--rate", "0.2", "--epochs", "2", "--data", cifar, "--out", out, "--run-name", "ddp",
         "--amp", "off", *BASE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "ddp", "result.json")) as f:
        result = json.load(f)
    assert result["world_size"] == 2
    rows = read_rows(os.path.join(out, "ddp"))
    # 25 samples per process, summed over both by the all-reduce.
    assert [r["train_samples"] for r in rows] == [50, 50]
    assert proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports


def test_synthetic_run_needs_no_data(tmp_path):
    train(["--noise", "sym", "--rate", "0.2", "--epochs", "1", "--synthetic", "40", "--data", str(tmp_path / "none"),
           "--out", str(tmp_path), *BASE])
    (run_dir,) = os.listdir(tmp_path)
    assert "synthetic40" in run_dir  # never mistaken for a CIFAR-10 run
    with open(os.path.join(tmp_path, run_dir, "result.json")) as f:
        data = json.load(f)["data"]
    assert {k: data[k] for k in ("dataset", "folder", "train", "test", "official")} == {
        "dataset": "cifar10", "folder": "synthetic", "train": 40, "test": 8, "official": False}
    assert data["deviations"] == ["synthetic (random images)"]


def test_sweep_cost_uses_epochs_of_the_same_model_data_set_and_device(tmp_path):
    """A CIFAR-100 or GPU run's epoch time does not price a CIFAR-10 CPU sweep."""
    def fake_run(name, model, dataset, device, seconds):
        d = tmp_path / name
        d.mkdir()
        (d / cli.CONFIG).write_text(json.dumps({"identity": {"model": model, "dataset": dataset, "device": device}}))
        rows = [{"epoch_time_s": seconds, "eval_time_s": 1.0}] * 3     # the first epoch is left out
        (d / cli.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_run("a", "cnn8", "cifar10", "cpu", 10.0)
    fake_run("b", "cnn8", "cifar100", "cpu", 50.0)
    fake_run("c", "cnn8", "cifar10", "cuda", 2.0)
    assert sweep.measured_epoch_seconds(str(tmp_path), ("cnn8", "cifar10", "cpu")) == (11.0, 2)
    assert sweep.measured_epoch_seconds(str(tmp_path), ("cnn8", "cifar100", "cpu")) == (51.0, 2)
    assert sweep.measured_epoch_seconds(str(tmp_path), ("resnet34", "cifar10", "cpu")) == (None, 0)
