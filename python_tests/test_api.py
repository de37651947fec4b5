"""Public API: bad input, backend choice and its errors, build_info, enum codes."""
import importlib.metadata

import pytest
import torch

import apl_kernels
from apl_kernels import APLLoss, LossSpec, apl_loss, backends, build_info, ops, spec


def _inputs(n=4, k=5):
    return torch.randn(n, k), torch.randint(0, k, (n,))


@pytest.mark.parametrize("backend", ("reference", "cpu", "auto"))
@pytest.mark.parametrize("bad", (5, 17, -1, -101))
def test_out_of_range_target_names_the_value(backend, bad):
    x, y = _inputs()
    y[2] = bad
    with pytest.raises(ValueError, match=rf"target value {bad}\b"):
        apl_loss(x, y, "nce+rce", backend=backend)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bool))
def test_non_integer_target(dtype):
    x, y = _inputs()
    with pytest.raises(TypeError, match="target"):
        apl_loss(x, y.to(dtype), backend="cpu")


def test_integer_logits():
    with pytest.raises(TypeError, match="logits"):
        apl_loss(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_int32_target_is_accepted():
    x, y = _inputs()
    a = apl_loss(x, y.int(), backend="cpu")
    b = apl_loss(x, y, backend="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("logits_shape,target_shape,match", [
    ((4,), (4,), "logits must be"),
    ((4, 1), (4,), "K = 2"),
    ((4, 5), (3,), "does not match"),
    ((4, 5), (4, 1), "does not match"),
    ((4, 5, 2), (4, 5), "does not match"),
    ((4, 5), (), "does not match"),
])
def test_bad_shapes(logits_shape, target_shape, match):
    x = torch.randn(*logits_shape)
    y = torch.zeros(target_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        apl_loss(x, y, backend="cpu")


def test_bad_options():
    x, y = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        apl_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        apl_loss(x, y, backend="tpu")
    with pytest.raises(ValueError, match="cannot parse"):
        apl_loss(x, y, "nce+ce")
    with pytest.raises(ValueError, match="q must"):
        apl_loss(x, y, "gce", q=0.0)
    with pytest.raises(ValueError, match="either a LossSpec"):
        apl_loss(x, y, LossSpec(), alpha=2.0)
    with pytest.raises(ValueError, match="reduction"):
        APLLoss("nce+rce", reduction="avg")


def test_unavailable_backends_say_why(monkeypatch):
    x, y = _inputs()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*(CUDA|cuda)"):
            apl_loss(x, y, backend="cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: .*TRITON_INTERPRET"):
            apl_loss(x, y, backend="triton")
    # Without the extension: "cpu" says so and how to fix it; "auto" falls back to the reference.
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "EXTENSION_ERROR", ImportError("libfoo.so: cannot open"))
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: .*libfoo.so.*pip install"):
        apl_loss(x, y, backend="cpu")
    assert backends.resolve("auto", x.device) == "reference"
    assert torch.isfinite(apl_loss(x, y, backend="auto"))


def test_auto_picks_the_cpu_kernel():
    assert backends.resolve("auto", torch.device("cpu")) == "cpu"


def test_build_info():
    info = build_info()
    assert info["version"] == apl_kernels.__version__ == importlib.metadata.version("apl_kernels")
    assert info["extension"] is True and info["extension_error"] is None
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool)
    assert info["torch_built"] == torch.__version__
    assert info["torch_runtime"] == torch.__version__
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda
        assert info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None and info["cuda_arch_list"] is None
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    assert info["triton"] == triton_version


def test_enum_codes_agree_with_the_extension():
    C = ops._C
    assert C.ACTIVE_TERMS == spec.ACTIVE_TERMS
    assert C.PASSIVE_TERMS == spec.PASSIVE_TERMS
    assert C.GRAD_MODES == spec.GRAD_MODES
    assert C.REDUCTIONS == spec.REDUCTIONS
    assert C.P_MIN == spec.P_MIN


def test_module():
    x, y = _inputs(6, 4)
    crit = APLLoss("sce", alpha=0.1, beta=1.0, reduction="sum", backend="cpu")
    assert "ce+rce" in repr(crit) and "backend='cpu'" in repr(crit)
    expected = apl_loss(x, y, "ce+rce", alpha=0.1, beta=1.0, reduction="sum", backend="reference")
    torch.testing.assert_close(crit(x, y), expected)


def test_autocast_keeps_half_logits():
    """Under CPU autocast, bf16 logits reach the kernel as bf16: fp32 loss, bf16 gradient."""
    lin = torch.nn.Linear(8, 5)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    seen = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        logits.register_hook(lambda g: seen.update(grad=g.dtype))
        loss = apl_loss(logits, y, "nce+rce", backend="cpu")
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert seen["grad"] == torch.bfloat16 and lin.weight.grad is not None


@pytest.mark.parametrize("name,active,passive", [
    ("nce+agce", "nce", "agce"), ("agce+nce", "nce", "agce"), ("nfl+nnfl", "nfl", "nnfl"), ("ece+mae", "ece", "mae"),
    ("poly1", "ce", "mae"), ("taylor", "taylor", "none"), ("nnce", "none", "nnce"), ("taylor+amse", "taylor", "amse"),
    (" NCE+AMSE ", "nce", "amse"),
])
def test_new_terms_parse(name, active, passive):
    s = LossSpec.from_name(name)
    assert (s.active, s.passive) == (active, passive)


def test_new_parameters_reach_the_spec():
    s = LossSpec.from_name("nce+aul", a=6.3, q=1.5, beta=4.0)
    assert (s.a, s.q, s.beta) == (6.3, 1.5, 4.0)
    assert LossSpec.from_name("ece+mae", m=1e3).m == 1e3
    assert LossSpec.from_name("taylor", t=6).t == 6
    assert LossSpec.from_name("nfl+nnfl", min_prob=1e-5, gamma=2.0).op_args()[-1] == 1e-5
    crit = APLLoss("nce+agce", a=6.0, q=1.5, backend="reference")
    assert (crit.spec.a, crit.spec.q) == (6.0, 1.5) and "a=6.0" in repr(crit)
    # The op arguments in the schema's order (csrc/apl_ops.cpp).
    assert LossSpec.from_name("ece", m=2.0, t=3, min_prob=1e-4, a=5.0).op_args()[8:] == (5.0, 2.0, 3, 1e-4)


def test_unset_parameters_take_their_terms_defaults():
    assert LossSpec.from_name("gce").q == 0.7 and LossSpec.from_name("agce").q == 2.0
    assert LossSpec.from_name("aul").q == 0.9 and LossSpec.from_name("aul").a == 1.5
    assert LossSpec.from_name("nce+ael").a == 3.0 and LossSpec.from_name("nce+amse").a == 30.0
    assert LossSpec.from_name("ece+mae").m == 1e5 and LossSpec.from_name("taylor").t == 2
    assert LossSpec().q == 0.7 and LossSpec().gamma == 0.5  # nce+rce: nothing reads them; the old defaults


@pytest.mark.parametrize("name,params,match", [
    ("ngce+agce", {}, "both terms read q"),
    ("gce+aul", {}, "both terms read q"),
    ("gce+agce", dict(q=2.0), r"q must lie in \(0, 1\] for gce"),
    ("agce", dict(q=0.0), "q must be > 0 for agce"),
    ("aul", dict(a=1.0), "a must be > 1 for aul"),
    ("ael", dict(a=-1.0), "a must be > 0 for ael"),
    ("amse", dict(a=0.0), "a must be > 0 for amse"),
    ("ece", dict(m=-1.0), "m must be >= 0"),
    ("taylor", dict(t=0), r"t \(the Taylor order\) must lie in"),
    ("taylor", dict(t=2.5), "must be an integer"),
    ("taylor", dict(t=True), "must be an integer"),
    ("nnce", dict(min_prob=1.0), r"min_prob must lie in \(0, 1\)"),
    ("nnfl", dict(min_prob=0.0), r"min_prob must lie in \(0, 1\)"),
    ("nce+agce", dict(a=float("nan")), "a must be a finite number"),
    ("nnce+nnfl", {}, "cannot parse"),
    ("ece+taylor", {}, "cannot parse"),
])
def test_new_parameters_are_validated(name, params, match):
    with pytest.raises(ValueError, match=match):
        LossSpec.from_name(name, **params)
    with pytest.raises(ValueError, match=match):
        apl_loss(*_inputs(), name, backend="reference", **params)


def test_cached_spec_by_name_still_refuses_what_from_name_refuses():
    """apl_loss caches the LossSpec of a name and its parameters: a value that equals and
    hashes as a good one (True == 1, 2 == 2.0) must still get its own validation."""
    x, y = _inputs()
    apl_loss(x, y, "taylor", t=1, backend="reference")          # caches t=1
    with pytest.raises(ValueError, match="must be an integer"):
        apl_loss(x, y, "taylor", t=True, backend="reference")   # True == 1
    apl_loss(x, y, "nce+rce", alpha=2, backend="reference")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        apl_loss(x, y, "nce+rce", alpha=[2], backend="reference")  # unhashable: not cached
    a = apl_loss(x, y, "nce+rce", alpha=2.0, beta=0.5, backend="reference")
    b = apl_loss(x, y, "nce+rce", alpha=2.0, beta=1.0, backend="reference")
    assert not torch.equal(a, b)  # a parameter change reaches the loss
