"""The Triton cross-entropy kernel against a float64 reference (CPU: under the Triton interpreter).

Tolerances: the loss within 1e-5 relative (it is computed in fp32 from the same input values);
gradients, stored in the input dtype, within a relative norm error of 1e-5 (fp32), 2e-3 (fp16) and 1e-2
(bf16, GPU only: the interpreter does not support bf16).
"""
import pytest
import torch
import torch.nn.functional as F

from fasttrain.kernels.cross_entropy import cross_entropy
from references import cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(logits, targets, ignore_index, reduction, z_loss):
    """float64 cross-entropy + z_loss * lse^2 over valid rows."""
    return cross_entropy_reference(logits.double(), targets, ignore_index, reduction, z_loss)


def make_targets(n, v, pattern, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=gen)
    if pattern == "some":
        targets[torch.rand(n, generator=gen) < 0.3] = ignore_index
    elif pattern == "all":
        targets[:] = ignore_index
    return targets.to(DEVICE)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(n, v, dtype, reduction, z_loss, pattern, scale=3.0, ignore_index=-100):
    gen = torch.Generator().manual_seed(n * 7919 + v)
    logits = (torch.randn(n, v, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
    targets = make_targets(n, v, pattern, ignore_index)
    before = logits.detach().clone()

    loss, z_term = cross_entropy(logits, targets, ignore_index, reduction, z_loss, return_z_loss=True)
    upstream = torch.randn(loss.shape, generator=gen).to(DEVICE) if reduction == "none" else torch.tensor(1.7, device=DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, upstream)

    ref_logits = logits.detach().double().requires_grad_()
    ref_loss, ref_z = reference(ref_logits, targets, ignore_index, reduction, z_loss)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits, upstream.double())

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert torch.equal(logits.detach(), before), "the input logits were modified"
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_term.double(), ref_z, rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    if pattern == "all":
        assert (loss == 0).all() and (grad == 0).all()
    else:
        assert rel_err(grad, ref_grad) < GRAD_TOL[dtype]
    # rows with an ignored target get exactly zero gradient
    assert (grad[targets == ignore_index] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("pattern", ["none", "some", "all"])
def test_small_vocab(dtype, reduction, z_loss, pattern):
    check(7, 3, dtype, reduction, z_loss, pattern)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", [(1, 5), (33, 1000), (130, 4099), (300, 17)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shapes(n, v, dtype, reduction):
    check(n, v, dtype, reduction, 1e-4, "some")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_vocab_not_multiple_of_block(dtype):
    # 50257 = GPT-2's vocabulary: several blocks with a ragged last one
    check(24, 50257, dtype, "sum", 1e-4, "some")


def test_large_logits_are_stable():
    check(16, 777, torch.float32, "mean", 0.0, "some", scale=300.0)


def test_other_ignore_index():
    check(40, 100, torch.float32, "mean", 0.0, "some", ignore_index=0)


def test_leading_dimensions():
    logits = torch.randn(2, 5, 11, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), device=DEVICE)
    loss = cross_entropy(logits, targets, reduction="none")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss, F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))


def test_inplace_backward_writes_grad_over_logits():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 8, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(300, 8, generator=gen).to(DEVICE)
    targets = make_targets(20, 300, "some")
    grads = []
    for inplace in (False, True):
        logits = hidden @ weight.t()
        loss = cross_entropy(logits, targets, inplace_backward=inplace)
        (g,) = torch.autograd.grad(loss, hidden)
        grads.append(g)
        if inplace:
            # the logits buffer now holds d loss / d logits: rows of a softmax minus a one-hot sum to 0
            assert logits.detach().sum(dim=1).abs().max() < 1e-5
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("bad", [300, -5])
def test_out_of_range_target_raises(bad):
    logits = torch.randn(6, 300, device=DEVICE)
    targets = torch.zeros(6, dtype=torch.long, device=DEVICE)
    targets[4] = bad
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy(logits, targets)


@pytest.mark.parametrize("bad", [300, -5])
def test_unvalidated_out_of_range_target_gives_nan_row(bad):
    # validate_targets=False skips the host sync; the bad row must turn NaN (no out-of-bounds read)
    # while every other row keeps its exact loss and gradient.
    logits = torch.randn(6, 300, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 300, (6,), device=DEVICE)
    targets[4] = bad
    losses = cross_entropy(logits, targets, reduction="none", validate_targets=False)
    losses.sum().backward()
    good = torch.arange(6, device=DEVICE) != 4
    assert torch.isnan(losses[4]) and torch.isnan(logits.grad[4]).all()
    ref_logits = logits.detach()[good].double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits, targets[good], reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(losses[good].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad[good].double(), ref_logits.grad, atol=1e-6, rtol=1e-5)
    assert torch.isnan(cross_entropy(logits.detach(), targets, validate_targets=False))


def test_float_targets_raise():
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(torch.randn(4, 10, device=DEVICE), torch.zeros(4, device=DEVICE))


def test_under_torch_compile():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(12, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(50, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(12, 50, "some")

    def step(h, w, t):
        return cross_entropy(torch.tanh(h) @ w.t(), t, z_loss=1e-3) * 2.0

    # On the CPU the inductor backend would compile C++ for a few seconds; aot_eager runs the same tracing.
    compiled = torch.compile(step, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    loss, grads = [], []
    for fn in (step, compiled):
        out = fn(hidden, weight, targets)
        loss.append(out)
        grads.append(torch.autograd.grad(out, [hidden, weight]))
    torch.testing.assert_close(loss[1], loss[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_stride", "transposed", "batch_transposed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(layout, reduction, dtype):
    # Views as callers hand them over: rows of a wider buffer, column-major logits, a transposed batch, and
    # targets with a stride of 2; forward and backward against the float64 reference.
    n, v = 24, 301
    gen = torch.Generator().manual_seed(11)
    wide = (torch.randn(n, v + 9, generator=gen) * 3.0).to(DEVICE, dtype)
    target_pairs = torch.randint(0, v, (n, 2), generator=gen)
    target_pairs[torch.rand(n, generator=gen) < 0.3, 0] = -100
    targets = target_pairs.to(DEVICE)[:, 0]
    logits = wide[:, :v]  # row stride v + 9
    if layout == "transposed":
        logits = logits.t().contiguous().t()  # column-major: stride (1, n)
    elif layout == "batch_transposed":
        logits, targets = logits.reshape(6, 4, v).transpose(0, 1), targets.reshape(6, 4).transpose(0, 1)
    logits.requires_grad_()
    assert not logits.is_contiguous() and not targets.is_contiguous()
    before = logits.detach().clone()

    loss = cross_entropy(logits, targets, reduction=reduction, z_loss=1e-3)
    gen_up = torch.Generator().manual_seed(12)
    upstream = torch.randn(loss.shape, generator=gen_up).to(DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, upstream)

    ref_logits = logits.detach().double().requires_grad_()
    flat_logits, flat_targets = ref_logits.reshape(-1, v), targets.reshape(-1)
    ref_loss, _ = reference(flat_logits, flat_targets, -100, reduction, 1e-3)
    ref_loss = ref_loss.reshape(loss.shape)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits, upstream.double())

    assert torch.equal(logits.detach(), before), "the input logits were modified"
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert grad.shape == logits.shape and grad.dtype == dtype
    assert rel_err(grad, ref_grad) < GRAD_TOL[dtype]
