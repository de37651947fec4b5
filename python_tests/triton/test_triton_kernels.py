"""The Triton backend against the eager reference, in every launch regime.

Runs on CPU tensors under TRITON_INTERPRET=1 (fp32 and fp64, small shapes) and
on CUDA tensors without it.  Every expected value comes from
apl_kernels.reference (autograd for the gradients).
"""
import pytest
import torch

pytest.importorskip("triton")

from apl_kernels import APLLoss, LossSpec, apl_loss  # noqa: E402
from apl_kernels.reference import reference_loss  # noqa: E402
from apl_kernels.spec import ACTIVE_TERMS, PASSIVE_TERMS, REDUCTIONS, TERMS  # noqa: E402

from apl_testing import expect_device_assert  # noqa: E402
from apl_triton_helpers import regime  # noqa: E402

# Driven by the term tables of apl_kernels.spec: a new term is tested here without new code.
ACTIVES = tuple(t for t in ACTIVE_TERMS if t != "none")
PASSIVES = tuple(t for t in PASSIVE_TERMS if t != "none")
SINGLE_TERMS = tuple(TERMS)
PAIRS = tuple(f"{a}+{p}" for a in ACTIVES for p in PASSIVES)
# The pairs the papers use (Ma et al.; ALFs; ANL; JAL; eps-softmax), in every regime.
KEY_PAIRS = ("nce+rce", "nce+mae", "nfl+rce", "ngce+nrce", "fl+nmae", "nce+agce", "nce+aul", "nce+ael",
             "nce+nnce", "nfl+nnfl", "nce+amse", "nfl+amse", "ece+mae")


def pair_spec(loss):
    """Parameters away from the defaults (q given: gce/ngce and agce/aul default differently)."""
    return LossSpec.from_name(loss, alpha=0.7, beta=1.3, gamma=1.5, q=0.4, a=2.5, m=3.0, t=4, min_prob=1e-5)
DTYPES = (torch.float32, torch.float64)
N, K = 12, 37


def tolerances(dtype):
    # fp32 atol: a p within rounding of P_MIN may be clamped in fp32 and not in the
    # float64 oracle, a jump of |A| beta P_MIN ~ 1e-6 in that gradient entry.
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def make_logits(n, k, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    x[0] *= 4  # a confident row: p_y near 1 and many clamped p
    return x.to(dtype).to(device)


def make_target(n, k, device, seed=1, ignored=(3,)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    for i in ignored:
        y[i] = -100
    return y.to(device)


def output_weight(loss, seed=2):
    """A grad_output that is not 1: 2.5 for a scalar, a different weight per row otherwise."""
    if loss.dim() == 0:
        return torch.tensor(2.5, dtype=loss.dtype, device=loss.device)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype).to(loss.device)


def run_reference(x, y, spec, reduction="mean", ignore_index=-100):
    """Loss and d(sum(w * loss))/dx in float64."""
    xr = x.detach().to(torch.float64).requires_grad_()
    loss = reference_loss(xr, y, spec, reduction, ignore_index)
    (loss * output_weight(loss)).sum().backward()
    return loss.detach(), xr.grad


def run_triton(x, y, spec, reduction="mean", ignore_index=-100, **kw):
    xt = x.detach().clone().requires_grad_()
    loss = apl_loss(xt, y, spec, reduction=reduction, ignore_index=ignore_index, backend="triton", **kw)
    (loss * output_weight(loss)).sum().backward()
    return loss.detach(), xt.grad


def assert_matches(x, y, spec, reduction="mean", ignore_index=-100, **kw):
    ref_loss, ref_grad = run_reference(x, y, spec, reduction, ignore_index)
    loss, grad = run_triton(x, y, spec, reduction, ignore_index, **kw)
    expected_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and grad.dtype == x.dtype and grad.shape == x.shape
    tol = tolerances(x.dtype)
    torch.testing.assert_close(loss.to(torch.float64), ref_loss, equal_nan=True, **tol)
    torch.testing.assert_close(grad.to(torch.float64), ref_grad, equal_nan=True, **tol)
    return loss, grad


def plan():
    from apl_kernels.triton import kernels
    return kernels.last_plan


# ------------------------------------------------------------------ every term, every regime
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", SINGLE_TERMS + KEY_PAIRS)
def test_terms_in_every_regime(loss, dtype, regime_name, device):
    x, y = make_logits(N, K, dtype, device), make_target(N, K, device)
    with regime(regime_name):
        assert_matches(x, y, LossSpec.from_name(loss))
        assert plan()[0] == regime_name


@pytest.mark.parametrize("loss", PAIRS)
def test_every_pair(loss, device):
    """fp64, one regime, parameters away from the defaults (the key pairs run in every regime and dtype)."""
    x, y = make_logits(N, 10, torch.float64, device, seed=5), make_target(N, 10, device)
    assert_matches(x, y, pair_spec(loss))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", (0.0, 0.5, 2.0))
@pytest.mark.parametrize("loss", ("fl", "nfl", "nfl+rce", "nfl+nnfl"))
def test_exact_grad_mode(loss, gamma, dtype, regime_name, device):
    """The exact mode differentiates the focal factor (the official mode is in every other test)."""
    x, y = make_logits(N, K, dtype, device, seed=7), make_target(N, K, device)
    with regime(regime_name):
        assert_matches(x, y, LossSpec.from_name(loss, grad="exact", gamma=gamma))
    if gamma > 0:
        official, _ = run_triton(x, y, LossSpec.from_name(loss, gamma=gamma))
        exact, _ = run_triton(x, y, LossSpec.from_name(loss, grad="exact", gamma=gamma))
        torch.testing.assert_close(official, exact)   # same loss, different gradient


@pytest.mark.parametrize("m", (3.0, 1e5))
def test_ece_argmax_ties(m, regime_name, device):
    """ece adds m at the argmax, the first index of a tie (torch.argmax): labels at the
    first and at the second of two tied maxima, and labels elsewhere."""
    x = make_logits(N, K, torch.float64, device, seed=53)
    y = make_target(N, K, device)
    rows = torch.arange(N, device=device)
    first, second = (y + 3) % K, (y + 11) % K
    top = x.max(dim=1).values + 1.0
    x[rows, first] = top
    x[rows, second] = top
    swap = rows % 3 == 1                              # label at the first tied max
    y = torch.where(swap, first, torch.where(rows % 3 == 2, second, y))   # or the second
    y[3] = -100
    with regime(regime_name):
        assert_matches(x, y, LossSpec.from_name("ece+mae", m=m), reduction="none")


def test_float16_logits(regime_name, device):
    """fp16 logits (the interpreter has no bf16): fp32 math, fp32 loss, gradient in fp16."""
    x, y = make_logits(N, K, torch.float16, device, seed=43), make_target(N, K, device)
    spec = LossSpec.from_name("nfl+rce")
    with regime(regime_name):
        loss, grad = run_triton(x, y, spec)
    ref_loss, ref_grad = run_reference(x, y, spec)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-3, atol=2e-3 * ref_grad.abs().max().item())


# ------------------------------------------------------------------ reductions and ignored rows
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
@pytest.mark.parametrize("loss", ("nce+rce", "nfl+nrce"))
def test_reductions_with_ignored_rows(loss, reduction, dtype, regime_name, device):
    x = make_logits(N, K, dtype, device, seed=11)
    y = make_target(N, K, device, ignored=(0, 3, 4, 11))
    with regime(regime_name):
        loss_t, grad_t = assert_matches(x, y, LossSpec.from_name(loss), reduction=reduction)
    kept = y != -100
    assert torch.all(grad_t[~kept] == 0)
    if reduction == "none":
        assert torch.all(loss_t[~kept] == 0)


@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_all_rows_ignored(reduction, regime_name, device):
    x = make_logits(N, K, torch.float32, device)
    y = torch.full((N,), 7, device=device)
    with regime(regime_name):
        loss, grad = run_triton(x, y, LossSpec.from_name("nce+rce"), reduction, ignore_index=7)
    assert torch.all(loss == 0) and torch.all(grad == 0)
    ref_loss, _ = run_reference(x, y, LossSpec.from_name("nce+rce"), reduction, ignore_index=7)
    torch.testing.assert_close(loss.double(), ref_loss)


def test_ignore_index_other_than_default(device):
    x, y = make_logits(N, K, torch.float64, device), make_target(N, K, device, ignored=())
    y[5] = 0
    assert_matches(x, y, LossSpec.from_name("nce+rce"), ignore_index=0)


# ------------------------------------------------------------------ non-finite logits and bad labels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ngce+nrce", "ce", "fl", "gce+rce"))
def test_masked_classes_minus_inf(loss, dtype, regime_name, device):
    """-inf logits (masked classes) match the reference: no NaN from the online rescale or the sums."""
    x = make_logits(N, K, dtype, device, seed=13)
    y = make_target(N, K, device)
    g = torch.Generator().manual_seed(3)
    masked = torch.rand(N, K, generator=g) < 0.3
    masked[:, :16] |= torch.arange(N)[:, None] % 2 == 0   # whole first chunk -inf in every other row
    masked[torch.arange(N), y.clamp(min=0).cpu()] = False   # labels keep a finite logit
    x = x.masked_fill(masked.to(device), float("-inf"))
    for spec in (LossSpec.from_name(loss), LossSpec.from_name(loss, grad="exact")):
        if spec.grad == "exact" and spec.active == "nfl":
            continue   # see test_exact_nfl_with_masked_classes
        with regime(regime_name):
            loss_t, grad_t = assert_matches(x, y, spec, reduction="none")
        assert torch.isfinite(loss_t).all() and torch.isfinite(grad_t).all()


def test_exact_nfl_with_masked_classes(regime_name, device):
    """Exact-mode nfl with -inf logits: the reference's autograd gives NaN (0 * -inf in the
    derivative of (1-p)^gamma log p at p = 0); the kernels take the limit 0, as the C++
    header does.  The loss matches the reference, the gradient is finite and equals the
    C++ backend's when that is built."""
    x = make_logits(N, K, torch.float64, device, seed=13)
    y = make_target(N, K, device)
    x[:, 20:] = float("-inf")
    x[torch.arange(N, device=device), y.clamp(min=0)] = 1.0
    spec = LossSpec.from_name("nfl+mae", grad="exact")
    ref_loss = reference_loss(x, y, spec, "none")
    with regime(regime_name):
        loss_t, grad_t = run_triton(x, y, spec, "none")
    torch.testing.assert_close(loss_t, ref_loss, **tolerances(torch.float64))
    assert torch.isfinite(grad_t).all()
    from apl_kernels import backends
    if device == "cpu" and backends.unavailable_reason("cpu", x.device) is None:
        xc = x.clone().requires_grad_()
        lc = apl_loss(xc, y, spec, reduction="none", backend="cpu")
        (lc * output_weight(lc)).sum().backward()
        torch.testing.assert_close(grad_t, xc.grad, **tolerances(torch.float64))


@pytest.mark.parametrize("loss", ("nce+rce", "nfl+mae", "ngce+nrce"))
def test_nonfinite_rows_give_nan_rows(loss, regime_name, device):
    """An all -inf row, a NaN logit, a +inf logit: NaN loss rows, as the reference; other rows intact."""
    x = make_logits(N, K, torch.float32, device, seed=17)
    y = make_target(N, K, device, ignored=())
    x[1] = float("-inf")
    x[2, 5] = float("nan")
    x[6, 30] = float("inf")
    spec = LossSpec.from_name(loss)
    with regime(regime_name):
        loss_t = apl_loss(x, y, spec, reduction="none", backend="triton")
    ref = reference_loss(x.double(), y, spec, "none")
    bad = torch.tensor([1, 2, 6], device=device)
    assert torch.isnan(loss_t[bad]).all() and torch.isnan(ref[bad]).all()
    good = torch.ones(N, dtype=torch.bool, device=device)
    good[bad] = False
    torch.testing.assert_close(loss_t[good].double(), ref[good], **tolerances(torch.float32))


BAD_LABELS = ((2, K), (5, -5), (8, 10 ** 9))


@pytest.mark.parametrize("label", [label for _, label in BAD_LABELS])
def test_out_of_range_label_stops_the_kernel(label, regime_name, device):
    """check_targets=False (no host-side check): the kernel's own assert names the bad label
    (on the GPU a device-side assert, as F.cross_entropy; here the interpreter's error)."""
    x = make_logits(N, K, torch.float32, device, seed=19).requires_grad_()
    y = make_target(N, K, device)
    y[7] = label
    if device == "cuda":   # in a child process: the assert leaves the CUDA context unusable
        expect_device_assert(f"from apl_triton_helpers import regime\n"
                             f"x = torch.randn({N}, {K}, device='cuda', requires_grad=True)\n"
                             f"y = torch.tensor({y.tolist()}, device='cuda')\n"
                             f"with regime({regime_name!r}):\n"
                             f"    apl_loss(x, y, 'nce+rce', reduction='mean', backend='triton', check_targets=False)")
        return
    with regime(regime_name), pytest.raises(ValueError, match=rf"target value {label} is outside \[0, {K}\)"):
        apl_loss(x, y, "nce+rce", reduction="mean", backend="triton", check_targets=False)


@pytest.mark.parametrize("reduction", ("none", "sum"))
def test_out_of_range_label_without_the_assert_is_a_nan_row(reduction, regime_name, device):
    """Where the kernel's assert is compiled out (torch.compile), a bad label's row is NaN and
    is never read out of bounds; the other rows are right."""
    from apl_kernels.triton import kernels
    x = make_logits(N, K, torch.float64, device, seed=19)
    y = make_target(N, K, device)
    good = torch.ones(N, dtype=torch.bool, device=device)
    for row, label in BAD_LABELS:
        y[row] = label
        good[row] = False
    xt = x.clone().requires_grad_()
    saved, kernels.CHECK_LABELS = kernels.CHECK_LABELS, False
    try:
        with regime(regime_name):
            loss_t = apl_loss(xt, y, "nce+rce", reduction="none", backend="triton", check_targets=False)
    finally:
        kernels.CHECK_LABELS = saved
    loss_t.sum().backward()
    assert torch.isnan(loss_t[~good]).all() and torch.isnan(xt.grad[~good]).all()
    ref_loss, ref_grad = run_reference(x[good], y[good], LossSpec.from_name("nce+rce"), "none")
    torch.testing.assert_close(loss_t[good].detach(), ref_loss, **tolerances(torch.float64))
    # and the check is back: "sync" names the label on every device (the default's CUDA
    # assert would end this process's CUDA context)
    with pytest.raises(ValueError, match="outside"):
        apl_loss(x, y, "nce+rce", backend="triton", check_targets="sync")


@pytest.mark.parametrize("loss", ("nce+rce", "nfl+rce", "ngce+mae", "ce"))
def test_shift_invariance(loss, regime_name, device):
    """+100 on every logit changes nothing (fp32: the max is subtracted before exp)."""
    x = make_logits(N, K, torch.float32, device, seed=23)
    y = make_target(N, K, device)
    spec = LossSpec.from_name(loss)
    shifted = x + 100.0   # rounds x to the fp32 spacing at 100 (7.6e-6)
    with regime(regime_name):
        shifted_loss, shifted_grad = run_triton(shifted, y, spec, "none")
        loss, grad = run_triton(x, y, spec, "none")
    ref_loss, ref_grad = run_reference(shifted, y, spec, "none")
    torch.testing.assert_close(shifted_loss.double(), ref_loss, **tolerances(torch.float32))
    torch.testing.assert_close(shifted_grad.double(), ref_grad, **tolerances(torch.float32))
    # and the same as without the shift, up to that input rounding
    torch.testing.assert_close(shifted_loss, loss, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(shifted_grad, grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("offset", (1e4, 1e5))
@pytest.mark.parametrize("loss", ("nce", "nce+rce"))
def test_nce_with_a_large_common_offset(loss, offset, regime_name, device):
    """Rows whose logits share a large offset (fp32): nce's normaliser sum_k -log p_k is
    formed from max - z_k (terms >= 0).  As sum z - K lse it cancelled: relative loss
    error 2e-4 at 1e4 and 2e-3 at 1e5, where the fp64 reference of the same input is exact."""
    x = make_logits(N, K, torch.float32, device, seed=47, scale=1.0) + offset
    y = make_target(N, K, device)
    spec = LossSpec.from_name(loss)
    with regime(regime_name):
        got_loss, got_grad = run_triton(x, y, spec, "none")
    ref_loss, ref_grad = run_reference(x, y, spec, "none")
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-4, atol=1e-6 * ref_grad.abs().max().item())


# ------------------------------------------------------------------ layouts, shapes, options
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_stride(dtype, regime_name, device):
    """Rows that are a view with a row stride larger than K are read in place."""
    big = make_logits(N, K + 9, dtype, device, seed=29)
    x = big[:, 4:4 + K]
    assert x.stride() == (K + 9, 1)
    y = make_target(N, K, device)
    with regime(regime_name):
        assert_matches(x, y, LossSpec.from_name("nce+rce"))
        assert_matches(x, y, LossSpec.from_name("nfl+nrce"), reduction="none")


def test_spatial_logits(device):
    """[B, K, d1, d2] as cross_entropy: rows of K after moving the class axis last."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (2, 3, 4), generator=g).to(device)
    y[0, 1, 2] = -100
    assert_matches(x, y, LossSpec.from_name("nce+rce"), reduction="none")
    assert_matches(x, y, LossSpec.from_name("nfl+mae"))


@pytest.mark.parametrize("k", (2, 3, 16, 17))
def test_small_class_counts(k, device):
    x, y = make_logits(9, k, torch.float64, device, seed=k), make_target(9, k, device)
    assert_matches(x, y, LossSpec.from_name("nce+rce"))
    assert_matches(x, y, LossSpec.from_name("ngce+nmae"), reduction="sum")


@pytest.mark.parametrize("dtype,k", ((torch.float32, 20000), (torch.float64, 9000)), ids=("fp32", "fp64"))
def test_default_chunked_regime(dtype, k, device):
    """K beyond the register-resident limit takes the chunked kernel with its default chunk."""
    x, y = make_logits(3, k, dtype, device, seed=37), make_target(3, k, device, ignored=())
    assert_matches(x, y, LossSpec.from_name("nfl+rce"))
    assert plan()[0] == "chunked"


@pytest.mark.parametrize("k", (48, 47), ids=("no_tail", "tail"))
def test_chunked_rows_with_and_without_a_tail(k, device):
    """48 classes in chunks of 16 compile the masked tail step out (EVEN_K); 47 run it.  Row 0
    (logits x12) clamps many p: rce's sums and gradient in units of e are checked there too."""
    x, y = make_logits(5, k, torch.float32, device, seed=k), make_target(5, k, device)
    with regime("chunked"):
        for loss in ("nce+rce", "nfl+rce", "ngce+nrce", "nce+nnce"):
            assert_matches(x, y, LossSpec.from_name(loss))
            assert plan()[0] == "chunked"


def test_too_many_classes_is_refused(device):
    """Column indices are int32: K near 2^31 is refused by name, before any allocation."""
    from apl_kernels.triton import kernels
    x = torch.zeros(1, 1, device=device).expand(1, kernels.MAX_K + 1)
    y = torch.zeros(1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="at most .* classes"):
        kernels.launch(x, y, *LossSpec.from_name("nce+rce").op_args(), REDUCTIONS["mean"], -100, True)


def test_many_rows_default_heuristic(device):
    """Enough rows for several default-size tiles: the labels pre-pass counts them in two programs
    (1024 rows each at most), the mean sums the tiles' partials (the last program)."""
    x, y = make_logits(1300, 10, torch.float32, device, seed=41), make_target(1300, 10, device, ignored=(3, 999))
    assert_matches(x, y, LossSpec.from_name("nce+rce"))
    assert plan()[0] == "tiles" and plan()[1] > 1


def test_empty_batch(device):
    x = torch.zeros(0, K, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum"):
        loss = apl_loss(x, y, backend="triton", reduction=reduction)
        assert loss.item() == 0
        loss.backward()
    assert apl_loss(x, y, backend="triton", reduction="none").shape == (0,)


def test_without_grad(device):
    """compute_grad False: the op returns an empty gradient and the same loss."""
    from apl_kernels.triton.op import fused_loss_triton
    x, y = make_logits(N, K, torch.float32, device), make_target(N, K, device)
    spec = LossSpec.from_name("nce+rce")
    loss, grad = fused_loss_triton(x, y, *spec.op_args(), REDUCTIONS["mean"], -100, False)
    assert grad.numel() == 0
    with torch.no_grad():
        no_grad_loss = apl_loss(x.clone().requires_grad_(), y, spec, backend="triton")
    ref = reference_loss(x.double(), y, spec)
    torch.testing.assert_close(loss.double(), ref, **tolerances(torch.float32))
    torch.testing.assert_close(no_grad_loss, loss)


def test_module_and_autograd_accumulation(device):
    """APLLoss with backend triton; two backward passes accumulate like any autograd op."""
    x, y = make_logits(N, K, torch.float64, device), make_target(N, K, device)
    criterion = APLLoss("nfl+rce", gamma=2.0, backend="triton")
    xt = x.clone().requires_grad_()
    (criterion(xt, y) + 0.5 * criterion(xt, y)).backward()
    xr = x.clone().requires_grad_()
    ref = reference_loss(xr, y, LossSpec.from_name("nfl+rce", gamma=2.0))
    (1.5 * ref).backward()
    torch.testing.assert_close(xt.grad, xr.grad, **tolerances(torch.float64))


# ------------------------------------------------------------------ in-place mode
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_overwrite_logits(reduction, regime_name, device):
    """The gradient replaces the logits; parameter gradients equal the default mode's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, K).double().to(device)
    inp = torch.randn(N, 6, dtype=torch.float64, device=device)
    y = make_target(N, K, device)
    results = []
    for overwrite in (False, True):
        lin.zero_grad()
        z = lin(inp)
        with regime(regime_name):
            loss = apl_loss(z, y, "nce+rce", reduction=reduction, backend="triton", overwrite_logits=overwrite)
        (loss * output_weight(loss)).sum().backward()
        results.append((loss.detach(), lin.weight.grad.clone(), lin.bias.grad.clone(), z.detach()))
    (l0, w0, b0, z0), (l1, w1, b1, z1) = results
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(b1, b0)
    _, ref_grad = run_reference(z0, y, LossSpec.from_name("nce+rce"), reduction)
    torch.testing.assert_close(z1, ref_grad, **tolerances(torch.float64))  # now holds dloss/dz


def test_overwrite_logits_misuse_is_caught(device):
    lin = torch.nn.Linear(6, K).to(device)
    inp = torch.randn(N, 6, device=device)
    y = make_target(N, K, device)
    leaf = torch.randn(N, K, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        apl_loss(leaf, y, backend="triton", overwrite_logits=True)
    saved = torch.tanh(lin(inp))   # tanh saves its output for backward
    loss = apl_loss(saved, y, backend="triton", overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = apl_loss(lin(inp), y, backend="triton", overwrite_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()
    with pytest.raises(ValueError, match="triton"):
        apl_loss(lin(inp), y, backend="reference", overwrite_logits=True)
    with pytest.raises(ValueError, match="2-D"):
        apl_loss(lin(inp)[:, :, None], y[:, None], backend="triton", overwrite_logits=True)
    with torch.no_grad():   # nothing to differentiate: the logits stay untouched
        z = lin(inp)
        before = z.clone()
        apl_loss(z, y, backend="triton", overwrite_logits=True)
        assert torch.equal(z, before)


# ------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_training_step(device):
    """A model + loss step compiles with fullgraph=True; gradients match eager reference."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, K).double().to(device)
    inp = torch.randn(N, 6, dtype=torch.float64, device=device)
    y = make_target(N, K, device)

    def step(inp, y):
        return apl_loss(lin(inp), y, "nfl+rce", backend="triton")

    backend = "aot_eager" if device == "cpu" else "inductor"
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend=backend)(inp, y)
    (2.0 * loss).backward()
    got = lin.weight.grad.clone()
    lin.zero_grad()
    ref = reference_loss(lin(inp), y, LossSpec.from_name("nfl+rce"))
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref.detach(), **tolerances(torch.float64))
    torch.testing.assert_close(got, lin.weight.grad, **tolerances(torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ("nfl+rce", "nfl+nnfl"))
def test_focal_terms_of_a_near_certain_class(loss, dtype, regime_name, device):
    """The focal factor (1 - p)^gamma of a class with p near 1, the label (rows 0, 1) or not
    (rows 2, 3): the per-element loops take 1 - p from p, without expm1 (lm.one_minus_p)."""
    x = torch.zeros(4, K, dtype=torch.float64)
    x[:, 5] = torch.tensor([12.0, 30.0, 12.0, 30.0])   # 1 - p_5 = 2e-4, 3e-12
    y = torch.tensor([5, 5, 0, 1])
    assert_matches(x.to(dtype).to(device), y.to(device), LossSpec.from_name(loss, gamma=0.5, min_prob=1e-5))
