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

and the later terms, each as its paper's official code computes it:

    ece     -log max(p'_y, 1e-8),  p' = (p + m onehot(argmax p)) / (m + 1)    (eps-softmax ECELoss)
    taylor  sum_{j=1..t} (1 - p_y)^j / j                                      (Feng et al. 2020)
    agce    ((a + 1)^q - (a + p_y)^q) / q                                     (ALFs AGCELoss)
    aul     ((a - p_y)^q - (a - 1)^q) / q                                     (ALFs AUELoss)
    ael     exp(-p_y / a)                                                     (ALFs AExpLoss)
    nnce    1 - (A + log c_y) / sum_k (A + log c_k),
            c = clamp(p, min_prob, 1), A = -log min_prob                      (ANL NormalizedNegativeCrossEntropy)
    nnfl    1 - (A - f_y) / (K A - sum_k f_k),  f_k = -(1 - c_k)^gamma log c_k,
            log c = max(log p, log min_prob), A = -(1 - min_prob)^gamma log min_prob
                                                                              (ANL NormalizedNegativeFocalLoss)
    amse    (1/K) sum_k (p_k - a [k = y])^2                                   (JAL AMSELoss)

loss = alpha * active + beta * passive.

Gradients are autograd's, with the official detaches: the focal factors
(1 - p)^gamma of fl, nfl and nnfl are constants in grad="official".  Where the
official gradient is a subgradient, it is the one autograd gives:
- clamps (gce, ngce, rce, nrce, nnce, nnfl, ece) pass the gradient where the
  value is inside the clamp's range, ends included, and 0 outside;
- ece's argmax is an index, so it carries no gradient; ties go to the first
  index, as torch.argmax does (the kernels decide the argmax on the logits,
  which agrees whenever the tied probabilities come from equal logits).
"""
from __future__ import annotations

import math

import torch

from .spec import ECE_EPS, P_MIN, LossSpec


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


def _at_label(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return values.gather(1, target[:, None]).squeeze(1)


def _active(spec: LossSpec, log_p, p, log_p_y, p_y, target, K: int):
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
    if spec.active == "ece":
        # The argmax is an index (first of ties, as torch.argmax): the m added there carries no gradient.
        at_argmax = _one_hot(p.argmax(dim=1), K, p.dtype)
        eps_softmax = (p + spec.m * at_argmax) / (spec.m + 1)
        return -_at_label(eps_softmax.clamp(min=ECE_EPS).log(), target)
    if spec.active == "taylor":
        one_minus_p_y = 1 - p_y
        return sum(one_minus_p_y ** j / j for j in range(1, spec.t + 1))
    raise AssertionError(spec.active)


def _passive(spec: LossSpec, log_p, p, p_y, one_hot, target, K: int):
    if spec.passive == "none":
        return None
    if spec.passive == "agce":
        return ((spec.a + 1) ** spec.q - (spec.a + p_y) ** spec.q) / spec.q
    if spec.passive == "aul":
        return ((spec.a - p_y) ** spec.q - (spec.a - 1) ** spec.q) / spec.q
    if spec.passive == "ael":
        return torch.exp(-p_y / spec.a)
    if spec.passive == "amse":
        return ((p - spec.a * one_hot) ** 2).sum(dim=1) / K
    if spec.passive == "nnce":
        shifted = -math.log(spec.min_prob) + p.clamp(min=spec.min_prob, max=1.0).log()
        return 1 - _at_label(shifted, target) / shifted.sum(dim=1)
    if spec.passive == "nnfl":
        log_min = math.log(spec.min_prob)
        A = -(1 - spec.min_prob) ** spec.gamma * log_min
        clamped_log_p = log_p.clamp(min=log_min)
        focal = -_focal_weight(clamped_log_p, spec.gamma, spec.grad) * clamped_log_p
        return 1 - (A - _at_label(focal, target)) / (K * A - focal.sum(dim=1))
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


def _one_hot(index: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    # A comparison, not F.one_hot, whose range check reads values (vmap cannot);
    # gather below still rejects a label outside [0, K).
    return (index[:, None] == torch.arange(K, device=index.device)).to(dtype)


def reference_loss_rows(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-row loss of 2-D logits [N, K] with labels [N] in [0, K)."""
    K = logits.shape[1]
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    one_hot = _one_hot(target, K, z.dtype)
    log_p_y = log_p.gather(1, target[:, None]).squeeze(1)
    p_y = p.gather(1, target[:, None]).squeeze(1)
    active = _active(spec, log_p, p, log_p_y, p_y, target, K)
    passive = _passive(spec, log_p, p, p_y, one_hot, target, K)
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
