"""Published CIFAR-10 and CIFAR-100 test accuracies of Ma et al. (ICML 2020).

Last-epoch means over 3 runs, from the official results notebook.  Keys are the
loss names of ``apl_kernels`` ("sce" is ce+rce with alpha 0.1, beta 1).
"""

SYM_RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
ASYM_RATES = (0.1, 0.2, 0.3, 0.4)

SYMMETRIC = {
    "ce":      (90.36, 75.90, 60.28, 40.90, 19.65),
    "fl":      (89.63, 74.59, 57.55, 38.91, 19.43),
    "nce":     (75.40, 73.38, 69.90, 63.36, 44.22),
    "nfl":     (73.42, 71.38, 67.70, 60.49, 39.34),
    "mae":     (88.75, 86.79, 84.41, 78.22, 50.42),
    "rce":     (88.05, 85.69, 86.09, 77.38, 45.04),
    "nce+mae": (88.83, 87.12, 84.19, 77.61, 49.62),
    "nce+rce": (90.76, 89.22, 86.02, 79.78, 52.71),
    "nfl+mae": (89.25, 87.33, 83.81, 76.36, 45.23),
    "nfl+rce": (90.91, 89.14, 86.05, 79.78, 55.06),
    "gce":     (89.38, 87.37, 83.33, 72.00, 29.08),
    "sce":     (91.30, 88.05, 82.06, 66.08, 30.69),
}

ASYMMETRIC = {
    "ce":      (87.38, 83.62, 79.38, 75.00),
    "fl":      (86.35, 82.97, 79.48, 74.60),
    "mae":     (88.19, 74.20, 65.99, 55.53),
    "nce+mae": (88.25, 86.44, 83.98, 78.23),
    "nce+rce": (89.95, 88.56, 85.58, 79.59),
    "nfl+mae": (88.46, 86.81, 83.91, 77.16),
    "nfl+rce": (90.20, 88.73, 85.74, 79.27),
    "gce":     (88.42, 86.07, 80.78, 74.98),
    "sce":     (88.13, 83.92, 79.70, 78.20),
}

# CIFAR-100 (ResNet-34, 200 epochs), transcribed from the "CIFAR-100 Test Acc
# Table" cell of plot_results.ipynb in github.com/HanxunH/Active-Passive-Losses
# (commit 89fa39a), the source of the CIFAR-10 numbers above.  Not checked here
# against the paper's PDF.  The losses are those of the CIFAR-10 tables: the
# notebook has more, and its asymmetric rows for nce, nfl, mae and rce exist only
# at rate 0.1.  Its per-loss settings differ from CIFAR-10's (e.g. nce+rce alpha
# 10, beta 0.1 under symmetric noise; see the notebook's notes).
CIFAR100_SYMMETRIC = {
    "ce":      (70.89, 56.99, 41.40, 22.15, 7.58),
    "fl":      (70.61, 56.10, 40.77, 22.14, 7.21),
    "nce":     (28.66, 24.24, 19.15, 13.98, 8.27),
    "nfl":     (28.93, 24.09, 18.94, 13.60, 7.94),
    "mae":     (11.20, 8.76, 7.64, 6.08, 2.22),
    "rce":     (11.52, 10.37, 8.11, 5.45, 2.43),
    "nce+mae": (68.75, 65.25, 59.22, 48.06, 25.50),
    "nce+rce": (69.02, 65.31, 59.48, 47.12, 25.80),
    "nfl+mae": (67.98, 63.58, 58.18, 46.10, 24.78),
    "nfl+rce": (68.23, 64.52, 58.20, 46.30, 25.16),
    "gce":     (69.00, 65.28, 58.94, 45.18, 16.18),
    "sce":     (70.38, 55.39, 39.99, 22.35, 7.57),
}

CIFAR100_ASYMMETRIC = {
    "ce":      (65.42, 58.45, 51.09, 41.68),
    "fl":      (64.79, 58.59, 51.26, 42.15),
    "nce+mae": (65.71, 62.38, 58.02, 47.22),
    "nce+rce": (65.68, 62.68, 57.82, 46.79),
    "nfl+mae": (66.06, 63.10, 56.19, 43.51),
    "nfl+rce": (66.13, 63.12, 54.72, 42.97),
    "gce":     (61.98, 59.99, 53.99, 41.49),
    "sce":     (64.15, 58.22, 49.85, 42.19),
}

TABLES = {"sym": (SYM_RATES, SYMMETRIC), "asym": (ASYM_RATES, ASYMMETRIC)}
DATASET_TABLES = {
    "cifar10": TABLES,
    "cifar100": {"sym": (SYM_RATES, CIFAR100_SYMMETRIC), "asym": (ASYM_RATES, CIFAR100_ASYMMETRIC)},
}


def paper_accuracy(noise: str, loss: str, rate: float, dataset: str = "cifar10"):
    """The published accuracy (percent), or None where the paper has none."""
    rates, table = DATASET_TABLES.get(dataset, {}).get(noise, ((), {}))
    for i, r in enumerate(rates):
        if abs(r - rate) < 1e-9 and loss in table:
            return table[loss][i]
    return None


# --------------------------------------------------------------------------- sweep presets (issue 14)
#
# A later paper's CIFAR-10 grid for ``python -m train.sweep --preset NAME``:
# its losses (each runs with its official settings, train.engine) and rates.
# The loss lists are those of each paper's released CIFAR-10 experiments:
# ALFs: every key of CIFAR10_CONFIG in hitcszx/ALFs config.py; ANL: the
# config/cifar10_*.json files of Virusdoll/Active-Negative-Loss; JAL: the
# losses its config.py gathers (ALFs, ANL and JAL under one protocol);
# eps-softmax: CE_eps+MAE beside CE and the strongest earlier pairs.
STANDARD_RATES = {"sym": SYM_RATES, "asym": ASYM_RATES}
PRESETS = {
    "alfs": {"title": "ALFs, Zhou et al. ICML 2021 (hitcszx/ALFs)", "rates": STANDARD_RATES,
             "losses": ("ce", "fl", "mae", "gce", "sce", "nfl", "ngce", "nce", "ael", "aul", "agce", "nfl+rce",
                        "nce+mae", "nce+rce", "nce+agce", "nce+aul", "nce+ael")},
    "anl": {"title": "ANL, Ye et al. NeurIPS 2023 (Virusdoll/Active-Negative-Loss)", "rates": STANDARD_RATES,
            "losses": ("ce", "fl", "gce", "mae", "sce", "nce+rce", "nce+mae", "nfl+rce", "nce+agce", "nce+aul",
                       "nce+ael", "nce+nnce", "nfl+nnfl")},
    "jal": {"title": "JAL, ICCV 2025 (cswjl/joint-asymmetric-loss)", "rates": STANDARD_RATES,
            "losses": ("ce", "gce", "sce", "nce+rce", "nfl+rce", "nce+agce", "nce+aul", "nce+ael", "nce+nnce",
                       "nfl+nnfl", "nce+amse", "nfl+amse")},
    "eps-softmax": {"title": "eps-softmax, NeurIPS 2024 (cswjl/eps-softmax)", "rates": STANDARD_RATES,
                    "losses": ("ce", "gce", "sce", "nce+rce", "nfl+rce", "nce+aul", "nce+agce", "ece+mae")},
}
