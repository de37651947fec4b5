"""One run: ``python -m train --loss nce+rce --noise sym --rate 0.4 ...``.

Reads top to bottom as the run does: parse flags, set up the device (and
torch.distributed under torchrun), load CIFAR-10/100, corrupt the training labels,
build model, loss and optimiser, resume if asked, then per epoch train, evaluate,
checkpoint and log; finally write result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import warnings

import numpy as np
import torch

from . import data as data_mod
from . import engine
from .models import MODELS, build_model
from .noise import (HUMAN_LABEL_SETS, NOISE_TYPES, RECIPES, HumanLabelError, find_human_labels, load_human_labels,
                    make_noisy_labels, noise_record)

CHECKPOINT, RESULT, CONFIG, METRICS = "checkpoint.pt", "result.json", "config.json", "metrics.jsonl"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None, False or already explained."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", formatter_class=HelpFormatter,
        description="Train on CIFAR-10 or CIFAR-100 with synthetic or human (CIFAR-N) label noise and a loss of "
                    "apl_kernels; log accuracy and per-epoch time. Several GPUs: torchrun --nproc_per_node N -m train ...")
    g = p.add_argument_group("loss and noise")
    g.add_argument("--loss", default="nce+rce",
                   help="loss of apl_kernels: ce fl nce nfl gce ngce mae rce, pairs such as nce+rce nfl+mae, sce")
    g.add_argument("--noise", required=True, choices=NOISE_TYPES,
                   help="label noise type: sym (uniform over the other classes), asym (CIFAR-10 class pairs; CIFAR-100: "
                        "next class in each group of five) or human (CIFAR-10N/100N labels, see --label-set); "
                        "always explicit and recorded")
    g.add_argument("--rate", type=float, default=None, help="noise rate eta in [0, 1] (sym and asym; required there)")
    g.add_argument("--label-set", default=None,
                   help="human noise: which CIFAR-N labels; CIFAR-10: aggre (9.0%% noisy), random1 random2 random3 "
                        "(~17-18%%), worse (40.2%%); CIFAR-100: noisy (40.2%%)")
    g.add_argument("--human-labels", default=None, metavar="PATH",
                   help="human noise: the CIFAR-N label file (CIFAR-10_human.pt or CIFAR-100_human.pt); default: that "
                        "file in --data or --data/cifar-n")
    g.add_argument("--noise-recipe", default="exact", choices=RECIPES,
                   help="asym only: 'exact' flips int(eta*n) clean samples per source class; 'official' flips the "
                        "pairs sequentially on already-noisy labels as the released code (cat->dog ~ eta(1-eta)); on "
                        "CIFAR-100 'official' flips each sample independently with probability eta, as the released code")
    g.add_argument("--noise-seed", type=int, default=None, help="seed of the label noise (default: --seed)")
    g.add_argument("--alpha", type=float, default=None, help="weight of the active term (default: official config)")
    g.add_argument("--beta", type=float, default=None, help="weight of the passive term (default: official config)")
    g.add_argument("--gamma", type=float, default=None, help="focal exponent of fl/nfl (default: 0.5)")
    g.add_argument("--q", type=float, default=None, help="exponent of gce/ngce (default: 0.7 gce, 0.1 ngce)")
    g.add_argument("--A", type=float, default=None, help="RCE constant, log of the clamped one-hot (default: ln 1e-4)")
    g.add_argument("--grad", default=None, choices=("official", "exact"),
                   help="focal factor gradient: official (constant, as the released code) or exact")
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda", "triton"),
                   help="apl_kernels backend computing the loss (auto: fastest available)")

    g = p.add_argument_group("model and recipe")
    g.add_argument("--model", default=None, choices=MODELS,
                   help="network: cnn8 (8-layer CNN of the official code), resnet18 or resnet34 (CIFAR variants) "
                        "(default: cnn8 on CIFAR-10, resnet34 on CIFAR-100)")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs, the cosine schedule spans them (default: 120 on CIFAR-10, 200 on CIFAR-100)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch size (divided among torchrun processes); the last partial batch is kept")
    g.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.01 on CIFAR-10, 0.1 on CIFAR-100)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="SGD weight decay (default: 1e-4 on CIFAR-10, 1e-5 on CIFAR-100)")
    g.add_argument("--clip-grad", type=float, default=5.0, help="gradient-norm clipping threshold (0: off)")
    g.add_argument("--amp", default="bf16", choices=tuple(engine.AMP_DTYPES),
                   help="mixed precision; fp16 uses a GradScaler")
    g.add_argument("--seed", type=int, default=0, help="training seed: initialisation, data order, augmentation")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=tuple(data_mod.DATASETS),
                   help="cifar10 or cifar100 (its 100 fine labels); sets the recipe defaults of Ma et al.")
    g.add_argument("--data", default="./data",
                   help="folder holding (or to receive) cifar-10-batches-py or cifar-100-python")
    g.add_argument("--no-download", action="store_true", help="never try to download the data set")
    g.add_argument("--synthetic", type=int, nargs="?", const=50000, default=None, metavar="N",
                   help="random CIFAR-shaped data instead of the data set, N training images (50,000 if N is omitted) and "
                        "N/5 test images: times the full pipeline on a machine without the data; accuracies mean nothing")
    g.add_argument("--loader", default="device", choices=("device", "classic"),
                   help="device: whole uint8 set on the device, augmentation there; classic: DataLoader + "
                        "torchvision transforms")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers of the classic loader")

    g = p.add_argument_group("run control")
    g.add_argument("--out", default="runs", help="parent folder of the run folder")
    g.add_argument("--run-name", default=None,
                   help="run folder name (default: from model, loss, noise, rate, seed, backend, amp)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (under torchrun each process takes cuda:LOCAL_RANK)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the run folder's checkpoint (bit-exactly); starts afresh if there is none")
    g.add_argument("--overwrite", action="store_true", help="discard an existing run folder's state and start afresh")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="exit after epoch N as if interrupted (checkpoint kept, no result.json)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-reproducible where the backends allow it)")
    return p


def resolve_dataset_defaults(args) -> None:
    """Fill the flags left unset (None) with the data set's official recipe, and
    check the noise flags: --rate belongs to sym/asym, --label-set to human."""
    for key, value in data_mod.dataset_info(args.dataset).recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.noise == "human":
        sets = HUMAN_LABEL_SETS.get(args.dataset, {})
        if args.label_set not in sets:
            raise UsageError(f"--noise human needs --label-set, one of {', '.join(sets)} for {args.dataset}"
                             + (f" (got {args.label_set!r})" if args.label_set else ""))
        if args.rate is not None:
            raise UsageError("--rate is for sym and asym noise; human noise has the rate of its --label-set")
    else:
        if args.rate is None:
            raise UsageError(f"--noise {args.noise} needs --rate")
        if args.label_set is not None or args.human_labels is not None:
            raise UsageError("--label-set and --human-labels are for --noise human")


def run_name(args) -> str:
    """Default run folder name; the sweep uses it to find finished runs."""
    if args.run_name:
        return args.run_name
    resolve_dataset_defaults(args)  # the name holds the model, which the data set's recipe may set
    noise = args.noise + ("-official" if args.noise == "asym" and args.noise_recipe == "official" else "")
    noise = f"human-{args.label_set}" if args.noise == "human" else f"{noise}{args.rate:g}"
    loss = args.loss.strip().lower().replace("+", "_")
    parts = ([] if args.dataset == "cifar10" else [args.dataset]) + [args.model, loss, noise, f"s{args.seed}"]
    if args.noise_seed is not None and args.noise_seed != args.seed:
        parts.append(f"ns{args.noise_seed}")
    if args.backend != "auto":
        parts.append(args.backend)
    if args.amp != "bf16":
        parts.append(args.amp)
    if args.synthetic:
        parts.append(f"synthetic{args.synthetic}")
    return "_".join(parts)


class UsageError(Exception):
    """A problem the user fixes; printed without a traceback."""


def _setup_distributed(args):
    """(rank, world_size, device).  torchrun sets WORLD_SIZE; gloo on the CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(args.device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _read_metrics(path: str, up_to_epoch: int) -> list:
    """Lines of metrics.jsonl up to an epoch: a crash between the checkpoint and
    the log line must not leave a duplicate behind on resume."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def run(args) -> int:
    resolve_dataset_defaults(args)
    rank, world, device = _setup_distributed(args)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    try:
        return _run(args, rank, world, device, main_process, say)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _run(args, rank, world, device, main_process, say) -> int:
    from apl_kernels import backends
    if args.epochs < 1 or args.batch_size < world:
        raise UsageError("--epochs must be >= 1 and --batch-size at least the number of processes")
    if args.rate is not None and not 0.0 <= args.rate <= 1.0:
        raise UsageError(f"--rate must lie in [0, 1], got {args.rate}")
    try:
        backend = backends.resolve(args.backend, device)
        # CIFAR-N has no official APL config: its runs take the symmetric-noise settings.
        settings_noise = "sym" if args.noise == "human" else args.noise
        criterion = engine.make_criterion(args.loss, settings_noise, backend, alpha=args.alpha, beta=args.beta,
                                          gamma=args.gamma, q=args.q, A=args.A, grad=args.grad)
    except (RuntimeError, ValueError) as error:  # unknown loss, bad parameter, backend unavailable
        raise UsageError(str(error)) from None
    run_dir = os.path.join(args.out, run_name(args))
    paths = {k: os.path.join(run_dir, v) for k, v in
             (("ckpt", CHECKPOINT), ("result", RESULT), ("config", CONFIG), ("metrics", METRICS))}
    if os.path.exists(paths["result"]) and not args.overwrite:
        say(f"{run_dir}: finished already (result.json exists); --overwrite to run again")
        return 0
    if os.path.exists(paths["ckpt"]) and not (args.resume or args.overwrite):
        raise UsageError(f"{run_dir} holds a checkpoint: pass --resume to continue it or --overwrite to restart")
    resume = args.resume and os.path.exists(paths["ckpt"]) and not args.overwrite
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

    # Data, checked; the md5 warning is shown once and recorded.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cifar = (data_mod.synthetic_dataset(args.dataset, args.synthetic) if args.synthetic else
                     data_mod.load_dataset(args.dataset, args.data, download=not args.no_download))
        except data_mod.DataError as error:
            raise UsageError(str(error)) from None
    for w in caught:
        say(f"warning: {w.message}", file=sys.stderr)

    # Label noise: from the CIFAR-N file, or synthetic from its own seed.
    noise_seed = args.seed if args.noise_seed is None else args.noise_seed
    if args.noise == "human":
        try:
            label_file = find_human_labels(args.dataset, args.human_labels, args.data)
            noisy = load_human_labels(label_file, args.dataset, args.label_set, cifar.train_labels)
        except HumanLabelError as error:
            raise UsageError(str(error)) from None
        noise = {"type": "human", "rate": None, "label_set": args.label_set, "file": os.path.abspath(label_file)}
    else:
        noisy = make_noisy_labels(cifar.train_labels, args.noise, args.rate, noise_seed, cifar.num_classes,
                                  recipe=args.noise_recipe)
        noise = {"type": args.noise, "rate": args.rate, "recipe": args.noise_recipe if args.noise == "asym" else None,
                 "seed": noise_seed}
    noise.update(noise_record(cifar.train_labels, noisy, cifar.num_classes))

    # Model, optimiser, schedule, scaler.
    _seed_everything(args.seed)
    model = build_model(args.model, cifar.num_classes).to(device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    train_model = torch.compile(model) if args.compile else model
    # Every process evaluates the whole test set on its plain (not DDP) model.
    eval_model = torch.compile(engine.unwrap(model)) if args.compile else engine.unwrap(model)
    optimizer = engine.make_optimizer(model, args.lr, args.momentum, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    # Loaders: training shards per process; every process evaluates the whole test set.
    Loader = data_mod.DeviceLoader if args.loader == "device" else data_mod.ClassicLoader
    extra = {"mean": cifar.info.mean, "std": cifar.info.std}
    extra.update({} if args.loader == "device" else {"num_workers": args.workers})
    train_loader = Loader(cifar.train_images, (noisy, cifar.train_labels), batch_size=args.batch_size // world,
                          train=True, device=device, seed=args.seed, rank=rank, world_size=world,
                          rotate_degrees=cifar.info.rotate_degrees, **extra)
    test_loader = Loader(cifar.test_images, cifar.test_labels, batch_size=max(args.batch_size, 512), train=False,
                         device=device, **extra)

    start_epoch, history = 1, []
    if resume:
        state = engine.load_checkpoint(paths["ckpt"], model=model, optimizer=optimizer, scheduler=scheduler,
                                       scaler=scaler)
        start_epoch = state["epoch"] + 1
        history = _read_metrics(paths["metrics"], state["epoch"])
        say(f"{run_dir}: resuming after epoch {state['epoch']}")
    elif args.resume:
        say(f"{run_dir}: no checkpoint, starting afresh")

    config = {"args": vars(args), "run_dir": run_dir, "backend": backend, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
              "world_size": world, "loss_spec": engine.spec_record(criterion),
              "loss_in_amp_dtype": engine.loss_takes_amp_dtype(criterion, device),
              "data": {"dataset": args.dataset, "folder": cifar.folder, "differing_from_release": cifar.differing_files,
                       "train": len(cifar.train_labels), "test": len(cifar.test_labels)},
              "noise": noise, "versions": _versions()}
    if main_process:
        os.makedirs(run_dir, exist_ok=True)
        engine.atomic_write_json(paths["config"], config)
        if not resume:  # a fresh start drops the old state, so no stale result.json outlives it
            for stale in (paths["result"], paths["ckpt"]):
                if os.path.exists(stale):
                    os.remove(stale)
            open(paths["metrics"], "w").close()
        else:
            _rewrite_metrics(paths["metrics"], history)
    noise_text = f"human noise {args.label_set}" if args.noise == "human" else f"{args.noise} noise rate {args.rate}"
    say(f"{run_dir}: {args.dataset} {args.model} {criterion.spec.name} on {noise_text} "
        f"(realised {noise['realised_rate']:.4f}), backend {backend}, amp {args.amp}, device {device}"
        + (f" x{world}" if world > 1 else ""))

    stopwatch = engine.Stopwatch(device)
    tty = main_process and sys.stdout.isatty()
    for epoch in range(start_epoch, args.epochs + 1):
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        bar = None
        if tty:
            from tqdm import tqdm
            bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True)
        stopwatch.start()
        metrics = engine.train_one_epoch(train_model, train_loader, criterion, optimizer, device=device, amp=args.amp,
                                         scaler=scaler, clip_grad=args.clip_grad,
                                         on_step=bar.update if bar else None)
        epoch_time = stopwatch.stop()
        if bar:
            bar.close()
        stopwatch.start()
        test = engine.evaluate(eval_model, test_loader, device=device, amp=args.amp)
        eval_time = stopwatch.stop()
        scheduler.step()
        row = {"epoch": epoch, "lr": lr, "train_loss": metrics["train_loss"], "noisy_acc": metrics["noisy_acc"],
               "clean_acc": metrics["clean_acc"], "test_acc": test["test_acc"], "test_loss": test["test_loss"],
               "epoch_time_s": epoch_time, "eval_time_s": eval_time, "train_samples": metrics["samples"]}
        history.append(row)
        if main_process:
            # Checkpoint first: a log line never refers to an epoch the checkpoint lacks.
            engine.save_checkpoint(paths["ckpt"], model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=scaler, epoch=epoch)
            with open(paths["metrics"], "a") as f:
                f.write(json.dumps(row) + "\n")
        say(f"epoch {epoch}/{args.epochs}  lr {lr:.5f}  loss {row['train_loss']:.4f}  "
            f"noisy-acc {row['noisy_acc']:.2f}  clean-acc {row['clean_acc']:.2f}  test-acc {row['test_acc']:.2f}  "
            f"time {epoch_time:.2f}s  eval {eval_time:.2f}s", flush=True)
        if args.stop_after is not None and epoch >= args.stop_after and epoch < args.epochs:
            say(f"stopped after epoch {epoch} (--stop-after); continue with --resume")
            return 0

    if main_process:
        last = history[-1]
        result = {"status": "finished", **{k: config[k] for k in ("run_dir", "backend", "device", "device_name",
                                                                   "world_size", "loss_spec", "noise", "data")},
                  "loss": args.loss.strip().lower(), "model": args.model, "seed": args.seed, "amp": args.amp,
                  "epochs": args.epochs, "final": {k: last[k] for k in ("test_acc", "noisy_acc", "clean_acc",
                                                                        "train_loss")},
                  "best_test_acc": max(r["test_acc"] for r in history),
                  "timing": engine.timing_summary([r["epoch_time_s"] for r in history],
                                                  [r["eval_time_s"] for r in history]),
                  "versions": config["versions"]}
        engine.atomic_write_json(paths["result"], result)
        say(f"{run_dir}: test accuracy {last['test_acc']:.2f} after {args.epochs} epochs; "
            f"first epoch {result['timing']['first_epoch_s']:.2f}s, median of the rest "
            + (f"{result['timing']['median_epoch_s']:.2f}s" if result["timing"]["median_epoch_s"] else "n/a"))
    return 0


def _rewrite_metrics(path: str, rows: list) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def _versions() -> dict:
    import torchvision
    import apl_kernels
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "apl_kernels": getattr(apl_kernels, "__version__", None)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
