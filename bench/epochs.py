"""Epoch-time benchmark: training time per epoch, backend "reference" vs "auto".

    python -m bench.epochs                       # GPU: every loss, cnn8, bs 128, AMP bf16 and fp16,
                                                 #      full CIFAR-sized epochs of synthetic data
                                                 # CPU: nce+rce, 4 epochs of 25 steps per backend
                                                 #      (200 steps with the CPU kernels, ~3-4 minutes)
    python -m bench.epochs --data ~/data         # real CIFAR-10 (cifar-10-batches-py under that folder;
                                                 # ./data is used by default when it holds CIFAR-10)
    python -m bench.epochs --losses nce+rce --amp bf16 --epochs 6 --models cnn8,resnet18

The step is the training recipe's (train.engine.train_one_epoch: AMP, GradScaler
for fp16, gradient clipping, fused SGD) on the device-resident loader
(train.data.DeviceLoader); only the loss's backend differs.  Both backends
train their own copy of the same initial model in one process, alternating
epoch by epoch (and which goes first), so a change in the machine's load hits
both alike.  The figure is the median epoch time over the epochs after the
first (which carries compilation and warm-up), and reference / auto.
The spread (min-max over those epochs of the per-epoch ratio) is printed
and kept in meta["epoch_details"].  Records are merged into the results JSON
of the kernel benchmark (bench-results/<gpu-or-cpu-name>-<date>.json under the
current directory unless --out; bench/results/ holds the published runs).
`python -m bench.plots <results.json>` draws the epoch records.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time

import torch

from . import common
from .common import ALL_LOSSES

MODULE = "bench.epochs"
CPU_DEFAULT_LOSSES = ("nce+rce",)
CIFAR_TRAIN_SIZE = 50000
DEFAULT_DATA = "./data"  # the train CLI's default --data


def _import_train():
    try:
        from train import data, engine, models
        return data, engine, models
    except Exception as error:  # noqa: BLE001
        raise SystemExit(f"the train package does not import ({error!r}); run from the repository root")


class _Steps:
    """At most `steps` batches of a loader per epoch (None: all of them)."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader) if self.steps is None else itertools.islice(iter(self.loader), self.steps)


def run(args) -> dict:
    data_mod, engine, models = _import_train()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    from apl_kernels import backends as apl_backends
    auto_is = apl_backends.resolve("auto", device)

    if args.losses == "all":
        losses = list(ALL_LOSSES)
    else:
        losses = common.parse_list(args.losses) or (["nce+rce"] if args.quick else
                                                    list(ALL_LOSSES if gpu else CPU_DEFAULT_LOSSES))
    model_names = common.parse_list(args.models, models.MODELS if hasattr(models, "MODELS") else None,
                                    "model") or ["cnn8"]
    amps = common.parse_list(args.amp, ("bf16", "fp16", "off"), "amp") or \
        (["bf16", "fp16"] if gpu and not args.quick else ["bf16"])
    batch = args.batch_size or (8 if args.quick else 128)
    epochs = args.epochs or (2 if args.quick else 4)
    steps = args.steps if args.steps is not None else (2 if args.quick else (None if gpu else 25))
    if epochs < 2:
        raise SystemExit("--epochs must be >= 2: the first epoch is warm-up and not counted")

    data_dir = args.data
    if data_dir is None and not (args.synthetic or args.quick) and data_mod.find_folder(DEFAULT_DATA):
        data_dir = DEFAULT_DATA  # train's default folder holds CIFAR-10: use the real thing
    if data_dir and not args.synthetic:
        cifar = data_mod.load_cifar10(data_dir, download=False)
        images, labels = cifar.train_images, cifar.train_labels
        data_kind = "cifar10"
        data_note = f"CIFAR-10 from {cifar.folder} ({len(labels)} training images)"
    else:
        n = args.n_train or (CIFAR_TRAIN_SIZE if steps is None else steps * batch)
        images, labels = data_mod.synthetic_cifar(n, seed=0)
        data_kind = "synthetic"
        data_note = f"synthetic CIFAR-shaped data ({n} random images; pass --data for real CIFAR-10)"
    loader = _Steps(data_mod.DeviceLoader(images, labels, batch_size=batch, train=True, device=device, seed=0),
                    steps)
    steps_per_epoch = len(loader.loader) if steps is None else min(steps, len(loader.loader))

    out_path = args.out or common.default_results_path(device, quick=args.quick)
    meta = common.base_meta(device, MODULE)
    settings = {"losses": losses, "models": model_names, "amp": amps, "batch_size": batch, "epochs": epochs,
                "steps_per_epoch": steps_per_epoch, "data": data_kind, "data_note": data_note,
                "auto_resolves_to": auto_is, "threads": torch.get_num_threads(), "backends": ["reference", "auto"], "noise_type_settings": "sym",
                "timing": "train.engine.Stopwatch around train_one_epoch (CUDA events on GPU, perf_counter on CPU)",
                "statistic": "median over the epochs after the first; backends alternate epoch by epoch"}
    meta["epoch_settings"] = settings
    print(f"apl_kernels epoch benchmark on {meta['gpu']} (torch {meta['torch']})")
    print(f"data: {data_note}")
    print(f"{', '.join(model_names)}, batch {batch}, AMP {', '.join(amps)}, {epochs} epochs x {steps_per_epoch} "
          f"steps per backend; backend 'auto' resolves to {auto_is!r}")
    if auto_is == "reference":
        print("note: no fused backend is available here, so 'auto' runs the reference too")
    print("epoch 0 is warm-up (compilation, caches): left out of the median and the spread")
    print(f"results -> {out_path}\n")

    records, details = [], []
    configs = [(m, a, l) for m in model_names for a in amps for l in losses]
    writer = common.ResultsWriter(out_path, replace_meta=False)
    meta["epoch_details"] = details
    t_start = time.perf_counter()
    for index, (model_name, amp, loss) in enumerate(configs, 1):
        torch.manual_seed(0)
        base = models.build_model(model_name).to(device)
        runs = {}
        for backend in ("reference", "auto"):
            model = copy.deepcopy(base)
            runs[backend] = {
                "model": model, "optimizer": engine.make_optimizer(model),
                "criterion": engine.make_criterion(loss, "sym", backend),
                "scaler": torch.amp.GradScaler(device.type) if amp == "fp16" else None,
                "times": []}
        watch = engine.Stopwatch(device)
        print(f"[{index}/{len(configs)}] {loss:<9} {model_name} AMP {amp}", end="", flush=True)
        try:
            for epoch in range(epochs):
                order = ("reference", "auto") if epoch % 2 == 0 else ("auto", "reference")
                for backend in order:
                    run_ = runs[backend]
                    loader.set_epoch(epoch)  # both backends see the same batches
                    watch.start()
                    engine.train_one_epoch(run_["model"], loader, run_["criterion"], run_["optimizer"],
                                           device=device, amp=amp, scaler=run_["scaler"])
                    run_["times"].append(watch.stop())
                print(f"  e{epoch}: ref {runs['reference']['times'][-1]:.3g} s / auto {runs['auto']['times'][-1]:.3g} s",
                      end="", flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on with the next configuration
            print(f"\n  failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            details.append({"loss": loss, "model": model_name, "amp": amp, "error": repr(error)[:300]})
            continue
        finally:
            base = None
        medians = {b: statistics.median(r["times"][1:]) for b, r in runs.items()}
        speedup = medians["reference"] / medians["auto"]
        spread = speedup_spread(runs["reference"]["times"], runs["auto"]["times"])
        print(f"\n  median epoch (epochs 1-{epochs - 1}): reference {medians['reference']:.4g} s, auto ({auto_is}) "
              f"{medians['auto']:.4g} s, speedup {speedup:.3f}x (min {spread[0]:.3f}x, max {spread[1]:.3f}x)   "
              f"[{time.perf_counter() - t_start:.0f} s elapsed]", flush=True)
        for backend in ("reference", "auto"):
            records.append({"kind": "epoch", "loss": loss, "model": model_name, "amp": amp, "backend": backend,
                            "data": data_kind, "epoch_s_median": common.sig(medians[backend], 5),
                            "speedup_vs_reference": 1.0 if backend == "reference" else round(speedup, 4)})
        details.append({"loss": loss, "model": model_name, "amp": amp,
                        "epoch_s": {b: [round(t, 5) for t in r["times"]] for b, r in runs.items()},
                        "speedup_min": round(spread[0], 4), "speedup_max": round(spread[1], 4)})
        runs = None
        if gpu:
            torch.cuda.empty_cache()
        meta["epoch_seconds"] = round(time.perf_counter() - t_start, 1)
        writer.write(meta, records)  # after every configuration: a cut-off run keeps its records

    meta["epoch_details"] = details
    meta["epoch_seconds"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_end"] = common._loadavg()
    data = writer.write(meta, records)
    # The epoch benchmark's own settings and details always describe its latest run.
    data["meta"]["epoch_settings"] = settings
    data["meta"]["epoch_details"] = details
    from .goals import evaluate, format_goal
    goals = evaluate(data)
    data["meta"]["goals"] = goals
    common.write_json_atomic(out_path, data)

    print(f"\n{'loss':<10} {'model':<9} {'amp':<5} {'reference s':>12} {'auto s':>9} {'speedup':>8} {'min-max':>15}"
          f"   (medians and spread over epochs 1-{epochs - 1}; epoch 0 is warm-up)")
    spreads = {(d["loss"], d["model"], d["amp"]): (d["speedup_min"], d["speedup_max"]) for d in details
               if "speedup_min" in d}
    for ref, auto in zip(records[0::2], records[1::2]):
        low, high = spreads[(ref["loss"], ref["model"], ref["amp"])]
        print(f"{ref['loss']:<10} {ref['model']:<9} {ref['amp']:<5} {ref['epoch_s_median']:>12.4g} "
              f"{auto['epoch_s_median']:>9.4g} {auto['speedup_vs_reference']:>7.3f}x {low:>6.3f}-{high:.3f}x")
    print(f"\n{len(records)} epoch records written to {out_path} ({meta['epoch_seconds']} s); data: {data_kind}")
    print("Epoch goals (stated for the H200, cnn8, batch 128, AMP bf16):")
    for goal in goals[:2]:
        print("  " + format_goal(goal))
    return data


def speedup_spread(reference_times, auto_times) -> tuple:
    """(min, max) over the epochs after the warm-up epoch 0 of reference time / auto time."""
    ratios = [r / a for r, a in zip(reference_times[1:], auto_times[1:])]
    return min(ratios), max(ratios)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.epochs", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: nce+rce, cnn8, bf16, batch 8, 2 epochs of 2 steps; results go to the "
                             "temporary directory unless --out")
    parser.add_argument("--losses", help=f"comma list or 'all' (default: all on GPU = {','.join(ALL_LOSSES)}; "
                                         f"{','.join(CPU_DEFAULT_LOSSES)} on CPU)")
    parser.add_argument("--models", help="comma list of cnn8,resnet18 (default cnn8)")
    parser.add_argument("--amp", help="comma list of bf16,fp16,off (default bf16,fp16 on GPU, bf16 on CPU); "
                                      "fp16 runs with a GradScaler")
    parser.add_argument("--batch-size", type=int, default=0, help="default 128")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs per backend, the first not counted (default 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per epoch (default: full epochs on GPU, 25 on CPU)")
    parser.add_argument("--data", help="folder holding cifar-10-batches-py: real CIFAR-10 (default: ./data "
                                       "when it holds CIFAR-10, else synthetic data)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data even when CIFAR-10 is present")
    parser.add_argument("--n-train", type=int, default=0,
                        help="synthetic images (default 50000 for full epochs, else steps x batch)")
    parser.add_argument("--out", help="results JSON to merge into (default bench-results/<name>-<date>.json under "
                                      "the current directory; bench/results/ is for published runs)")
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (default: torch's)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
