"""Copying: the loss on a passage the model has already seen in its context, as Hernandez et al. measure it
(a paragraph placed 11 times in one context).

Definitions (fixed):
- A passage x of L tokens is placed C times (`copies`, default 11) in a row after a start token
  (end-of-text): [EOT, x, x, ..., x]. It must fit the context: 1 + C * L <= context_length. By default L is
  the largest length that fits, (context_length - 1) // C (186 tokens at 2048 with 11 copies).
- Loss of a copy: mean next-token loss over its tokens x[1..L-1]. x[0] is left out of every copy: nothing
  announces where a copy starts, so it cannot be copied.
- Copying loss of a passage: the mean of its copies 2..C (every copy after the first, equally weighted).
  copy_{text,random}_loss is its mean over passages; copy_{text,random}_loss_stderr its standard error,
  taken over passages, not tokens (tokens and copies of one passage are correlated): random passages are
  independent draws, text passages are grouped by their document (fasttrain.measure.stats).
  copy_*_first_loss and copy_*_second_loss are the 1st and the 2nd copy alone (a 2nd copy has one earlier
  copy to read from, whatever C is).
- Text: held-out passages (the test split, windows of L tokens spread evenly over it, crossing document
  boundaries like training windows). Random: tokens drawn uniformly from the vocabulary without the
  special tokens, with a fixed seed, all distinct within a passage when the vocabulary allows (so each
  token's successor is unambiguous and a perfect copier reaches zero loss from the second copy on).
- Number of passages (each kind): given, or from a token budget max(4, tokens // (1 + C * L)), so each kind
  reads about as many tokens as the test loss does; text passages are at most the windows the split holds.
  A model that copies perfectly has a copying loss near 0; on random tokens the first copy costs about
  ln(vocabulary) for any model.
"""
from __future__ import annotations

import numpy as np
import torch

from fasttrain.measure.stats import mean_and_stderr
from fasttrain.measure.windows import (count_windows, evenly_spaced, read_windows, special_token_ids, token_losses,
                                       window_documents)

PAPER_COPIES = 11
MIN_PASSAGES = 4


def copy_sequences(passages: np.ndarray, start_id: int, copies: int = PAPER_COPIES) -> np.ndarray:
    """(n, L) passages -> (n, 1 + copies * L) sequences [start, x, x, ...]."""
    passages = np.asarray(passages, dtype=np.int64)
    start = np.full((passages.shape[0], 1), start_id, dtype=np.int64)
    return np.concatenate([start] + [passages] * copies, axis=1)


def occurrence_losses(model, passages: np.ndarray, start_id: int, copies: int = PAPER_COPIES, batch_size: int = 8,
                      device=None) -> np.ndarray:
    """(n, copies) array: the mean loss (nats/token) on tokens 1..L-1 of each copy of each passage."""
    passages = np.asarray(passages, dtype=np.int64)
    n, L = passages.shape
    if L < 2:
        raise ValueError(f"a copying passage needs at least 2 tokens, got {L}")
    losses = token_losses(model, copy_sequences(passages, start_id, copies), batch_size, device).double()
    # Loss column t predicts sequence token t + 1; token k of copy c sits at 1 + c * L + k.
    return torch.stack([losses[:, c * L + 1:(c + 1) * L].mean(dim=1) for c in range(copies)], dim=1).numpy()


def copying_losses(model, passages: np.ndarray, start_id: int, copies: int = PAPER_COPIES, batch_size: int = 8,
                   device=None) -> list[float]:
    """Mean loss (nats/token) on tokens 1..L-1 of each copy, one value per copy."""
    return [float(v) for v in occurrence_losses(model, passages, start_id, copies, batch_size, device).mean(axis=0)]


def text_passages(dataset, length: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n held-out passages of `length` tokens, spread evenly over the test split (fewer if it holds fewer),
    and the document each comes from."""
    available = count_windows(dataset, "test", length - 1)
    if available == 0:
        raise ValueError(f"the test split holds fewer than {length} tokens, too few for one copying passage: "
                         "prepare the dataset with a larger test fraction or use a shorter copy length")
    ids = evenly_spaced(available, n)
    return read_windows(dataset, "test", ids, length - 1), window_documents(dataset, "test", ids, length - 1)


def random_passages(pool: np.ndarray, length: int, n: int, seed: int = 0) -> np.ndarray:
    """n passages of tokens drawn uniformly from pool (distinct within a passage when the pool allows)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool, dtype=np.int64)
    return np.stack([rng.choice(pool, size=length, replace=length > pool.size) for _ in range(n)])


def check_copies(copies) -> int:
    if isinstance(copies, bool) or not isinstance(copies, (int, np.integer)) or copies < 2:
        raise ValueError(f"copies {copies!r}: copying needs a passage placed at least 2 times (the paper uses "
                         f"{PAPER_COPIES})")
    return int(copies)


def max_copy_length(context_length: int, copies: int = PAPER_COPIES) -> int:
    return (context_length - 1) // check_copies(copies)


def copy_length_for(context_length: int, copies: int = PAPER_COPIES, length: int | None = None) -> int:
    """The passage length: the requested one (checked against the context) or the longest that fits."""
    longest = max_copy_length(context_length, copies)
    if length is None:
        length = longest
    if length > longest:
        raise ValueError(f"copy length {length} needs 1 + {copies} x {length} = {1 + copies * length} tokens but "
                         f"the context is {context_length} tokens: use a copy length of at most {longest}")
    if length < 2:
        raise ValueError(f"copy length {length}: a passage needs at least 2 tokens, and a context of "
                         f"{context_length} tokens allows at most {longest} with {copies} copies: use fewer copies")
    return int(length)


def passages_for_budget(tokens: int, copies: int, length: int) -> int:
    return max(MIN_PASSAGES, int(tokens) // (1 + copies * length))


def summarize(kind: str, losses: np.ndarray, documents=None) -> dict:
    """copy_{kind}_* from the (n, copies) per-copy losses of n passages (grouped by document for the error)."""
    loss, stderr = mean_and_stderr(losses[:, 1:].mean(axis=1), documents)
    return {f"copy_{kind}_loss": loss, f"copy_{kind}_loss_stderr": stderr,
            f"copy_{kind}_first_loss": float(losses[:, 0].mean()),
            f"copy_{kind}_second_loss": float(losses[:, 1].mean())}


@torch.no_grad()
def copying_scores(model, dataset, context_length: int, length: int | None = None, n_sequences: int | None = None,
                   copies: int = PAPER_COPIES, seed: int = 0, batch_size: int = 8, device=None,
                   tokens: int | None = None) -> dict:
    """Copying losses on held-out text and on random tokens (see the module docstring). The number of
    passages of each kind: n_sequences, or from the token budget `tokens` (16 when neither is given)."""
    copies = check_copies(copies)
    length = copy_length_for(context_length, copies, length)
    if n_sequences is None:
        n_sequences = passages_for_budget(tokens, copies, length) if tokens is not None else 16
    if n_sequences < 1:
        raise ValueError(f"copying over {n_sequences} passages: need at least 1")
    special = special_token_ids(dataset)
    pool = np.array([i for i in range(dataset.vocab_size) if i not in special], dtype=np.int64)
    passages, documents = text_passages(dataset, length, n_sequences)
    text = occurrence_losses(model, passages, dataset.eot_id, copies, batch_size, device)
    rand = occurrence_losses(model, random_passages(pool, length, n_sequences, seed), dataset.eot_id, copies,
                             batch_size, device)
    return {
        "copy_length": length,
        "copy_copies": copies,
        "copy_sequences": int(len(text)),
        "copy_random_sequences": int(len(rand)),
        **summarize("text", text, documents),
        **summarize("random", rand),
    }
