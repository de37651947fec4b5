"""train.report on hand-made run folders (no training): grouping by the full run
identity, the mark on non-official data, the plots' axes and titles."""
import copy
import csv
import json
import os

import pytest

import train_helpers  # noqa: F401  (puts the repo root on sys.path)
from train import report

OFFICIAL = {"folder": "/data/cifar-10-batches-py", "differing_from_release": [], "train": 50000, "test": 10000,
            "official": True, "deviations": []}
SUBSET = {"folder": "/data/small", "differing_from_release": [], "train": 500, "test": 100, "official": False,
          "deviations": ["subset: 500 training and 100 test images (the release has 50000 and 10000)"]}


def make_run(root, name, *, loss="nce+rce", alpha=1.0, rate=0.2, seed=0, lr=0.01, data=OFFICIAL, acc=50.0,
             dataset="cifar10", noise="sym", label_set=None, realised=None):
    identity = {"model": "cnn8", "epochs": 2, "amp": "bf16", "backend": "cpu", "lr": lr, "batch_size": 128,
                "dataset": dataset, "loss": {"name": loss, "alpha": alpha, "beta": 1.0}, "rate": rate,
                "seed": seed, "noise_seed": seed, "noise": noise, "noise_recipe": None, "label_set": label_set}
    curve = [{"epoch": e, "test_acc": acc - 2 + e, "clean_acc": 40.0 + e, "noisy_acc": 30.0 + 5 * e,
              "train_loss": 2.0 / e, "epoch_time_s": 1.0, "eval_time_s": 0.1} for e in (1, 2)]
    result = {"identity": identity, "loss": loss, "model": "cnn8", "epochs": 2, "amp": "bf16", "backend": "cpu",
              "seed": seed, "device": "cpu", "device_name": "cpu", "data": copy.deepcopy(data),
              "noise": {"type": noise, "rate": rate, "recipe": None, "label_set": label_set,
                        "realised_rate": rate if realised is None else realised}, "final": {"test_acc": acc},
              "timing": {"median_epoch_s": 1.0, "first_epoch_s": 1.0}}
    folder = os.path.join(root, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in curve)


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path / "runs")
    for seed, acc in ((0, 80.0), (1, 82.0)):
        for rate in (0.2, 0.6):
            make_run(root, f"a_ce_{rate}_{seed}", loss="ce", rate=rate, seed=seed, acc=acc - 20 * rate)
            make_run(root, f"a_ncerce_{rate}_{seed}", rate=rate, seed=seed, acc=acc)
    make_run(root, "a_alpha10", alpha=10.0, acc=10.0)         # same loss, other parameters
    make_run(root, "b_lr", lr=0.1, acc=11.0)                  # another setup: never averaged with the others
    make_run(root, "c_subset", data=SUBSET, acc=12.0)          # not the official data
    return root


def read_csv(path):
    with open(path) as f:
        return {row[0]: row for row in csv.reader(f)}


def test_tables_group_by_identity_and_mark_other_data(runs, tmp_path, monkeypatch):
    figures = []
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    written = report.make_report(runs, str(tmp_path / "report"))
    csvs = sorted(p for p in written["tables"] if p.endswith(".csv"))
    assert len(csvs) == 3  # official lr 0.01, lr 0.1, subset
    tables = {p: read_csv(p) for p in csvs}
    (main,) = [t for t in tables.values() if "ce" in t]
    assert main["loss"][1:] == ["official_data"] + [f"{r}_{field}" for r in ("0.2", "0.6") for field in
                                                    ("mean", "std", "n", "paper", "eps_softmax", "eps_softmax_std")]
    # Two seeds averaged; the alpha=10 run has its own row; published numbers beside: Ma et al.'s,
    # then the epsilon-softmax paper's Table 2 (CIFAR-10 sym 0.2 NCE+RCE 88.41 ± 0.24).
    assert main["nce+rce (alpha=1)"][1:8] == ["yes", "81.00", "1.41", "2", "89.22", "88.41", "0.24"]
    assert main["nce+rce (alpha=10)"][2:5] == ["10.00", "0.00", "1"]
    assert main["ce"][2] == "77.00" and main["ce"][8] == "69.00"
    (subset,) = [t for t in tables.values() if any(row[1].startswith("no: subset") for row in t.values())]
    assert subset["nce+rce"][2] == "12.00"
    (subset_md,) = [p for p in written["tables"] if p.endswith(".md") and "NOT-OFFICIAL-DATA" in p]
    with open(subset_md) as f:
        text = f.read()
    assert text.startswith("**NOT THE OFFICIAL DATA (subset: 500 training")
    assert "| NCE+RCE | 12.00† (1) [Ma 89.22; ε-softmax 88.41 ± 0.24] |" in text
    # Plots: ticks at the rates that exist, titles in words, the curves' four panels.
    accuracy = [f for f in figures if f is not None and f.axes and "Test accuracy against noise rate" in
                f.axes[0].get_title()]
    main_plot = [f for f in accuracy if len(f.axes[0].get_xticks()) == 2]
    assert [float(t) for t in main_plot[0].axes[0].get_xticks()] == [0.2, 0.6]
    main_title = main_plot[0].axes[0].get_title().replace("\n", " ")
    assert "CIFAR-10, cnn8, 2 epochs, AMP bf16, backend cpu, symmetric label noise" in main_title
    assert "Dotted x: published (Ma et al., ICML 2020)" in main_title
    assert "Dashed +: published (ε-softmax paper, NeurIPS 2024, Table 2)" in main_title
    # Both sources are drawn: a dotted line for Ma et al.'s numbers, a dashed one for the epsilon-softmax paper's.
    styles = {line.get_linestyle() for line in main_plot[0].axes[0].get_lines()}
    assert {":", "--"} <= styles
    curves = [f for f in figures if f is not None and f._suptitle is not None
              and f._suptitle.get_text().startswith("Learning curves")]
    assert len(curves) == 3
    (two_rates,) = [f for f in curves if len(f.axes) == 8]  # 4 panels x 2 rates
    labels = [ax.get_ylabel().replace("\n", " ") for ax in two_rates.axes[::2]]
    assert labels == ["test accuracy (%)", "train accuracy (%) on the clean labels",
                      "train accuracy (%) on the noisy labels", "training loss"]


def test_license_and_citation_files():
    yaml = pytest.importorskip("yaml")
    root = train_helpers.ROOT
    with open(os.path.join(root, "LICENSE")) as f:
        assert f.readline().strip() == "MIT License"
    with open(os.path.join(root, "CITATION.cff"), encoding="utf-8") as f:
        citation = yaml.safe_load(f)
    assert citation["cff-version"] == "1.2.0" and citation["title"].startswith("apl_kernels")
    assert citation["license"] == "MIT" and citation["authors"]
    titles = " / ".join(r["title"] for r in citation["references"])
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for paper in ("Normalized Loss Functions for Deep Learning with Noisy Labels",
                  "Asymmetric Loss Functions for Learning with Noisy Labels",
                  "Active Negative Loss Functions for Learning with Noisy Labels",
                  "Joint Asymmetric Loss for Learning with Noisy Labels",
                  "Approximating One-Hot Vectors for Mitigating Label Noise"):
        assert paper in titles and paper in readme, paper


def test_published_numbers_are_those_of_the_run_data_set(tmp_path):
    """CIFAR-100 results sit beside the CIFAR-100 table of Ma et al., CIFAR-10 beside
    CIFAR-10's; CIFAR-N runs (no published numbers) get columns at their realised rates."""
    root = str(tmp_path / "runs")
    make_run(root, "c10", rate=0.4, acc=70.0)
    make_run(root, "c100", rate=0.4, acc=50.0, dataset="cifar100")
    make_run(root, "c100_asym", rate=0.3, acc=40.0, dataset="cifar100", noise="asym", loss="nfl+rce")
    for label_set, realised in (("aggre", 0.0901), ("worse", 0.4021)):
        make_run(root, f"n_{label_set}", rate=None, noise="human", label_set=label_set, realised=realised, acc=60.0)
    written = report.make_report(root, str(tmp_path / "report"))
    tables = {os.path.basename(p): read_csv(p) for p in written["tables"] if p.endswith(".csv")}
    (c10,) = [t for name, t in tables.items() if name.startswith("table_sym_cnn8")]
    (c100,) = [t for name, t in tables.items() if name.startswith("table_sym_cifar100_")]
    (c100_asym,) = [t for name, t in tables.items() if name.startswith("table_asym_cifar100_")]
    (human,) = [t for name, t in tables.items() if name.startswith("table_human_")]
    # Published values (Ma et al.: CIFAR-10 sym 0.4 NCE+RCE 86.02; CIFAR-100 sym 0.4 59.48, asym 0.3 NFL+RCE 54.72).
    assert c10["nce+rce"][2:6] == ["70.00", "0.00", "1", "86.02"]
    assert c100["nce+rce"][2:6] == ["50.00", "0.00", "1", "59.48"]
    assert c100_asym["nfl+rce"][2:6] == ["40.00", "0.00", "1", "54.72"]
    # Both label sets of one CIFAR-N file in one table, a column each, nothing published beside.
    assert human["loss"][2:] == [f"{r}_{field}" for r in ("0.0901", "0.4021") for field in
                                 ("mean", "std", "n", "paper", "eps_softmax", "eps_softmax_std")]
    assert human["nce+rce"][2:] == ["60.00", "0.00", "1", "", "", ""] * 2


def test_eps_softmax_table_beside_its_losses(tmp_path):
    """The epsilon-softmax paper's Table 2 (NeurIPS 2024; its own reruns of the
    baselines) beside our runs of the losses it has, named as its source; nothing
    for a loss it lacks.  Expected values typed from the paper."""
    root = str(tmp_path / "runs")
    make_run(root, "agce", loss="nce+agce", rate=0.8, acc=50.0)
    make_run(root, "ece", loss="ece+mae", rate=0.8, acc=55.0)
    make_run(root, "sce", loss="ce+rce", rate=0.8, acc=20.0)      # sce under its canonical name
    make_run(root, "anl", loss="nce+nnce", rate=0.8, acc=45.0)    # not in either table
    make_run(root, "c100", loss="ece+mae", rate=0.4, acc=40.0, dataset="cifar100", noise="asym")
    written = report.make_report(root, str(tmp_path / "report"))
    tables = {os.path.basename(p): read_csv(p) for p in written["tables"] if p.endswith(".csv")}
    (c10,) = [t for name, t in tables.items() if name.startswith("table_sym_cnn8")]
    (c100,) = [t for name, t in tables.items() if name.startswith("table_asym_cifar100_")]
    # loss, official, mean, std, n, Ma et al., epsilon-softmax mean and std
    assert c10["nce+agce"][2:] == ["50.00", "0.00", "1", "", "49.98", "4.81"]
    assert c10["ece+mae"][5:] == ["", "58.96", "0.70"]
    assert c10["ce+rce"][5:] == ["30.69", "25.88", "0.49"]   # SCE: Ma et al. 30.69, epsilon-softmax 25.88
    assert c10["nce+nnce"][5:] == ["", "", ""]
    assert c100["ece+mae"][5:] == ["", "48.51", "0.36"]
    (md,) = [p for p in written["tables"] if os.path.basename(p).startswith("table_sym_cnn8") and p.endswith(".md")]
    with open(md, encoding="utf-8") as f:
        text = f.read()
    assert "| NCE+AGCE | 50.00 (1) [ε-softmax 49.98 ± 4.81] |" in text
    assert "| SCE | 20.00 (1) [Ma 30.69; ε-softmax 25.88 ± 0.49] |" in text
    assert "| NCE+NNCE | 45.00 (1) |" in text
    assert "Approximating One-Hot Vectors for Mitigating Label Noise" in text and "NeurIPS 2024, Table 2" in text
    assert "own reruns" in text and "Normalized Loss Functions for Deep Learning with Noisy Labels" in text


def test_eps_softmax_table_covers_its_preset():
    """Every loss of ``--preset eps-softmax`` has the paper's number at every rate the preset runs."""
    from train.paper_results import PRESETS, paper_accuracy
    preset = PRESETS["eps-softmax"]
    for noise, rates in preset["rates"].items():
        for loss in preset["losses"]:
            for rate in rates:
                for dataset in ("cifar10", "cifar100"):
                    assert paper_accuracy(noise, loss, rate, dataset, source="eps-softmax") is not None, \
                        (noise, loss, rate, dataset)
    assert paper_accuracy("sym", "nce+agce", 0.8, source="eps-softmax") == 49.98
    assert paper_accuracy("asym", "nce+ael", 0.1, "cifar100", source="eps-softmax") == 58.20
    assert paper_accuracy("sym", "nce+nnce", 0.8, source="eps-softmax") is None
