"""Reference implementations shared by the kernel tests."""
import torch
import torch.nn.functional as F


def cross_entropy_reference(logits, targets, ignore_index, reduction, z_loss):
    """F.cross_entropy + z_loss * lse^2 over non-ignored rows, in the logits' own dtype.
    Returns (loss, z-loss term), each reduced like the loss ('mean' over non-ignored rows)."""
    valid = targets != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    z_terms = torch.where(valid, z_loss * lse**2, 0.0)
    if reduction == "none":
        return losses + z_terms, z_terms
    total, z_total = (losses + z_terms).sum(), z_terms.sum()
    if reduction == "mean":
        count = valid.sum().clamp_min(1)
        total, z_total = total / count, z_total / count
    return total, z_total
