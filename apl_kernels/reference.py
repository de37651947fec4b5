"""The oracle: every loss of the contract in plain eager PyTorch.

Written straight from the formulas, gradients from autograd, nothing shared with
the kernels.  It is slow on purpose: every test compares against it.

For logits z (one row, K classes), label y, p = softmax(z), log p = log_softmax(z),
clamp(p) = min(max(p, P_MIN), 1):

    ce    -log p_y
    fl    -(1-p_y)^gamma log p_y
    nce   (-log p_y) / (-sum_k log p_k)
    nfl   [-(1-p_y)^gamma log p_y] / [sum_k -(1-p_k)^gamma log p_k]
    gce   (1 - clamp(p_y)^q) / q
    ngce  (1 - clamp(p_y)^q) / (K - sum_k clamp(p_k)^q)
    mae   1 - p_y
    rce   -A sum_{k != y} clamp(p_k)
    nmae  (1 - p_y) / (K - 1)
    nrce  sum_{k != y} clamp(p_k) / (K - 1)

loss = alpha * active + beta * passive.
"""
from __future__ import annotations

import torch

from .spec import P_MIN, LossSpec


def _focal_weight(log_p: torch.Tensor, gamma: float, grad: str) -> torch.Tensor:
    """(1 - p)^gamma; a constant in the official gradient mode."""
    one_minus_p = -torch.expm1(log_p)
    if grad == "official":
        return one_minus_p.detach() ** gamma
    # Exact mode: the derivative of (1-p)^gamma is infinite at p = 1, but it is
    # multiplied by log p = 0 there and the true limit of the product is 0.  The
    # double `where` keeps autograd away from the singular point.
    positive = one_minus_p > 0
    safe = torch.where(positive, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(positive, safe ** gamma, torch.zeros_like(one_minus_p))


def _active(spec: LossSpec, log_p, p, log_p_y, p_y, K: int):
    if spec.active == "none":
        return None
    if spec.active == "ce":
        return -log_p_y
    if spec.active == "nce":
        return -log_p_y / -log_p.sum(dim=1)
    if spec.active in ("fl", "nfl"):
        focal_y = -_focal_weight(log_p_y, spec.gamma, spec.grad) * log_p_y
        if spec.active == "fl":
            return focal_y
        return focal_y / (-_focal_weight(log_p, spec.gamma, spec.grad) * log_p).sum(dim=1)
    clamped_y = p_y.clamp(min=P_MIN, max=1.0)
    if spec.active == "gce":
        return (1 - clamped_y ** spec.q) / spec.q
    if spec.active == "ngce":
        return (1 - clamped_y ** spec.q) / (K - (p.clamp(min=P_MIN, max=1.0) ** spec.q).sum(dim=1))
    raise AssertionError(spec.active)


def _passive(spec: LossSpec, p, p_y, one_hot, K: int):
    if spec.passive == "none":
        return None
    if spec.passive == "mae":
        return 1 - p_y
    if spec.passive == "nmae":
        return (1 - p_y) / (K - 1)
    others = (p.clamp(min=P_MIN, max=1.0) * (1 - one_hot)).sum(dim=1)
    if spec.passive == "rce":
        return -spec.A * others
    if spec.passive == "nrce":
        return others / (K - 1)
    raise AssertionError(spec.passive)


def reference_loss_rows(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-row loss of 2-D logits [N, K] with labels [N] in [0, K)."""
    K = logits.shape[1]
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    one_hot = torch.nn.functional.one_hot(target, K).to(z.dtype)
    log_p_y = log_p.gather(1, target[:, None]).squeeze(1)
    p_y = p.gather(1, target[:, None]).squeeze(1)
    active = _active(spec, log_p, p, log_p_y, p_y, K)
    passive = _passive(spec, p, p_y, one_hot, K)
    loss = 0
    if active is not None:
        loss = loss + spec.alpha * active
    if passive is not None:
        loss = loss + spec.beta * passive
    return loss


def reference_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec,
                   reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """The full contract: logits [B, K] or [B, K, d1, ...] as in ``cross_entropy``."""
    K = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, K)
    flat_target = target.reshape(-1)
    kept = flat_target != ignore_index
    # Ignored rows are computed with a dummy label 0 and then masked out with
    # `where`, which passes them zero loss and zero gradient.
    safe_target = torch.where(kept, flat_target, torch.zeros_like(flat_target))
    per_row = reference_loss_rows(rows, safe_target, spec)
    per_row = torch.where(kept, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(target.shape)
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / kept.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")
