"""CIFAR-10 noisy-label experiments for the losses of ``apl_kernels``.

    python -m train --loss nce+rce --noise sym --rate 0.4     # one run
    python -m train.sweep                                     # the paper's grids
    python -m train.report runs/                              # tables and plots

Modules, in reading order: ``data`` (CIFAR-10 reader, device-resident loader),
``noise`` (label noise), ``models`` (cnn8, resnet18), ``engine`` (criterion,
train step and epoch, evaluation, timing, checkpoints), ``cli`` (one run),
``sweep``, ``report``, ``paper_results`` (the published numbers).
Importing any of them has no side effects.
"""
