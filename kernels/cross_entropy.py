"""Cross-entropy over the rows of a logits matrix, as one Triton kernel and a thin autograd wrapper.

One program handles one row (token). It streams the row in blocks of BLOCK_V columns, keeping a running
maximum and a running sum of exponentials (online logsumexp, fp32), so the vocabulary can be any size.
The same kernel can then stream the row a second time and write the gradient

    d loss / d logits = scale * (softmax * (1 + 2 * z_loss * lse) - onehot(target))

either into a new buffer or over the logits themselves. The fused linear cross-entropy
(linear_cross_entropy.py) calls it that way on each chunk of logits it computes.

Unlike some fused kernels, `cross_entropy` leaves its input logits untouched unless asked
(inplace_backward=True), in which case the backward pass writes the gradient over the saved logits.
"""
import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def cross_entropy_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    loss_ptr,  # fp32 per row: lse - logit[target] + z_loss * lse^2, 0 for ignored rows
    lse_ptr,  # fp32 per row: written when COMPUTE_LSE, read otherwise
    grad_ptr,  # may be logits_ptr itself: each element is read before it is overwritten
    grad_row_stride,
    grad_scale_ptr,  # per-row factor on the gradient (upstream grad, 1/n for a mean)
    grad_scale_stride,  # 0: one factor for every row
    n_cols,
    ignore_index,
    z_loss,
    BLOCK_V: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 for large chunks
    logits_row = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # A target outside [0, n_cols) (possible only when the caller skipped the host-side check) reads no
    # memory out of bounds: its loss and gradient row become NaN, which the training loop reports.
    in_range = (target >= 0) & (target < n_cols)
    cols = tl.arange(0, BLOCK_V)

    if COMPUTE_LSE:
        row_max = -float("inf")
        sum_exp = 0.0
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            x = tl.load(logits_row + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            row_max = new_max
        lse = row_max + tl.log(sum_exp)
        # Ignored rows still get their true lse stored: the gradient pass divides by it safely.
        target_logit = tl.load(logits_row + tl.where(valid & in_range, target, 0)).to(tl.float32)
        loss = tl.where(valid, tl.where(in_range, lse - target_logit + z_loss * lse * lse, float("nan")), 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        if HAS_GRAD_SCALE:
            scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        else:
            scale = 1.0
        scale = tl.where(valid, scale, 0.0)
        softmax_coef = scale * (1.0 + 2.0 * z_loss * lse)
        grad_row = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * softmax_coef - tl.where(offs == target, scale, 0.0)
            grad = tl.where(valid, tl.where(in_range, grad, float("nan")), 0.0)
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_cols, device):
    if device.type == "cuda":
        # Measured on an H100 (bf16, V = 32k / 50k): 16k-column blocks with 16 warps stream fastest.
        block_v = min(triton.next_power_of_2(n_cols), 16384)
        return block_v, (16 if block_v >= 8192 else 8 if block_v >= 2048 else 4)
    # The interpreter runs block operations as numpy calls: large blocks mean few Python-level steps.
    return min(triton.next_power_of_2(n_cols), 16384), 1


def launch_cross_entropy(logits, targets, ignore_index, z_loss, losses=None, lse=None, grad=None, grad_scale=None):
    """Run the kernel over the rows of `logits` (rows, V), last dimension contiguous.

    With `losses` and `lse` (fp32, (rows,)) it computes both; without `losses` it reads `lse`.
    With `grad` ((rows, V), may be `logits`) it also writes the gradient, times `grad_scale`
    (fp32 tensor of 1 or rows elements; None means 1).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    if logits.device.type != "cuda" and not _interpreter_on():
        raise ValueError("the Triton cross-entropy kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    block_v, num_warps = _launch_config(n_cols, logits.device)
    compute_lse = losses is not None
    write_grad = grad is not None
    has_scale = grad_scale is not None
    launch_kernel(
        cross_entropy_kernel,
        (n_rows,),
        logits,
        logits.stride(0),
        targets,
        losses if compute_lse else lse,
        lse,
        grad if write_grad else logits,
        grad.stride(0) if write_grad else 0,
        grad_scale if has_scale else lse,
        (grad_scale.stride(0) if grad_scale.numel() > 1 else 0) if has_scale else 0,
        n_cols,
        ignore_index,
        float(z_loss),
        BLOCK_V=block_v,
        COMPUTE_LSE=compute_lse,
        WRITE_GRAD=write_grad,
        HAS_GRAD_SCALE=has_scale,
        num_warps=num_warps,
    )


def _interpreter_on():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_kernel(kernel, grid, *args, **kwargs):
    """Launch a Triton kernel, from eager code or from the body of an op made by register_op. On a GPU it goes
    through torch.library.wrap_triton, so that torch.compile sees the kernel; under the interpreter it runs
    directly, and does nothing on the fake tensors an op's body is traced with for its output shapes."""
    if _interpreter_on():
        from torch._subclasses.fake_tensor import is_fake

        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return
        kernel[grid](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def register_op(name):
    """Register fn (type-annotated, mutating none of its inputs, free of host syncs) as the operator
    fasttrain::name, so that torch.compile keeps it in one graph (no graph break) and a CUDA graph can
    capture it: torch.library.triton_op on a GPU, whose kernels torch.compile may then optimize; under the
    interpreter, whose kernels cannot be traced, an opaque custom op with the same body (its kernels skipped,
    see launch_kernel) giving the output shapes."""

    def register(fn):
        from torch._library.custom_ops import OPDEFS

        if f"fasttrain::{name}" in OPDEFS:  # this file imported a second time, as the top-level package
            return OPDEFS[f"fasttrain::{name}"]  # `kernels` (a library probing for a namesake): one operator
        if _interpreter_on():
            op = torch.library.custom_op(f"fasttrain::{name}", fn, mutates_args=())
            op.register_fake(fn)
            return op
        return torch.library.triton_op(f"fasttrain::{name}", fn, mutates_args=())

    return register


def check_targets(targets, n_classes, ignore_index, validate=True):
    """Raise ValueError on a target outside [0, n_classes) that is not ignore_index.

    One reduction on the device and one host sync; validate=False skips both (the kernel then turns an
    out-of-range target's loss into NaN). Returns (valid mask, number of valid targets as a device tensor).
    """
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of class indices, got {targets.dtype}")
    valid = targets != ignore_index
    if not validate:
        return valid, valid.sum()
    out_of_range = valid & ((targets < 0) | (targets >= n_classes))
    if bool(out_of_range.any()):
        bad = targets[out_of_range][0].item()
        raise ValueError(
            f"target {bad} is out of range for {n_classes} classes: targets must lie in [0, {n_classes}) "
            f"or equal ignore_index={ignore_index}"
        )
    return valid, valid.sum()


def reduce_losses(losses, lse, valid, n_valid, reduction, z_loss):
    """The loss and the z-loss term (z_loss * lse^2 over valid rows) for the given reduction."""
    z_terms = torch.where(valid, z_loss * lse * lse, 0.0) if z_loss else torch.zeros_like(losses)
    if reduction == "none":
        return losses, z_terms
    loss, z_term = losses.sum(), z_terms.sum()
    if reduction == "mean":
        denom = n_valid.clamp_min(1).to(torch.float32)  # all ignored: 0 / 1 = 0, not NaN
        loss, z_term = loss / denom, z_term / denom
    return loss, z_term


def grad_scale_for(grad_output, n_valid, reduction):
    """Per-row factor on d loss / d logits: the upstream gradient, divided by the count for a mean."""
    grad_output = grad_output.to(torch.float32)
    if reduction == "none":
        return grad_output
    if reduction == "mean":
        grad_output = grad_output / n_valid.clamp_min(1).to(torch.float32)
    return grad_output.reshape(1)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, z_loss, inplace_backward, validate_targets):
        valid, n_valid = check_targets(targets, logits.shape[1], ignore_index, validate_targets)
        n_rows = logits.shape[0]
        losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        launch_cross_entropy(logits, targets, ignore_index, z_loss, losses=losses, lse=lse)
        loss, z_term = reduce_losses(losses, lse, valid, n_valid, reduction, z_loss)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index, ctx.reduction, ctx.z_loss, ctx.inplace_backward = ignore_index, reduction, z_loss, inplace_backward
        ctx.mark_non_differentiable(z_term)
        return loss, z_term

    @staticmethod
    def backward(ctx, grad_loss, grad_z_term):
        logits, targets, lse, n_valid = ctx.saved_tensors
        grad_scale = grad_scale_for(grad_loss, n_valid, ctx.reduction)
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        launch_cross_entropy(logits, targets, ctx.ignore_index, ctx.z_loss, lse=lse, grad=grad, grad_scale=grad_scale)
        return grad, None, None, None, None, None, None


# Run eagerly under torch.compile: Dynamo cannot trace the Triton interpreter (nor the target check's host
# sync); the graph breaks here and the loss and gradients stay exact.
@torch.compiler.disable
def cross_entropy(
    logits,
    targets,
    ignore_index=-100,
    reduction="mean",
    z_loss=0.0,
    return_z_loss=False,
    inplace_backward=False,
    validate_targets=True,
):
    """Cross-entropy of `logits` (N, V) against `targets` (N,) of class indices, in fp32.

    Equals torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=ignore_index,
    reduction=reduction) plus, when z_loss > 0, z_loss * lse^2 per valid row (PaLM's z-loss) reduced the
    same way. Leading dimensions are flattened: logits (..., V) with targets (...).

    reduction: "mean" (over rows whose target is not ignore_index; 0 when all are ignored), "sum" or
    "none" (fp32 per-row losses, 0 at ignored rows).
    return_z_loss: also return the z-loss term alone (already included in the loss; for logging, not
    differentiable).
    inplace_backward: write the gradient over `logits` in the backward pass instead of allocating a new
    tensor (saves N x V memory; the logits are no longer valid after backward).
    validate_targets: raise ValueError on a target outside [0, V) (one host sync per call). False skips
    the check and its sync, for callers whose targets are known to be in range (a training loop); an
    out-of-range target then gives a NaN loss, never an out-of-bounds read.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits (..., V) and targets (...) must agree in the leading dimensions, got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    out_shape = targets.shape
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.reshape(-1).contiguous()
    loss, z_term = CrossEntropyFunction.apply(logits, targets, ignore_index, reduction, float(z_loss), inplace_backward,
                                              validate_targets)
    if reduction == "none":
        loss, z_term = loss.reshape(out_shape), z_term.reshape(out_shape)
    return (loss, z_term) if return_z_loss else loss
