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
