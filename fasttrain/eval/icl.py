"""The in-context-learning score (Olsson et al. 2022).

Definition (fixed):
- "Loss at token k" is the loss of predicting the k-th token of a context from the k - 1 tokens before it.
- Score = mean over held-out contexts of (loss at token 500 - loss at token 50). Contexts are windows of
  the test split spread evenly over it (cut at arbitrary points, like training windows); their number
  follows the token budget (at least 16). A negative score means later tokens are predicted better.
- When the context is shorter than 500 tokens, the nearest positions it allows are used: late =
  min(500, context_length), early = 50 (or late // 10, at least 2, when late <= 50). The positions used
  are reported (icl_positions), with the standard error over contexts (icl_score_stderr).
"""
from __future__ import annotations

import math

import torch

from fasttrain.measure.windows import count_windows, evenly_spaced, read_windows, token_losses


def icl_positions(context_length: int, positions: tuple[int, int] | None = None) -> tuple[int, int]:
    """(early, late) token positions: the requested ones (checked), or 50 and 500 moved to fit the context."""
    if positions is not None:
        early, late = (int(p) for p in positions)
        if not 2 <= early < late:
            raise ValueError(f"in-context-learning positions ({early}, {late}): need 2 <= early < late")
        if late > context_length:
            raise ValueError(f"in-context-learning position {late} is beyond the context of "
                             f"{context_length} tokens: request positions of at most {context_length}")
        return early, late
    late = min(500, context_length)
    early = 50 if late > 50 else max(2, late // 10)
    if early >= late:
        raise ValueError(f"the context ({context_length} tokens) is too short for an in-context-learning "
                         "score (it needs at least 3 tokens)")
    return early, late


@torch.no_grad()
def icl_score(model, dataset, context_length: int, positions: tuple[int, int] | None = None,
              n_sequences: int = 16, batch_size: int = 8, device=None) -> dict:
    """Loss at the late position minus loss at the early one, on held-out contexts (see the docstring)."""
    early, late = icl_positions(context_length, positions)
    available = count_windows(dataset, "test", late - 1)
    if available == 0:
        raise ValueError(f"the test split holds fewer than {late} tokens, too few for one in-context-learning "
                         "context: prepare the dataset with a larger test fraction")
    windows = read_windows(dataset, "test", evenly_spaced(available, n_sequences), late - 1)  # `late` tokens
    losses = token_losses(model, windows, batch_size, device).double()
    diff = losses[:, late - 2] - losses[:, early - 2]  # column t predicts token t + 2 (1-based)
    n = diff.numel()
    return {
        "icl_score": float(diff.mean()),
        "icl_score_stderr": float(diff.std() / math.sqrt(n)) if n > 1 else None,
        "icl_positions": [early, late],
        "icl_loss_early": float(losses[:, early - 2].mean()),
        "icl_loss_late": float(losses[:, late - 2].mean()),
        "icl_sequences": int(n),
    }
