"""Label noise: synthetic for CIFAR-10 and CIFAR-100, human (CIFAR-N), and the
record of what it realised.

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

Asymmetric on CIFAR-100, as the official code: each class flips to the next
class of its group of five, circularly (4 -> 0 within each group).  The official
code calls the groups superclasses, but they are blocks of five consecutive
class ids (0-4, 5-9, ...), and CIFAR-100's ids are alphabetical, so a block is
not one of CIFAR-100's 20 coarse classes (apple, aquarium_fish, baby, bear,
beaver are ids 0-4).  The published CIFAR-100 numbers come from these blocks,
so they are kept here.
  recipe "exact"    (default) each class flips exactly int(rate * n) of its samples.
  recipe "official" as the released code: each sample flips independently with
                    probability rate (realised rates scatter around rate).

Human noise (CIFAR-10N, CIFAR-100N of Wei et al., ICLR 2022): the released label
file's noisy labels, read by ``load_human_labels`` without running any code
from the file, and checked against the data set's own training labels.

All randomness comes from one ``numpy.random.Generator`` seeded by the noise
seed, kept apart from the training seed.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .data import dataset_info

NOISE_TYPES = ("sym", "asym", "human")
RECIPES = ("exact", "official")

# CIFAR-10 class ids: 0 airplane 1 automobile 2 bird 3 cat 4 deer 5 dog 6 frog
# 7 horse 8 ship 9 truck.  Order as in the official code, which matters for
# the "official" recipe (cat flips before dog).
CIFAR10_ASYM_PAIRS = ((9, 1), (2, 0), (3, 5), (5, 3), (4, 7))
CIFAR100_GROUP = 5  # classes per flip group (the official code's "superclass")
# Each class to the next one of its group, circularly: 0->1, ..., 4->0, 5->6, ...
CIFAR100_ASYM_PAIRS = tuple((c, c - c % CIFAR100_GROUP + (c + 1) % CIFAR100_GROUP) for c in range(100))


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


def asymmetric_noise_independent(labels: np.ndarray, rate: float, rng: np.random.Generator, pairs) -> np.ndarray:
    """Each sample of a source class flips to its target independently with
    probability ``rate`` (the official CIFAR-100 code's per-sample draw)."""
    _check_rate(rate)
    target = np.arange(max(max(p) for p in pairs) + 1)
    for source, dest in pairs:
        target[source] = dest
    noisy = labels.copy()
    flip = rng.random(len(labels)) < rate
    noisy[flip] = target[labels[flip]]
    return noisy


def make_noisy_labels(labels: np.ndarray, noise: str, rate: float, seed: int, num_classes: int = 10,
                      recipe: str = "exact") -> np.ndarray:
    """The noisy training labels for a noise type ("sym"/"asym"), rate and noise
    seed; asymmetric noise knows CIFAR-10 (10 classes) and CIFAR-100 (100)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    if noise == "sym":
        return symmetric_noise(labels, rate, num_classes, rng)
    if noise == "asym":
        if recipe not in RECIPES:
            raise ValueError(f"unknown noise recipe {recipe!r}; expected one of {RECIPES}")
        if num_classes == 10:
            return asymmetric_noise(labels, rate, rng, recipe)
        if num_classes == 100:
            if recipe == "official":
                return asymmetric_noise_independent(labels, rate, rng, CIFAR100_ASYM_PAIRS)
            return asymmetric_noise(labels, rate, rng, "exact", CIFAR100_ASYM_PAIRS)
        raise ValueError(f"asymmetric noise is defined for CIFAR-10 and CIFAR-100 (10 or 100 classes), "
                         f"not {num_classes} classes")
    if noise == "human":
        raise ValueError("human noise comes from a label file: use load_human_labels")
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


# --------------------------------------------------------------------------- human noise (CIFAR-N)

# The released files and, per data set, --label-set -> the key of its labels.
HUMAN_FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}
HUMAN_LABEL_SETS = {
    "cifar10": {"aggre": "aggre_label", "worse": "worse_label", "random1": "random_label1",
                "random2": "random_label2", "random3": "random_label3"},
    "cifar100": {"noisy": "noisy_label"},
}
HUMAN_URL = "https://github.com/UCSC-REAL/cifar-10-100n (data/CIFAR-10_human.pt, data/CIFAR-100_human.pt)"


class HumanLabelError(ValueError):
    """A CIFAR-N label file is missing, unsafe, malformed or does not match the data; the message says which."""


def find_human_labels(dataset: str, path: Optional[str], data_root: str) -> str:
    """The label file: ``path`` when given, else ``HUMAN_FILES[dataset]`` in the
    data folder (``data_root`` or its ``cifar-n`` subfolder)."""
    if dataset not in HUMAN_FILES:
        raise HumanLabelError(f"human label noise exists for {tuple(HUMAN_FILES)}, not {dataset!r}")
    if path is not None:
        if not os.path.isfile(path):
            raise HumanLabelError(f"--human-labels {path}: no such file. Get {HUMAN_FILES[dataset]} from {HUMAN_URL}")
        return path
    candidates = [os.path.join(data_root, HUMAN_FILES[dataset]), os.path.join(data_root, "cifar-n", HUMAN_FILES[dataset])]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise HumanLabelError(f"{HUMAN_FILES[dataset]} was found neither at {' nor at '.join(candidates)}; "
                          f"pass --human-labels PATH or put the file there. Get it from {HUMAN_URL}")


def _numpy_safe_globals() -> list:
    """The globals a pickled dict of integer numpy arrays needs, and nothing more:
    the array rebuilder (under numpy 1's and numpy 2's module names, since the
    released files were written by numpy 1), ndarray, dtype and the integer
    dtype classes."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever it lives
    allowed = [(reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64,
                                             np.uint8, np.uint16, np.uint32, np.uint64)]
    return allowed


def read_human_label_file(path: str) -> dict:
    """The dict of label arrays in a CIFAR-N file, loaded with ``torch.load(weights_only=True)``:
    no code from the file runs; anything but integer numpy arrays (and tensors) is refused."""
    import pickle
    import torch
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch names what it refused (a global, a type it cannot build) on a line of its message.
        lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(error).splitlines()]
        refused = [line for line in lines if "global" in line.lower() or "can only build" in line.lower()]
        reason = (refused or [line for line in lines if line] or [""])[0]
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise HumanLabelError(f"{path}: refused, it holds more than integer arrays ({reason}). A CIFAR-N label "
                                  f"file is a dict of int64 numpy arrays; nothing else is loaded, so that no code in "
                                  f"the file can run") from None
        # Not a torch/pickle file at all, truncated, ...
        raise HumanLabelError(f"{path} is not a readable CIFAR-N label file ({type(error).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise HumanLabelError(f"{path}: expected a dict of label arrays, found {type(obj).__name__}")
    labels = {}
    for key, value in obj.items():
        array = value.numpy() if isinstance(value, torch.Tensor) else value
        if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            kind = f"{type(value).__name__} {getattr(value, 'dtype', '')} {list(getattr(value, 'shape', []))}"
            raise HumanLabelError(f"{path}: {key!r} must be a 1-D integer array, found {kind.strip()}")
        labels[str(key)] = array.astype(np.int64)
    return labels


def load_human_labels(path: str, dataset: str, label_set: str, train_labels: np.ndarray) -> np.ndarray:
    """The noisy labels ``label_set`` of a CIFAR-N file, after checking that the
    file's ``clean_label`` is the data set's training labels, in order (a file
    for another data set or another image order would scramble the noise)."""
    sets = HUMAN_LABEL_SETS.get(dataset)
    if sets is None:
        raise HumanLabelError(f"human label noise exists for {tuple(HUMAN_LABEL_SETS)}, not {dataset!r}")
    if label_set not in sets:
        raise HumanLabelError(f"--label-set {label_set!r} is not a {dataset} label set; expected one of {tuple(sets)}")
    labels = read_human_label_file(path)
    key = sets[label_set]
    missing = [k for k in ("clean_label", key) if k not in labels]
    if missing:
        raise HumanLabelError(f"{path}: missing {missing} (has {sorted(labels)}); is it {HUMAN_FILES[dataset]}?")
    clean, noisy = labels["clean_label"], labels[key]
    train_labels = np.asarray(train_labels, dtype=np.int64)
    if len(noisy) != len(clean):
        raise HumanLabelError(f"{path}: {key} has {len(noisy)} labels but clean_label {len(clean)}")
    if len(clean) != len(train_labels):
        raise HumanLabelError(f"{path} holds {len(clean)} labels but the {dataset} training set has "
                              f"{len(train_labels)} images: the file belongs to the full official training set")
    if not np.array_equal(clean, train_labels):
        wrong = np.flatnonzero(clean != train_labels)
        raise HumanLabelError(f"{path}: its clean_label differs from the {dataset} training labels at {len(wrong)} of "
                              f"{len(clean)} images (first at index {wrong[0]}): the file does not belong to this data "
                              f"or its image order, and its noisy labels would be scrambled")
    num_classes = dataset_info(dataset).num_classes
    if noisy.min() < 0 or noisy.max() >= num_classes:
        raise HumanLabelError(f"{path}: {key} must lie in [0, {num_classes}), found [{noisy.min()}, {noisy.max()}]")
    return noisy
