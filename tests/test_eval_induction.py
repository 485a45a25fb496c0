"""Induction, copying, previous-token and in-context-learning scores on a GPT whose weights are set by hand,
and per-head scores against independent computations.

The model is a previous-token head (layer 0, head 0) feeding an induction head (layer 1, head 0), the
circuit of Olsson et al. The residual stream holds three one-hot blocks: [token | position | previous
token]. Every other head attends uniformly and writes nothing; the MLPs are zero.
"""
import math

import numpy as np
import pytest
import torch

from fasttrain.eval import heads
from fasttrain.eval.copying import copy_sequences, copying_losses, occurrence_losses, random_passages
from fasttrain.eval.heads import copying_head_scores_on, previous_token_scores
from fasttrain.eval.icl import icl_positions
from fasttrain.measure.prefix_matching import (prefix_matching_per_sequence, prefix_matching_scores,
                                               prefix_matching_sequences, prefix_matching_targets,
                                               sequences_for_budget, token_pool)
from fasttrain.model import GPT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V, T = 64, 128  # vocabulary (token 0 is the start token), context
SHARP = 30.0  # attention logit of a match: softmax is one-hot to ~1e-12


def layer_norm_to_scale(ln, ones: int, d: int):
    """Set a LayerNorm so that, on a 0/1 vector with `ones` ones, it returns x / std (the mean removed by
    the bias). Returns that std."""
    m = ones / d
    s = math.sqrt(m * (1 - m) + ln.eps)
    ln.weight.fill_(1.0)
    ln.bias.fill_(m / s)
    return s


@torch.no_grad()
def induction_model(copy_gain: float = 10.0, V: int = V, T: int = T) -> GPT:
    """The circuit above for a vocabulary of V tokens and a context of T (d_model 2V + T)."""
    d = 2 * V + T
    model = GPT(n_layer=2, d_model=d, n_head=2, vocab_size=V, context_length=T)
    for p in model.parameters():
        p.zero_()
    hd = d // 2
    tok, pos, prev = 0, V, V + T  # offsets of the three blocks
    model.wte.weight[:, tok:tok + V] = torch.eye(V)
    model.wpe.weight[:, pos:pos + T] = torch.eye(T)
    scale = SHARP * math.sqrt(hd)

    # Layer 0, head 0: query of position i = one-hot(i - 1), key of position j = one-hot(j), value = token.
    s0 = layer_norm_to_scale(model.blocks[0].ln_1, 2, d)
    attn = model.blocks[0].attn
    q, k, v = attn.c_attn.weight[:d], attn.c_attn.weight[d:2 * d], attn.c_attn.weight[2 * d:]
    for p in range(1, T):
        q[p - 1, pos + p] = scale * s0
    for p in range(T):
        k[p, pos + p] = s0
    for t in range(V):
        v[t, tok + t] = s0
        attn.c_proj.weight[prev + t, t] = 1.0  # writes the previous token into its block

    # Layer 1, head 0: query = current token, key = previous token, value = token (copied, amplified).
    s1 = layer_norm_to_scale(model.blocks[1].ln_1, 3, d)
    attn = model.blocks[1].attn
    q, k, v = attn.c_attn.weight[:d], attn.c_attn.weight[d:2 * d], attn.c_attn.weight[2 * d:]
    for t in range(V):
        q[t, tok + t] = scale * s1
        k[t, prev + t] = s1
        v[t, tok + t] = s1
        attn.c_proj.weight[tok + t, t] = copy_gain
    model.ln_f.weight.fill_(5.0)
    assert hd >= max(T, V)
    return model.to(DEVICE).eval()


@pytest.fixture(scope="module")
def model():
    return induction_model()


def test_previous_token_head_is_exact(model):
    idx = torch.randint(1, V, (2, 40), device=DEVICE)
    _, probs = model.attention_probs(idx)
    diag = torch.diagonal(probs[0][:, 0], offset=-1, dim1=-2, dim2=-1)  # attention i -> i - 1
    assert diag.min() > 0.999


def test_induction_head_scores_one_and_others_low(model):
    pool = np.arange(1, V)
    scores = prefix_matching_scores(model, pool, start_id=0, n_sequences=10, seed=0)
    assert scores.shape == (2, 2)
    assert scores[1, 0] > 0.99
    others = np.delete(scores.ravel(), 2)
    assert others.max() < 0.1, scores
    # Same seed, same scores; the sequences are start + 25 distinct tokens x 4.
    assert np.array_equal(scores, prefix_matching_scores(model, pool, start_id=0, n_sequences=10, seed=0))
    seqs = prefix_matching_sequences(pool, 0, n_sequences=3, seed=1)
    assert seqs.shape == (3, 101) and (seqs[:, 0] == 0).all()
    assert all(len(set(row[1:26])) == 25 and (row[1:26] == row[26:51]).all() for row in seqs)


def test_prefix_matching_targets_point_after_earlier_occurrences():
    mask = prefix_matching_targets(n_random=3, repeats=3)  # [s, a b c, a b c, a b c]
    assert mask.shape == (10, 10)
    assert mask[:4].sum() == 0  # the first repeat has nothing to match
    assert mask[4].nonzero().ravel().tolist() == [2]  # 2nd 'a' -> the 'b' after the 1st 'a'
    assert mask[6].nonzero().ravel().tolist() == [4]  # 2nd 'c' -> the 'a' that followed the 1st 'c'
    assert mask[8].nonzero().ravel().tolist() == [3, 6]  # 3rd 'b' -> both earlier 'c's


def test_perfect_copier_has_near_zero_second_occurrence_loss(model):
    passages = random_passages(np.arange(1, V), length=40, n=6, seed=0)
    assert all(len(set(p)) == 40 for p in passages)  # distinct: each successor unambiguous
    first, second, third = copying_losses(model, passages, start_id=0, copies=3, batch_size=4)
    assert second < 0.01 and third < 0.01
    assert first > 2.0
    seq = copy_sequences(passages[:1], 0, copies=2)
    assert seq.shape == (1, 81) and (seq[0, 1:41] == seq[0, 41:]).all()


def test_context_too_short_is_a_clear_error(model):
    with pytest.raises(ValueError, match="context"):
        prefix_matching_scores(model, np.arange(1, V), start_id=0, n_random=25, repeats=6)
    with pytest.raises(ValueError, match="beyond the context"):
        icl_positions(128, (50, 500))
    assert icl_positions(2048) == (50, 500)
    assert icl_positions(256) == (50, 256)
    assert icl_positions(32) == (3, 32)


def test_token_pool_drops_most_and_least_common():
    counts = np.arange(200)[::-1].copy()  # token 0 most common
    pool = token_pool(200, {7}, counts, min_size=25)
    assert 0 not in pool and 1 not in pool  # the most common 1% (2 of 199)
    assert 199 not in pool and 150 not in pool  # the least common half
    assert 7 not in pool and pool.size == 97
    fallback = token_pool(200, {0}, None)
    assert fallback.min() >= 50 and fallback.max() < 150


def test_perfect_copier_with_eleven_copies():
    passages = random_passages(np.arange(1, V), length=11, n=4, seed=2)  # (128 - 1) // 11 tokens each
    losses = occurrence_losses(induction_model(), passages, start_id=0, copies=11, batch_size=4)
    assert losses.shape == (4, 11)
    assert losses[:, 0].min() > 2.0 and losses[:, 1:].max() < 0.01


def test_previous_token_scores_known_answers(model, monkeypatch):
    windows = np.random.default_rng(0).integers(1, V, size=(3, 40))
    scores = previous_token_scores(model, windows, batch_size=2)
    assert scores.shape == (2, 2)
    assert scores[0, 0] > 0.999  # the previous-token head
    uniform = np.mean([1.0 / (i + 1) for i in range(1, 40)])  # a head with q = k = 0 attends 1 / (i + 1)
    assert scores[0, 1] == pytest.approx(uniform, rel=1e-5) and scores[1, 1] == pytest.approx(uniform, rel=1e-5)
    monkeypatch.setattr(heads, "QUERY_CHUNK", 7)  # query rows in chunks: the same scores
    np.testing.assert_allclose(previous_token_scores(model, windows, batch_size=3), scores, rtol=1e-6)


def test_copying_scores_known_answers(model):
    """The induction head raises only the token it attends to: 1. The previous-token head writes into the
    previous-token block, which the unembedding does not read, and the uniform heads write nothing: 0."""
    idx = torch.from_numpy(prefix_matching_sequences(np.arange(1, V), 0, n_sequences=3, seed=0))
    scores = copying_head_scores_on(model, idx, range(26, 101))
    assert scores[1, 0] == pytest.approx(1.0, abs=1e-4)
    assert np.abs(np.delete(scores.ravel(), 2)).max() < 1e-6, scores


def independent_copying_scores(model, idx, queries):
    """The copying score of every head, recomputed from the weights with explicit loops over heads,
    positions and attended keys (no code shared with fasttrain.eval.heads)."""
    B, T = idx.shape
    L, H = model.n_layer, model.n_head
    hd = model.d_model // H
    out_heads = {}
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(T))
        for layer, block in enumerate(model.blocks):
            a = block.ln_1(x)
            W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            heads_out = []
            for h in range(H):
                rows = slice(h * hd, (h + 1) * hd)
                q = a @ W[rows].T + b[rows]
                k = a @ W[model.d_model:][rows].T + b[model.d_model:][rows]
                v = a @ W[2 * model.d_model:][rows].T + b[2 * model.d_model:][rows]
                s = q @ k.transpose(1, 2) / math.sqrt(hd)
                s = s + torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
                p = torch.softmax(s, dim=-1)
                o = (p @ v) @ block.attn.c_proj.weight[:, rows].T  # the head's write, without the bias
                out_heads[layer, h] = (p, o)
                heads_out.append(o)
            x = x + sum(heads_out) + block.attn.c_proj.bias
            x = x + block.mlp(block.ln_2(x))
        assert torch.allclose(model.ln_f(x), model.hidden_states(idx), atol=1e-5)
        scores = np.zeros((L, H))
        for (layer, h), (p, o) in out_heads.items():
            total, count = 0.0, 0
            for n in range(B):
                for i in queries:
                    resid = x[n, i]
                    sigma = torch.sqrt(((resid - resid.mean()) ** 2).mean() + model.ln_f.eps)
                    logits = model.wte.weight @ ((o[n, i] - o[n, i].mean()) * model.ln_f.weight / sigma)
                    c = logits - logits.mean()
                    raise_ = torch.relu(c).sum()
                    if raise_ > 1e-5 * logits.abs().sum():
                        total += sum(float(p[n, i, j] * c[idx[n, j]]) for j in range(i + 1)) / float(raise_)
                    count += 1
            scores[layer, h] = total / count
    return scores


def test_copying_scores_match_an_independent_computation():
    torch.manual_seed(3)
    model = GPT(n_layer=2, d_model=24, n_head=3, vocab_size=50, context_length=32).eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight, bias and LayerNorm parameter away from its init
            p.add_(0.3 * torch.randn_like(p))
        attn = model.blocks[1].attn  # head 0 of layer 1 passes 8 dimensions of what it attends to: it copies some
        attn.c_attn.weight[48:56] = 3 * torch.eye(8, 24)
        attn.c_proj.weight[:, :8] = 3 * torch.eye(24, 8)
    idx = torch.from_numpy(prefix_matching_sequences(np.arange(1, 50), 0, n_random=6, repeats=4, n_sequences=2,
                                                     seed=1))
    queries = range(7, 25)
    expected = independent_copying_scores(model, idx, queries)
    np.testing.assert_allclose(copying_head_scores_on(model, idx, queries), expected, atol=2e-5)
    assert np.abs(expected).max() > 0.02  # not trivially zero


def test_prefix_matching_per_sequence_and_its_error(model):
    pool = np.arange(1, V)
    per_sequence = prefix_matching_per_sequence(model, pool, 0, n_sequences=7, seed=4, batch_size=3)
    seqs = prefix_matching_sequences(pool, 0, n_sequences=7, seed=4)
    for n, seq in enumerate(seqs):  # one sequence alone, targets found by their tokens
        _, probs = model.attention_probs(torch.from_numpy(seq[None]).to(DEVICE))
        targets = [[j for j in range(1, i + 1) if seq[j - 1] == seq[i]] for i in range(26, 101)]
        for layer in range(2):
            p = probs[layer][0].detach().float().cpu().numpy()
            expected = [np.mean([p[h, i, t].sum() for i, t in zip(range(26, 101), targets)]) for h in range(2)]
            np.testing.assert_allclose(per_sequence[n, layer], expected, rtol=1e-5, atol=1e-7)
    assert sequences_for_budget(None) == 10 and sequences_for_budget(505) == 10 and sequences_for_budget(20200) == 200
