"""Published CIFAR-10 and CIFAR-100 test accuracies, keyed by the loss names of
``apl_kernels`` ("sce" is ce+rce with alpha 0.1, beta 1 on CIFAR-10).

Two sources (``SOURCES``): Ma et al. (ICML 2020), last-epoch means over 3 runs
from the official results notebook; and Table 2 of the epsilon-softmax paper
(NeurIPS 2024), last-epoch mean and std over 3 runs of its own reruns.
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


# The epsilon-softmax paper: J. Wang, X. Zhou, D. Zhai, J. Jiang, X. Ji, X. Liu,
# "eps-Softmax: Approximating One-Hot Vectors for Mitigating Label Noise",
# NeurIPS 2024, Table 2: "Last epoch test accuracies (%) of different methods on
# CIFAR-10/100 symmetric and asymmetric noise", mean and std over 3 random runs,
# transcribed from the paper's text (each entry is (mean, std) as printed).
# CIFAR-10: 8-layer CNN, 120 epochs; CIFAR-100: ResNet-34, 200 epochs (its
# appendix D.1).  Every baseline row is the epsilon-softmax authors' OWN rerun
# (D.1: "We set the parameter settings which match their original papers for all
# baseline methods"), not the number Ma et al. or the ALFs paper (Zhou et al.,
# ICML 2021) published:
# these are not the ALFs paper's tables.  Their settings (D.1): FL gamma 0.5;
# GCE q 0.7 (CIFAR-100: 0.5, 0.5, 0.7, 0.7, 0.9 at clean, sym 0.2-0.8; 0.7 asym);
# SCE A -4 (their notation for the one-hot clamped at 1e-4, as ours), alpha 0.1,
# beta 1 (CIFAR-100: alpha 6, beta 0.1); NCE+MAE, NCE+RCE, NFL+RCE alpha 1, beta 1
# (CIFAR-100: 10, 0.1); NCE+AUL a 6.3, q 1.5, alpha 1, beta 4 (CIFAR-100: a 6,
# q 3, alpha 10, beta 0.015); NCE+AGCE a 6, q 1.5, alpha 1, beta 4 (CIFAR-100:
# a 1.8, q 3, 10, 0.1); NCE+AEL a 5, alpha 1, beta 4 (CIFAR-100: a 1.5, 10, 0.1);
# CE_eps+MAE (our ece+mae) as in train.engine (their MAE is 2(1 - p_y)).  Left
# out: the rows of losses apl_kernels does not have (NLNL, LDR-KL, CE+LC,
# FL_eps+MAE).  Columns: clean and symmetric at SYM_RATES, asymmetric at ASYM_RATES.
EPS_SOFTMAX_CIFAR10_SYMMETRIC = {
    "ce":       ((90.50, 0.35), (75.47, 0.27), (58.46, 0.21), (39.16, 0.50), (18.95, 0.38)),
    "fl":       ((89.70, 0.24), (74.50, 0.18), (58.23, 0.40), (38.69, 0.06), (19.47, 0.74)),
    "gce":      ((89.42, 0.21), (86.87, 0.06), (82.24, 0.25), (68.43, 0.26), (25.82, 1.03)),
    "sce":      ((91.30, 0.08), (87.58, 0.05), (79.47, 0.48), (59.14, 0.07), (25.88, 0.49)),
    "nce+mae":  ((89.02, 0.10), (86.79, 0.28), (83.60, 0.14), (75.93, 0.41), (46.96, 0.67)),
    "nce+rce":  ((91.03, 0.28), (88.41, 0.24), (85.13, 0.56), (79.20, 0.06), (55.28, 1.26)),
    "nfl+rce":  ((91.08, 0.29), (89.00, 0.23), (85.90, 0.19), (79.79, 0.52), (55.47, 2.73)),
    "nce+aul":  ((91.06, 0.24), (89.11, 0.07), (85.79, 0.16), (79.57, 0.21), (57.59, 0.84)),
    "nce+agce": ((91.13, 0.11), (89.00, 0.29), (85.91, 0.15), (80.36, 0.36), (49.98, 4.81)),
    "nce+ael":  ((88.43, 0.25), (86.46, 0.28), (83.06, 0.23), (75.15, 0.32), (43.22, 0.46)),
    "ece+mae":  ((91.40, 0.12), (89.29, 0.10), (85.93, 0.19), (79.52, 0.14), (58.96, 0.70)),
}

EPS_SOFTMAX_CIFAR10_ASYMMETRIC = {
    "ce":       ((86.98, 0.31), (83.82, 0.04), (79.35, 0.66), (75.28, 0.58)),
    "fl":       ((86.64, 0.12), (83.08, 0.07), (79.34, 0.30), (74.68, 0.31)),
    "gce":      ((88.43, 0.20), (86.17, 0.29), (80.72, 0.42), (74.01, 0.53)),
    "sce":      ((89.87, 0.27), (86.48, 0.25), (81.30, 0.18), (74.99, 0.16)),
    "nce+mae":  ((88.03, 0.27), (85.53, 0.08), (81.10, 0.52), (74.98, 0.48)),
    "nce+rce":  ((90.25, 0.08), (88.11, 0.23), (85.35, 0.18), (79.43, 0.21)),
    "nfl+rce":  ((89.99, 0.35), (88.33, 0.26), (85.27, 0.13), (79.05, 0.35)),
    "nce+aul":  ((90.18, 0.23), (88.30, 0.44), (85.28, 0.04), (79.14, 0.36)),
    "nce+agce": ((89.90, 0.09), (88.36, 0.11), (85.73, 0.12), (79.28, 0.37)),
    "nce+ael":  ((87.59, 0.38), (85.98, 0.14), (82.87, 0.16), (75.78, 0.12)),
    "ece+mae":  ((90.30, 0.11), (88.62, 0.18), (85.56, 0.12), (78.91, 0.25)),
}

EPS_SOFTMAX_CIFAR100_SYMMETRIC = {
    "ce":       ((70.79, 0.58), (56.21, 2.04), (39.31, 0.74), (22.38, 0.74), (7.33, 0.10)),
    "fl":       ((70.58, 0.34), (56.32, 1.43), (40.83, 0.52), (22.44, 0.54), (7.68, 0.37)),
    "gce":      ((70.57, 0.25), (64.55, 0.36), (56.60, 1.61), (45.19, 0.92), (19.85, 0.88)),
    "sce":      ((70.41, 0.20), (55.23, 0.76), (40.23, 0.29), (21.44, 0.52), (7.63, 0.24)),
    "nce+mae":  ((67.69, 0.05), (63.21, 0.44), (57.91, 0.45), (45.26, 0.44), (23.72, 0.99)),
    "nce+rce":  ((67.89, 0.47), (64.60, 0.92), (58.64, 0.19), (45.25, 0.50), (24.87, 0.52)),
    "nfl+rce":  ((68.28, 0.30), (64.57, 0.52), (57.64, 0.74), (45.47, 0.59), (24.35, 0.32)),
    "nce+aul":  ((69.55, 0.40), (65.12, 0.36), (55.86, 0.20), (37.88, 0.32), (12.69, 0.14)),
    "nce+agce": ((68.78, 0.24), (65.30, 0.46), (59.95, 0.15), (47.63, 0.94), (24.13, 0.06)),
    "nce+ael":  ((64.47, 0.19), (48.07, 0.16), (32.29, 0.71), (19.78, 1.03), (10.50, 0.51)),
    "ece+mae":  ((70.83, 0.18), (65.45, 0.31), (59.20, 0.42), (48.15, 0.79), (26.30, 0.46)),
}

EPS_SOFTMAX_CIFAR100_ASYMMETRIC = {
    "ce":       ((65.10, 0.74), (58.26, 0.31), (49.99, 0.54), (41.15, 1.04)),
    "fl":       ((65.00, 0.46), (58.12, 0.44), (51.16, 1.32), (41.46, 0.38)),
    "gce":      ((63.94, 2.08), (60.89, 0.06), (53.36, 1.58), (40.82, 0.85)),
    "sce":      ((64.54, 0.30), (57.62, 0.70), (50.17, 0.19), (41.01, 0.74)),
    "nce+mae":  ((65.70, 1.04), (62.87, 0.42), (55.82, 0.19), (41.86, 0.27)),
    "nce+rce":  ((66.20, 0.28), (63.18, 0.37), (55.05, 0.32), (41.21, 0.66)),
    "nfl+rce":  ((66.18, 0.38), (63.63, 0.30), (55.33, 0.25), (40.82, 0.67)),
    "nce+aul":  ((67.06, 0.23), (58.16, 0.17), (48.06, 0.16), (38.30, 0.12)),
    "nce+agce": ((67.15, 0.40), (64.21, 0.17), (56.18, 0.24), (44.15, 0.08)),
    "nce+ael":  ((58.20, 0.37), (50.19, 0.61), (43.82, 0.32), (35.13, 0.23)),
    "ece+mae":  ((67.58, 0.04), (64.52, 0.18), (58.47, 0.12), (48.51, 0.36)),
}

EPS_SOFTMAX_TABLES = {
    "cifar10": {"sym": (SYM_RATES, EPS_SOFTMAX_CIFAR10_SYMMETRIC),
                "asym": (ASYM_RATES, EPS_SOFTMAX_CIFAR10_ASYMMETRIC)},
    "cifar100": {"sym": (SYM_RATES, EPS_SOFTMAX_CIFAR100_SYMMETRIC),
                 "asym": (ASYM_RATES, EPS_SOFTMAX_CIFAR100_ASYMMETRIC)},
}

# Every source of published numbers: "label" names it in a table cell, "short" in
# a plot, "citation" in full where a report explains its cells.  Ma et al.'s
# entries here are means only.
SOURCES = {
    "ma": {"label": "Ma", "short": "Ma et al., ICML 2020", "tables": DATASET_TABLES,
           "citation": "Ma et al., \"Normalized Loss Functions for Deep Learning with Noisy Labels\", ICML 2020 "
                       "(official results notebook): last-epoch mean over 3 runs"},
    "eps-softmax": {"label": "ε-softmax", "short": "ε-softmax paper, NeurIPS 2024, Table 2",
                    "tables": EPS_SOFTMAX_TABLES,
                    "citation": "Wang et al., \"ε-Softmax: Approximating One-Hot Vectors for Mitigating Label "
                                "Noise\", NeurIPS 2024, Table 2: last-epoch mean ± std over 3 runs. Its baselines "
                                "are the ε-softmax authors' own reruns, not the numbers Ma et al. or the ALFs "
                                "paper published"},
}


def published_entry(noise: str, loss: str, rate: float, dataset: str = "cifar10", source: str = "ma"):
    """(mean, std) in percent from ``SOURCES[source]`` (std None where the source
    prints none), or None where it has no number for the cell."""
    rates, table = SOURCES[source]["tables"].get(dataset, {}).get(noise, ((), {}))
    for i, r in enumerate(rates):
        if abs(r - rate) < 1e-9 and loss in table:
            value = table[loss][i]
            return value if isinstance(value, tuple) else (value, None)
    return None


def paper_accuracy(noise: str, loss: str, rate: float, dataset: str = "cifar10", source: str = "ma"):
    """The published accuracy (percent), or None where the source has none."""
    entry = published_entry(noise, loss, rate, dataset, source)
    return None if entry is None else entry[0]


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
