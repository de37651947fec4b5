"""The later papers' losses in train: their official settings (values transcribed
from each paper's released config, independent of the code under test), the L1
switch, and every preset's own losses trained end to end for one epoch on
random CIFAR-shaped data."""
import json
import os

import pytest

import train_helpers  # noqa: F401  (puts the repo root on sys.path)
from train import cli, engine, sweep
from train.paper_results import PRESETS

BASE = ["--batch-size", "16", "--backend", "reference", "--device", "cpu", "--amp", "off"]


@pytest.mark.parametrize("dataset, loss, noise, rate, expected", [
    # hitcszx/ALFs config.py, CIFAR10_CONFIG / CIFAR100_CONFIG
    ("cifar10", "ael", "sym", 0.4, dict(a=2.5)),
    ("cifar10", "aul", "sym", 0.4, dict(a=5.5, q=3.0)),
    ("cifar10", "agce", "asym", 0.2, dict(a=0.6, q=0.6)),
    ("cifar10", "nce+agce", "sym", 0.4, dict(alpha=1.0, beta=4.0, a=6.0, q=1.5)),
    ("cifar10", "nce+aul", "asym", 0.2, dict(alpha=1.0, beta=4.0, a=6.3, q=1.5)),
    ("cifar10", "nce+ael", "sym", 0.8, dict(alpha=1.0, beta=4.0, a=5.0)),
    ("cifar100", "nce+agce", "sym", 0.4, dict(alpha=10.0, beta=0.1, a=1.8, q=3.0)),
    ("cifar100", "nce+aul", "sym", 0.4, dict(alpha=10.0, beta=0.015, a=6.0, q=3.0)),
    ("cifar100", "nce+ael", "sym", 0.4, dict(alpha=10.0, beta=0.1, a=1.5)),
    # Virusdoll/Active-Negative-Loss config/cifar10_anl_ce.json, cifar10_anl_fl.json, cifar100_anl_ce.json
    ("cifar10", "nce+nnce", "sym", 0.4, dict(alpha=5.0, beta=5.0, min_prob=1e-7)),
    ("cifar10", "nfl+nnfl", "asym", 0.3, dict(alpha=5.0, beta=5.0, gamma=0.5)),
    ("cifar100", "nce+nnce", "sym", 0.4, dict(alpha=10.0, beta=1.0)),
    # cswjl/joint-asymmetric-loss, as gathered in ../shared/reference/official-settings.md
    ("cifar10", "nce+amse", "sym", 0.4, dict(alpha=1.0, beta=1.0, a=30.0)),
    ("cifar100", "nfl+amse", "sym", 0.4, dict(alpha=5.0, beta=1.0, a=20.0)),
    # cswjl/eps-softmax config.py ECEandMAE; their MAE is 2(1-p_y), so their beta doubles here
    ("cifar10", "ece+mae", "sym", 0.8, dict(alpha=0.01, beta=10.0, m=1e5)),
    ("cifar10", "ece+mae", "asym", 0.4, dict(alpha=0.02, beta=10.0, m=1e3)),
    ("cifar100", "ece+mae", "sym", 0.6, dict(alpha=0.00125, beta=2.0, m=1e4)),
    ("cifar100", "ece+mae", "asym", 0.3, dict(alpha=0.005, beta=2.0, m=1e2)),
])
def test_official_settings_of_the_later_losses(dataset, loss, noise, rate, expected):
    spec = engine.make_criterion(loss, noise, "reference", dataset=dataset, rate=rate).spec
    for key, value in expected.items():
        assert getattr(spec, key) == pytest.approx(value), key


def test_eps_softmax_needs_parameters_at_unlisted_rates():
    with pytest.raises(ValueError, match="rates"):
        engine.make_criterion("ece+mae", "sym", "reference", dataset="cifar100", rate=0.3)
    spec = engine.make_criterion("ece+mae", "sym", "reference", dataset="cifar100", rate=0.3, alpha=0.01,
                                 beta=2.0, m=1e4).spec
    assert (spec.alpha, spec.beta, spec.m) == (0.01, 2.0, 1e4)


@pytest.mark.parametrize("loss, dataset, expected", [
    ("nce+nnce", "cifar10", {"weight_decay": 0.0, "l1": 5e-5}),   # ANL: L1 5e-5, weight_decay 0
    ("nfl+amse", "cifar10", {"weight_decay": 0.0, "l1": 5e-5}),
    ("nce+amse", "cifar100", {"weight_decay": 0.0, "l1": 5e-6}),
    ("nfl+nnfl", "cifar100", {"weight_decay": 0.0, "l1": 5e-7}),  # ANL cifar100_anl_*.json: delta 5e-7
    ("nce+agce", "cifar10", {"weight_decay": 1e-4, "l1": 0.0}),
])
def test_l1_replaces_weight_decay_where_the_papers_do(loss, dataset, expected):
    from apl_kernels import LossSpec
    assert engine.official_regularisation(LossSpec.from_name(loss), dataset) == expected


def test_presets_plan_the_papers_grids(tmp_path):
    for name, preset in PRESETS.items():
        args, flags = sweep.build_parser().parse_known_args(["--preset", name, "--seeds", "0"])
        runs = sweep.plan(args, ["--out", str(tmp_path), *BASE])
        expected = len(preset["losses"]) * (len(preset["rates"]["sym"]) + len(preset["rates"]["asym"]))
        assert len(runs) == expected, name


def test_the_presets_new_terms_train_for_an_epoch(tmp_path):
    own = ["nce+agce", "nce+aul", "nce+ael", "nce+nnce", "nfl+nnfl", "nfl+amse", "ece+mae"]  # every new term
    assert set(own) <= {loss for p in PRESETS.values() for loss in p["losses"]}
    for loss in own:
        assert cli.main(["--loss", loss, "--noise", "sym", "--rate", "0.4", "--epochs", "1", "--synthetic", "32",
                         "--out", str(tmp_path), *BASE]) == 0, loss
    for name in os.listdir(tmp_path):
        with open(os.path.join(tmp_path, name, "result.json")) as f:
            result = json.load(f)
        assert result["final"]["train_loss"] == result["final"]["train_loss"], name  # finite, not NaN
        uses_l1 = any(t in result["loss_spec"]["name"] for t in ("nnce", "nnfl", "amse"))
        assert (result["l1"], result["weight_decay"]) == ((5e-5, 0.0) if uses_l1 else (0.0, 1e-4)), name
