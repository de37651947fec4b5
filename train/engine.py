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

def official_settings(loss: str, noise_type: str) -> dict:
    """The official CIFAR-10 configs' parameters for a loss (``LossSpec`` fields).

    fl, nfl: gamma 0.5.  gce: q 0.7; ngce and its pairs: q 0.1.  Pairs:
    alpha = beta = 1.  nfl alone: scale (alpha) 10 under symmetric noise, 1 under
    asymmetric.  sce = ce+rce: alpha 0.1, beta 1.  Other single terms: scale 1.
    """
    if noise_type not in ("sym", "asym"):
        raise ValueError(f"noise type must be 'sym' or 'asym', got {noise_type!r}")
    spec = apl_kernels.LossSpec.from_name(loss)
    settings = {"alpha": 1.0, "beta": 1.0}
    if spec.active in ("fl", "nfl"):
        settings["gamma"] = 0.5
    if spec.active == "gce":
        settings["q"] = 0.7
    if spec.active == "ngce":
        settings["q"] = 0.1
    if spec.name == "nfl":
        settings["alpha"] = 10.0 if noise_type == "sym" else 1.0
    if spec.name == "ce+rce":
        settings["alpha"] = 0.1
    return settings


def make_criterion(loss: str, noise_type: str, backend: str = "auto", **overrides) -> apl_kernels.APLLoss:
    """``APLLoss`` for ``loss`` ("nce+rce", "sce", ...) with the official settings
    for ``noise_type`` ("sym"/"asym"); ``overrides`` (alpha, beta, gamma, q, A,
    grad) replace them, None meaning "keep".  Targets are not range-checked per
    call (that would sync the host on a GPU): labels are checked once at load.
    The resulting parameters are in ``criterion.spec``.
    """
    settings = official_settings(loss, noise_type)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return apl_kernels.APLLoss(loss, backend=backend, check_targets=False, **settings)


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
                    clip_grad: float = 5.0, loss_in_amp_dtype: Optional[bool] = None,
                    on_step: Optional[Callable[[], None]] = None) -> dict:
    """One epoch of the official recipe's step over ``loader``.

    loader yields ``(x, y)`` or ``(x, y_noisy, y_clean)``; the loss uses the
    second element.  amp: "bf16", "fp16" (needs ``scaler``) or "off".
    loss_in_amp_dtype: default ``loss_takes_amp_dtype(criterion, device)``.
    clip_grad: max gradient norm, 0 to disable.  on_step: called after each step
    (e.g. a progress bar), must not sync.
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
    # [loss sum, correct on the loss labels, correct on the clean labels, samples]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    has_clean, steps = False, 0
    for batch in loader:
        x, y = batch[0], batch[1]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = criterion(logits if loss_in_amp_dtype else logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
        else:
            loss.backward()
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
