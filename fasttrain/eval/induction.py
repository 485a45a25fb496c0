"""Induction heads (prefix-matching score per head) and the in-context-learning score (Olsson et al. 2022).

Prefix-matching score of a head (fixed definition):
- Token pool: the vocabulary without special tokens, ranked by frequency in the train split (all of it, or
  64 evenly spaced chunks totalling 2^24 tokens when larger); the most common 1% and the least common
  half are left out (the least common include tokens barely or never trained). Without a train split the
  pool is the middle half of the token ids (byte-level BPE ids grow roughly with rarity). If that leaves
  fewer than 25 tokens, the whole vocabulary without special tokens is used.
- Sequence: a start token (end-of-text), then 25 distinct tokens drawn uniformly from the pool, repeated
  4 times: 101 tokens. Distinct, so every token has one well-defined successor.
- Score: for every token in repeats 2-4, the attention it pays to the tokens that followed its earlier
  occurrences (summed over all earlier repeats, so a head that always attends to the right place scores
  1 whether it picks the latest or an older repeat), averaged over those 75 tokens and over 10 sequences
  drawn with a fixed seed. Attention probabilities are computed in fp32 by an explicit softmax.
- Reported: every head's score (layers x heads), the maximum per layer, and the best head overall.

In-context-learning score (fixed definition):
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

import numpy as np
import torch

from fasttrain.eval.common import (count_windows, evenly_spaced, model_device, read_windows, special_token_ids,
                                   token_losses)

FREQUENCY_SAMPLE_TOKENS = 1 << 24
FREQUENCY_SAMPLE_CHUNKS = 64
DROP_MOST_COMMON = 0.01
KEEP_UNTIL = 0.5  # the least common half is dropped


def token_counts(dataset, sample_tokens: int = FREQUENCY_SAMPLE_TOKENS) -> np.ndarray | None:
    """Token frequencies in the train split (or an evenly spread sample of it); None without a train split."""
    try:
        tokens = dataset.train.tokens
    except ValueError:  # no train split
        return None
    n = int(len(tokens))
    if n == 0:
        return None
    if n <= sample_tokens:
        sample = np.asarray(tokens)
    else:
        chunk = sample_tokens // FREQUENCY_SAMPLE_CHUNKS
        starts = evenly_spaced(n - chunk + 1, FREQUENCY_SAMPLE_CHUNKS)
        sample = np.concatenate([np.asarray(tokens[s:s + chunk]) for s in starts.tolist()])
    return np.bincount(sample.astype(np.int64), minlength=dataset.vocab_size)[:dataset.vocab_size]


def token_pool(vocab_size: int, special: set[int], counts: np.ndarray | None, min_size: int = 25) -> np.ndarray:
    """Token ids for random sequences: without the most and least common tokens (see the docstring)."""
    candidates = np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)
    n = candidates.size
    if counts is not None and counts[candidates].sum() > 0:
        order = candidates[np.argsort(-counts[candidates], kind="stable")]  # most common first
        pool = np.sort(order[int(math.ceil(DROP_MOST_COMMON * n)):int(KEEP_UNTIL * n)])
    else:
        pool = candidates[n // 4:(3 * n) // 4]
    return pool if pool.size >= min_size else candidates


def prefix_matching_sequences(pool: np.ndarray, start_id: int, n_random: int = 25, repeats: int = 4,
                              n_sequences: int = 10, seed: int = 0) -> np.ndarray:
    """(n_sequences, 1 + n_random * repeats): [start, t_1..t_n, t_1..t_n, ...] with distinct random t."""
    pool = np.asarray(pool, dtype=np.int64)
    if pool.size < n_random:
        raise ValueError(f"the token pool holds {pool.size} tokens, fewer than the {n_random} distinct random "
                         "tokens a prefix-matching sequence needs")
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([[start_id], np.tile(rng.choice(pool, n_random, replace=False), repeats)])
            for _ in range(n_sequences)]
    return np.stack(rows).astype(np.int64)


def prefix_matching_targets(n_random: int, repeats: int) -> torch.Tensor:
    """(T, T) 0/1 mask: query i (a token of repeat >= 2) -> the positions after its earlier occurrences."""
    T = 1 + n_random * repeats
    mask = torch.zeros(T, T)
    for r in range(1, repeats):
        for k in range(n_random):
            i = 1 + r * n_random + k
            for earlier in range(r):
                mask[i, 1 + earlier * n_random + k + 1] = 1.0  # k + 1 == n_random: first token of the next repeat
    return mask


@torch.no_grad()
def prefix_matching_scores(model, pool: np.ndarray, start_id: int, n_random: int = 25, repeats: int = 4,
                           n_sequences: int = 10, seed: int = 0, device=None) -> np.ndarray:
    """Prefix-matching score of every head: array (n_layer, n_head)."""
    T = 1 + n_random * repeats
    if T > model.context_length:
        raise ValueError(f"prefix matching needs 1 + {n_random} x {repeats} = {T} tokens but the model's context "
                         f"is {model.context_length}: use fewer random tokens or repeats")
    device = device or model_device(model)
    idx = torch.from_numpy(prefix_matching_sequences(pool, start_id, n_random, repeats, n_sequences, seed))
    mask = prefix_matching_targets(n_random, repeats).to(device)
    n_queries = n_random * (repeats - 1)
    model.eval()
    _, probs = model.attention_probs(idx.to(device))
    scores = [(p.float() * mask).sum(dim=(-1, -2)).mean(dim=0) / n_queries for p in probs]  # each (H,)
    return torch.stack(scores).cpu().numpy()


def induction_scores(model, dataset, n_random: int = 25, repeats: int = 4, n_sequences: int = 10,
                     seed: int = 0, device=None) -> dict:
    """Prefix-matching scores on sequences from the dataset's token pool (see the module docstring)."""
    special = special_token_ids(dataset)
    pool = token_pool(dataset.vocab_size, special, token_counts(dataset), min_size=n_random)
    scores = prefix_matching_scores(model, pool, dataset.eot_id, n_random, repeats, n_sequences, seed, device)
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return {
        "induction_score_max": float(scores.max()),
        "induction_best_head": [int(layer), int(head)],
        "induction_score_per_layer": [float(s) for s in scores.max(axis=1)],
        "induction_scores": [[float(s) for s in row] for row in scores],
    }


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
