"""The CIFAR-10 reader on a fabricated cifar-10-batches-py, and the two loaders."""
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from train_helpers import ROOT, fabricate_cifar
from train import data

MEAN = np.array([0.49139968, 0.48215827, 0.44653124])
STD = np.array([0.24703233, 0.24348505, 0.26158768])


@pytest.fixture()
def cifar_root(tmp_path):
    images, labels = fabricate_cifar(str(tmp_path), per_batch=10, test=10)
    return str(tmp_path), images, labels


def test_reads_the_fabricated_release_and_warns_about_checksums(cifar_root):
    root, images, labels = cifar_root
    with pytest.warns(data.ChecksumWarning, match="data_batch_1.*differ from the official release"):
        cifar = data.load_cifar10(root, download=False)
    assert cifar.train_images.dtype == np.uint8 and cifar.train_images.shape == (50, 32, 32, 3)
    assert np.array_equal(cifar.train_images, images)  # plane order R, G, B undone correctly
    assert np.array_equal(cifar.train_labels, labels) and cifar.train_labels.dtype == np.int64
    assert cifar.test_images.shape == (10, 32, 32, 3)
    assert cifar.classes[3] == "cat" and len(cifar.classes) == 10
    assert len(cifar.differing_files) == 7


def test_matching_checksums_give_no_warning(cifar_root, monkeypatch):
    import hashlib
    root, _, _ = cifar_root
    folder = os.path.join(root, "cifar-10-batches-py")
    sums = {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in os.listdir(folder)}
    monkeypatch.setattr(data, "official_md5", lambda info: sums)
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.ChecksumWarning)
        assert data.load_cifar10(root, download=False).differing_files == []


def test_official_checksums_come_from_torchvision():
    from torchvision.datasets import CIFAR10
    sums = data.official_md5()
    assert set(sums) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert sums["test_batch"] == dict(CIFAR10.test_list)["test_batch"]


def _rewrite(folder, name, **changes):
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    for key, value in changes.items():
        if value is None:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    with open(path, "wb") as f:
        pickle.dump(batch, f)


@pytest.mark.parametrize("name, changes, message", [
    ("data_batch_2", {"labels": None}, "missing key.*labels"),
    ("data_batch_3", {"data": np.zeros((10, 3072), dtype=np.float32)}, "uint8"),
    ("test_batch", {"data": np.zeros((10, 3000), dtype=np.uint8)}, r"\[n, 3072\]"),
    ("data_batch_1", {"labels": [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]}, r"labels must lie in \[0, 10\)"),
    ("data_batch_4", {"labels": [0, 1, 2]}, "labels must be 10 integers"),
    ("batches.meta", {"label_names": [b"cat"]}, "label_names"),
])
def test_bad_structure_is_a_clear_error(cifar_root, name, changes, message):
    root, _, _ = cifar_root
    _rewrite(os.path.join(root, "cifar-10-batches-py"), name, **changes)
    with pytest.raises(data.DataError, match=message):
        data.load_cifar10(root, download=False)


def test_missing_data_exits_with_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError, match="cifar-10-batches-py"):
        data.load_cifar10(str(tmp_path), download=False)
    proc = subprocess.run([sys.executable, "-m", "train", "--noise", "sym", "--rate", "0.2", "--data", str(tmp_path),
                           "--no-download", "--out", str(tmp_path / "runs"), "--epochs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in proc.stderr
    assert "cifar-10-python.tar.gz" in proc.stderr


def _unnormalise(x):
    """float [B, 3, 32, 32] -> uint8-valued float [B, 32, 32, 3]."""
    return (x.permute(0, 2, 3, 1).numpy() * STD + MEAN) * 255


def test_device_loader_eval_is_the_normalised_data():
    images, labels = data.synthetic_cifar(37, seed=1)
    loader = data.DeviceLoader(images, labels, batch_size=16, train=False, device="cpu")
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [16, 16, 5] and len(loader) == 3  # last partial batch kept
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_unnormalise(x), images.numpy(), atol=1e-3)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_device_loader_augmentation_is_a_zero_padded_crop_and_flip():
    images, labels = data.synthetic_cifar(40, seed=2)
    clean = labels.flip(0)
    loader = data.DeviceLoader(images, (labels, clean), batch_size=40, train=True, device="cpu", seed=7)
    loader.set_epoch(3)
    x, y, y_clean = next(iter(loader))
    pixels = np.rint(_unnormalise(x))
    padded = np.pad(images.numpy().astype(float), ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips, shifted = 0, 0
    for i in range(len(x)):
        matches = []
        for j in torch.nonzero(labels == y[i]).flatten().tolist():  # candidates: images of its class
            for dy in range(9):
                for dx in range(9):
                    crop = padded[j, dy:dy + 32, dx:dx + 32]
                    for flip in (False, True):
                        if np.array_equal(crop[:, ::-1] if flip else crop, pixels[i]):
                            matches.append((j, dy, dx, flip))
        assert matches, f"sample {i} is no zero-padded crop/flip of any image of its class"
        j, dy, dx, flip = matches[0]
        flips += flip
        shifted += (dy, dx) != (4, 4)
        assert y_clean[i] == clean[j]  # the labels travel with their image
    assert 0 < flips < len(x)  # both flipped and unflipped images occur
    assert shifted > len(x) // 2  # and the zero padding really shows


def test_device_loader_epoch_order_depends_on_seed_and_epoch_only():
    images, labels = data.synthetic_cifar(30, seed=0)
    ids = torch.arange(30)

    def epoch(seed, e):
        loader = data.DeviceLoader(images, ids, batch_size=8, train=True, device="cpu", seed=seed)
        loader.set_epoch(e)
        return torch.cat([torch.cat([b[0].flatten(1)[:, :5], b[1][:, None].float()], 1) for b in loader])

    a = epoch(0, 2)
    assert torch.equal(a, epoch(0, 2))
    assert not torch.equal(a, epoch(0, 3)) and not torch.equal(a, epoch(1, 2))
    assert sorted(a[:, -1].long().tolist()) == list(range(30))  # a permutation: every sample once


def test_device_loader_shards_for_ddp():
    images, _ = data.synthetic_cifar(11, seed=0)
    ids = torch.arange(11)
    seen = []
    for rank in (0, 1):
        loader = data.DeviceLoader(images, ids, batch_size=4, train=True, device="cpu", seed=0, rank=rank, world_size=2)
        loader.set_epoch(1)
        got = torch.cat([b[1] for b in loader]).tolist()
        assert len(got) == 6 and len(loader) == 2  # equal shares, so DDP ranks step together
        seen += got
    assert set(seen) == set(range(11))


def test_classic_loader_matches_device_loader_without_augmentation():
    images, labels = data.synthetic_cifar(20, seed=3)
    device = data.DeviceLoader(images, labels, batch_size=8, train=False, device="cpu")
    classic = data.ClassicLoader(images, labels, batch_size=8, train=False, device="cpu", num_workers=0)
    for (xd, yd), (xc, yc) in zip(device, classic):
        torch.testing.assert_close(xc, xd, atol=1e-5, rtol=0)
        assert torch.equal(yc, yd)
    classic_train = data.ClassicLoader(images, labels, batch_size=8, train=True, device="cpu", num_workers=0, seed=1)
    classic_train.set_epoch(1)
    first = [b[0] for b in classic_train]
    assert [len(x) for x in first] == [8, 8, 4]
    assert all(torch.equal(a, b[0]) for a, b in zip(first, classic_train))  # same epoch -> same augmentation


def test_synthetic_cifar_shapes():
    images, labels = data.synthetic_cifar(25, seed=4)
    assert images.shape == (25, 32, 32, 3) and images.dtype == torch.uint8
    assert labels.shape == (25,) and labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("Loader", [data.DeviceLoader, data.ClassicLoader])
def test_a_lone_last_training_sample_joins_the_previous_batch(Loader):
    images, labels = data.synthetic_cifar(33, seed=5)
    extra = {"num_workers": 0} if Loader is data.ClassicLoader else {}
    loader = Loader(images, labels, batch_size=16, train=True, device="cpu", **extra)
    assert [len(b[1]) for b in loader] == [16, 17] and len(loader) == 2  # BatchNorm cannot train on one sample
    evaluation = Loader(images, labels, batch_size=16, train=False, device="cpu", **extra)
    assert [len(b[1]) for b in evaluation] == [16, 16, 1]
