"""CIFAR-10: the checked reader, the device-resident loader and the classic one.

Reading.  ``load_cifar10(root)`` finds ``cifar-10-batches-py`` under ``root`` (or
downloads it with ``torchvision.datasets.CIFAR10`` when online), checks each
file's structure (keys, shapes, dtypes, label range) and compares it with the
official release's md5, warning about files that differ.  Problems a user can
fix raise ``DataError`` with a message; the CLI prints it and exits.

Loading.  ``DeviceLoader`` keeps the whole uint8 set on the device and does the
official augmentation there: random crop with 4 pixels of zero padding (as
torchvision's ``RandomCrop(32, padding=4)``), horizontal flip, normalisation,
with a single gather per batch.  ``ClassicLoader`` is the same pipeline with a
``DataLoader`` and torchvision transforms, for comparison.  Both draw the order
and augmentation of epoch e from (seed, e) only, so a resumed run sees the same
batches as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import socket
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
NUM_CLASSES = 10
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
BATCH_KEYS = (b"data", b"labels", b"batch_label", b"filenames")
META_KEYS = (b"label_names", b"num_cases_per_batch", b"num_vis")
DOWNLOAD_HINT = ("Put the python version of CIFAR-10 there: the folder `cifar-10-batches-py` "
                 "(data_batch_1..5, test_batch, batches.meta) extracted from "
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, or run once on a machine "
                 "that is online so torchvision can download it.")


class DataError(RuntimeError):
    """The data is missing or malformed; the message says what to do."""


class ChecksumWarning(UserWarning):
    """A CIFAR-10 file differs from the official release."""


def official_md5() -> dict:
    """{file name: md5} of the official release, as listed by torchvision."""
    from torchvision.datasets import CIFAR10
    sums = {name: md5 for name, md5 in CIFAR10.train_list + CIFAR10.test_list}
    sums[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return sums


@dataclasses.dataclass
class Cifar10:
    """The arrays of CIFAR-10: images uint8 [N, 32, 32, 3] (NHWC), labels int64 [N]."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: List[str]
    folder: str
    differing_files: List[str]


def find_folder(root: str) -> Optional[str]:
    """``root/cifar-10-batches-py``, or ``root`` itself if it is that folder; None if absent."""
    for candidate in (os.path.join(root, FOLDER), root):
        if os.path.isfile(os.path.join(candidate, META_FILE)):
            return candidate
    return None


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file {path} is missing. {DOWNLOAD_HINT}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as error:  # any unpickling failure is a bad file to the user
        raise DataError(f"{path} is not a readable CIFAR-10 pickle ({type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def read_meta(path: str) -> List[str]:
    meta = _unpickle(path)
    missing = [k.decode() for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; expected {[k.decode() for k in META_KEYS]}")
    names = meta[b"label_names"]
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise DataError(f"{path}: label_names must list {NUM_CLASSES} classes, found {names!r}")
    if meta[b"num_vis"] != 32 * 32 * 3:
        raise DataError(f"{path}: num_vis must be 3072 (3x32x32), found {meta[b'num_vis']!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 [n, 32, 32, 3], labels int64 [n]), structure checked."""
    batch = _unpickle(path)
    missing = [k.decode() for k in BATCH_KEYS if k not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; expected {[k.decode() for k in BATCH_KEYS]}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"{type(data).__name__} of {getattr(data, 'dtype', '?')}"
        raise DataError(f"{path}: data must be a uint8 numpy array, found {kind}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data must have shape [n, 3072], found {list(data.shape)}")
    labels = np.asarray(batch[b"labels"])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be {data.shape[0]} integers, found {labels.dtype} of shape "
                        f"{list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in [0, {NUM_CLASSES}), found [{labels.min()}, {labels.max()}]")
    if len(batch[b"filenames"]) != data.shape[0]:
        raise DataError(f"{path}: {len(batch[b'filenames'])} filenames for {data.shape[0]} images")
    # Rows are the R, G, B planes of 32x32 images, row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_folder(folder: str) -> Cifar10:
    """Read and check a ``cifar-10-batches-py`` folder; warn about files differing from the release."""
    classes = read_meta(os.path.join(folder, META_FILE))
    train = [read_batch(os.path.join(folder, name)) for name in TRAIN_FILES]
    test = [read_batch(os.path.join(folder, name)) for name in TEST_FILES]
    sums = official_md5()
    differing = [name for name in TRAIN_FILES + TEST_FILES + (META_FILE,)
                 if _md5(os.path.join(folder, name)) != sums[name]]
    if differing:
        warnings.warn(f"CIFAR-10 in {folder}: {', '.join(differing)} differ from the official release "
                      f"(md5 mismatch); loading them anyway", ChecksumWarning, stacklevel=2)
    return Cifar10(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test]),
                   classes, folder, differing)


def load_cifar10(root: str, download: bool = True) -> Cifar10:
    """CIFAR-10 from ``root`` (downloading it there first when absent, online and allowed)."""
    folder = find_folder(root)
    if folder is None and download:
        try:
            from torchvision.datasets import CIFAR10
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)  # an offline machine should fail fast, not hang
            try:
                CIFAR10(root, train=True, download=True)
            finally:
                socket.setdefaulttimeout(previous)
        except Exception as error:  # offline, proxy, disk full...: say where to put the data
            warnings.warn(f"could not download CIFAR-10 ({type(error).__name__}: {error})", stacklevel=2)
        folder = find_folder(root)
    if folder is None:
        raise DataError(f"CIFAR-10 was not found under {os.path.abspath(root)!r}"
                        f"{'' if download else ' (download disabled)'}. {DOWNLOAD_HINT} "
                        f"Expected: {os.path.join(os.path.abspath(root), FOLDER, META_FILE)}")
    return read_folder(folder)


def synthetic_cifar(n: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped random data for benchmarks: uint8 images [n, 32, 32, 3] (NHWC,
    as the CIFAR files and ``DeviceLoader`` use) and int64 labels [n], classes balanced."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    return images, labels


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order and augmentation: a function of (seed, epoch) only."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's share of an epoch order.  As DistributedSampler: padded by wrapping so
    every rank has the same number of samples and hence of batches."""
    if world_size == 1:
        return order
    total = -(-len(order) // world_size) * world_size
    padded = torch.cat([order, order[: total - len(order)]])
    return padded[rank::world_size]


def batch_bounds(count: int, batch_size: int, train: bool) -> list:
    """Batch boundaries [0, b, 2b, ..., count], the last partial batch kept.  In
    training a lone last sample joins the previous batch: BatchNorm cannot
    train on a batch of one."""
    bounds = list(range(0, count, batch_size)) + [count]
    if train and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


LabelArg = Union[torch.Tensor, np.ndarray, Sequence]


def _as_label_tuple(labels) -> Tuple[torch.Tensor, ...]:
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        labels = (labels,)
    return tuple(torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long() for y in labels)


class DeviceLoader:
    """Device-resident loader: uint8 data on ``device``, augmentation on ``device``.

    images: uint8 [N, 32, 32, 3] (NHWC) tensor or array.
    labels: one label tensor [N], or a tuple of them (e.g. noisy and clean);
        each batch is ``(x, *labels)`` with x float32 [B, 3, 32, 32] normalised,
        in channels_last memory format.
    train: shuffle, random crop (pad 4, zero fill) and horizontal flip;
        otherwise the data in order, unaugmented.
    The last partial batch is kept (in training, a last batch of one sample
    joins the previous batch, as BatchNorm needs two).  ``set_epoch(e)`` must be called before
    each training epoch: epoch e's order and augmentation come from (seed, e).
    For DistributedDataParallel pass rank and world_size: each rank then gets
    an equal share of every epoch (wrapped as in DistributedSampler).
    Works on any device, CPU included.
    """

    def __init__(self, images, labels: LabelArg, *, batch_size: int, train: bool, device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        self.device = torch.device(device)
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (32, 32, 3):
            raise ValueError(f"images must be uint8 [N, 32, 32, 3], got {images.dtype} {list(images.shape)}")
        self.labels = tuple(y.to(self.device) for y in _as_label_tuple(labels))
        if any(len(y) != len(images) for y in self.labels):
            raise ValueError("every label tensor must have one label per image")
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n = len(images)
        # Pad once, with zeros as RandomCrop's default fill; a crop is then a gather.
        pad = 4 if train else 0
        self.pad = pad
        self.images = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad)).to(self.device)
        self.mean = torch.tensor(mean, device=self.device).mul(255).view(1, 3, 1, 1)
        self.inv_std = (1 / (torch.tensor(std, device=self.device) * 255)).view(1, 3, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_plan(self):
        """This rank's sample indices and their crop offsets and flips, on the device."""
        if not self.train:
            return _shard(torch.arange(self.n), self.rank, self.world_size).to(self.device), None, None, None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        total = len(order)
        dy = torch.randint(0, 2 * self.pad + 1, (total,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (total,), generator=g)
        flip = torch.randint(0, 2, (total,), generator=g).bool()
        # The augmentation belongs to a position in the epoch, so shard it alike.
        plan = [_shard(t, self.rank, self.world_size).to(self.device) for t in (order, dy, dx, flip)]
        return tuple(plan)

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size) if self.world_size > 1 else self.n
        return len(batch_bounds(per_rank, self.batch_size, self.train)) - 1

    def __iter__(self):
        order, dy, dx, flip = self._epoch_plan()
        span = torch.arange(32, device=self.device)
        bounds = batch_bounds(len(order), self.batch_size, self.train)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            idx = order[start:stop]
            if self.train:
                rows = dy[start:start + len(idx), None] + span
                flipped = flip[start:start + len(idx), None]
                cols = dx[start:start + len(idx), None] + torch.where(flipped, 31 - span, span)
                x = self.images[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # the one gather
            else:
                x = self.images[idx]
            # NHWC uint8 -> NCHW view with channels_last strides; float ops keep them.
            x = (x.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
            yield (x,) + tuple(y[idx] for y in self.labels)


class _ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: Tuple[torch.Tensor, ...], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return (self.transform(Image.fromarray(self.images[i])),) + tuple(y[i] for y in self.labels)


class ClassicLoader:
    """The same pipeline with ``DataLoader`` + torchvision transforms (PIL per image).

    Same arguments and batches as ``DeviceLoader`` (not the same random draws),
    plus ``num_workers``.  Batches are moved to ``device`` in channels_last.
    """

    def __init__(self, images, labels: LabelArg, *, batch_size: int, train: bool, device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        from torchvision import transforms as T
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
        images = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
        self.dataset = _ArrayDataset(images, _as_label_tuple(labels), transform)
        self.device = torch.device(device)
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = -(-len(self.dataset) // self.world_size) if self.world_size > 1 else len(self.dataset)
        return len(batch_bounds(per_rank, self.batch_size, self.train)) - 1

    def __iter__(self):
        seed = epoch_seed(self.seed, self.epoch)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.dataset), generator=g) if self.train else torch.arange(len(self.dataset))
        order = _shard(order, self.rank, self.world_size).tolist()
        bounds = batch_bounds(len(order), self.batch_size, self.train)
        batches = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers,
            generator=g, pin_memory=self.device.type == "cuda", persistent_workers=False)
        # Workers seed their transforms from `g`; in-process transforms use the
        # global RNG, so give them the epoch's seed without disturbing it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in loader:
                x = batch[0].to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                yield (x,) + tuple(y.to(self.device, non_blocking=True) for y in batch[1:])
