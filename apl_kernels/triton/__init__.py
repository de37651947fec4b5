"""The Triton backend: fused softmax + robust loss kernels (forward and gradient).

``loss_math`` holds the loss math as jit helpers, ``kernels`` the kernels and
launch heuristics, ``op`` the torch.library ops.  Importing this package does
not import triton; ``apl_kernels.backends`` loads ``op`` on first use.
"""
