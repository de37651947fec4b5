"""Synthetic label noise for CIFAR-10, and the record of what it realised.

Symmetric: in each class exactly int(rate * n_class) samples, chosen at random,
get a label drawn uniformly from the K-1 other classes.

Asymmetric (the CIFAR-10 mapping of Ma et al.): truck->automobile,
bird->airplane, deer->horse, cat->dog, dog->cat.
  recipe "exact"    (default) each source class flips exactly int(rate * n) of
                    its *clean* samples, so every pair realises the rate.
  recipe "official" as the released code: the pairs flip one after another on
                    the already-noisy labels.  The dog pool then holds the cats
                    just flipped to dog, part of them flip back, and the realised
                    cat->dog rate is about rate * (1 - rate).

All randomness comes from one ``numpy.random.Generator`` seeded by the noise
seed, kept apart from the training seed.
"""
from __future__ import annotations

import numpy as np

NOISE_TYPES = ("sym", "asym")
RECIPES = ("exact", "official")

# CIFAR-10 class ids: 0 airplane 1 automobile 2 bird 3 cat 4 deer 5 dog 6 frog
# 7 horse 8 ship 9 truck.  Order as in the official code, which matters for
# the "official" recipe (cat flips before dog).
CIFAR10_ASYM_PAIRS = ((9, 1), (2, 0), (3, 5), (5, 3), (4, 7))


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels with exactly int(rate * n_c) of each class c moved to another class."""
    _check_rate(rate)
    noisy = labels.copy()
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, size=int(rate * len(members)), replace=False)
        # c + 1..K-1 (mod K) is uniform over the other K-1 classes, never c itself.
        noisy[chosen] = (c + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return noisy


def asymmetric_noise(labels: np.ndarray, rate: float, rng: np.random.Generator, recipe: str = "exact",
                     pairs=CIFAR10_ASYM_PAIRS) -> np.ndarray:
    """Class-dependent flips source->target for each pair (see the module docstring)."""
    _check_rate(rate)
    if recipe not in RECIPES:
        raise ValueError(f"unknown noise recipe {recipe!r}; expected one of {RECIPES}")
    noisy = labels.copy()
    for source, target in pairs:
        # The official code draws from the current, already partly noisy labels.
        pool = labels if recipe == "exact" else noisy
        members = np.flatnonzero(pool == source)
        chosen = rng.choice(members, size=int(rate * len(members)), replace=False)
        noisy[chosen] = target
    return noisy


def make_noisy_labels(labels: np.ndarray, noise: str, rate: float, seed: int, num_classes: int = 10,
                      recipe: str = "exact") -> np.ndarray:
    """The noisy training labels for a noise type ("sym"/"asym"), rate and noise seed."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    if noise == "sym":
        return symmetric_noise(labels, rate, num_classes, rng)
    if noise == "asym":
        if num_classes != 10:
            raise ValueError("asymmetric noise is defined for the 10 CIFAR-10 classes")
        return asymmetric_noise(labels, rate, rng, recipe)
    raise ValueError(f"unknown noise type {noise!r}; expected one of {NOISE_TYPES}")


def noise_record(clean: np.ndarray, noisy: np.ndarray, num_classes: int = 10) -> dict:
    """What the noise realised: overall rate, counts and row-normalised transitions.

    ``transition[i][j]`` is the fraction of clean class i labelled j.
    """
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (clean, noisy), 1)
    rows = counts.sum(axis=1, keepdims=True)
    transition = counts / np.maximum(rows, 1)
    return {
        "realised_rate": float((clean != noisy).mean()) if len(clean) else 0.0,
        "num_flipped": int((clean != noisy).sum()),
        "transition_counts": counts.tolist(),
        "transition": np.round(transition, 6).tolist(),
    }


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
