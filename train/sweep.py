"""The paper's grids: ``python -m train.sweep [options] [any python -m train flag]``.

Every (noise type, loss, rate, seed) of the grid becomes one ``python -m train``
process with an explicit ``--noise``; flags this script does not know (--epochs,
--model, --backend, --out, --data, ...) go to every run unchanged.  Runs whose
folder holds result.json are skipped, interrupted ones continue (--resume), so
the sweep itself is resumable: start it again after any interruption.  Runs are
spread over GPUs (--gpus 0,1,...: one process per GPU at a time) or, on the
CPU, over --workers processes.
"""
from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time

from . import cli
from .paper_results import ASYMMETRIC, ASYM_RATES, SYM_RATES, SYMMETRIC

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = {"sym": (tuple(SYMMETRIC), SYM_RATES), "asym": (tuple(ASYMMETRIC), ASYM_RATES)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.sweep", formatter_class=cli.HelpFormatter,
        description="Run the grid noise types x losses x rates x seeds (the paper's CIFAR-10 grids by default), "
                    "one `python -m train` process per run. Other flags (e.g. --epochs, --model, --backend, --amp, "
                    "--out, --data) are passed to every run.",
        epilog=f"Default grids: sym losses {' '.join(GRIDS['sym'][0])}, rates {' '.join(map(str, SYM_RATES))}; "
               f"asym losses {' '.join(GRIDS['asym'][0])}, rates {' '.join(map(str, ASYM_RATES))}.")
    p.add_argument("--noise-types", nargs="+", default=["sym", "asym"], choices=("sym", "asym"),
                   help="noise types to sweep")
    p.add_argument("--losses", nargs="+", default=None, help="losses (default: the paper's list for each noise type)")
    p.add_argument("--rates", nargs="+", type=float, default=None,
                   help="noise rates (default: the paper's rates for each noise type)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (3 runs as in the paper)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, one run at a time per entry (list an id twice to share a GPU between two runs)")
    p.add_argument("--workers", type=int, default=1, help="parallel runs without --gpus (CPU threads are shared out)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    return p


def plan(sweep, train_flags):
    """[(argv of python -m train, run folder)] of the grid, in order."""
    parser = cli.build_parser()
    runs = []
    for noise in sweep.noise_types:
        losses, rates = GRIDS[noise]
        for loss in sweep.losses or losses:
            for rate in sweep.rates if sweep.rates is not None else rates:
                for seed in sweep.seeds:
                    argv = ["--loss", loss, "--noise", noise, "--rate", f"{rate:g}", "--seed", str(seed),
                            *train_flags, "--resume"]
                    args = parser.parse_args(argv)  # fails early on a bad passed-through flag
                    runs.append((argv, os.path.join(args.out, cli.run_name(args))))
    return runs


def state_of(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, cli.RESULT)):
        return "finished"
    if os.path.exists(os.path.join(run_dir, cli.CHECKPOINT)):
        return "partial"
    return "todo"


def main(argv=None) -> int:
    sweep, train_flags = build_parser().parse_known_args(argv)
    runs = plan(sweep, train_flags)
    todo = [(a, d) for a, d in runs if state_of(d) != "finished"]
    print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run", flush=True)
    if sweep.dry_run:
        for argv_, run_dir in runs:
            print(f"  [{state_of(run_dir):8s}] python -m train {' '.join(argv_)}")
        return 0
    slots = [g.strip() for g in sweep.gpus.split(",") if g.strip()] if sweep.gpus else [None] * max(1, sweep.workers)
    threads_each = max(1, (os.cpu_count() or 1) // len(slots))
    jobs: "queue.Queue" = queue.Queue()
    for item in todo:
        jobs.put(item)
    lock, done, failed = threading.Lock(), [0], []

    def worker(gpu):
        env = dict(os.environ)
        # `python -m train` must import this package wherever the sweep was started.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        else:
            env.setdefault("OMP_NUM_THREADS", str(threads_each))
        while True:
            try:
                argv_, run_dir = jobs.get_nowait()
            except queue.Empty:
                return
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.perf_counter()
            with open(os.path.join(run_dir, "log.txt"), "a") as log:
                rc = subprocess.call([sys.executable, "-m", "train", *argv_], stdout=log, stderr=subprocess.STDOUT,
                                     env=env)
            with lock:
                done[0] += 1
                status = "ok" if rc == 0 and state_of(run_dir) == "finished" else f"FAILED (exit {rc})"
                if status != "ok":
                    failed.append(run_dir)
                where = f" gpu {gpu}" if gpu is not None else ""
                print(f"[{done[0]}/{len(todo)}]{where} {os.path.basename(run_dir)}: {status} "
                      f"in {time.perf_counter() - t0:.0f}s (log: {os.path.join(run_dir, 'log.txt')})", flush=True)

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"sweep: {len(failed)} run(s) failed; see their log.txt. Rerun the sweep to retry them.", flush=True)
        return 1
    print("sweep: all runs finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
