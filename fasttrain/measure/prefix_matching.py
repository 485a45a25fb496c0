"""Induction heads: the prefix-matching score of every attention head (Olsson et al. 2022).

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
  1 whether it picks the latest or an older repeat), averaged over those 75 tokens and over the sequences,
  drawn with a fixed seed. Attention probabilities are computed in fp32 by an explicit softmax.
- Number of sequences: 10 (the paper's), or with a token budget max(10, tokens // 101), so that the
  measurement reads about as many tokens as the test loss does.
- Reported: every head's score (layers x heads), the maximum per layer, the best head overall, the number
  of sequences, and the standard error of the best head's score over sequences (induction_score_max_stderr:
  sample standard deviation of that head's per-sequence scores / sqrt(sequences); the choice of the best
  head is not counted in it).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fasttrain.measure.stats import mean_and_stderr
from fasttrain.measure.windows import evenly_spaced, model_device, special_token_ids

FREQUENCY_SAMPLE_TOKENS = 1 << 24
FREQUENCY_SAMPLE_CHUNKS = 64
DROP_MOST_COMMON = 0.01
KEEP_UNTIL = 0.5  # the least common half is dropped
PAPER_SEQUENCES = 10  # Olsson et al. average over 10 sequences


def sequences_for_budget(tokens: int | None, n_random: int = 25, repeats: int = 4) -> int:
    """Prefix-matching sequences for a token budget: 10, or about tokens / sequence length when more."""
    if tokens is None:
        return PAPER_SEQUENCES
    return max(PAPER_SEQUENCES, int(tokens) // (1 + n_random * repeats))


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


def check_fits(model, n_random: int, repeats: int) -> int:
    """Length of a prefix-matching sequence; an error when the model's context cannot hold it."""
    T = 1 + n_random * repeats
    if T > model.context_length:
        raise ValueError(f"prefix matching needs 1 + {n_random} x {repeats} = {T} tokens but the model's context "
                         f"is {model.context_length}: use fewer random tokens or repeats")
    return T


@torch.no_grad()
def prefix_matching_per_sequence(model, pool: np.ndarray, start_id: int, n_random: int = 25, repeats: int = 4,
                                 n_sequences: int = 10, seed: int = 0, device=None,
                                 batch_size: int = 32) -> np.ndarray:
    """Prefix-matching score of every head on each sequence: array (n_sequences, n_layer, n_head)."""
    check_fits(model, n_random, repeats)
    device = device or model_device(model)
    idx = torch.from_numpy(prefix_matching_sequences(pool, start_id, n_random, repeats, n_sequences, seed))
    mask = prefix_matching_targets(n_random, repeats).to(device)
    n_queries = n_random * (repeats - 1)
    model.eval()
    out = []
    for start in range(0, n_sequences, max(1, batch_size)):  # all layers' patterns of a batch are held at once
        _, probs = model.attention_probs(idx[start:start + batch_size].to(device))
        out.append(torch.stack([(p.float() * mask).sum(dim=(-1, -2)) / n_queries for p in probs], dim=1).cpu())
    return torch.cat(out).numpy()  # (n, L, H)


def prefix_matching_scores(model, pool: np.ndarray, start_id: int, n_random: int = 25, repeats: int = 4,
                           n_sequences: int = 10, seed: int = 0, device=None, batch_size: int = 32) -> np.ndarray:
    """Prefix-matching score of every head: array (n_layer, n_head)."""
    return prefix_matching_per_sequence(model, pool, start_id, n_random, repeats, n_sequences, seed, device,
                                        batch_size).mean(axis=0)


def dataset_pool(dataset, n_random: int = 25) -> np.ndarray:
    """The dataset's token pool for random sequences (see the module docstring)."""
    return token_pool(dataset.vocab_size, special_token_ids(dataset), token_counts(dataset), min_size=n_random)


def induction_scores(model, dataset, n_random: int = 25, repeats: int = 4, n_sequences: int | None = None,
                     seed: int = 0, device=None, tokens: int | None = None, batch_size: int = 32) -> dict:
    """Prefix-matching scores on sequences from the dataset's token pool (see the module docstring).
    n_sequences: given, or from the token budget `tokens` (10 when neither is given)."""
    n_sequences = int(n_sequences) if n_sequences is not None else sequences_for_budget(tokens, n_random, repeats)
    if n_sequences < 1:
        raise ValueError(f"prefix matching over {n_sequences} sequences: need at least 1")
    per_sequence = prefix_matching_per_sequence(model, dataset_pool(dataset, n_random), dataset.eot_id, n_random,
                                                repeats, n_sequences, seed, device, batch_size)
    scores = per_sequence.mean(axis=0)
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return {
        "induction_score_max": float(scores.max()),
        "induction_score_max_stderr": mean_and_stderr(per_sequence[:, layer, head])[1],
        "induction_best_head": [int(layer), int(head)],
        "induction_score_per_layer": [float(s) for s in scores.max(axis=1)],
        "induction_scores": [[float(s) for s in row] for row in scores],
        "induction_sequences": int(n_sequences),
    }
