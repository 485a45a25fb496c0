"""Fused language-model head + cross-entropy: loss(hidden @ weight.T + bias, targets) without ever holding
the full (tokens x vocab) logits.

The tokens are processed in chunks. For each chunk:
  1. logits = h_chunk @ W.T (+ bias), a cuBLAS matmul in the input dtype, into one reused buffer;
  2. the Triton cross-entropy kernel (cross_entropy.py) reads each row twice (logsumexp, then softmax)
     and writes d loss / d logits over the logits in place (fp32 math, stored in the input dtype);
  3. grad_h_chunk = dlogits @ W and grad_W += dlogits.T @ h_chunk (fp32 accumulator), grad_b += sum.
So the gradients are finished during the forward pass and the backward pass only scales them by the
upstream gradient. Extra memory: one chunk of logits plus the gradients themselves.

reduction="none" takes an arbitrary per-token upstream gradient, which is unknown during the forward:
there the forward computes the losses only and the backward recomputes each chunk's logits with the
upstream gradient folded into the kernel (one extra matmul of the forward's size).

The passes are registered operators (fasttrain::linear_cross_entropy and friends, see
cross_entropy.register_op) with their autograd formulas: torch.compile keeps them in its graph and a CUDA
graph can capture them (nothing in them waits for the host).
"""
from typing import Optional

import torch

from .cross_entropy import REDUCTIONS, check_targets, launch_cross_entropy, reduce_losses, register_op

# 4096 tokens per chunk: the grad_W matmul (K = chunk) runs near cuBLAS's peak and the fp32 accumulator is
# read and written N / 4096 times (measured on an H100: 2048-token chunks cost ~5% more time at d = 2048).
# Very large vocabularies get fewer tokens so one chunk of logits stays within CHUNK_LOGITS elements.
CHUNK_TOKENS = 4096
CHUNK_LOGITS = 2**28


def default_chunk_size(n_tokens, vocab_size):
    rows = min(CHUNK_TOKENS, max(CHUNK_LOGITS // vocab_size // 256 * 256, 256))
    return max(1, min(rows, n_tokens))


_FP32_OUT_MATMUL = {}


@torch.compiler.assume_constant_result  # probed eagerly once; a constant to torch.compile
def _has_fp32_out_matmul(device, dtype):
    """Whether torch.addmm(..., out_dtype=torch.float32) accumulates low-precision products in fp32 here."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    device = torch.device(device)
    key = (device.type, dtype)
    if dtype == torch.float32:
        return False  # not needed: fp32 products are accumulated in fp32 anyway
    if key not in _FP32_OUT_MATMUL:
        with unset_fake_temporarily():  # real tensors, even while a graph is traced with fake ones
            try:
                a = torch.ones(2, 2, device=device, dtype=dtype)
                acc = torch.ones(2, 2, device=device, dtype=torch.float32)
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                _FP32_OUT_MATMUL[key] = bool((acc == 3).all())
            except (RuntimeError, TypeError, NotImplementedError):
                _FP32_OUT_MATMUL[key] = False
    return _FP32_OUT_MATMUL[key]


def _accumulate_matmul(acc, a, b, first, fp32_out):
    """acc (fp32) = a @ b when first, else acc += a @ b; fp32_out: _has_fp32_out_matmul for a's dtype."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    elif fp32_out:
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # product rounded to the input dtype once, then summed in fp32
        acc.copy_(a @ b) if first else acc.add_(a @ b)


def _chunked_pass(hidden, weight, bias, targets, ignore_index, z_loss, chunk_size, needs, losses, lse, grad_scale,
                  fp32_out):
    """Loop over token chunks. Forward (losses given): computes losses and lse, and the unscaled gradients
    when any of needs = (hidden, weight, bias) is set. Backward (losses None): reads lse and writes the
    gradients times the per-row grad_scale. Returns (grad_hidden, grad_weight fp32, grad_bias fp32)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_bias = torch.empty(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    if n_tokens == 0:
        return (grad_hidden, grad_weight.zero_() if need_w else None, grad_bias.zero_() if need_b else None)

    logits_buffer = hidden.new_empty(min(chunk_size, n_tokens), vocab)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        launch_cross_entropy(
            logits,
            targets[start:end],
            ignore_index,
            z_loss,
            losses=None if losses is None else losses[start:end],
            lse=lse[start:end],
            grad=logits if any_grad else None,
            grad_scale=None if grad_scale is None else grad_scale[start:end] if grad_scale.numel() > 1 else grad_scale,
        )
        if not any_grad:
            continue
        dlogits, first = logits, start == 0
        if need_h:
            torch.mm(dlogits, weight, out=grad_hidden[start:end])
        if need_w:
            _accumulate_matmul(grad_weight, dlogits.t(), h, first, fp32_out)
        if need_b:
            chunk_sum = dlogits.sum(0, dtype=torch.float32)
            grad_bias.copy_(chunk_sum) if first else grad_bias.add_(chunk_sum)
    return grad_hidden, grad_weight, grad_bias


def _none_if_empty(t):
    """The operators return an empty 1-d tensor for a gradient that is not needed."""
    return None if t.dim() == 1 and t.shape[0] == 0 else t


# ---- the operators: forward passes and their autograd formulas --------------------------------------------
# Gradients that are not needed come back as empty tensors (an operator returns tensors only).
@register_op("linear_cross_entropy")
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
              ignore_index: int, reduction: str, z_loss: float, chunk_size: int, need_hidden: bool, need_weight: bool,
              need_bias: bool, fp32_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor]:
    """reduction "mean" or "sum": (loss, z-loss term, per-token losses, and the gradients of the loss with
    respect to hidden, weight and bias, finished during this pass)."""
    valid = targets != ignore_index
    n_valid = valid.sum()
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(losses)
    grad_hidden, grad_weight, grad_bias = _chunked_pass(
        hidden, weight, bias, targets, ignore_index, z_loss, chunk_size, (need_hidden, need_weight, need_bias),
        losses, lse, None, fp32_out)
    loss, z_term = reduce_losses(losses, lse, valid, n_valid, reduction, z_loss)
    # 1/n folded in before grad_weight leaves fp32: a sum over many tokens can overflow fp16.
    inv_count = torch.ones((), dtype=torch.float32, device=hidden.device)
    if reduction == "mean":
        inv_count = inv_count / n_valid.clamp_min(1)
    grad_hidden = hidden.new_empty(0) if grad_hidden is None else grad_hidden.mul_(inv_count)
    grad_weight = hidden.new_empty(0) if grad_weight is None else grad_weight.mul_(inv_count).to(weight.dtype)
    grad_bias = hidden.new_empty(0) if grad_bias is None else grad_bias.mul_(inv_count).to(hidden.dtype)
    return loss, z_term, losses, grad_hidden, grad_weight, grad_bias


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])


def _fused_backward(ctx, grad_loss, grad_z_term, grad_token_losses, *unused):
    grad_hidden, grad_weight, grad_bias = (_none_if_empty(g) for g in ctx.saved_tensors)
    grad_loss = grad_loss.to(torch.float32)
    grads = [None if g is None else g * grad_loss for g in (grad_hidden, grad_weight, grad_bias)]
    return (*grads,) + (None,) * 9


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


@register_op("linear_cross_entropy_none")
def _per_token_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  ignore_index: int, z_loss: float, chunk_size: int, need_hidden: bool, need_weight: bool,
                  need_bias: bool, fp32_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction "none": (per-token losses, z-loss terms, lse); the gradients wait for the backward."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(losses)
    _chunked_pass(hidden, weight, bias, targets, ignore_index, z_loss, chunk_size, (False, False, False),
                  losses, lse, None, fp32_out)
    valid = targets != ignore_index
    _, z_terms = reduce_losses(losses, lse, valid, valid.sum(), "none", z_loss)
    return losses, z_terms, lse


@register_op("linear_cross_entropy_none_backward")
def _per_token_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           targets: torch.Tensor, lse: torch.Tensor, grad_losses: torch.Tensor, ignore_index: int,
                           z_loss: float, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                           fp32_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients for per-token upstream gradients grad_losses: each chunk's logits recomputed."""
    grad_hidden, grad_weight, grad_bias = _chunked_pass(
        hidden, weight, bias, targets, ignore_index, z_loss, chunk_size, (need_hidden, need_weight, need_bias),
        None, lse, grad_losses.to(torch.float32), fp32_out)
    return (hidden.new_empty(0) if grad_hidden is None else grad_hidden,
            hidden.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
            hidden.new_empty(0) if grad_bias is None else grad_bias.to(hidden.dtype))


def _per_token_setup(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, z_loss, chunk_size, *needs_and_fp32 = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[2])
    ctx.args = (ignore_index, z_loss, chunk_size, *needs_and_fp32)


def _per_token_backward(ctx, grad_losses, grad_z_terms, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    grads = _per_token_backward_op(hidden, weight, bias, targets, lse, grad_losses, *ctx.args)
    return tuple(_none_if_empty(g) for g in grads) + (None,) * 8


_per_token_op.register_autograd(_per_token_backward, setup_context=_per_token_setup)


def linear_cross_entropy(
    hidden,
    weight,
    targets,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    z_loss=0.0,
    return_z_loss=False,
    chunk_size=None,
    validate_targets=True,
    return_token_losses=False,
):
    """Cross-entropy of hidden @ weight.T + bias against targets, computed in chunks of tokens.

    hidden (N, d) or (..., d); weight (V, d); bias (V,) or None; targets (N,) or (...) class indices.
    Equals torch.nn.functional.cross_entropy((hidden @ weight.T + bias).float(), targets,
    ignore_index=ignore_index, reduction=reduction) (matmul in the input dtype, softmax in fp32), plus
    z_loss * lse^2 per valid token reduced the same way when z_loss > 0.

    reduction: "mean" (over tokens whose target is not ignore_index; 0 when all are ignored), "sum" or
    "none" (fp32 per-token losses, 0 at ignored tokens; its backward recomputes the logits).
    return_z_loss: also return the z-loss term alone (already included in the loss; for logging, not
    differentiable).
    return_token_losses: also return every token's loss (shaped like targets, fp32, 0 at ignored tokens,
    not differentiable), which the fused reductions compute anyway: a training loop can split its logged
    loss by sequence at no cost. Returned after the z-loss term when both are asked for.
    chunk_size: tokens per chunk; by default 4096 (fewer when V > 64k). Peak extra memory ~ chunk_size x V.
    validate_targets: raise ValueError on a target outside [0, V) (one host sync per call). False skips
    the check and its sync, for callers whose targets are known to be in range (a training loop); an
    out-of-range target then gives a NaN loss, never an out-of-bounds read. Inside torch.compile the check
    is skipped (a graph has no host syncs).
    Under autocast, hidden, weight and bias are cast to the autocast dtype first. The loss is fp32.
    Under torch.compile the passes stay in the graph (registered operators, no graph break).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., d) and weight (V, d) must share d, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden, weight and bias must share one dtype (or run under autocast), got {hidden.dtype}, "
            f"{weight.dtype}" + ("" if bias is None else f", {bias.dtype}")
        )
    out_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).contiguous()
    check_targets(targets, weight.shape[0], ignore_index, validate_targets and not torch.compiler.is_compiling())
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    grad_enabled = torch.is_grad_enabled()
    needs = [bool(grad_enabled and t is not None and t.requires_grad) for t in (hidden, weight, bias)]
    fp32_out = _has_fp32_out_matmul(hidden.device, hidden.dtype)
    with torch.autocast(device_type, enabled=False):
        if reduction == "none":
            loss, z_term, _ = _per_token_op(hidden, weight, bias, targets, ignore_index, float(z_loss), chunk_size,
                                            *needs, fp32_out)
            loss, z_term = loss.reshape(out_shape), z_term.reshape(out_shape)
            token_losses = loss.detach()
        else:
            loss, z_term, token_losses, *_ = _fused_op(hidden, weight, bias, targets, ignore_index, reduction,
                                                       float(z_loss), chunk_size, *needs, fp32_out)
            z_term, token_losses = z_term.detach(), token_losses.detach()
    outputs = (loss,) + ((z_term,) if return_z_loss else ()) + ((token_losses.reshape(out_shape),) if return_token_losses else ())
    return outputs if len(outputs) > 1 else loss
