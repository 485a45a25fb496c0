"""Per-head scores of Olsson et al. 2022 besides prefix matching: the copying score and the previous-token score.

Olsson et al. call a head an induction head when, on a repeated sequence of random tokens, it does two
things: it attends to the token that followed an earlier occurrence of the present token (prefix matching,
fasttrain.measure.prefix_matching) and its output raises the logit of the token it attends to (copying).
The paper states the copying score's ingredients, not its formula ("the head's direct contribution to the
logits, mean-subtracted, ReLU, ... rescaled to [-1, 1]"); the formula below is ours, fixed here.

Copying score of a head (fixed definition):
- Sequences: the prefix-matching sequences (an end-of-text token, then 25 distinct random tokens from the
  token pool repeated 4 times), 10 of them, same seed; query positions: the 75 tokens of repeats 2-4.
- Direct contribution to the logits at query position i: the head's output o_i = W_O^h sum_j a_ij v_j (its
  attention-weighted values through its slice of the output projection; the projection's bias belongs to no
  head) carried to the logits as the model carries the residual stream, with the final LayerNorm taken as
  the linear map it is at that position: d_i = W_U (gamma * (o_i - mean(o_i)) / sigma_i), where sigma_i is
  the standard deviation the LayerNorm divides by there (of the whole residual stream) and W_U the
  unembedding (the tied token embedding); the LayerNorm's bias belongs to no head.
- Mean-subtracted: c_i = d_i - mean over the vocabulary of d_i. ReLU: the raise the head gives its favoured
  tokens, R_i = sum over the vocabulary of max(c_i, 0).
- Score at i: sum_j a_ij c_i[x_j] / R_i, the attention-weighted mean-subtracted logit of the attended tokens
  x_j, relative to the total raise. The mean-subtracted logits sum to zero, so R_i is also the total
  lowering and the score lies in [-1, 1]: 1 when the head raises only the tokens it attends to, 0 when it
  is indifferent to them, -1 when it lowers only them (an anti-copying head). A head that writes nothing
  the unembedding tells apart (R_i <= 1e-5 x sum over the vocabulary of |d_i|: its logits are one constant
  up to rounding) scores 0.
- Head score: the mean over query positions and sequences. Computed in fp32.

Previous-token score of a head (fixed definition): its mean attention from position i to position i - 1
over every position i >= 1 of held-out windows (the test windows the test loss reads, seq_len tokens each,
as many as the token budget gives), in fp32. A head that always attends to the previous token scores 1.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from fasttrain.measure.prefix_matching import (PAPER_SEQUENCES, check_fits, dataset_pool,
                                               prefix_matching_sequences)
from fasttrain.measure.windows import model_device

QUERY_CHUNK = 256  # query rows of the explicit attention at a time: memory O(chunk x seq_len) per head
WRITES_NOTHING = 1e-5  # total raise / sum of |logits| below which a head's logits count as one constant


@contextmanager
def captured_inputs(model):
    """Record the input of every attention layer (after its LayerNorm) and of the final LayerNorm (the residual
    stream) during the forward passes run inside the block: yields {"attn": [x per layer], "final": x}."""
    captured = {"attn": [None] * len(model.blocks), "final": None}

    def keep(layer):
        def hook(module, args):
            captured["attn"][layer] = args[0].detach()
        return hook

    def keep_final(module, args):
        captured["final"] = args[0].detach()

    handles = [block.attn.register_forward_pre_hook(keep(i)) for i, block in enumerate(model.blocks)]
    handles.append(model.ln_f.register_forward_pre_hook(keep_final))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def queries_keys_values(attn, x: torch.Tensor):
    """(q, k, v) of an attention layer on its input x (B, T, C): each (B, H, T, D), in fp32."""
    B, T, C = x.shape
    qkv = torch.nn.functional.linear(x.float(), attn.c_attn.weight.float(), attn.c_attn.bias.float())
    q, k, v = qkv.view(B, T, 3, attn.n_head, attn.head_dim).unbind(dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Causal softmax attention probabilities (B, H, queries, T) for the query rows `rows` (all by default)."""
    T = k.shape[-2]
    rows = rows or slice(0, T)
    query_pos = torch.arange(T, device=q.device)[rows]
    scores = (q[:, :, rows] @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    allowed = torch.arange(T, device=q.device)[None, :] <= query_pos[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


# ---- copying ---------------------------------------------------------------------------------------------
@torch.no_grad()
def copying_head_scores_on(model, idx: torch.Tensor, query_positions) -> np.ndarray:
    """Copying score of every head (see the module docstring) on token sequences idx (B, T), averaged over
    the given query positions and the sequences: array (n_layer, n_head)."""
    model.eval()
    idx = idx.to(model_device(model))
    queries = torch.as_tensor(list(query_positions), dtype=torch.int64, device=idx.device)
    with captured_inputs(model) as captured:
        model.hidden_states(idx)
    ln_f = model.ln_f
    residual = captured["final"].float()[:, queries]  # (B, Q, C)
    sigma = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + ln_f.eps)
    gamma = ln_f.weight.float()
    unembedding = model.wte.weight.float()  # (V, C)
    attended_ids = idx[:, None, :].expand(-1, len(queries), -1)  # (B, Q, T): the token at every key position
    scores = np.zeros((model.n_layer, model.n_head))
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = queries_keys_values(attn, captured["attn"][layer])
        probs = attention_pattern(q, k)[:, :, queries]  # (B, H, Q, T)
        weighted = probs @ v  # (B, H, Q, D)
        w_out = attn.c_proj.weight.float()  # (C, H * D)
        for h in range(model.n_head):
            out = weighted[:, h] @ w_out[:, h * attn.head_dim:(h + 1) * attn.head_dim].T  # (B, Q, C)
            logits = ((out - out.mean(dim=-1, keepdim=True)) * gamma / sigma) @ unembedding.T  # (B, Q, V)
            centered = logits - logits.mean(dim=-1, keepdim=True)
            raise_total = centered.clamp_min(0).sum(dim=-1)  # (B, Q)
            attended = (probs[:, h] * centered.gather(-1, attended_ids)).sum(dim=-1)  # (B, Q)
            # A head whose logits are one constant writes nothing the unembedding tells apart: what is left
            # after the mean is subtracted is rounding, and it scores 0.
            writes = raise_total > WRITES_NOTHING * logits.abs().sum(dim=-1)
            score = torch.where(writes, attended / raise_total.clamp_min(1e-30), torch.zeros_like(attended))
            scores[layer, h] = float(score.clamp(-1.0, 1.0).mean())
    return scores


def copying_head_scores(model, dataset, n_random: int = 25, repeats: int = 4, n_sequences: int = PAPER_SEQUENCES,
                        seed: int = 0) -> np.ndarray:
    """Copying score of every head on the dataset's prefix-matching sequences: array (n_layer, n_head)."""
    check_fits(model, n_random, repeats)
    idx = torch.from_numpy(prefix_matching_sequences(dataset_pool(dataset, n_random), dataset.eot_id, n_random,
                                                     repeats, n_sequences, seed))
    return copying_head_scores_on(model, idx, range(1 + n_random, 1 + n_random * repeats))


# ---- previous token --------------------------------------------------------------------------------------
@torch.no_grad()
def previous_token_scores(model, windows, batch_size: int = 8, device=None) -> np.ndarray:
    """Mean attention from position i to i - 1 (i >= 1) of every head over token windows (n, T): array
    (n_layer, n_head)."""
    device = device or model_device(model)
    windows = torch.as_tensor(np.asarray(windows), dtype=torch.int64)
    n, T = windows.shape
    if T < 2:
        raise ValueError(f"a previous-token score needs windows of at least 2 tokens, got {T}")
    model.eval()
    total = torch.zeros(model.n_layer, model.n_head, dtype=torch.float64, device=device)

    def accumulate(layer):  # measured as each layer runs: no layer's pattern or input is kept
        def hook(module, args):
            q, k, _ = queries_keys_values(module, args[0])
            for first in range(1, T, QUERY_CHUNK):  # the pattern one chunk of query rows at a time
                rows = slice(first, min(T, first + QUERY_CHUNK))
                probs = attention_pattern(q, k, rows)  # (B, H, rows, T)
                i = torch.arange(rows.start, rows.stop, device=probs.device)
                total[layer] += probs[:, :, i - rows.start, i - 1].double().sum(dim=(0, 2))  # attention i -> i - 1
        return hook

    handles = [block.attn.register_forward_pre_hook(accumulate(i)) for i, block in enumerate(model.blocks)]
    try:
        for start in range(0, n, max(1, batch_size)):
            model.hidden_states(windows[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return (total / (n * (T - 1))).cpu().numpy()
