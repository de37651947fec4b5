"""Runs that can be trusted: run identity, refused resumes, provenance records,
Ctrl-C, clear errors, the asymmetric-noise rates, and the sweep's checks.
Tiny fabricated CIFAR-10 on the CPU (a few 1-2 epoch runs of 50 images)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train_helpers import ROOT, fabricate_cifar
from train import cli, data as data_mod, engine, sweep
from train.noise import make_noisy_labels, noise_record

BASE = ["--batch-size", "16", "--no-download", "--backend", "reference", "--device", "cpu", "--amp", "off"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    fabricate_cifar(str(root), per_batch=10, test=10)  # 50 training images, 10 test images
    return str(root)


def folder_of(argv):
    return cli.plan_run(cli.build_parser().parse_args(argv))[3]


def read(path):
    with open(path) as f:
        return json.load(f)


def test_folder_name_is_the_identity():
    common = ["--noise", "sym", "--rate", "0.4", "--out", "o", *BASE]
    plain = folder_of(["--loss", "nce+rce", *common])
    assert re.fullmatch(r"o/cnn8_nce\+rce_sym0\.4_s0_reference_off-[0-9a-f]{8}", plain)
    # Equivalent spellings, and an official value given explicitly, are the same run.
    assert folder_of(["--loss", "rce+nce", *common]) == plain
    assert folder_of(["--loss", " NCE+RCE ", "--alpha", "1", "--weight-decay", "1e-4", *common]) == plain
    assert folder_of(["--loss", "sce", *common]) == folder_of(["--loss", "ce+rce", *common])
    # Every setting that changes the result makes another run.
    others = [["--alpha", "10"], ["--beta", "0.1"], ["--epochs", "50"], ["--lr", "0.1"], ["--batch-size", "32"],
              ["--weight-decay", "0"], ["--l1", "1e-5"], ["--clip-grad", "0"], ["--momentum", "0.8"],
              ["--noise-seed", "7"], ["--model", "resnet18"], ["--synthetic", "100"], ["--loader", "classic"]]
    names = {folder_of(["--loss", "nce+rce", *common, *flags]) for flags in others}
    assert len(names) == len(others) and plain not in names
    # Where the run reads and writes, and how it is driven, do not.
    for flags in (["--data", "/elsewhere"], ["--resume"], ["--stop-after", "3"], ["--workers", "9"]):
        assert folder_of(["--loss", "nce+rce", *common, *flags]) == plain
    # The noise recipe matters for asymmetric noise only.
    sym = ["--loss", "nce+rce", *common]
    assert folder_of(sym + ["--noise-recipe", "official"]) == plain


def test_changed_settings_are_another_run_and_resume_refuses_them(cifar, tmp_path, capsys):
    out = str(tmp_path)
    run = ["--loss", "rce+nce", "--noise", "sym", "--rate", "0.2", "--epochs", "2", "--data", cifar, "--out", out,
           *BASE]
    assert cli.main(run + ["--stop-after", "1"]) == 0
    (first,) = os.listdir(out)
    assert first.startswith("cnn8_nce+rce_sym0.2_s0")  # the canonical spelling
    config_before = read(os.path.join(out, first, "config.json"))
    capsys.readouterr()
    # A changed flag with --resume: refused, each change named, nothing written.
    assert cli.main(run + ["--resume", "--lr", "0.1", "--clip-grad", "0"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 -> 0.1" in err and "--clip-grad 5.0 -> 0.0" in err and first in err
    assert os.listdir(out) == [first] and read(os.path.join(out, first, "config.json")) == config_before
    # The same with an explicit --run-name: the folder's settings differ.
    named = run + ["--run-name", "mine"]
    assert cli.main(named + ["--epochs", "1"]) == 0
    assert cli.main(named + ["--resume"]) == 2
    assert "--epochs 1 -> 2" in capsys.readouterr().err
    # Without --resume the changed flags are a new run that trains (never "finished already").
    assert cli.main(run + ["--lr", "0.1", "--epochs", "1"]) == 0
    assert "finished already" not in capsys.readouterr().out
    assert len(os.listdir(out)) == 3
    # The original run resumes with its own settings and then is finished with them.
    assert cli.main(run + ["--resume"]) == 0
    assert read(os.path.join(out, first, "result.json"))["final"]["test_acc"] >= 0
    assert cli.main(run) == 0 and "finished already with these settings" in capsys.readouterr().out


def test_records_hold_provenance_and_asym_rates(cifar, tmp_path, capsys):
    out = str(tmp_path)
    assert cli.main(["--loss", "ce", "--noise", "asym", "--rate", "0.6", "--epochs", "1", "--data", cifar,
                     "--out", out, *BASE]) == 0
    captured = capsys.readouterr()
    assert "warning: --rate 0.6 > 0.5 under asymmetric noise" in captured.err
    # 5 of the 10 classes flip int(0.6 * 5) = 3 of their 5 images: 15/50 overall, 3/5 among them.
    assert "realised 0.3000 overall, 0.6000 among the 5 flipped classes" in captured.out
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in ("config.json", "result.json"):
        record = read(os.path.join(run_dir, name))
        prov = record["provenance"]
        assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", prov["started_at"])
        assert len(prov["load_average"]) == 3
        assert record["noise"]["rate_among_flipped_classes"] == pytest.approx(0.6)
        assert record["noise"]["flipped_classes"] == [2, 3, 4, 5, 9]
    assert read(os.path.join(run_dir, "result.json"))["provenance"]["finished_at"] >= prov["started_at"]


def test_noise_summary_on_its_own():
    labels = np.repeat(np.arange(10), 100)
    noisy = make_noisy_labels(labels, "asym", 0.4, seed=1)
    summary = cli.noise_summary("asym", 0.4, noise_record(labels, noisy))
    assert summary == {"flipped_classes": [2, 3, 4, 5, 9], "rate_among_flipped_classes": pytest.approx(0.4)}
    clean = cli.noise_summary("sym", 0.0, noise_record(labels, labels))
    assert clean == {"flipped_classes": [], "rate_among_flipped_classes": 0.0}


def test_ctrl_c_prints_one_line_and_resume_continues(cifar, tmp_path, capsys, monkeypatch):
    out = str(tmp_path)
    run = ["--noise", "sym", "--rate", "0.2", "--epochs", "2", "--data", cifar, "--out", out, *BASE]
    evaluate, calls = engine.evaluate, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(engine, "evaluate", interrupted_in_epoch_2)
    assert cli.main(run) == 130
    captured = capsys.readouterr()
    assert "interrupted after epoch 1; `--resume` continues" in captured.out
    assert "Traceback" not in captured.out + captured.err
    monkeypatch.setattr(engine, "evaluate", evaluate)
    assert cli.main(run + ["--resume"]) == 0
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    assert read(os.path.join(run_dir, "result.json"))["resumed"][0]["after_epoch"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--synthetic", "0"], "--synthetic N needs N >= 2"),
    (["--data", "{tmp}/absent/cifar"], "CIFAR-10 was not found"),
    (["--device", "cuda:0"], "no CUDA GPU is visible"),
    (["--device", "tpu-ish"], "is not a torch device"),
])
def test_clear_errors_leave_no_folders(tmp_path, capsys, flags, message):
    if "cuda:0" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    argv = ["--noise", "sym", "--rate", "0.2", "--out", str(tmp_path / "runs"), "--no-download", "--backend",
            "reference", *flags]
    if "--device" not in flags:
        argv += ["--device", "cpu"]
    if "--data" not in flags:
        argv += ["--data", str(tmp_path / "data")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    def download_fails(name, root, download=True):
        os.makedirs(root, exist_ok=True)  # as torchvision does before its download fails
        raise data_mod.DataError("CIFAR-10 was not found (offline)")
    monkeypatch.setattr(data_mod, "load_dataset", download_fails)
    assert cli.main(["--noise", "sym", "--rate", "0.2", "--data", str(tmp_path / "new" / "data"), "--out",
                     str(tmp_path / "runs"), "--device", "cpu", "--backend", "reference"]) == 2
    assert "offline" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_tensorboard_is_optional(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    assert cli.main(["--noise", "sym", "--rate", "0.2", "--synthetic", "20", "--tensorboard", "--out",
                     str(tmp_path), *BASE]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_tensorboard_logs_each_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    assert cli.main(["--noise", "sym", "--rate", "0.2", "--synthetic", "20", "--epochs", "2", "--tensorboard",
                     "--out", str(tmp_path), *BASE]) == 0
    (run_dir,) = os.listdir(tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(tmp_path, run_dir, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_acc")] == [1, 2]


@pytest.mark.parametrize("flags, message", [
    (["--losses", "nce+rce", "nce+bogus"], "--loss nce+bogus"),
    (["--rates", "0.2", "1.5"], "--rates must lie in [0, 1]; got 1.5"),
    (["--preset", "anl", "--losses", "ce", "--alpha", "-x"], "refused"),
])
def test_sweep_refuses_bad_grids_before_starting(tmp_path, capsys, flags, message):
    argv = ["--noise-types", "sym", "--seeds", "0", "--out", str(tmp_path), "--device", "cpu", *flags]
    assert sweep.main(argv) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_sweep_equivalent_spellings_are_one_run(tmp_path):
    args = sweep.build_parser().parse_known_args(["--noise-types", "sym", "--losses", "nce+rce", "rce+nce",
                                                  "--rates", "0.2", "--seeds", "0"])
    runs = sweep.plan(args[0], ["--out", str(tmp_path), "--device", "cpu"])
    assert len(runs) == 1


def test_sweep_ctrl_c_prints_one_line(cifar, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.sweep", "--noise-types", "sym", "--losses", "ce", "--rates", "0.2",
         "--seeds", "0", "1", "--epochs", "50", "--data", cifar, "--out", str(tmp_path), *BASE],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first run has logged an epoch
        logs = [os.path.join(tmp_path, d, "log.txt") for d in os.listdir(tmp_path)]
        if any("epoch 1/50" in open(p).read() for p in logs if os.path.exists(p)):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "sweep interrupted after 0 of 2 runs; the same command continues" in stdout
    assert "Traceback" not in stdout + stderr
    (log,) = [os.path.join(tmp_path, d, "log.txt") for d in os.listdir(tmp_path)]
    with open(log) as f:
        text = f.read()
    assert re.search(r"interrupted after epoch \d+; `--resume` continues", text) and "Traceback" not in text
