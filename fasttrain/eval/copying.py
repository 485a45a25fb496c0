"""Copying: the loss on a passage the model has just seen, against the loss on its first occurrence.

Definitions (fixed):
- A passage x of L tokens is placed `copies` times (default 2) in a row after a start token (end-of-text):
  [EOT, x, x]. It must fit the context: 1 + copies * L <= context_length. By default L is the largest
  length that fits, (context_length - 1) // copies (1023 tokens at a 2048 context).
- Loss of an occurrence: mean next-token loss over its tokens x[1..L-1]. x[0] is left out of every
  occurrence: nothing announces where a copy starts, so it cannot be copied.
- Text: held-out passages (the test split, windows of L tokens spread evenly over it, crossing document
  boundaries like training windows). Random: tokens drawn uniformly from the vocabulary without the
  special tokens, with a fixed seed, all distinct within a passage when the vocabulary allows (so each
  token's successor is unambiguous and a perfect copier reaches zero loss on the second occurrence).
- Reported: copy_{text,random}_first_loss and ..._second_loss (nats/token; with copies > 2 the mean over
  occurrences 2..copies) over n passages (16 by default; `evaluate` scales it with its token budget, 4 to 16).
  A model that copies perfectly has second-occurrence loss near 0; on random tokens the first occurrence
  costs about ln(vocabulary) for any model. The paper's stronger variant (a paragraph repeated 11
  times) is copies=11 with a shorter L.
"""
from __future__ import annotations

import numpy as np
import torch

from fasttrain.measure.windows import count_windows, evenly_spaced, read_windows, special_token_ids, token_losses


def copy_sequences(passages: np.ndarray, start_id: int, copies: int = 2) -> np.ndarray:
    """(n, L) passages -> (n, 1 + copies * L) sequences [start, x, x, ...]."""
    passages = np.asarray(passages, dtype=np.int64)
    start = np.full((passages.shape[0], 1), start_id, dtype=np.int64)
    return np.concatenate([start] + [passages] * copies, axis=1)


def copying_losses(model, passages: np.ndarray, start_id: int, copies: int = 2, batch_size: int = 8,
                   device=None) -> list[float]:
    """Mean loss (nats/token) on tokens 1..L-1 of each occurrence, one value per occurrence."""
    passages = np.asarray(passages, dtype=np.int64)
    n, L = passages.shape
    if L < 2:
        raise ValueError(f"a copying passage needs at least 2 tokens, got {L}")
    losses = token_losses(model, copy_sequences(passages, start_id, copies), batch_size, device)
    # Loss column t predicts sequence token t + 1; token k of occurrence c sits at 1 + c * L + k.
    return [float(losses[:, c * L + 1:(c + 1) * L].double().mean()) for c in range(copies)]


def text_passages(dataset, length: int, n: int) -> np.ndarray:
    """n held-out passages of `length` tokens, spread evenly over the test split."""
    available = count_windows(dataset, "test", length - 1)
    if available == 0:
        raise ValueError(f"the test split holds fewer than {length} tokens, too few for one copying passage: "
                         "prepare the dataset with a larger test fraction or use a shorter copy length")
    return read_windows(dataset, "test", evenly_spaced(available, n), length - 1)


def random_passages(pool: np.ndarray, length: int, n: int, seed: int = 0) -> np.ndarray:
    """n passages of tokens drawn uniformly from pool (distinct within a passage when the pool allows)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool, dtype=np.int64)
    return np.stack([rng.choice(pool, size=length, replace=length > pool.size) for _ in range(n)])


def max_copy_length(context_length: int, copies: int = 2) -> int:
    return (context_length - 1) // copies


@torch.no_grad()
def copying_scores(model, dataset, context_length: int, length: int | None = None, n_sequences: int = 16,
                   copies: int = 2, seed: int = 0, batch_size: int = 8, device=None) -> dict:
    """Copying losses on held-out text and on random tokens (see the module docstring)."""
    longest = max_copy_length(context_length, copies)
    if length is None:
        length = longest
    if length > longest:
        raise ValueError(f"copy length {length} needs 1 + {copies} x {length} = {1 + copies * length} tokens but "
                         f"the context is {context_length} tokens: use a copy length of at most {longest}")
    if length < 2:
        raise ValueError(f"copy length {length}: a passage needs at least 2 tokens (context {context_length} "
                         f"allows at most {longest})")
    special = special_token_ids(dataset)
    pool = np.array([i for i in range(dataset.vocab_size) if i not in special], dtype=np.int64)
    text = copying_losses(model, text_passages(dataset, length, n_sequences), dataset.eot_id, copies,
                          batch_size, device)
    rand = copying_losses(model, random_passages(pool, length, n_sequences, seed), dataset.eot_id, copies,
                          batch_size, device)
    return {
        "copy_length": int(length),
        "copy_copies": int(copies),
        "copy_sequences": int(n_sequences),
        "copy_text_first_loss": text[0],
        "copy_text_second_loss": float(np.mean(text[1:])),
        "copy_random_first_loss": rand[0],
        "copy_random_second_loss": float(np.mean(rand[1:])),
    }
