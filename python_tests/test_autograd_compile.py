"""gradcheck of the CPU op, torch.library.opcheck, and torch.compile(fullgraph=True)
of a training step that uses the fused loss."""
import pytest
import torch

from apl_kernels import LossSpec, apl_loss
from apl_kernels.spec import REDUCTIONS

op = torch.ops.apl_kernels.fused_loss.default


@pytest.mark.parametrize("grad", ("official", "exact"))
@pytest.mark.parametrize("loss", ("nce+rce", "ce+mae", "gce+nrce", "ngce+nmae", "fl", "nfl+rce"))
def test_gradcheck_cpu(loss, grad):
    spec = LossSpec.from_name(loss, grad=grad)
    if grad == "official" and spec.active in ("fl", "nfl"):
        pytest.skip("the official focal gradient is not the derivative of the loss by design")
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, -100, 4, 2, 1])
    for reduction in ("mean", "sum", "none"):
        x = torch.randn(5, 6, dtype=torch.float64, generator=g).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: apl_loss(t, y, spec, reduction=reduction, backend="cpu"), (x,))


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_opcheck(reduction, dtype):
    x = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1, -100, 3, 4, 2])
    args = (x, y, *LossSpec.from_name("nfl+rce").op_args(), REDUCTIONS[reduction], -100, True)
    torch.library.opcheck(op, args)
    args_no_grad = (x.detach(), y, *LossSpec.from_name("nce+mae").op_args(), REDUCTIONS[reduction], -100, False)
    torch.library.opcheck(op, args_no_grad)


def test_compile_training_step():
    """A small model's training step, compiled whole, matches the eager reference step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(16, 12)
    y = torch.randint(0, 5, (16,))
    y[3] = -100

    def make_model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))

    def forward(model, backend):
        return apl_loss(model(x), y, "nfl+rce", backend=backend)

    compiled_model, eager_model = make_model(), make_model()
    step = torch.compile(lambda: forward(compiled_model, "cpu"), fullgraph=True)
    for _ in range(2):  # the second call runs the cached graphs
        for p in compiled_model.parameters():
            p.grad = None
        loss = step()
        loss.backward()
    eager_loss = forward(eager_model, "reference")
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for pc, pe in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6)
