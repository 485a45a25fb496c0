"""The fused linear cross-entropy against a float64 reference (CPU: under the Triton interpreter).

Reference: F.cross_entropy(h @ W.T + b) + z_loss * lse^2 in float64 from the same (rounded) inputs.
Tolerances: fp32: loss within 1e-5 relative, gradients within 1e-5 relative norm error. fp16 / bf16 (bf16
on the GPU only): the logits themselves are rounded to the input dtype, as in PyTorch's own path, so the
error may be at most twice that of PyTorch's path in the same dtype (matmul in the dtype, softmax in
fp32) against the same reference, plus a floor of 1e-4 (fp16) / 1e-3 (bf16).
"""
import pytest
import torch
import torch.nn.functional as F

from fasttrain.kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from references import cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def reference(hidden, weight, bias, targets, ignore_index, reduction, z_loss, upcast=True):
    """Loss of the plain path; in float64 when upcast, else matmul in the inputs' dtype + fp32 softmax."""
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.double() if upcast else logits.float()
    return cross_entropy_reference(logits, targets, ignore_index, reduction, z_loss)


def make_inputs(n, d, v, dtype, with_bias, pattern, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed + 31 * n + v)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / d**0.5 * 2.0
    bias = torch.randn(v, generator=gen) * 0.5 if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if pattern == "some":
        targets[torch.rand(n, generator=gen) < 0.3] = ignore_index
    elif pattern == "all":
        targets[:] = ignore_index
    upstream = torch.randn(n, generator=gen)
    to = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()
    return to(hidden), to(weight), to(bias), targets.to(DEVICE), upstream.to(DEVICE)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(n, d, v, dtype, reduction, z_loss, pattern, with_bias, chunk_size, ignore_index=-100):
    hidden, weight, bias, targets, upstream = make_inputs(n, d, v, dtype, with_bias, pattern, ignore_index)
    params = [hidden, weight] + ([bias] if with_bias else [])
    upstream = upstream if reduction == "none" else torch.tensor(1.7, device=DEVICE)

    loss, z_term = linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index, reduction, z_loss, return_z_loss=True, chunk_size=chunk_size
    )
    grads = torch.autograd.grad(loss, params, upstream)

    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_loss, ref_z = reference(*ref_params[:2], ref_params[2] if with_bias else None, targets, ignore_index, reduction, z_loss)
    ref_grads = torch.autograd.grad(ref_loss, ref_params, upstream.double())

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    if pattern == "all":
        assert (loss == 0).all() and all((g == 0).all() for g in grads)
        return
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z_term.double(), ref_z, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 1e-5
        return
    # low precision: compare with PyTorch's own path in the same dtype
    torch_params = [p.detach().requires_grad_() for p in params]
    torch_loss, _ = reference(*torch_params[:2], torch_params[2] if with_bias else None, targets, ignore_index, reduction, z_loss, upcast=False)
    torch_grads = torch.autograd.grad(torch_loss, torch_params, upstream.float())
    assert rel_err(loss, ref_loss) <= 2 * rel_err(torch_loss, ref_loss) + FLOOR[dtype]
    for g, tg, r in zip(grads, torch_grads, ref_grads):
        assert rel_err(g, r) <= 2 * rel_err(tg, r) + FLOOR[dtype]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("pattern", ["none", "some", "all"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_reductions_fp32(reduction, z_loss, pattern, with_bias):
    # 50 tokens in chunks of 16: three full chunks and a ragged one
    check(50, 24, 301, torch.float32, reduction, z_loss, pattern, with_bias, chunk_size=16)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_low_precision(dtype, reduction, with_bias):
    check(100, 64, 1000, dtype, reduction, 1e-4, "some", with_bias, chunk_size=33)


@pytest.mark.parametrize(
    "n,d,v,chunk_size",
    [
        (1, 16, 3, None),
        (5, 16, 3, 2),
        (64, 32, 7, 1),
        (200, 256, 129, 64),  # d = 256
        (130, 32, 4099, None),  # one chunk (the default for small N)
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shapes(n, d, v, chunk_size, reduction):
    check(n, d, v, torch.float32, reduction, 1e-4, "some", True, chunk_size)


def test_many_tokens():
    # ~2k tokens in chunks that split N unevenly, through the recomputing backward of "none"
    check(2048, 16, 40, torch.float32, "none", 1e-4, "some", True, chunk_size=600)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION, ids=str)
def test_large_vocab(dtype):
    # GPT-2's vocabulary (not a multiple of any block size), with 3 chunks
    check(40, 32, 50257, dtype, "mean", 1e-4, "some", False, chunk_size=16)


def test_other_ignore_index():
    check(40, 16, 100, torch.float32, "sum", 0.0, "some", False, chunk_size=16, ignore_index=3)


def test_default_chunk_size():
    assert default_chunk_size(100, 50304) == 100  # small batches: one chunk
    chunk = default_chunk_size(65536, 50304)
    assert chunk % 256 == 0 and 1024 <= chunk <= 8192


def test_leading_dimensions_and_none_shape():
    hidden = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 40, (2, 7), device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_size=4)
    assert loss.shape == (2, 7)
    torch.testing.assert_close(loss, F.cross_entropy((hidden @ weight.t()).transpose(1, 2), targets, reduction="none"))
    loss.sum().backward()
    assert hidden.grad.shape == hidden.shape


def test_frozen_weight_and_no_grad():
    hidden, weight, _, targets, _ = make_inputs(30, 16, 50, torch.float32, False, "some")
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), loss.detach())


def test_backward_twice_with_retain_graph():
    hidden, weight, _, targets, _ = make_inputs(30, 16, 50, torch.float32, False, "some")
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(weight.grad, 2 * first)


@pytest.mark.parametrize("bad", [50, -2])
def test_out_of_range_target_raises(bad):
    hidden, weight, _, targets, _ = make_inputs(30, 16, 50, torch.float32, False, "some")
    targets[7] = bad
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(hidden, weight, targets)


def test_unvalidated_out_of_range_target_gives_nan():
    # validate_targets=False (what the trainer uses on a GPU: no host sync) must not read out of bounds:
    # the loss becomes NaN, which the training loop reports, and the other tokens' losses stay exact.
    hidden, weight, _, targets, _ = make_inputs(30, 16, 50, torch.float32, False, "none")
    targets[7] = 50
    losses = linear_cross_entropy(hidden, weight, targets, reduction="none", validate_targets=False)
    good = torch.arange(30, device=targets.device) != 7
    ref, _ = reference(hidden.detach()[good], weight.detach(), None, targets[good], -100, "none", 0.0)
    assert torch.isnan(losses[7])
    torch.testing.assert_close(losses[good].double(), ref.double(), atol=1e-5, rtol=1e-5)
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets, validate_targets=False))


def test_bad_arguments_raise():
    hidden, weight, _, targets, _ = make_inputs(8, 16, 50, torch.float32, False, "none")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="share d"):
        linear_cross_entropy(hidden[:, :8], weight, targets)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(hidden.half(), weight, targets)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast needs the GPU (the interpreter has no bf16)")
def test_autocast_bf16_reaches_fp32_weight():
    hidden, weight, _, targets, _ = make_inputs(64, 32, 500, torch.float32, False, "some")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    ref_loss, _ = reference(hidden.detach(), weight.detach(), None, targets, -100, "mean", 0.0)
    assert abs(loss.item() - ref_loss.item()) < 2e-2


def test_under_torch_compile():
    hidden, weight, bias, targets, _ = make_inputs(24, 16, 50, torch.float32, True, "some")

    def step(h, w, b, t):
        return linear_cross_entropy(torch.tanh(h), w, t, bias=b, z_loss=1e-3, chunk_size=10) * 2.0

    # On the CPU the inductor backend would compile C++ for a few seconds; aot_eager runs the same tracing.
    compiled = torch.compile(step, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    losses, grads = [], []
    for fn in (step, compiled):
        out = fn(hidden, weight, bias, targets)
        losses.append(out)
        grads.append(torch.autograd.grad(out, [hidden, weight, bias]))
    torch.testing.assert_close(losses[1], losses[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)


def _strided_like(t, layout):
    """The values of t in another memory layout: a column slice of a wider buffer, or column-major."""
    if layout == "sliced":
        wide = t.new_zeros(*t.shape[:-1], t.shape[-1] + 5)
        wide[..., :t.shape[-1]] = t
        return wide[..., :t.shape[-1]]
    return t.t().contiguous().t()


@pytest.mark.parametrize("layout", ["hidden_sliced", "hidden_transposed", "weight_sliced", "weight_transposed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(layout, reduction):
    # hidden or weight as a view (a slice of a fused projection, a transposed matrix), a strided bias and
    # strided targets; several chunks, forward and backward (also the recomputing one of "none") vs float64.
    hidden, weight, bias, targets, upstream = make_inputs(50, 24, 301, torch.float32, True, "some")
    which, how = layout.split("_")
    views = {"hidden": hidden.detach(), "weight": weight.detach()}
    views[which] = _strided_like(views[which], how)
    hidden, weight = (views[name].requires_grad_() for name in ("hidden", "weight"))
    bias = torch.stack([bias.detach(), torch.zeros_like(bias)], dim=1)[:, 0].requires_grad_()  # stride 2
    targets = torch.stack([targets, targets], dim=1)[:, 0]
    assert not views[which].is_contiguous() and not bias.is_contiguous() and not targets.is_contiguous()
    upstream = upstream if reduction == "none" else torch.tensor(1.7, device=DEVICE)

    loss = linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction, z_loss=1e-4, chunk_size=16)
    grads = torch.autograd.grad(loss, [hidden, weight, bias], upstream)
    ref_params = [p.detach().double().requires_grad_() for p in (hidden, weight, bias)]
    ref_loss, _ = reference(*ref_params, targets, -100, reduction, 1e-4)
    ref_grads = torch.autograd.grad(ref_loss, ref_params, upstream.double())

    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.shape == r.shape and rel_err(g, r) < 1e-5, f"d{name}: relative error {rel_err(g, r):.3g}"
