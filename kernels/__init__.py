"""Triton kernels with their autograd wrappers. Imports only torch and triton.

    flash_attention(q, k, v, causal=True, softmax_scale=None)           fused attention, fwd + bwd
    cross_entropy(logits, targets, ...)                                 cross-entropy over given logits
    linear_cross_entropy(hidden, weight, targets, bias=None, ...)       lm-head matmul + cross-entropy,
                                                                        never materializing all logits

On a machine without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1).
"""
from .cross_entropy import cross_entropy
from .flash_attention import flash_attention
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["cross_entropy", "flash_attention", "linear_cross_entropy"]
