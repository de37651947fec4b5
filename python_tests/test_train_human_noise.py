"""CIFAR-N human label noise: tiny label files in the released format (a torch.save'd
dict of int64 numpy arrays), the safe loader, the consistency checks, the CLI,
and, when ../shared holds them, the released files' known noise rates."""
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from train_helpers import ROOT, fabricate_cifar
from train import cli, noise
from train.noise import HumanLabelError, load_human_labels, read_human_label_file

SHARED_CIFAR_N = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar-n")


def write_cifar10n(path, clean, seed=0, rates=(0.1, 0.4, 0.2, 0.2, 0.2)):
    """A CIFAR-10N-format file: clean_label and five noisy sets, each with exactly
    round(rate * n) labels moved to another class.  Returns the dict written."""
    rng = np.random.default_rng(seed)
    labels = {"clean_label": np.asarray(clean, dtype=np.int64)}
    for key, rate in zip(("aggre_label", "worse_label", "random_label1", "random_label2", "random_label3"), rates):
        noisy = labels["clean_label"].copy()
        chosen = rng.choice(len(noisy), size=round(rate * len(noisy)), replace=False)
        noisy[chosen] = (noisy[chosen] + rng.integers(1, 10, size=len(chosen))) % 10
        labels[key] = noisy
    torch.save(labels, path)
    return labels


def as_numpy1_file(path):
    """Rewrite a torch.save'd file as numpy 1 wrote it: the released files name the
    array rebuilder numpy.core.multiarray._reconstruct (numpy 2: numpy._core...)."""
    with zipfile.ZipFile(path) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    for name in entries:
        if name.endswith("data.pkl"):
            entries[name] = entries[name].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray\n_reconstruct" in entries[name]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, content in entries.items():
            z.writestr(name, content)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


CLEAN = np.arange(200) % 10


def test_reads_the_labels_of_a_label_set(tmp_path):
    path = str(tmp_path / "CIFAR-10_human.pt")
    written = write_cifar10n(path, CLEAN)
    for label_set, key in (("aggre", "aggre_label"), ("worse", "worse_label"), ("random2", "random_label2")):
        noisy = load_human_labels(path, "cifar10", label_set, CLEAN)
        assert np.array_equal(noisy, written[key]) and noisy.dtype == np.int64
    record = noise.noise_record(CLEAN, load_human_labels(path, "cifar10", "worse", CLEAN))
    assert record["realised_rate"] == pytest.approx(0.4) and record["num_flipped"] == 80


def test_reads_a_file_written_by_numpy_1(tmp_path):
    path = str(tmp_path / "CIFAR-10_human.pt")
    written = write_cifar10n(path, CLEAN)
    as_numpy1_file(path)
    assert np.array_equal(load_human_labels(path, "cifar10", "aggre", CLEAN), written["aggre_label"])


class _RunsCode:
    """Unpickling this would create a folder: the loader must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "evil.pt")
    torch.save({"clean_label": np.zeros(3, dtype=np.int64), "aggre_label": _RunsCode(marker)}, path)
    with pytest.raises(HumanLabelError, match="refused.*no code in the file can run"):
        read_human_label_file(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("payload, message", [
    ({"clean_label": np.zeros(3), "aggre_label": np.zeros(3)}, "refused"),  # float64 arrays
    ([np.zeros(3, dtype=np.int64)], "expected a dict"),
    ({"clean_label": np.zeros((3, 2), dtype=np.int64)}, "1-D integer array"),
])
def test_anything_but_a_dict_of_integer_arrays_is_refused(tmp_path, payload, message):
    path = str(tmp_path / "bad.pt")
    torch.save(payload, path)
    with pytest.raises(HumanLabelError, match=message):
        read_human_label_file(path)


def test_not_a_label_file_at_all(tmp_path):
    path = tmp_path / "CIFAR-10_human.pt"
    path.write_text("not a pickle")
    with pytest.raises(HumanLabelError, match="not a readable CIFAR-N label file"):
        read_human_label_file(str(path))


def test_clean_labels_must_be_the_training_labels(tmp_path):
    path = str(tmp_path / "CIFAR-10_human.pt")
    write_cifar10n(path, CLEAN)
    shifted = CLEAN.copy()
    shifted[17] = (shifted[17] + 1) % 10
    with pytest.raises(HumanLabelError, match="differs from the cifar10 training labels at 1 of 200 images "
                                              r"\(first at index 17\)"):
        load_human_labels(path, "cifar10", "aggre", shifted)
    with pytest.raises(HumanLabelError, match="holds 200 labels but the cifar10 training set has 100"):
        load_human_labels(path, "cifar10", "aggre", CLEAN[:100])


def test_label_sets_belong_to_their_data_set(tmp_path):
    path = str(tmp_path / "CIFAR-10_human.pt")
    write_cifar10n(path, CLEAN)
    with pytest.raises(HumanLabelError, match=r"'noisy' is not a cifar10 label set.*'aggre', 'worse'"):
        load_human_labels(path, "cifar10", "noisy", CLEAN)
    # A CIFAR-10N file offered as CIFAR-100N lacks noisy_label.
    with pytest.raises(HumanLabelError, match=r"missing \['noisy_label'\].*CIFAR-100_human.pt"):
        load_human_labels(path, "cifar100", "noisy", CLEAN)


def test_cifar100n_format(tmp_path):
    path = str(tmp_path / "CIFAR-100_human.pt")
    clean = np.arange(300) % 100
    noisy = clean.copy()
    noisy[:120] = (noisy[:120] + 7) % 100
    torch.save({"clean_label": clean, "noisy_label": noisy, "clean_coarse_label": clean // 5,
                "noisy_coarse_label": noisy // 5}, path)
    got = load_human_labels(path, "cifar100", "noisy", clean)
    assert np.array_equal(got, noisy)
    assert noise.noise_record(clean, got, 100)["realised_rate"] == pytest.approx(0.4)


def test_the_file_is_found_in_the_data_folder_or_its_cifar_n_folder(tmp_path):
    (tmp_path / "cifar-n").mkdir()
    inside = tmp_path / "cifar-n" / "CIFAR-10_human.pt"
    inside.write_bytes(b"x")
    assert noise.find_human_labels("cifar10", None, str(tmp_path)) == str(inside)
    direct = tmp_path / "CIFAR-10_human.pt"
    direct.write_bytes(b"x")
    assert noise.find_human_labels("cifar10", None, str(tmp_path)) == str(direct)
    with pytest.raises(HumanLabelError, match="CIFAR-100_human.pt was found neither.*--human-labels"):
        noise.find_human_labels("cifar100", None, str(tmp_path))
    with pytest.raises(HumanLabelError, match="--human-labels .*nowhere.pt: no such file"):
        noise.find_human_labels("cifar10", str(tmp_path / "nowhere.pt"), str(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--noise", "human"], "--noise human needs --label-set, one of aggre, worse, random1, random2, random3"),
    (["--noise", "human", "--label-set", "noisy"], "needs --label-set.*got 'noisy'"),
    (["--noise", "human", "--label-set", "aggre", "--rate", "0.2"], "--rate is for sym and asym"),
    (["--noise", "sym"], "--noise sym needs --rate"),
    (["--noise", "sym", "--rate", "0.2", "--label-set", "aggre"], "--label-set and --human-labels are for"),
])
def test_cli_refuses_inconsistent_noise_flags(tmp_path, capsys, argv, message):
    assert cli.main(argv + ["--out", str(tmp_path / "runs"), "--synthetic", "20", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert not os.path.exists(tmp_path / "runs")


def test_a_human_noise_run_records_the_realised_noise(tmp_path):
    root = str(tmp_path / "data")
    _, labels = fabricate_cifar(root, per_batch=10, test=10)  # 50 training images
    written = write_cifar10n(os.path.join(root, "CIFAR-10_human.pt"), labels, rates=(0.1, 0.4, 0.2, 0.2, 0.2))
    out = str(tmp_path / "runs")
    argv = ["--noise", "human", "--label-set", "worse", "--epochs", "1", "--batch-size", "25", "--amp", "off",
            "--backend", "reference", "--device", "cpu", "--no-download", "--data", root, "--out", out]
    assert cli.main(argv) == 0
    (name,) = os.listdir(out)
    assert name.startswith("cnn8_nce+rce_human-worse_s0_reference_off-")
    run_dir = os.path.join(out, name)
    with open(os.path.join(run_dir, "config.json")) as f:
        recorded = json.load(f)["noise"]
    assert recorded["type"] == "human" and recorded["label_set"] == "worse" and recorded["rate"] is None
    assert recorded["file"] == os.path.abspath(os.path.join(root, "CIFAR-10_human.pt"))
    assert recorded["realised_rate"] == pytest.approx(0.4) and recorded["num_flipped"] == 20
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (labels, written["worse_label"]), 1)
    assert np.array_equal(recorded["transition_counts"], expected)
    # A file whose clean labels are not this data set's is refused before training.
    write_cifar10n(os.path.join(root, "CIFAR-10_human.pt"), (labels + 1) % 10)
    assert cli.main(argv + ["--overwrite"]) == 2


KNOWN_RATES = [("cifar10", "aggre", 9.01), ("cifar10", "random1", 17.23), ("cifar10", "random2", 18.12),
               ("cifar10", "random3", 17.64), ("cifar10", "worse", 40.21), ("cifar100", "noisy", 40.20)]


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR_N), reason="the released CIFAR-N files (../shared) are absent")
@pytest.mark.parametrize("dataset, label_set, percent", KNOWN_RATES)
def test_released_files_have_their_published_noise_rates(dataset, label_set, percent):
    path = os.path.join(SHARED_CIFAR_N, noise.HUMAN_FILES[dataset])
    clean = read_human_label_file(path)["clean_label"]
    assert len(clean) == 50000
    noisy = load_human_labels(path, dataset, label_set, clean)
    assert round(100 * float((noisy != clean).mean()), 2) == percent


def test_run_identity_holds_the_data_set_label_set_and_label_file_content(tmp_path):
    """The folder's hash changes with --dataset, --label-set and the label file's
    content, not with where the file lies."""
    clean = np.arange(50) % 10
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_cifar10n(str(a / "CIFAR-10_human.pt"), clean, seed=0)
    write_cifar10n(str(b / "copy.pt"), clean, seed=0)  # the same labels under another name
    write_cifar10n(str(b / "other.pt"), clean, seed=1)  # other noisy labels

    def folder(*flags):
        argv = ["--out", "o", "--device", "cpu", "--backend", "reference", "--synthetic", "50", *flags]
        return os.path.basename(cli.plan_run(cli.build_parser().parse_args(argv))[3])

    worse = folder("--noise", "human", "--label-set", "worse", "--data", str(a))
    assert worse.startswith("cnn8_nce+rce_human-worse_s0_reference_synthetic50-")
    assert folder("--noise", "human", "--label-set", "worse", "--human-labels", str(b / "copy.pt")) == worse
    others = {folder("--noise", "human", "--label-set", "worse", "--human-labels", str(b / "other.pt")),
              folder("--noise", "human", "--label-set", "aggre", "--data", str(a))}
    assert len(others) == 2 and worse not in others
    sym10 = folder("--noise", "sym", "--rate", "0.2", "--model", "cnn8", "--epochs", "120", "--lr", "0.01")
    sym100 = folder("--noise", "sym", "--rate", "0.2", "--model", "cnn8", "--epochs", "120", "--lr", "0.01",
                    "--dataset", "cifar100")
    assert sym100 == "cifar100_" + sym10.rsplit("-", 1)[0] + "-" + sym100.rsplit("-", 1)[1]
    assert sym100.rsplit("-", 1)[1] != sym10.rsplit("-", 1)[1]
