"""The paper's grids: ``python -m train.sweep [options] [any python -m train flag]``.

Every (noise type, loss, rate, seed) of the grid becomes one ``python -m train``
process with an explicit ``--noise``; flags this script does not know (--epochs,
--model, --backend, --out, --data, ...) go to every run unchanged.  A run's
folder name holds the hash of its settings, so finished runs (result.json) of
the same settings are skipped and interrupted ones continue (--resume): start
the sweep again after any interruption.  Runs are spread over GPUs (--gpus
0,1,...: one process per GPU at a time) or, on the CPU, over --workers
processes.  --preset picks a later paper's CIFAR-10 grid.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

from . import cli
from .paper_results import ASYM_RATES, PRESETS, SYM_RATES, TABLES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = {"sym": (tuple(TABLES["sym"][1]), SYM_RATES), "asym": (tuple(TABLES["asym"][1]), ASYM_RATES)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.sweep", formatter_class=cli.HelpFormatter,
        description="Run the grid noise types x losses x rates x seeds (the CIFAR-10 grids of Ma et al. by "
                    "default), one `python -m train` process per run. Other flags (e.g. --epochs, --model, "
                    "--backend, --amp, --out, --data) are passed to every run.",
        epilog=f"Default grids: sym losses {' '.join(GRIDS['sym'][0])}, rates {' '.join(map(str, SYM_RATES))}; "
               f"asym losses {' '.join(GRIDS['asym'][0])}, rates {' '.join(map(str, ASYM_RATES))}. Presets: "
               + "; ".join(f"{name}: {p['title']}" for name, p in PRESETS.items()) + ".")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a later paper's CIFAR-10 grid: its losses and rates (each loss with its official settings)")
    p.add_argument("--noise-types", nargs="+", default=["sym", "asym"], choices=("sym", "asym"),
                   help="noise types to sweep")
    p.add_argument("--losses", nargs="+", default=None,
                   help="losses (default: the paper's list for each noise type); checked before anything starts")
    p.add_argument("--rates", nargs="+", type=float, default=None,
                   help="noise rates in [0, 1] (default: the paper's rates for each noise type)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (3 runs as in the paper)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, one run at a time per entry (list an id twice to share a GPU between two runs)")
    p.add_argument("--workers", type=int, default=1, help="parallel runs without --gpus (CPU threads are shared out)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, their state and the estimated cost (from epoch times measured under --out), "
                        "run nothing")
    return p


def grid(sweep, noise: str):
    """(losses, rates) of one noise type: --losses/--rates, else the preset's, else Ma et al.'s."""
    if sweep.preset:
        losses, rates = PRESETS[sweep.preset]["losses"], PRESETS[sweep.preset]["rates"][noise]
    else:
        losses, rates = GRIDS[noise]
    return sweep.losses or losses, sweep.rates if sweep.rates is not None else rates


def plan(sweep, train_flags):
    """[(argv of python -m train without --resume, run folder, epochs)] of the grid, in order.

    Refuses (UsageError) a bad loss, rate or passed-through flag before anything
    starts; equivalent spellings (rce+nce, nce+rce) are one run."""
    parser = cli.build_parser()
    if sweep.rates is not None:
        bad = [r for r in sweep.rates if not 0.0 <= r <= 1.0]
        if bad:
            raise cli.UsageError(f"--rates must lie in [0, 1]; got {' '.join(f'{r:g}' for r in bad)}")
    runs, seen = [], set()
    for noise in sweep.noise_types:
        losses, rates = grid(sweep, noise)
        for loss in losses:
            for rate in rates:
                for seed in sweep.seeds:
                    argv = ["--loss", loss, "--noise", noise, "--rate", f"{rate:g}", "--seed", str(seed), *train_flags]
                    try:
                        args = parser.parse_args(argv)
                    except SystemExit:  # argparse printed why
                        raise cli.UsageError(f"a flag passed to python -m train was refused: {' '.join(train_flags)}")
                    try:
                        _, _, _, run_dir = cli.plan_run(args)
                    except cli.UsageError as error:
                        raise cli.UsageError(f"--loss {loss} --noise {noise} --rate {rate:g}: {error}") from None
                    if run_dir not in seen:
                        seen.add(run_dir)
                        runs.append((argv, run_dir, args.epochs))
    return runs


def state_of(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, cli.RESULT)):
        return "finished"
    if os.path.exists(os.path.join(run_dir, cli.CHECKPOINT)):
        return "partial"
    return "todo"


def epochs_done(run_dir: str) -> int:
    path = os.path.join(run_dir, cli.METRICS)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


# What an epoch's time depends on most: a run's measured epochs estimate only runs with the same of these.
COST_KEYS = ("model", "dataset", "device")


def cost_key(identity: dict) -> tuple:
    return tuple(identity.get(k) for k in COST_KEYS)


def measured_epoch_seconds(out: str, key: tuple):
    """Median seconds of a training epoch plus its evaluation, over every run under
    ``out`` whose cost_key is ``key`` (first epochs left out), and how many epochs; (None, 0) if none."""
    times = []
    if os.path.isdir(out):
        for name in os.listdir(out):
            config = os.path.join(out, name, cli.CONFIG)
            try:
                with open(config) as f:
                    if cost_key(json.load(f).get("identity", {})) != key:
                        continue
                with open(os.path.join(out, name, cli.METRICS)) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError):
                continue
            times += [r["epoch_time_s"] + r["eval_time_s"] for r in rows[1:]]
    return (statistics.median(times), len(times)) if times else (None, 0)


def _cost_key_of(argv) -> tuple:
    """cost_key of the run that `python -m train argv` would start."""
    _, _, ident, _ = cli.plan_run(cli.build_parser().parse_args(argv))
    return cost_key(ident)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _final_accuracy(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, cli.RESULT)) as f:
            return f"test accuracy {json.load(f)['final']['test_acc']:.2f}"
    except (OSError, ValueError, KeyError):
        return "no result.json"


def main(argv=None) -> int:
    sweep, train_flags = build_parser().parse_known_args(argv)
    try:
        runs = plan(sweep, train_flags)
    except cli.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    todo = [(a, d, e) for a, d, e in runs if state_of(d) != "finished"]
    print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run", flush=True)
    slots = [g.strip() for g in sweep.gpus.split(",") if g.strip()] if sweep.gpus else [None] * max(1, sweep.workers)
    if sweep.dry_run:
        for argv_, run_dir, _ in runs:
            print(f"  [{state_of(run_dir):8s}] {run_dir}: python -m train {' '.join(argv_)}")
        out = cli.build_parser().parse_args(runs[0][0]).out if runs else "runs"
        keys = {d: _cost_key_of(a) for a, d, _ in todo}
        for key in sorted(set(keys.values()), key=str):
            what = " ".join(str(v) for v in key)   # e.g. "cnn8 cifar10 cpu"
            epochs = sum(e - epochs_done(d) for _, d, e in todo if keys[d] == key)
            seconds, n = measured_epoch_seconds(out, key)
            if seconds is None:
                print(f"cost: {epochs} {what} epochs to run; no epoch time measured under {out} yet (a run with "
                      f"--epochs 2, or python -m bench.epochs, measures one)")
            else:
                print(f"cost: {epochs} {what} epochs x {seconds:.2f} s (median of {n} measured epochs with their "
                      f"evaluation under {out}, same {'/'.join(COST_KEYS)}) = {_hours(epochs * seconds)} on one "
                      f"slot, {_hours(epochs * seconds / len(slots))} on {len(slots)}")
        return 0
    return _run_all(todo, slots)


def _run_all(todo, slots) -> int:
    threads_each = max(1, (os.cpu_count() or 1) // len(slots))
    jobs: "queue.Queue" = queue.Queue()
    for item in todo:
        jobs.put(item)
    lock, done, failed, children = threading.Lock(), [0], [], set()
    stop = threading.Event()
    t_start = time.perf_counter()
    total_epochs = sum(e - epochs_done(d) for _, d, e in todo)
    epochs_finished = [0]

    def worker(gpu):
        env = dict(os.environ)
        # `python -m train` must import this package wherever the sweep was started.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        else:
            env.setdefault("OMP_NUM_THREADS", str(threads_each))
        while not stop.is_set():
            try:
                argv_, run_dir, epochs = jobs.get_nowait()
            except queue.Empty:
                return
            before = epochs_done(run_dir)
            resume = ["--resume"] if state_of(run_dir) == "partial" else []
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.perf_counter()
            with open(os.path.join(run_dir, "log.txt"), "a") as log:
                child = subprocess.Popen([sys.executable, "-m", "train", *argv_, *resume], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
                with lock:
                    children.add(child)
                rc = child.wait()
                with lock:
                    children.discard(child)
            if stop.is_set() or rc in (130, -signal.SIGINT):  # Ctrl-C: the main thread reports it
                return
            with lock:
                done[0] += 1
                epochs_finished[0] += epochs - before
                ok = rc == 0 and state_of(run_dir) == "finished"
                if not ok:
                    failed.append(run_dir)
                status = _final_accuracy(run_dir) if ok else f"FAILED (exit {rc})"
                elapsed = time.perf_counter() - t_start
                left = total_epochs - epochs_finished[0]
                eta = f"; ETA {_hours(elapsed / epochs_finished[0] * left)}" if epochs_finished[0] and left else ""
                where = f" gpu {gpu}" if gpu is not None else ""
                print(f"[{done[0]}/{len(todo)}]{where} {os.path.basename(run_dir)}: {status} "
                      f"in {time.perf_counter() - t0:.0f}s{eta} (log: {os.path.join(run_dir, 'log.txt')})", flush=True)

    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in slots]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    except KeyboardInterrupt:
        # The runs got the same Ctrl-C and stop after checkpointing; wait for them.
        stop.set()
        with lock:
            running = list(children)
        for child in running:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:  # the signal reached the sweep alone: pass it on
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
        print(f"sweep interrupted after {done[0]} of {len(todo)} runs; the same command continues "
              f"(finished runs are skipped, interrupted ones resume)", flush=True)
        return 130
    if failed:
        print(f"sweep: {len(failed)} run(s) failed; see their log.txt. Rerun the sweep to retry them.", flush=True)
        return 1
    print("sweep: all runs finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
