"""CIFAR-10 and CIFAR-100: the checked reader, the device-resident loader and the classic one.

Reading.  ``load_dataset(name, root)`` finds the official python folder under
``root`` (``cifar-10-batches-py`` or ``cifar-100-python``; downloads it with
torchvision when online), checks each file's structure (keys, shapes, dtypes,
label range) and compares it with the official release's md5, warning about
files that differ.  CIFAR-100 uses its 100 fine labels.  Problems a user can fix
raise ``DataError`` with a message; the CLI prints it and exits.  ``DATASETS``
holds what differs between the two: files, keys, classes, normalisation and the
official training recipe of Ma et al. for each.

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
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What differs between CIFAR-10 and CIFAR-100 (file layout, keys, classes,
    normalisation, the official recipe)."""
    name: str                 # the --dataset value
    title: str                # for messages
    folder: str               # the official python folder
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    meta_file: str
    label_key: bytes          # the labels' key in a batch file
    names_key: bytes          # the class names' key in the meta file
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    archive: str              # where the official archive is
    torchvision_class: str    # the torchvision.datasets class that knows the md5 sums
    rotate_degrees: float     # training augmentation: random rotation by up to this angle (0: none)
    # The official recipe of Ma et al. (ICML 2020) for this data set: the CLI's
    # defaults.  Both use SGD momentum 0.9, batch 128, cosine over the epochs, clip 5.
    # Weight decay and L1 depend on the loss as well: train.engine.regularisation.
    recipe: Dict[str, object]

    @property
    def batch_keys(self) -> Tuple[bytes, ...]:
        return (b"data", self.label_key, b"batch_label", b"filenames")

    @property
    def meta_keys(self) -> Tuple[bytes, ...]:
        return (self.names_key,) + ((b"num_cases_per_batch", b"num_vis") if self.name == "cifar10" else ())

    @property
    def download_hint(self) -> str:
        files = ", ".join(self.train_files + self.test_files + (self.meta_file,))
        return (f"Put the python version of {self.title} there: the folder `{self.folder}` ({files}) extracted from "
                f"{self.archive}, or run once on a machine that is online so torchvision can download it.")


DATASETS = {
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",), "batches.meta", b"labels", b"label_names", 10,
        (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10", 0.0,
        {"model": "cnn8", "epochs": 120, "lr": 0.01}),
    # Mean, std and the rotation by up to 20 degrees as in the official code's CIFAR-100 transforms.
    "cifar100": DatasetInfo(
        "cifar100", "CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", b"fine_labels",
        b"fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100", 20.0,
        {"model": "resnet34", "epochs": 200, "lr": 0.1}),
}
CIFAR10 = DATASETS["cifar10"]

def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {tuple(DATASETS)}")
    return DATASETS[name]


class DataError(RuntimeError):
    """The data is missing or malformed; the message says what to do."""


class ChecksumWarning(UserWarning):
    """A CIFAR file differs from the official release."""


def official_md5(info: DatasetInfo = CIFAR10) -> dict:
    """{file name: md5} of the official release, as listed by torchvision."""
    import torchvision.datasets
    release = getattr(torchvision.datasets, info.torchvision_class)
    sums = {name: md5 for name, md5 in release.train_list + release.test_list}
    sums[release.meta["filename"]] = release.meta["md5"]
    return sums


@dataclasses.dataclass
class Cifar10:
    """The arrays of a CIFAR data set: images uint8 [N, 32, 32, 3] (NHWC), labels int64 [N].

    (Named for CIFAR-10, its first use; ``info`` says which data set it holds.)"""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: List[str]
    folder: str
    differing_files: List[str]
    info: DatasetInfo = CIFAR10

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


def find_folder(root: str, info: DatasetInfo = CIFAR10) -> Optional[str]:
    """``root/<official folder>``, or ``root`` itself if it is that folder; None if absent."""
    for candidate in (os.path.join(root, info.folder), root):
        if os.path.isfile(os.path.join(candidate, info.meta_file)):
            return candidate
    return None


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickle(path: str, info: DatasetInfo) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{info.title} file {path} is missing. {info.download_hint}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as error:  # any unpickling failure is a bad file to the user
        raise DataError(f"{path} is not a readable {info.title} pickle ({type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def read_meta(path: str, info: DatasetInfo = CIFAR10) -> List[str]:
    meta = _unpickle(path, info)
    missing = [k.decode() for k in info.meta_keys if k not in meta]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; expected {[k.decode() for k in info.meta_keys]}")
    names = meta[info.names_key]
    if not isinstance(names, (list, tuple)) or len(names) != info.num_classes:
        raise DataError(f"{path}: {info.names_key.decode()} must list {info.num_classes} classes, found {names!r}")
    if b"num_vis" in meta and meta[b"num_vis"] != 32 * 32 * 3:
        raise DataError(f"{path}: num_vis must be 3072 (3x32x32), found {meta[b'num_vis']!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_batch(path: str, info: DatasetInfo = CIFAR10) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 [n, 32, 32, 3], labels int64 [n]), structure checked."""
    batch = _unpickle(path, info)
    missing = [k.decode() for k in info.batch_keys if k not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; expected {[k.decode() for k in info.batch_keys]}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"{type(data).__name__} of {getattr(data, 'dtype', '?')}"
        raise DataError(f"{path}: data must be a uint8 numpy array, found {kind}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data must have shape [n, 3072], found {list(data.shape)}")
    labels = np.asarray(batch[info.label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {info.label_key.decode()} must be {data.shape[0]} integers, found {labels.dtype} "
                        f"of shape {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{path}: labels must lie in [0, {info.num_classes}), found [{labels.min()}, {labels.max()}]")
    if len(batch[b"filenames"]) != data.shape[0]:
        raise DataError(f"{path}: {len(batch[b'filenames'])} filenames for {data.shape[0]} images")
    # Rows are the R, G, B planes of 32x32 images, row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_folder(folder: str, info: DatasetInfo = CIFAR10) -> Cifar10:
    """Read and check an official python folder; warn about files differing from the release."""
    classes = read_meta(os.path.join(folder, info.meta_file), info)
    train = [read_batch(os.path.join(folder, name), info) for name in info.train_files]
    test = [read_batch(os.path.join(folder, name), info) for name in info.test_files]
    sums = official_md5(info)
    differing = [name for name in info.train_files + info.test_files + (info.meta_file,)
                 if file_md5(os.path.join(folder, name)) != sums[name]]
    if differing:
        warnings.warn(f"{info.title} in {folder}: {', '.join(differing)} differ from the official release "
                      f"(md5 mismatch); loading them anyway", ChecksumWarning, stacklevel=2)
    return Cifar10(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test]),
                   classes, folder, differing, info)


def load_dataset(name: str, root: str, download: bool = True) -> Cifar10:
    """CIFAR-10 or CIFAR-100 ("cifar10"/"cifar100") from ``root`` (downloading it
    there first when absent, online and allowed)."""
    info = dataset_info(name)
    folder = find_folder(root, info)
    if folder is None and download:
        try:
            import torchvision.datasets
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)  # an offline machine should fail fast, not hang
            try:
                getattr(torchvision.datasets, info.torchvision_class)(root, train=True, download=True)
            finally:
                socket.setdefaulttimeout(previous)
        except Exception as error:  # offline, proxy, disk full...: say where to put the data
            warnings.warn(f"could not download {info.title} ({type(error).__name__}: {error})", stacklevel=2)
        folder = find_folder(root, info)
    if folder is None:
        raise DataError(f"{info.title} was not found under {os.path.abspath(root)!r}"
                        f"{'' if download else ' (download disabled)'}. {info.download_hint} "
                        f"Expected: {os.path.join(os.path.abspath(root), info.folder, info.meta_file)}")
    return read_folder(folder, info)


def load_cifar10(root: str, download: bool = True) -> Cifar10:
    """CIFAR-10 from ``root``: ``load_dataset("cifar10", ...)``."""
    return load_dataset("cifar10", root, download)


def synthetic_cifar(n: int, seed: int = 0, num_classes: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped random data for benchmarks: uint8 images [n, 32, 32, 3] (NHWC,
    as the CIFAR files and ``DeviceLoader`` use) and int64 labels [n], classes balanced."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    return images, labels


def synthetic_dataset(name: str, n: int) -> Cifar10:
    """Random data shaped as data set ``name``: n training and n/5 test images (timing only)."""
    info = dataset_info(name)
    train_x, train_y = synthetic_cifar(n, seed=0, num_classes=info.num_classes)
    test_x, test_y = synthetic_cifar(max(n // 5, 1), seed=1, num_classes=info.num_classes)
    return Cifar10(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(),
                   [f"class{i}" for i in range(info.num_classes)], "synthetic", [], info)


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
    train: shuffle, random crop (pad 4, zero fill) and horizontal flip, then,
        when rotate_degrees > 0, a rotation by an angle uniform in
        [-rotate_degrees, rotate_degrees] (nearest pixel, zero fill, as
        torchvision's RandomRotation); otherwise the data in order, unaugmented.
    The last partial batch is kept (in training, a last batch of one sample
    joins the previous batch, as BatchNorm needs two).  ``set_epoch(e)`` must be called before
    each training epoch: epoch e's order and augmentation come from (seed, e).
    For DistributedDataParallel pass rank and world_size: each rank then gets
    an equal share of every epoch (wrapped as in DistributedSampler).
    Works on any device, CPU included.
    """

    def __init__(self, images, labels: LabelArg, *, batch_size: int, train: bool, device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mean=CIFAR10.mean, std=CIFAR10.std,
                 rotate_degrees: float = 0.0):
        self.device = torch.device(device)
        self.rotate_degrees = rotate_degrees
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
        """This rank's sample indices and their crop offsets, flips and rotation angles (None without rotation)."""
        if not self.train:
            return _shard(torch.arange(self.n), self.rank, self.world_size).to(self.device), None, None, None, None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        total = len(order)
        dy = torch.randint(0, 2 * self.pad + 1, (total,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (total,), generator=g)
        flip = torch.randint(0, 2, (total,), generator=g).bool()
        # Drawn last and only when asked: without rotation the draws above are unchanged.
        angle = (torch.rand(total, generator=g) * 2 - 1) * self.rotate_degrees if self.rotate_degrees else None
        # The augmentation belongs to a position in the epoch, so shard it alike.
        plan = [_shard(t, self.rank, self.world_size).to(self.device) for t in (order, dy, dx, flip)]
        return tuple(plan) + (None if angle is None else _shard(angle, self.rank, self.world_size).to(self.device),)

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size) if self.world_size > 1 else self.n
        return len(batch_bounds(per_rank, self.batch_size, self.train)) - 1

    def __iter__(self):
        order, dy, dx, flip, angle = self._epoch_plan()
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
            x = x.permute(0, 3, 1, 2).float()
            if angle is not None:
                x = rotate_images(x, angle[start:start + len(idx)])
            x = (x - self.mean) * self.inv_std
            yield (x,) + tuple(y[idx] for y in self.labels)


def rotate_images(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of [B, C, H, W] counter-clockwise by its angle (degrees [B])
    about its centre: nearest pixel, zero fill, as torchvision's ``rotate``."""
    rad = torch.deg2rad(degrees.to(images.dtype))
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    # Output -> input sampling positions in [-1, 1] coordinates (y pointing down).
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


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
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, mean=CIFAR10.mean, std=CIFAR10.std,
                 rotate_degrees: float = 0.0):
        from torchvision import transforms as T
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        steps += [T.RandomRotation(rotate_degrees)] if train and rotate_degrees else []
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
