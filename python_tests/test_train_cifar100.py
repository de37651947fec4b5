"""CIFAR-100: the reader on a fabricated cifar-100-python, the asymmetric noise
in groups of five, ResNet-34, the data set's recipe defaults, and a short run."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from train_helpers import ROOT  # noqa: F401  (puts the repo root on sys.path)
import apl_kernels
from train import cli, data, engine
from train.models import build_model
from train.noise import make_noisy_labels, noise_record
from train.paper_results import paper_accuracy


def fabricate_cifar100(root, train=200, test=100, seed=0):
    """root/cifar-100-python in the official layout, written from the format's
    description (cs.toronto.edu/~kriz/cifar.html): ``train`` and ``test`` hold
    data (uint8 [n, 3072], R, G, B planes), fine_labels, coarse_labels,
    filenames, batch_label; ``meta`` holds fine_label_names and coarse_label_names."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("train", train), ("test", test)):
        fine = rng.permutation(np.arange(n) % 100)
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        batch = {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                 b"fine_labels": [int(y) for y in fine], b"coarse_labels": [int(y) // 5 for y in fine],
                 b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072)}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (images, fine)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar100"))
    return root, fabricate_cifar100(root)


def test_reads_fabricated_cifar100_with_its_fine_labels(cifar100_root):
    root, written = cifar100_root
    with pytest.warns(data.ChecksumWarning, match="CIFAR-100 .*train, test, meta differ from the official release"):
        cifar = data.load_dataset("cifar100", root, download=False)
    assert np.array_equal(cifar.train_images, written["train"][0])
    assert np.array_equal(cifar.train_labels, written["train"][1]) and cifar.train_labels.dtype == np.int64
    assert np.array_equal(cifar.test_labels, written["test"][1])
    assert cifar.num_classes == 100 and len(cifar.classes) == 100 and cifar.classes[7] == "fine7"
    assert cifar.info.mean == (0.5071, 0.4865, 0.4409)  # the official code's CIFAR-100 normalisation


def test_cifar100_checksums_are_the_official_ones():
    sums = data.official_md5(data.DATASETS["cifar100"])
    # As published with the release (and listed by torchvision).
    assert sums == {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                    "meta": "7973b15100ade9c7d40fb424638fde48"}


def _rewrite(path, **changes):
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    for key, value in changes.items():
        if value is None:
            del obj[key.encode()]
        else:
            obj[key.encode()] = value
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("name, changes, message", [
    ("train", {"fine_labels": None}, "missing key.*fine_labels"),
    ("test", {"fine_labels": [100] * 100}, r"labels must lie in \[0, 100\)"),
    ("meta", {"fine_label_names": [b"a"] * 10}, "fine_label_names must list 100 classes"),
])
def test_bad_cifar100_files_are_clear_errors(tmp_path, name, changes, message):
    fabricate_cifar100(str(tmp_path), train=100, test=100)
    _rewrite(os.path.join(tmp_path, "cifar-100-python", name), **changes)
    with pytest.raises(data.DataError, match=message):
        data.load_dataset("cifar100", str(tmp_path), download=False)


def test_missing_cifar100_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError, match="cifar-100-python.*cifar-100-python.tar.gz"):
        data.load_dataset("cifar100", str(tmp_path), download=False)


# The next class within each block of five class ids, circularly, written out by hand.
NEXT = {0: 1, 1: 2, 3: 4, 4: 0, 5: 6, 9: 5, 42: 43, 44: 40, 95: 96, 99: 95}


def balanced_labels(per_class, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(100), per_class))


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_cifar100_asym_exact_flips_to_the_next_class_of_its_group(rate):
    clean = balanced_labels(50)
    noisy = make_noisy_labels(clean, "asym", rate, seed=1, num_classes=100)
    counts = np.array(noise_record(clean, noisy, 100)["transition_counts"])
    for source, target in NEXT.items():
        assert counts[source, target] == int(rate * 50)
        assert counts[source, source] == 50 - int(rate * 50)
    off_diagonal = counts - np.diag(np.diag(counts))
    assert off_diagonal.sum() == 100 * int(rate * 50)  # nothing else moves
    assert np.all(noisy // 5 == clean // 5)  # no flip leaves its group


def test_cifar100_asym_official_draws_each_sample_independently():
    clean = balanced_labels(500)
    noisy = make_noisy_labels(clean, "asym", 0.3, seed=2, num_classes=100, recipe="official")
    t = np.array(noise_record(clean, noisy, 100)["transition"])
    flips = np.array([t[c, c - c % 5 + (c + 1) % 5] for c in range(100)])
    assert np.allclose(np.diag(t) + flips, 1.0)  # only the next class of the group
    assert abs(flips.mean() - 0.3) < 0.01  # 50,000 draws: sd ~0.002
    assert flips.std() > 0.005  # per-class rates scatter (binomial sd ~0.02), unlike "exact"
    assert np.array_equal(noisy, make_noisy_labels(clean, "asym", 0.3, seed=2, num_classes=100, recipe="official"))


def test_asym_refuses_unknown_class_counts():
    with pytest.raises(ValueError, match="CIFAR-10 and CIFAR-100"):
        make_noisy_labels(np.arange(20) % 20, "asym", 0.2, seed=0, num_classes=20)


def test_resnet34_is_the_cifar_resnet34():
    model = build_model("resnet34", 100)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 + 4 + 6 + 3
    # The CIFAR ResNet-34 with 10 classes has 21,282,122 parameters; 90 more
    # classes add 90 x 513 to the last layer.
    assert sum(p.numel() for p in build_model("resnet34", 10).parameters()) == 21_282_122
    assert sum(p.numel() for p in model.parameters()) == 21_282_122 + 90 * 513
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).shape == (2, 100)


def _parse(argv):
    args = cli.build_parser().parse_args(argv)
    cli.resolve_dataset_defaults(args)
    return args


def test_dataset_sets_the_recipe_defaults_and_flags_win():
    c100 = _parse(["--dataset", "cifar100", "--noise", "sym", "--rate", "0.4"])
    assert (c100.model, c100.epochs, c100.lr, c100.batch_size, c100.clip_grad, c100.momentum) == \
        ("resnet34", 200, 0.1, 128, 5.0, 0.9)
    c10 = _parse(["--noise", "sym", "--rate", "0.4"])
    assert (c10.model, c10.epochs, c10.lr) == ("cnn8", 120, 0.01)
    # Weight decay depends on the loss too (L1 instead for amse, nnce, nnfl): engine.regularisation picks it.
    nce_rce = apl_kernels.LossSpec(active="nce", passive="rce")
    assert c100.weight_decay is None and c10.weight_decay is None
    assert engine.regularisation(c100, nce_rce) == {"weight_decay": 1e-5, "l1": 0.0}
    assert engine.regularisation(c10, nce_rce) == {"weight_decay": 1e-4, "l1": 0.0}
    mine = _parse(["--dataset", "cifar100", "--noise", "sym", "--rate", "0.4", "--lr", "0.05", "--model", "resnet18"])
    assert (mine.model, mine.lr, mine.epochs) == ("resnet18", 0.05, 200)
    folder = cli.plan_run(cli.build_parser().parse_args(["--dataset", "cifar100", "--noise", "sym", "--rate", "0.4",
                                                          "--device", "cpu", "--backend", "reference"]))[3]
    assert os.path.basename(folder).startswith("cifar100_resnet34_nce+rce_sym0.4_s0_reference-")


def test_paper_table_has_cifar100():
    assert paper_accuracy("sym", "nce+rce", 0.4, "cifar100") == 59.48
    assert paper_accuracy("asym", "nfl+rce", 0.3, "cifar100") == 54.72
    assert paper_accuracy("sym", "nce+rce", 0.4) == 86.02  # CIFAR-10 stays the default
    assert paper_accuracy("asym", "mae", 0.1, "cifar100") is None


def test_a_cifar100_run_writes_its_data_set_and_noise(tmp_path):
    root = str(tmp_path / "data")
    fabricate_cifar100(root, train=200, test=20)  # 2 training images per class
    out = str(tmp_path / "runs")
    argv = ["--dataset", "cifar100", "--model", "cnn8", "--noise", "asym", "--rate", "0.5", "--epochs", "1",
            "--batch-size", "100", "--amp", "off", "--backend", "reference", "--device", "cpu", "--no-download",
            "--data", root, "--out", out, "--loss", "ce"]
    assert cli.main(argv) == 0
    (name,) = os.listdir(out)
    assert name.startswith("cifar100_cnn8_ce_asym0.5_s0_reference_off-")
    run_dir = os.path.join(out, name)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["data"]["dataset"] == "cifar100" and config["data"]["train"] == 200
    counts = np.array(config["noise"]["transition_counts"])
    # int(0.5 * 2) = 1 image of each class flips, to the next class of its group.
    assert counts.shape == (100, 100) and config["noise"]["realised_rate"] == 0.5
    assert all(counts[source, target] == 1 for source, target in NEXT.items())
    with open(os.path.join(run_dir, "result.json")) as f:
        assert 0.0 <= json.load(f)["final"]["test_acc"] <= 100.0


def test_rotation_matches_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    images = torch.randint(0, 256, (3, 3, 32, 32)).float()
    angles = torch.tensor([15.0, -20.0, 7.3])
    rotated = data.rotate_images(images, angles)
    for image, angle, got in zip(images, angles, rotated):
        expected = TF.rotate(image[None], float(angle), interpolation=InterpolationMode.NEAREST)[0]
        assert torch.equal(got, expected)


def test_cifar100_training_batches_are_rotated_by_up_to_20_degrees():
    """Each augmented image is a rotation, by an angle in [-20, 20], of a zero-padded
    crop/flip of its source image; the angles differ between images."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    images, _ = data.synthetic_cifar(6, seed=3)
    ids = torch.arange(6)
    rotating = data.DeviceLoader(images, ids, batch_size=6, train=True, device="cpu", seed=5,
                                 rotate_degrees=data.DATASETS["cifar100"].rotate_degrees, mean=(0, 0, 0), std=(1, 1, 1))
    plain = data.DeviceLoader(images, ids, batch_size=6, train=True, device="cpu", seed=5, mean=(0, 0, 0), std=(1, 1, 1))
    x_rot, y_rot = next(iter(rotating))
    x_plain, y_plain = next(iter(plain))
    assert torch.equal(y_rot, y_plain)  # same order and crops: rotation draws come last
    x_rot, x_plain = x_rot * 255, x_plain * 255
    best_angles = []
    for got, unrotated in zip(x_rot, x_plain):
        scores = {a: (TF.rotate(unrotated[None], a, interpolation=InterpolationMode.NEAREST)[0].round() == got.round())
                  .float().mean().item() for a in np.arange(-20, 20.01, 0.25)}
        best = max(scores, key=scores.get)
        assert scores[best] > 0.97, (best, scores[best])
        best_angles.append(best)
    assert np.ptp(best_angles) > 5  # the angles vary
    assert data.DATASETS["cifar10"].rotate_degrees == 0  # CIFAR-10 keeps the official crop and flip only
