"""The training engine: criterion, one epoch, evaluation, timing, checkpoints.

``make_criterion`` builds the loss from ``apl_kernels`` with the official
per-loss settings; ``train_one_epoch`` runs the official recipe's step (AMP,
GradScaler for fp16, gradient-norm clipping) with no host sync per step, and
reads its device-accumulated metrics once at the end; ``evaluate`` does the
same for accuracy.  ``Stopwatch`` times with CUDA events on a GPU and
``perf_counter`` on the CPU.  Checkpoints and JSON files are written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

import apl_kernels
from apl_kernels import backends

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# --------------------------------------------------------------------------- criterion

# Official per-loss settings.  Keys are canonical loss names (LossSpec.name);
# "scale" is the weight of a loss of one term (alpha for an active term, beta
# for a passive one).  Where a setting comes from:
#   Ma et al.:  HanxunH/Active-Passive-Losses configs/cifar10 and configs/cifar100/{sym,asym}/*.yaml
#   ALFs:       hitcszx/ALFs config.py (CIFAR10_CONFIG, CIFAR100_CONFIG)
#   ANL:        Virusdoll/Active-Negative-Loss config/cifar10_*.json, cifar100_*.json
#   JAL:        cswjl/joint-asymmetric-loss config.py (via ../shared/reference/official-settings.md)
#   eps-softmax: cswjl/eps-softmax config.py (per noise rate)
# Their MAE is 2(1 - p_y) in ALFs, JAL and eps-softmax; ours is 1 - p_y (as Ma
# et al.), so the beta of their "+mae" pairs is doubled here.
SETTINGS_SOURCES = {
    "ma": "Ma et al. (ICML 2020), HanxunH/Active-Passive-Losses configs/<dataset>/<noise>/*.yaml",
    "alfs": "Zhou et al. (ICML 2021), hitcszx/ALFs config.py",
    "anl": "Ye et al. (NeurIPS 2023), Virusdoll/Active-Negative-Loss config/<dataset>_anl_*.json",
    "jal": "JAL (ICCV 2025), cswjl/joint-asymmetric-loss config.py",
    "eps": "eps-softmax (NeurIPS 2024), cswjl/eps-softmax config.py (per noise rate; beta doubled: their MAE is 2(1-p_y))",
}
_CIFAR10 = {
    # Ma et al.
    "fl": ("ma", dict(gamma=0.5)), "nfl": ("ma", dict(gamma=0.5)), "gce": ("ma", dict(q=0.7)),
    "ngce": ("ma", dict(q=0.1)), "ce+rce": ("ma", dict(alpha=0.1, beta=1.0)),
    # ALFs
    "ael": ("alfs", dict(a=2.5)), "aul": ("alfs", dict(a=5.5, q=3.0)), "agce": ("alfs", dict(a=0.6, q=0.6)),
    "nce+agce": ("alfs", dict(alpha=1.0, beta=4.0, a=6.0, q=1.5)),
    "nce+aul": ("alfs", dict(alpha=1.0, beta=4.0, a=6.3, q=1.5)),
    "nce+ael": ("alfs", dict(alpha=1.0, beta=4.0, a=5.0)),
    # ANL
    "nce+nnce": ("anl", dict(alpha=5.0, beta=5.0)), "nfl+nnfl": ("anl", dict(alpha=5.0, beta=5.0, gamma=0.5)),
    "nnce": ("anl", dict(scale=5.0)),
    # JAL
    "nce+amse": ("jal", dict(alpha=1.0, beta=1.0, a=30.0)), "nfl+amse": ("jal", dict(alpha=1.0, beta=1.0, a=30.0, gamma=0.5)),
}
_CIFAR100 = {
    # Ma et al. (their CIFAR-100 yaml files; ngce+rce's file names NGCEandMAE, its alpha/beta/q are used)
    "fl": ("ma", dict(gamma=0.5)), "nfl": ("ma", dict(gamma=0.5)), "gce": ("ma", dict(q=0.7)),
    "ngce": ("ma", dict(q=0.7)), "ce+rce": ("ma", dict(alpha=6.0, beta=0.1)),
    "nce+rce": ("ma", dict(alpha=10.0, beta=0.1)), "nfl+rce": ("ma", dict(alpha=10.0, beta=0.1, gamma=0.5)),
    "nce+mae": ("ma", dict(alpha=10.0, beta=1.0)), "nfl+mae": ("ma", dict(alpha=10.0, beta=1.0, gamma=0.5)),
    "ngce+mae": ("ma", dict(alpha=10.0, beta=1.0, q=0.7)), "ngce+rce": ("ma", dict(alpha=10.0, beta=0.1, q=0.7)),
    # ALFs
    "ael": ("alfs", dict(a=2.5)), "aul": ("alfs", dict(a=5.5, q=3.0)), "agce": ("alfs", dict(a=0.6, q=0.6)),
    "nce+agce": ("alfs", dict(alpha=10.0, beta=0.1, a=1.8, q=3.0)),
    "nce+aul": ("alfs", dict(alpha=10.0, beta=0.015, a=6.0, q=3.0)),
    "nce+ael": ("alfs", dict(alpha=10.0, beta=0.1, a=1.5)),
    # ANL
    "nce+nnce": ("anl", dict(alpha=10.0, beta=1.0)), "nfl+nnfl": ("anl", dict(alpha=10.0, beta=1.0, gamma=0.5)),
    # JAL
    "nce+amse": ("jal", dict(alpha=5.0, beta=1.0, a=20.0)), "nfl+amse": ("jal", dict(alpha=5.0, beta=1.0, a=20.0, gamma=0.5)),
}
# eps-softmax: ece+mae, {(dataset, noise): (m, their beta, {rate: alpha})}; None: one alpha for every rate.
_EPS_SOFTMAX = {
    ("cifar10", "sym"): (1e5, 5.0, {None: 0.01}),
    ("cifar10", "asym"): (1e3, 5.0, {None: 0.02}),
    ("cifar100", "sym"): (1e4, 1.0, {0.0: 0.1, 0.2: 0.05, 0.4: 0.03, 0.6: 0.00125, 0.8: 0.0075}),
    ("cifar100", "asym"): (1e2, 1.0, {0.1: 0.015, 0.2: 0.007, 0.3: 0.005, 0.4: 0.004}),
}
DATASETS = ("cifar10", "cifar100")


def _eps_softmax(dataset: str, noise_type: str, rate) -> dict:
    m, beta, alphas = _EPS_SOFTMAX[(dataset, "asym" if noise_type == "asym" else "sym")]
    if None in alphas:
        alpha = alphas[None]
    else:
        near = [r for r in alphas if rate is not None and abs(r - rate) < 1e-9]
        if not near:
            raise ValueError(f"eps-softmax (ece+mae) has official settings on {dataset} {noise_type} noise only at "
                             f"rates {sorted(alphas)}; give --alpha (and --beta, --m) for rate {rate}")
        alpha = alphas[near[0]]
    return dict(alpha=alpha, beta=2 * beta, m=m)


def settings_help() -> str:
    """The official per-loss settings and their sources, for ``--help``."""
    def fmt(values):
        return ", ".join(f"{k} {v:g}" for k, v in values.items())
    lines = ["Official per-loss settings (used unless a flag overrides them; source in brackets):",
             "  every loss: alpha = beta = 1 unless listed; Ma et al.'s CIFAR-10 settings: fl/nfl gamma 0.5,",
             "  gce q 0.7, ngce and its pairs q 0.1, nfl alone scale 10 under symmetric noise, sce alpha 0.1 beta 1"]
    for dataset, table in (("CIFAR-10", _CIFAR10), ("CIFAR-100", _CIFAR100)):
        lines.append(f"  {dataset}:")
        for loss, (source, values) in table.items():
            if not (dataset == "CIFAR-10" and source == "ma"):
                lines.append(f"    {loss:<10} {fmt(values):<40} [{source}]")
    lines.append("  eps-softmax (ece+mae), by data set and noise:")
    for (dataset, noise), (m, beta, alphas) in _EPS_SOFTMAX.items():
        rates = ("alpha " + " / ".join(f"{a:g}" for a in alphas.values()) + " at rates "
                 + " / ".join(f"{r:g}" for r in alphas)) if None not in alphas else f"alpha {alphas[None]:g}"
        lines.append(f"    {dataset} {noise}: {rates}, beta {2 * beta:g}, m {m:g} [eps]")
    lines.append("  weight decay: L2 1e-4 (CIFAR-100 1e-5), except losses with amse/nnce/nnfl: no L2 and\n"
                 "  --l1 5e-5 (CIFAR-100: amse 5e-6, nnce/nnfl 5e-7) [anl, jal]")
    lines.append("  human noise (CIFAR-N): the symmetric-noise settings (no official ones exist)")
    lines.append("Sources:")
    lines += [f"  [{k}] {v}" for k, v in SETTINGS_SOURCES.items()]
    return "\n".join(lines)


def official_settings(loss: str, noise_type: str, dataset: str = "cifar10", rate=None) -> dict:
    """The official configs' parameters for a loss (``LossSpec`` fields), with "source".

    Ma et al.'s losses on CIFAR-10: fl, nfl gamma 0.5; gce q 0.7; ngce and its
    pairs q 0.1; pairs alpha = beta = 1; nfl alone scaled by 10 under symmetric
    noise; sce = ce+rce alpha 0.1, beta 1.  On CIFAR-100 their yaml files give
    alpha 10 (beta 0.1 with rce, 1 with mae), sce alpha 6 beta 0.1, ngce q 0.7.
    The later losses: see the tables above and ``SETTINGS_SOURCES``.
    Other single terms: scale 1.  noise_type "human" (CIFAR-N) takes the
    symmetric settings.
    """
    if noise_type not in ("sym", "asym", "human"):
        raise ValueError(f"noise type must be 'sym', 'asym' or 'human', got {noise_type!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    spec = apl_kernels.LossSpec.from_name(loss)
    settings = {"alpha": 1.0, "beta": 1.0, "source": "ma"}
    if spec.active in ("fl", "nfl"):
        settings["gamma"] = 0.5
    if spec.active == "gce":
        settings["q"] = 0.7
    if spec.active == "ngce":  # ngce pairs share ngce's q
        settings["q"] = 0.1 if dataset == "cifar10" else 0.7
    if spec.name == "ece+mae":
        settings.update(_eps_softmax(dataset, noise_type, rate), source="eps")
    else:
        table = _CIFAR10 if dataset == "cifar10" else _CIFAR100
        source, values = table.get(spec.name, ("ma", {}))
        settings.update(values, source=source)
    if spec.name == "nfl" and dataset == "cifar10" and noise_type != "asym":
        settings["alpha"] = 10.0
    scale = settings.pop("scale", None)
    if scale is not None:
        settings["alpha" if spec.active != "none" else "beta"] = scale
    return settings


def make_criterion(loss: str, noise_type: str, backend: str = "auto", *, dataset: str = "cifar10", rate=None,
                   **overrides) -> apl_kernels.APLLoss:
    """``APLLoss`` for ``loss`` ("nce+rce", "sce", ...) with the official settings
    for ``noise_type`` ("sym"/"asym"), ``dataset`` and (eps-softmax only) the
    noise ``rate``; ``overrides`` (alpha, beta, gamma, q, A, grad, ...) replace
    them, None meaning "keep".  Targets are not range-checked per call (that
    would sync the host on a GPU): labels are checked once at load.  The
    resulting parameters are in ``criterion.spec``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = official_settings(loss, noise_type, dataset, rate)
    except ValueError:
        if not given:
            raise
        settings = {}  # eps-softmax at an unlisted rate with its parameters given
    settings.pop("source", None)
    settings.update(given)
    return apl_kernels.APLLoss(loss, backend=backend, check_targets=False, **settings)


# Losses whose papers replace L2 weight decay by an L1 penalty (ANL, JAL):
# {dataset: {term: delta}}; the other losses keep L2.
_L1_TERMS = {"cifar10": {"amse": 5e-5, "nnce": 5e-5, "nnfl": 5e-5},
             "cifar100": {"amse": 5e-6, "nnce": 5e-7, "nnfl": 5e-7}}
_L2 = {"cifar10": 1e-4, "cifar100": 1e-5}


def official_regularisation(spec, dataset: str = "cifar10") -> dict:
    """{"weight_decay", "l1"}: L1 and no L2 for losses with amse, nnce or nnfl (ANL, JAL), else L2."""
    deltas = [d for term, d in _L1_TERMS[dataset].items() if term in (spec.active, spec.passive)]
    if deltas:
        return {"weight_decay": 0.0, "l1": deltas[0]}
    return {"weight_decay": _L2[dataset], "l1": 0.0}


def regularisation(args, spec) -> dict:
    """The run's weight decay and L1: the flags, else the official values."""
    official = official_regularisation(spec, getattr(args, "dataset", "cifar10"))
    return {k: float(getattr(args, k, None) if getattr(args, k, None) is not None else official[k])
            for k in ("weight_decay", "l1")}


def loss_takes_amp_dtype(criterion: apl_kernels.APLLoss, device) -> bool:
    """True when the resolved backend is fused and accumulates in fp32 itself, so
    it gets the AMP-dtype logits; the reference gets fp32 logits."""
    return backends.resolve(criterion.backend, torch.device(device)) != "reference"


# --------------------------------------------------------------------------- one epoch

def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def train_one_epoch(model: nn.Module, loader, criterion: Callable, optimizer: torch.optim.Optimizer, *,
                    device, amp: str = "bf16", scaler: Optional[torch.amp.GradScaler] = None,
                    clip_grad: float = 5.0, loss_in_amp_dtype: Optional[bool] = None, l1: float = 0.0,
                    on_step: Optional[Callable[[], None]] = None) -> dict:
    """One epoch of the official recipe's step over ``loader``.

    loader yields ``(x, y)`` or ``(x, y_noisy, y_clean)``; the loss uses the
    second element.  amp: "bf16", "fp16" (needs ``scaler``) or "off".
    loss_in_amp_dtype: default ``loss_takes_amp_dtype(criterion, device)``.
    clip_grad: max gradient norm, 0 to disable.  l1: the L1 penalty
    l1 * sum|theta| over every parameter, added to the loss before the backward
    (as ANL and JAL do); "train_loss" reports the loss without it.
    on_step: called after each step (e.g. a progress bar), must not sync.
    Under torch.distributed the sums are all-reduced.

    Returns {"train_loss", "noisy_acc", "clean_acc" (None without clean
    labels), "samples", "steps"}, accuracies in percent, read from the device
    once.
    """
    device = torch.device(device)
    dtype = AMP_DTYPES[amp]
    if dtype is torch.float16 and scaler is None:
        raise ValueError("amp='fp16' needs a GradScaler")
    if loss_in_amp_dtype is None:
        loss_in_amp_dtype = loss_takes_amp_dtype(criterion, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # [loss sum, correct on the loss labels, correct on the clean labels, samples]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    has_clean, steps = False, 0
    for batch in loader:
        x, y = batch[0], batch[1]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = criterion(logits if loss_in_amp_dtype else logits.float(), y)
        objective = loss + l1 * sum(p.abs().sum() for p in params) if l1 else loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
        else:
            objective.backward()
        if clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            pred = logits.argmax(dim=1)
            sums[0] += loss.detach().double() * len(y)
            sums[1] += (pred == y).sum()
            if len(batch) > 2:
                has_clean = True
                sums[2] += (pred == batch[2]).sum()
            sums[3] += len(y)
        steps += 1
        if on_step is not None:
            on_step()
    loss_sum, noisy, clean, n = _all_reduce_sum(sums).tolist()  # the one host sync
    n = max(n, 1)
    return {"train_loss": loss_sum / n, "noisy_acc": 100 * noisy / n,
            "clean_acc": 100 * clean / n if has_clean else None, "samples": int(n), "steps": steps}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device, amp: str = "bf16") -> dict:
    """Accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    device = torch.device(device)
    dtype = AMP_DTYPES[amp]
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in loader:
        x, y = batch[0], batch[1]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        sums[0] += (logits.argmax(dim=1) == y).sum()
        sums[1] += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        sums[2] += len(y)
    correct, loss, n = sums.tolist()
    n = max(n, 1)
    return {"test_acc": 100 * correct / n, "test_loss": loss / n}


def make_optimizer(model: nn.Module, lr: float = 0.01, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.SGD:
    """The official SGD.  On CUDA the fused implementation: with a GradScaler its
    found-inf check then stays on the device instead of syncing the host every
    step.  Not on the CPU: there (torch 2.14) fused SGD still applies a step whose
    gradients overflowed, and the weights turn NaN under fp16."""
    kwargs = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if next(model.parameters()).device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.SGD(model.parameters(), **kwargs)


# --------------------------------------------------------------------------- timing

class Stopwatch:
    """Seconds between ``start()`` and ``stop()``: CUDA events on a GPU (the
    stop waits for the recorded work), ``perf_counter`` on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._begin.elapsed_time(self._end) / 1000.0
        return time.perf_counter() - self._t0


def timing_summary(epoch_times, eval_times) -> dict:
    """The first epoch (compile, autotune, warm-up) apart from the median of the rest."""
    rest = epoch_times[1:]
    return {
        "first_epoch_s": epoch_times[0] if epoch_times else None,
        "median_epoch_s": float(np.median(rest)) if rest else None,
        "median_eval_s": float(np.median(eval_times[1:] or eval_times)) if eval_times else None,
        "total_train_s": float(sum(epoch_times)),
        "total_eval_s": float(sum(eval_times)),
        "epochs_timed": len(epoch_times),
    }


# --------------------------------------------------------------------------- state on disk

def atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: str, *, model, optimizer, scheduler, scaler, epoch: int, **extra) -> None:
    """Everything a bit-exact resume needs, written to a temporary file and renamed."""
    state = {"epoch": epoch, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "rng": rng_states(), **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns the checkpoint (its "epoch" is the last one done)."""
    # Our own file (RNG states inside, hence not weights_only).  Loaded on the CPU:
    # the RNG states must stay there; load_state_dict moves the rest to the model.
    state = torch.load(path, map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return state


def spec_record(criterion: apl_kernels.APLLoss) -> dict:
    return {"name": criterion.spec.name, **dataclasses.asdict(criterion.spec)}
