"""apl_kernels: fused kernels for noise-robust classification losses.

Normalized losses (NCE, NFL, NGCE) and Active-Passive Losses (e.g. NCE+RCE,
NFL+MAE) of Ma et al. (ICML 2020), with the softmax fused into one pass, in C++
for the CPU, CUDA C++ and Triton.
"""
from .functional import apl_loss, fused_loss
from .module import APLLoss
from .spec import LossSpec
from .build import build_info

__all__ = ["apl_loss", "fused_loss", "APLLoss", "LossSpec", "build_info"]
__version__ = "0.1.0"
