"""The engine on its own: official per-loss settings, the fp16/GradScaler step,
which dtype the loss sees, and the timing summary."""
import math

import pytest
import torch
from torch import nn

import train_helpers  # noqa: F401  (puts the repo root on sys.path)
from apl_kernels import backends
from train import engine
from train.data import DeviceLoader, synthetic_cifar


@pytest.mark.parametrize("loss, noise, expected", [
    ("nfl", "sym", dict(alpha=10.0, gamma=0.5)),       # NFL alone: scale 10 for symmetric noise
    ("nfl", "asym", dict(alpha=1.0, gamma=0.5)),       # and 1 for asymmetric
    ("fl", "sym", dict(alpha=1.0, gamma=0.5)),
    ("sce", "sym", dict(alpha=0.1, beta=1.0)),         # SCE = CE + RCE, alpha 0.1, beta 1
    ("ce+rce", "asym", dict(alpha=0.1, beta=1.0)),
    ("gce", "sym", dict(q=0.7)),
    ("ngce", "sym", dict(q=0.1)),
    ("ngce+rce", "asym", dict(q=0.1, alpha=1.0, beta=1.0)),
    ("nce+rce", "sym", dict(alpha=1.0, beta=1.0)),
    ("nfl+mae", "sym", dict(alpha=1.0, beta=1.0, gamma=0.5)),
])
def test_official_settings(loss, noise, expected):
    spec = engine.make_criterion(loss, noise, "reference").spec
    for key, value in expected.items():
        assert getattr(spec, key) == value, key
    assert spec.A == pytest.approx(math.log(1e-4))


def test_overrides_win_and_none_keeps():
    spec = engine.make_criterion("nfl", "sym", "reference", alpha=2.5, gamma=None, q=0.3).spec
    assert (spec.alpha, spec.gamma, spec.q) == (2.5, 0.5, 0.3)


def test_loss_dtype_follows_the_backend():
    assert not engine.loss_takes_amp_dtype(engine.make_criterion("ce", "sym", "reference"), "cpu")
    auto = engine.make_criterion("ce", "sym", "auto")
    assert engine.loss_takes_amp_dtype(auto, "cpu") == (backends.resolve("auto", torch.device("cpu")) != "reference")


class Recorder(nn.Module):
    """Wraps a criterion and records the dtype of the logits it receives."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.backend, self.dtypes = inner, inner.backend, set()

    def forward(self, logits, target):
        self.dtypes.add(logits.dtype)
        return self.inner(logits, target)


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_one_epoch_step_with_amp(amp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    images, labels = synthetic_cifar(40, seed=0)
    loader = DeviceLoader(images, (labels, labels), batch_size=16, train=True, device="cpu")
    criterion = Recorder(engine.make_criterion("nce+rce", "sym", "reference"))
    optimizer = engine.make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    before = [p.detach().clone() for p in model.parameters()]
    metrics = engine.train_one_epoch(model, loader, criterion, optimizer, device="cpu", amp=amp, scaler=scaler)
    assert metrics["samples"] == 40 and metrics["steps"] == 3
    assert math.isfinite(metrics["train_loss"]) and metrics["noisy_acc"] == metrics["clean_acc"]
    assert criterion.dtypes == {torch.float32}  # the reference always gets fp32 logits
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    test = engine.evaluate(model, DeviceLoader(images, labels, batch_size=64, train=False, device="cpu"),
                           device="cpu", amp=amp)
    assert 0 <= test["test_acc"] <= 100


def test_clipping_bounds_the_gradient_norm():
    model = nn.Linear(4, 10)
    batch = [(torch.randn(8, 4) * 1e3, torch.randint(0, 10, (8,)))]
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    original = optimizer.step

    def step(*a, **k):
        seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item())
        return original(*a, **k)
    optimizer.step = step
    engine.train_one_epoch(model, batch, engine.make_criterion("ce", "sym", "reference"), optimizer, device="cpu",
                           amp="off", clip_grad=0.5)
    assert seen[0] == pytest.approx(0.5, rel=1e-4)


def test_fp16_needs_a_scaler():
    with pytest.raises(ValueError, match="GradScaler"):
        engine.train_one_epoch(nn.Linear(2, 2), [], None, None, device="cpu", amp="fp16")


def test_first_epoch_is_reported_apart():
    t = engine.timing_summary([9.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.2, 0.3])
    assert t["first_epoch_s"] == 9.0 and t["median_epoch_s"] == 2.0 and t["median_eval_s"] == 0.2
    assert engine.timing_summary([4.0], [1.0])["median_epoch_s"] is None


@pytest.mark.parametrize("loss, noise, expected", [
    # Ma et al.'s CIFAR-100 yaml files (HanxunH/Active-Passive-Losses configs/cifar100/sym/*.yaml)
    ("nce+rce", "sym", dict(alpha=10.0, beta=0.1)),
    ("nfl+rce", "asym", dict(alpha=10.0, beta=0.1, gamma=0.5)),
    ("nce+mae", "sym", dict(alpha=10.0, beta=1.0)),
    ("sce", "sym", dict(alpha=6.0, beta=0.1)),
    ("ngce", "sym", dict(q=0.7)),
    ("nfl", "sym", dict(alpha=1.0)),  # CIFAR-100's nfl.yaml: scale 1 (CIFAR-10 symmetric: 10)
])
def test_official_settings_cifar100(loss, noise, expected):
    spec = engine.make_criterion(loss, noise, "reference", dataset="cifar100").spec
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


def test_official_regularisation_is_l2_for_ma_et_al_losses():
    from apl_kernels import LossSpec
    assert engine.official_regularisation(LossSpec.from_name("nce+rce"), "cifar10") == {"weight_decay": 1e-4, "l1": 0.0}
    assert engine.official_regularisation(LossSpec.from_name("ce"), "cifar100") == {"weight_decay": 1e-5, "l1": 0.0}


def test_l1_penalty_adds_delta_sign_theta_to_each_step():
    """One SGD step (lr 1, no momentum, no clipping) with l1 = delta moves every
    weight by -delta * sign(theta) more than the same step without it."""
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    x, y = torch.randn(8, 6), torch.randint(0, 10, (8,))
    delta = 1e-3
    moved = {}
    for l1 in (0.0, delta):
        model = nn.Linear(6, 10)
        model.load_state_dict(base.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        metrics = engine.train_one_epoch(model, [(x, y)], engine.make_criterion("ce", "sym", "reference"), optimizer,
                                         device="cpu", amp="off", clip_grad=0, l1=l1)
        moved[l1] = ([p.detach().clone() for p in model.parameters()], metrics["train_loss"])
    for before, without, with_l1 in zip(base.parameters(), moved[0.0][0], moved[delta][0]):
        assert torch.allclose(with_l1 - without, -delta * torch.sign(before.detach()), atol=1e-7)
    assert moved[0.0][1] == moved[delta][1]  # train_loss is the loss without the penalty
