"""A GPT-2-architecture decoder-only transformer, readable in one sitting.

The layout maps one to one onto Hugging Face's GPT2LMHeadModel (pre-LayerNorm, learned positions, fused
qkv projection, exact-erf GELU MLP, tied input/output embeddings), so a checkpoint exports with identical
logits. Attention and loss each have interchangeable backends chosen by the config:

    attention: torch  -> F.scaled_dot_product_attention (default; any device)
               triton -> fasttrain.kernels.flash_attention (ours)
               flash  -> flash_attn.flash_attn_func (optional dependency, imported lazily)
    loss:      torch  -> lm_head matmul + F.cross_entropy (materializes the logits)
               triton -> fasttrain.kernels.linear_cross_entropy (never materializes the logits)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise ImportError(
            "model.attention=flash needs the flash-attn package: pip install 'fasttrain-repeat[flash]' "
            "(CUDA only), or use model.attention=triton or torch"
        ) from None
    return flash_attn_func


def causal_attention(q, k, v, backend: str, dropout_p: float = 0.0):
    """q, k, v (batch, seq, heads, head_dim) -> the same shape: causal attention through the backend."""
    if backend == "flash":
        return _flash_attn_func()(q, k, v, dropout_p=dropout_p, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if backend == "triton":
        if dropout_p > 0:
            raise ValueError("model.attention=triton has no attention dropout: set model.dropout=0")
        from fasttrain.kernels import flash_attention

        y = flash_attention(q, k, v, causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, backend: str):
        super().__init__()
        self.n_head, self.head_dim, self.dropout, self.backend = n_head, d_model // n_head, dropout, backend
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(dim=2)  # each (B, T, H, D)
        p = self.dropout if self.training else 0.0
        if return_probs:  # explicit softmax, for interpretability (induction-head scores)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (probs @ v).transpose(1, 2)
        else:
            y = causal_attention(q, k, v, self.backend, p)
        y = y.reshape(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return (y, probs) if return_probs else y


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, attention: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, attention)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x, return_probs: bool = False):
        if return_probs:
            a, probs = self.attn(self.ln_1(x), return_probs=True)
            x = x + a
            return x + self.mlp(self.ln_2(x)), probs
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer: int, d_model: int, n_head: int, vocab_size: int, context_length: int,
                 dropout: float = 0.0, attention: str = "torch", loss: str = "torch", init_std: float = 0.02):
        super().__init__()
        self.n_layer, self.d_model, self.n_head = n_layer, d_model, n_head
        self.vocab_size, self.context_length, self.loss_backend = vocab_size, context_length, loss
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context_length, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, attention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        # GPT-2 init: N(0, init_std), residual projections scaled down by sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, init_std / math.sqrt(2 * n_layer))
            elif name.endswith(".weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, init_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int | None = None) -> "GPT":
        """Build from a (validated) ModelConfig; vocab_size comes from the dataset unless the config fixes it."""
        vocab = model_cfg.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("model.vocab_size: not set and no dataset tokenizer to take it from")
        return cls(model_cfg.n_layer, model_cfg.d_model, model_cfg.n_head, vocab, model_cfg.context_length,
                   model_cfg.dropout, model_cfg.attention, model_cfg.loss, model_cfg.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non-embedding excludes token and position embeddings (the output head is tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, return_probs: bool = False):
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context length {self.context_length}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        probs = []
        for block in self.blocks:
            if return_probs:
                x, p = block(x, return_probs=True)
                probs.append(p)
            else:
                x = block(x)
        x = self.ln_f(x)
        return (x, probs) if return_probs else x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                return_token_losses: bool = False):
        """idx (B, T) token ids. Without targets: logits (B, T, V). With targets (B, T; -100 = ignore):
        the cross-entropy loss ('mean' over counted tokens, 'sum', or 'none' -> (B, T)).
        return_token_losses: also return every token's loss (B, T), detached, from the same computation
        (the trainer splits the logged loss by sequence with it)."""
        x = self.hidden_states(idx)
        if targets is None:
            return F.linear(x, self.wte.weight)
        if self.loss_backend == "triton":
            from fasttrain.kernels import linear_cross_entropy

            # On a GPU the range check would sync with the host every step; F.cross_entropy does not check
            # there either. An out-of-range target then shows as a NaN loss.
            out = linear_cross_entropy(x.reshape(-1, self.d_model), self.wte.weight, targets.reshape(-1),
                                       reduction=reduction, validate_targets=x.device.type != "cuda",
                                       return_token_losses=return_token_losses)
            loss, token_losses = out if return_token_losses else (out, None)
        else:
            logits = F.linear(x, self.wte.weight)
            token_losses = F.cross_entropy(logits.float().view(-1, self.vocab_size), targets.reshape(-1),
                                           reduction="none")
            loss = token_losses  # ignored targets (-100) give 0 and count for nothing in a mean
            if reduction == "sum":
                loss = token_losses.sum()
            elif reduction == "mean":
                loss = token_losses.sum() / (targets != -100).sum().clamp_min(1)
            token_losses = token_losses.detach()
        loss = loss.view(targets.shape) if reduction == "none" else loss
        return (loss, token_losses.view(targets.shape)) if return_token_losses else loss

    def attention_probs(self, idx: torch.Tensor):
        """Logits and the attention pattern of every layer: (logits (B,T,V), [ (B, H, T, T) ] * n_layer)."""
        x, probs = self.hidden_states(idx, return_probs=True)
        return F.linear(x, self.wte.weight), probs

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N (weights, incl. the output head) + 6 * n_layer * seq_len * d_model
        for causal attention scores and values (forward 2*2*T*d/2 per layer, backward twice that)."""
        n = self.num_params(non_embedding=True) + self.wte.weight.numel()
        return 6.0 * n + 6.0 * self.n_layer * seq_len * self.d_model
