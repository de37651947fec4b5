"""``APLLoss``: the nn.Module face of ``apl_loss``, used like ``nn.CrossEntropyLoss``."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .functional import fused_loss, validate_check_targets
from .spec import REDUCTIONS, LossSpec


class APLLoss(torch.nn.Module):
    """Active-passive loss module.

    >>> criterion = APLLoss("nce+rce", alpha=1.0, beta=1.0)
    >>> loss = criterion(model(x), y)

    Takes the same options as ``apl_kernels.apl_loss``.
    """

    def __init__(self, loss: str = "nce+rce", *, alpha: Optional[float] = None, beta: Optional[float] = None,
                 gamma: Optional[float] = None, q: Optional[float] = None, A: Optional[float] = None,
                 reduction: str = "mean", ignore_index: int = -100, grad: Optional[str] = None,
                 backend: str = "auto", check_targets: Union[bool, str] = True, overwrite_logits: bool = False,
                 a: Optional[float] = None, m: Optional[float] = None, t: Optional[int] = None,
                 min_prob: Optional[float] = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")
        self.spec = LossSpec.from_name(loss, alpha=alpha, beta=beta, gamma=gamma, q=q, A=A, grad=grad, a=a, m=m, t=t,
                                       min_prob=min_prob)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        validate_check_targets(check_targets)
        self.check_targets = check_targets
        self.overwrite_logits = overwrite_logits  # Triton only: the gradient replaces the logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_loss(logits, target, self.spec, reduction=self.reduction, ignore_index=self.ignore_index,
                          backend=self.backend, check_targets=self.check_targets,
                          overwrite_logits=self.overwrite_logits)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.name!r}, alpha={s.alpha}, beta={s.beta}, gamma={s.gamma}, q={s.q}, A={s.A:.4g}, "
                f"a={s.a}, m={s.m}, t={s.t}, min_prob={s.min_prob}, "
                f"grad={s.grad!r}, reduction={self.reduction!r}, backend={self.backend!r}")
