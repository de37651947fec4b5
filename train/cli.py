"""One run: ``python -m train --loss nce+rce --noise sym --rate 0.4 ...``.

Reads top to bottom as the run does: parse flags, set up the device (and
torch.distributed under torchrun), load CIFAR-10/100, corrupt the training labels,
build model, loss and optimiser, resume if asked, then per epoch train, evaluate,
checkpoint and log; finally write result.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import warnings

import numpy as np
import torch

from . import data as data_mod
from . import engine, provenance
from .models import MODELS, build_model
from .noise import (HUMAN_LABEL_SETS, NOISE_TYPES, RECIPES, HumanLabelError, find_human_labels, load_human_labels,
                    make_noisy_labels, noise_record, read_human_label_file)

CHECKPOINT, RESULT, CONFIG, METRICS = "checkpoint.pt", "result.json", "config.json", "metrics.jsonl"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None, False or already explained;
    description and epilog as written (they hold tables)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", formatter_class=HelpFormatter,
        description="Train on CIFAR-10 or CIFAR-100 with synthetic or human (CIFAR-N) label noise and a loss of\n"
                    "apl_kernels; log accuracy and per-epoch time. Several GPUs: torchrun --nproc_per_node N -m train ...",
        epilog=engine.settings_help())
    g = p.add_argument_group("loss and noise")
    g.add_argument("--loss", default="nce+rce",
                   help="loss of apl_kernels: ce fl nce nfl gce ngce mae rce agce aul ael nnce nnfl amse ece taylor, "
                        "pairs such as nce+rce nfl+mae nce+agce nce+nnce nfl+nnfl nce+amse ece+mae, sce; the "
                        "spelling is canonical in the run's name (rce+nce is nce+rce)")
    g.add_argument("--noise", required=True, choices=NOISE_TYPES,
                   help="label noise type: sym (uniform over the other classes), asym (CIFAR-10 class pairs; CIFAR-100: "
                        "next class in each group of five) or human (CIFAR-10N/100N labels, see --label-set); "
                        "always explicit and recorded")
    g.add_argument("--rate", type=float, default=None,
                   help="noise rate eta in [0, 1], for sym and asym noise (required there); asym: the fraction flipped "
                        "in each flipped class (a warning above 0.5, where the wrong label outnumbers the true one)")
    g.add_argument("--label-set", default=None,
                   help="human noise: which CIFAR-N labels; CIFAR-10: aggre (9.0%% noisy), random1 random2 random3 "
                        "(~17-18%%), worse (40.2%%); CIFAR-100: noisy (40.2%%)")
    g.add_argument("--human-labels", default=None, metavar="PATH",
                   help="human noise: the CIFAR-N label file (CIFAR-10_human.pt or CIFAR-100_human.pt); default: that "
                        "file in --data or --data/cifar-n. The run's identity holds the md5 of its labels, not its "
                        "path")
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
    g.add_argument("--a", type=float, default=None,
                   help="the 'a' of agce, aul, ael and amse (default: official config)")
    g.add_argument("--m", type=float, default=None, help="eps-softmax's m of ece (default: official config)")
    g.add_argument("--t", type=int, default=None, help="order of the taylor loss (default: the LossSpec's)")
    g.add_argument("--min-prob", type=float, default=None,
                   help="probability clamp of nnce and nnfl (default: 1e-7 as ANL)")
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
                   help="SGD (L2) weight decay (default: official: 1e-4 on CIFAR-10, 1e-5 on CIFAR-100; 0 for "
                        "losses with amse, nnce or nnfl, which use --l1 instead)")
    g.add_argument("--l1", type=float, default=None, metavar="DELTA",
                   help="L1 penalty DELTA * sum|theta| over the weights, added to the loss every step, as ANL and JAL "
                        "use (default: official: 5e-5 for losses with amse, nnce or nnfl on CIFAR-10; on CIFAR-100 "
                        "5e-6 with amse, 5e-7 with nnce/nnfl; else 0)")
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
                   help="random CIFAR-shaped data instead of the data set, N >= 2 training images (50,000 if N is "
                        "omitted) and N/5 test images: times the full pipeline on a machine without the data; accuracies "
                        "mean nothing")
    g.add_argument("--loader", default="device", choices=("device", "classic"),
                   help="device: whole uint8 set on the device, augmentation there; classic: DataLoader + "
                        "torchvision transforms")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers of the classic loader")

    g = p.add_argument_group("run control")
    g.add_argument("--out", default="runs", help="parent folder of the run folder")
    g.add_argument("--run-name", default=None,
                   help="run folder name (default: [<dataset>_]<model>_<loss>_<noise><rate>_s<seed>[...]-<hash>, the "
                        "hash of every setting that changes the result, so another config is another run)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (under torchrun each process takes cuda:LOCAL_RANK)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the run folder's checkpoint (bit-exactly); starts afresh if there is none; "
                        "refuses, naming them, settings that differ from the interrupted run's")
    g.add_argument("--overwrite", action="store_true", help="discard an existing run folder's state and start afresh")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="exit after epoch N as if interrupted (checkpoint kept, no result.json)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log each epoch's metrics for TensorBoard in <run folder>/tensorboard (needs the "
                        "optional tensorboard package)")
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


class UsageError(Exception):
    """A problem the user fixes; printed without a traceback."""


# --------------------------------------------------------------------------- run identity
#
# A run is every setting that changes its result.  Its folder is named
# "[<dataset>_]<model>_<loss>_<noise><rate>_s<seed>[...]-<hash>", the hash of the resolved
# settings (official per-loss values filled in, "auto" backend resolved, loss
# name canonical: rce+nce is nce+rce), so a different config is a different run
# and equivalent spellings are one.  Every flag counts unless listed here as
# not changing the result (where the run reads and writes, how it is driven).
NOT_IDENTITY = frozenset({"out", "run_name", "resume", "overwrite", "stop_after", "workers", "data", "no_download",
                          "device", "tensorboard", "human_labels"})
# Replaced by the resolved loss spec, backend and noise seed.
_RESOLVED = frozenset({"loss", "backend", "noise_seed"})


def _spec_fields() -> set:
    import apl_kernels
    return {f.name for f in dataclasses.fields(apl_kernels.LossSpec)}


def resolve_device(name: str) -> torch.device:
    """``--device`` checked: a torch device that exists here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def make_criterion(args, device: torch.device):
    """(criterion, resolved backend) of the flags; a bad loss, parameter or backend is a UsageError."""
    from apl_kernels import backends
    params = {k: getattr(args, k) for k in _spec_fields() if k not in ("active", "passive") and hasattr(args, k)}
    try:
        backend = backends.resolve(args.backend, device)
        criterion = engine.make_criterion(args.loss, args.noise, backend, dataset=getattr(args, "dataset", "cifar10"),
                                          rate=args.rate, **params)
    except (RuntimeError, ValueError) as error:  # unknown loss, bad parameter, backend unavailable
        raise UsageError(str(error)) from None
    return criterion, backend


def identity(args, criterion, backend: str, device: torch.device, world: int = 1) -> dict:
    """The settings that define the run (JSON types), as hashed into its folder name."""
    skip = NOT_IDENTITY | _RESOLVED | _spec_fields()
    ident = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    ident.update(engine.regularisation(args, criterion.spec))  # resolved weight decay and L1
    ident["loss"] = engine.spec_record(criterion)
    ident["backend"] = backend
    ident["device"] = device.type
    ident["noise_seed"] = args.seed if args.noise_seed is None else args.noise_seed
    ident["world_size"] = world
    if args.noise != "asym":
        ident["noise_recipe"] = None  # only asymmetric noise has recipes
    if args.noise == "human":  # the labels are the file's content, wherever it lies
        ident["human_labels_md5"] = human_labels_md5(args)
    return json.loads(json.dumps(ident))


def human_labels_md5(args) -> str:
    """md5 of the labels that --noise human reads: the file's clean labels and its
    --label-set, as int64.  Not the file's bytes: torch.save writes the file's
    name into them, so a renamed copy would be another run."""
    try:
        path = find_human_labels(args.dataset, args.human_labels, args.data)
        labels = read_human_label_file(path)
    except HumanLabelError as error:
        raise UsageError(str(error)) from None
    digest = hashlib.md5()
    for key in ("clean_label", HUMAN_LABEL_SETS[args.dataset][args.label_set]):
        digest.update(key.encode() + np.ascontiguousarray(labels.get(key, np.zeros(0, np.int64))).tobytes())
    return digest.hexdigest()


def run_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]


def readable_name(args, loss_name: str) -> str:
    """The human part of the folder name: data set, model, canonical loss, noise, rate, seed, ..."""
    noise = args.noise + ("-official" if args.noise == "asym" and args.noise_recipe == "official" else "")
    if getattr(args, "label_set", None) and args.noise == "human":
        noise += f"-{args.label_set}"
    dataset = getattr(args, "dataset", "cifar10")
    rate = f"{args.rate:g}" if args.rate is not None else ""
    parts = ([dataset] if dataset != "cifar10" else []) + [args.model, loss_name, f"{noise}{rate}", f"s{args.seed}"]
    if args.noise_seed is not None and args.noise_seed != args.seed:
        parts.append(f"ns{args.noise_seed}")
    if args.backend != "auto":
        parts.append(args.backend)
    if args.amp != "bf16":
        parts.append(args.amp)
    if args.synthetic is not None:
        parts.append(f"synthetic{args.synthetic}")
    return "_".join(parts)


def run_name(args, ident: dict) -> str:
    """The run folder's name: --run-name, else readable part + "-" + hash of the identity."""
    if args.run_name:
        return args.run_name
    return f"{readable_name(args, ident['loss']['name'])}-{run_hash(ident)}"


def plan_run(args, device: torch.device = None, world: int = 1):
    """(criterion, backend, identity, run folder) of parsed flags; the sweep uses it to find runs."""
    resolve_dataset_defaults(args)  # the data set's recipe fills the flags left unset, before the identity
    device = device if device is not None else resolve_device(args.device)
    criterion, backend = make_criterion(args, device)
    ident = identity(args, criterion, backend, device, world)
    return criterion, backend, ident, os.path.join(args.out, run_name(args, ident))


def _flag(key: str) -> str:
    name = key.split(".")[-1]
    return f"--{name.replace('_', '-')}" if not key.startswith("data.") else key


def differences(old, new, prefix: str = "") -> list:
    """["--lr 0.01 -> 0.1", ...]: each setting that differs between two identities."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{_flag(prefix[:-1])} {old} -> {new}"]


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); move the folder away or pass --overwrite") from None


def _check_existing(args, run_dir: str, paths: dict, ident: dict, say) -> str:
    """What to do with the run folder: "finished", "resume" or "fresh"; refuses a clash."""
    if args.overwrite:
        return "fresh"
    stored = _read_json(paths["config"])
    if stored is not None:
        if "identity" not in stored:
            raise UsageError(f"{run_dir} was written by an older version that did not record the run's settings; "
                             f"pass --overwrite to restart it, or choose another --out or --run-name")
        changed = differences(stored["identity"], ident)
        if changed:
            raise UsageError(f"{run_dir} holds a run with other settings ({'; '.join(changed)}); "
                             f"--resume continues a run only with its own settings. Choose another --run-name "
                             f"or --out, or pass --overwrite to discard it")
    if os.path.exists(paths["result"]):
        return "finished"
    if os.path.exists(paths["ckpt"]):
        if not args.resume:
            raise UsageError(f"{run_dir} holds a checkpoint: pass --resume to continue it or --overwrite to restart")
        return "resume"
    if args.resume:
        _refuse_resume_with_changed_settings(args, run_dir, ident)
        say(f"{run_dir}: no checkpoint, starting afresh")
    return "fresh"


def _refuse_resume_with_changed_settings(args, run_dir: str, ident: dict) -> None:
    """--resume where no run has these settings but an interrupted one of the same
    model, loss, noise and seed has others: the user changed a flag, say which."""
    if args.run_name or not os.path.isdir(args.out):
        return
    base = os.path.basename(run_dir).rsplit("-", 1)[0]
    candidates = []
    for name in os.listdir(args.out):
        folder = os.path.join(args.out, name)
        if (name.rsplit("-", 1)[0] == base and os.path.exists(os.path.join(folder, CHECKPOINT))
                and not os.path.exists(os.path.join(folder, RESULT))):
            stored = _read_json(os.path.join(folder, CONFIG)) or {}
            if "identity" in stored:
                candidates.append((os.path.getmtime(os.path.join(folder, CHECKPOINT)), folder, stored["identity"]))
    if candidates:
        _, folder, other = max(candidates)
        raise UsageError(f"--resume: {folder} is the interrupted run of these flags, and its settings differ: "
                         f"{'; '.join(differences(other, ident))}. Resume it with its own settings, or drop "
                         f"--resume to start a new run with these")


def _setup_distributed(args, device: torch.device):
    """(rank, world_size, device).  torchrun sets WORLD_SIZE; gloo on the CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
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
    resolve_dataset_defaults(args)  # before the identity: the data set's recipe fills unset flags
    device = resolve_device(args.device)  # before torch.distributed: a missing GPU is a usage error
    rank, world, device = _setup_distributed(args, device)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    try:
        return _run(args, rank, world, device, main_process, say)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _check_flags(args, world: int) -> None:
    if args.epochs < 1 or args.batch_size < world:
        raise UsageError("--epochs must be >= 1 and --batch-size at least the number of processes")
    if args.rate is not None and not 0.0 <= args.rate <= 1.0:
        raise UsageError(f"--rate must lie in [0, 1], got {args.rate}")
    if args.synthetic is not None and args.synthetic < 2:
        raise UsageError(f"--synthetic N needs N >= 2 training images (BatchNorm trains on batches of two or "
                         f"more), got {args.synthetic}")
    for name in ("weight_decay", "l1"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def _load_data(args, say):
    """The data set, checked; a failure leaves behind no folder that it created."""
    if args.synthetic is not None:
        return data_mod.synthetic_dataset(args.dataset, args.synthetic)
    created = _first_missing(args.data)
    with warnings.catch_warnings(record=True) as caught:  # the md5 warning is shown once and recorded
        warnings.simplefilter("always")
        try:
            data = data_mod.load_dataset(args.dataset, args.data, download=not args.no_download)
        except data_mod.DataError as error:
            if created is not None:
                _remove_if_empty(created)  # e.g. the folder torchvision made for a download that failed
            raise UsageError(str(error)) from None
    for w in caught:
        say(f"warning: {w.message}", file=sys.stderr)
    return data


def _first_missing(path: str):
    """The outermost folder of ``path`` that does not exist yet (None if it exists)."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_empty(folder: str) -> None:
    if os.path.isdir(folder) and not any(files for _, _, files in os.walk(folder)):
        shutil.rmtree(folder, ignore_errors=True)


def data_record(data, args) -> dict:
    """Where the data came from, and each way it differs from the official release."""
    deviations = []
    if args.synthetic is not None:
        deviations.append("synthetic (random images)")
    if data.differing_files:
        deviations.append(f"md5 mismatch: {', '.join(data.differing_files)}")
    if args.synthetic is None and (len(data.train_labels), len(data.test_labels)) != (50000, 10000):
        deviations.append(f"subset: {len(data.train_labels)} training and {len(data.test_labels)} test images "
                          f"(the release has 50000 and 10000)")
    return {"dataset": args.dataset, "folder": data.folder, "differing_from_release": data.differing_files, "train": len(data.train_labels),
            "test": len(data.test_labels), "official": not deviations, "deviations": deviations}


def noise_summary(noise_type: str, rate: float, record: dict) -> dict:
    """The realised rate among the classes that flip (for asymmetric noise only part
    of the classes does, so the overall rate is a fraction of --rate)."""
    counts = np.asarray(record["transition_counts"])
    off = counts.sum(axis=1) - np.diag(counts)
    flipping = np.flatnonzero(off > 0)
    total = counts[flipping].sum()
    return {"flipped_classes": flipping.tolist(),
            "rate_among_flipped_classes": float(off[flipping].sum() / total) if total else 0.0}


def _tensorboard_writer():
    """torch's SummaryWriter class; --tensorboard is optional, its package too."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _open_tensorboard(args, run_dir: str):
    return _tensorboard_writer()(os.path.join(run_dir, "tensorboard")) if args.tensorboard else None


def _run(args, rank, world, device, main_process, say) -> int:
    _check_flags(args, world)
    criterion, backend = make_criterion(args, device)
    ident = identity(args, criterion, backend, device, world)
    run_dir = os.path.join(args.out, run_name(args, ident))
    paths = {k: os.path.join(run_dir, v) for k, v in
             (("ckpt", CHECKPOINT), ("result", RESULT), ("config", CONFIG), ("metrics", METRICS))}
    state_on_disk = _check_existing(args, run_dir, paths, ident, say)
    if state_on_disk == "finished":
        say(f"{run_dir}: finished already with these settings (result.json exists); --overwrite to run again")
        return 0
    resume = state_on_disk == "resume"
    if args.tensorboard:  # fail before any work if the package is missing
        _tensorboard_writer()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

    cifar = _load_data(args, say)
    data = data_record(cifar, args)

    # Label noise: from the CIFAR-N file, or synthetic from its own seed.
    noise_seed = ident["noise_seed"]
    if args.noise == "human":
        try:
            label_file = find_human_labels(args.dataset, args.human_labels, args.data)
            noisy = load_human_labels(label_file, args.dataset, args.label_set, cifar.train_labels)
        except HumanLabelError as error:
            raise UsageError(str(error)) from None
        noise = {"type": "human", "rate": None, "label_set": args.label_set, "file": os.path.abspath(label_file),
                 "labels_md5": ident["human_labels_md5"]}
    else:
        noisy = make_noisy_labels(cifar.train_labels, args.noise, args.rate, noise_seed, cifar.num_classes,
                                  recipe=args.noise_recipe)
        noise = {"type": args.noise, "rate": args.rate, "recipe": args.noise_recipe if args.noise == "asym" else None,
                 "seed": noise_seed}
    noise.update(noise_record(cifar.train_labels, noisy, cifar.num_classes))
    noise.update(noise_summary(args.noise, args.rate, noise))
    if args.noise == "asym" and args.rate > 0.5:
        say(f"warning: --rate {args.rate:g} > 0.5 under asymmetric noise: in each flipped class the wrong label is "
            f"then more frequent than the true one, so the pair's labels swap meaning", file=sys.stderr)

    # Model, optimiser, schedule, scaler.
    reg = engine.regularisation(args, criterion.spec)
    _seed_everything(args.seed)
    model = build_model(args.model, cifar.num_classes).to(device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    train_model = torch.compile(model) if args.compile else model
    # Every process evaluates the whole test set on its plain (not DDP) model.
    eval_model = torch.compile(engine.unwrap(model)) if args.compile else engine.unwrap(model)
    optimizer = engine.make_optimizer(model, args.lr, args.momentum, reg["weight_decay"])
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

    stored = _read_json(paths["config"]) if resume else None
    if resume:
        changed = differences({k: stored.get("data", {}).get(k) for k in ("train", "test", "differing_from_release")},
                              {k: data[k] for k in ("train", "test", "differing_from_release")}, "data.")
        if changed:
            raise UsageError(f"--resume: the data differ from the run's ({'; '.join(changed)})")

    start_epoch, history = 1, []
    if resume:
        state = engine.load_checkpoint(paths["ckpt"], model=model, optimizer=optimizer, scheduler=scheduler,
                                       scaler=scaler)
        start_epoch = state["epoch"] + 1
        history = _read_metrics(paths["metrics"], state["epoch"])
        say(f"{run_dir}: resuming after epoch {state['epoch']}")

    started = provenance.record()
    config = {"identity": ident, "run_id": run_hash(ident), "args": vars(args), "run_dir": run_dir,
              "backend": backend, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
              "world_size": world, "loss_spec": engine.spec_record(criterion), **reg,
              "loss_in_amp_dtype": engine.loss_takes_amp_dtype(criterion, device),
              "data": data, "noise": noise, "versions": _versions(),
              # The first start's provenance stays; each resume adds its own.
              "provenance": stored["provenance"] if stored and "provenance" in stored else started,
              "resumed": (stored.get("resumed", []) + [dict(started, after_epoch=start_epoch - 1)]) if stored else []}
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
    if args.noise == "human":
        noise_text = f"human noise {args.label_set} (realised {noise['realised_rate']:.4f})"
    elif args.noise == "asym":
        noise_text = (f"asym noise rate {args.rate} (realised {noise['realised_rate']:.4f} overall, "
                      f"{noise['rate_among_flipped_classes']:.4f} among the {len(noise['flipped_classes'])} flipped "
                      f"classes)")
    else:
        noise_text = f"{args.noise} noise rate {args.rate} (realised {noise['realised_rate']:.4f})"
    say(f"{run_dir}: {args.dataset} {args.model} {criterion.spec.name} on {noise_text}, "
        f"backend {backend}, amp {args.amp}, device {device}" + (f" x{world}" if world > 1 else ""))
    if not data["official"]:
        say(f"note: not the official data ({'; '.join(data['deviations'])}): the report marks these results")

    board = _open_tensorboard(args, run_dir) if main_process else None
    loop = dict(start_epoch=start_epoch, done=start_epoch - 1, history=history, train_loader=train_loader,
                test_loader=test_loader, train_model=train_model, eval_model=eval_model, model=model,
                criterion=criterion, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                paths=paths, main_process=main_process, say=say, board=board, l1=reg["l1"])
    try:
        epoch = _train_epochs(args, loop)
    except KeyboardInterrupt:
        say(f"interrupted after epoch {loop['done']}; `--resume` continues", flush=True)
        return 130
    finally:
        if board is not None:
            board.close()
    if epoch < args.epochs:  # --stop-after
        return 0

    if main_process:
        last = history[-1]
        result = {"status": "finished", "identity": ident, "run_id": config["run_id"],
                  **{k: config[k] for k in ("run_dir", "backend", "device", "device_name", "world_size", "loss_spec",
                                            "noise", "data", "weight_decay", "l1")},
                  "loss": criterion.spec.name, "model": args.model, "seed": args.seed, "amp": args.amp,
                  "epochs": args.epochs, "final": {k: last[k] for k in ("test_acc", "noisy_acc", "clean_acc",
                                                                        "train_loss", "test_loss")},
                  "best_test_acc": max(r["test_acc"] for r in history),
                  "timing": engine.timing_summary([r["epoch_time_s"] for r in history],
                                                  [r["eval_time_s"] for r in history]),
                  "versions": config["versions"],
                  "provenance": dict(config["provenance"], finished_at=provenance.now(),
                                     load_average_end=provenance.load_average()),
                  "resumed": config["resumed"]}
        engine.atomic_write_json(paths["result"], result)
        say(f"{run_dir}: test accuracy {last['test_acc']:.2f} after {args.epochs} epochs; "
            f"first epoch {result['timing']['first_epoch_s']:.2f}s, median of the rest "
            + (f"{result['timing']['median_epoch_s']:.2f}s" if result["timing"]["median_epoch_s"] else "n/a"))
    return 0


def _train_epochs(args, s: dict) -> int:
    """The epoch loop; appends to s["history"], keeps s["done"] (the last epoch
    checkpointed) for the interrupt message; returns the last epoch done."""
    device, say, history = s["device"], s["say"], s["history"]
    stopwatch = engine.Stopwatch(device)
    tty = s["main_process"] and sys.stdout.isatty()
    epoch = s["start_epoch"] - 1
    for epoch in range(s["start_epoch"], args.epochs + 1):
        s["train_loader"].set_epoch(epoch)
        lr = s["optimizer"].param_groups[0]["lr"]
        bar = None
        if tty:
            from tqdm import tqdm
            bar = tqdm(total=len(s["train_loader"]), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                       dynamic_ncols=True)
        try:
            stopwatch.start()
            metrics = engine.train_one_epoch(s["train_model"], s["train_loader"], s["criterion"], s["optimizer"],
                                             device=device, amp=args.amp, scaler=s["scaler"], clip_grad=args.clip_grad,
                                             l1=s["l1"], on_step=bar.update if bar else None)
            epoch_time = stopwatch.stop()
        finally:
            if bar:
                bar.close()
        stopwatch.start()
        test = engine.evaluate(s["eval_model"], s["test_loader"], device=device, amp=args.amp)
        eval_time = stopwatch.stop()
        s["scheduler"].step()
        row = {"epoch": epoch, "lr": lr, "train_loss": metrics["train_loss"], "noisy_acc": metrics["noisy_acc"],
               "clean_acc": metrics["clean_acc"], "test_acc": test["test_acc"], "test_loss": test["test_loss"],
               "epoch_time_s": epoch_time, "eval_time_s": eval_time, "train_samples": metrics["samples"]}
        if s["main_process"]:
            # Checkpoint first: a log line never refers to an epoch the checkpoint lacks.
            engine.save_checkpoint(s["paths"]["ckpt"], model=s["model"], optimizer=s["optimizer"],
                                   scheduler=s["scheduler"], scaler=s["scaler"], epoch=epoch)
            s["done"] = epoch
            with open(s["paths"]["metrics"], "a") as f:
                f.write(json.dumps(row) + "\n")
            if s["board"] is not None:
                for key in ("train_loss", "noisy_acc", "clean_acc", "test_acc", "test_loss", "lr", "epoch_time_s"):
                    s["board"].add_scalar(key, row[key], epoch)
        else:
            s["done"] = epoch
        history.append(row)
        say(f"epoch {epoch}/{args.epochs}  lr {lr:.5f}  loss {row['train_loss']:.4f}  "
            f"noisy-acc {row['noisy_acc']:.2f}  clean-acc {row['clean_acc']:.2f}  test-acc {row['test_acc']:.2f}  "
            f"time {epoch_time:.2f}s  eval {eval_time:.2f}s", flush=True)
        if args.stop_after is not None and epoch >= args.stop_after and epoch < args.epochs:
            say(f"stopped after epoch {epoch} (--stop-after); continue with --resume")
            return epoch
    return epoch


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
    except KeyboardInterrupt:  # before the first epoch began (the epoch loop reports its own)
        print("interrupted before training began; nothing to resume", file=sys.stderr)
        return 130
