"""A GPT-2-architecture decoder-only transformer, readable in one sitting.

The layout maps one to one onto Hugging Face's GPT2LMHeadModel (pre-LayerNorm, learned positions, fused
qkv projection, exact-erf GELU MLP, tied input/output embeddings), so a checkpoint exports with identical
logits. Attention and loss each have interchangeable backends chosen by the config:

    attention: torch  -> F.scaled_dot_product_attention, the backend SDPA picks (any device)
               cudnn  -> the same restricted to cuDNN's kernel (CUDA only)
               triton -> fasttrain.kernels.flash_attention (ours)
               flash  -> flash_attn.flash_attn_func (optional dependency, imported lazily)
               auto   -> the fastest of these measured on this GPU for the shape (torch on a CPU)
    loss:      torch  -> lm_head matmul + F.cross_entropy (materializes the logits)
               triton -> fasttrain.kernels.linear_cross_entropy (never materializes the logits)
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# What attention "auto" chooses among on a GPU (flash only where flash-attn is installed).
AUTO_ATTENTION_CANDIDATES = ("cudnn", "torch", "triton", "flash")


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise ImportError(
            "model.attention=flash needs the flash-attn package: pip install 'fasttrain-repeat[flash]' "
            "(CUDA only), or use model.attention=triton or torch"
        ) from None
    return flash_attn_func


def _restricted_sdpa(q, k, v, dropout_p, backends):
    """SDPA allowed only the given SDPBackends (q, k, v as (B, H, T, D))."""
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def causal_attention(q, k, v, backend: str, dropout_p: float = 0.0):
    """q, k, v (batch, seq, heads, head_dim) -> the same shape: causal attention through the backend."""
    if backend == "auto":
        B, T, H, D = q.shape
        backend = auto_attention(B, H, T, D, q.dtype, q.device)
    if backend == "flash":
        return _flash_attn_func()(q, k, v, dropout_p=dropout_p, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if backend == "triton":
        if dropout_p > 0:
            raise ValueError("model.attention=triton has no attention dropout: set model.dropout=0")
        from fasttrain.kernels import flash_attention

        y = flash_attention(q, k, v, causal=True)
    elif backend == "cudnn":
        if not q.is_cuda:
            raise ValueError("model.attention=cudnn needs a CUDA GPU (cuDNN's attention): use auto or torch")
        y = _restricted_sdpa(q, k, v, dropout_p, [SDPBackend.CUDNN_ATTENTION])
    else:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return y.transpose(1, 2)


# ---- attention "auto": the fastest backend, measured once per shape and GPU -----------------------------
_AUTO_CHOICES: dict[str, str] = {}


def auto_choice_file() -> str:
    """Where the measured choices are kept between processes (JSON): $FASTTRAIN_CACHE_DIR or ~/.cache/fasttrain."""
    root = os.environ.get("FASTTRAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fasttrain")
    return os.path.join(root, "attention_auto.json")


def _read_choices(path: str) -> dict:
    try:
        with open(path) as f:
            choices = json.load(f)
        return choices if isinstance(choices, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again


def time_attention(backend: str, batch: int, heads: int, seq: int, head_dim: int, dtype, device,
                   iters: int = 5) -> float:
    """Milliseconds of one causal forward + backward through `backend` (CUDA events; the first calls, which
    compile and autotune, are not timed). Raises where the backend does not take the shape."""
    with torch.inference_mode(False), torch.enable_grad():  # also when first met in an evaluation
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(batch, seq, heads, head_dim, generator=gen, device=device, dtype=dtype)
                         for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            torch.autograd.grad(causal_attention(q, k, v, backend), (q, k, v), grad)

        for _ in range(2):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters


@torch.compiler.disable  # measured outside any compiled graph (the engines resolve "auto" before compiling)
def auto_attention(batch: int, heads: int, seq: int, head_dim: int, dtype, device) -> str:
    """The backend attention "auto" runs for (seq, heads, head_dim, dtype): torch on a CPU; on a GPU the
    fastest forward + backward among AUTO_ATTENTION_CANDIDATES, measured at this batch the first time the
    shape is seen on this GPU model and torch version, then kept in auto_choice_file()."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch"
    key = (f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | seq {seq} heads {heads} "
           f"head_dim {head_dim} {str(dtype).replace('torch.', '')}")
    if key in _AUTO_CHOICES:
        return _AUTO_CHOICES[key]
    path = auto_choice_file()
    known = _read_choices(path).get(key)
    if isinstance(known, dict) and known.get("backend") in AUTO_ATTENTION_CANDIDATES:
        _AUTO_CHOICES[key] = known["backend"]
        return known["backend"]
    timings = {}
    for backend in AUTO_ATTENTION_CANDIDATES:
        try:
            timings[backend] = time_attention(backend, batch, heads, seq, head_dim, dtype, device)
        except (ImportError, RuntimeError, ValueError):  # not installed, or not for this shape, dtype or GPU
            pass
        torch.cuda.empty_cache()
    choice = min(timings, key=timings.get) if timings else "torch"
    _AUTO_CHOICES[key] = choice
    print(f"attention auto: {choice} for seq {seq}, heads {heads}, head_dim {head_dim} (fwd+bwd ms at batch "
          f"{batch}: {', '.join(f'{b} {ms:.3g}' for b, ms in timings.items())})", flush=True)
    try:  # merged into what other processes wrote meanwhile; replaced atomically
        os.makedirs(os.path.dirname(path), exist_ok=True)
        choices = _read_choices(path)
        choices[key] = {"backend": choice, "ms": timings}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(choices, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measured again next time
    return choice


def resolve_attention(model: nn.Module, batch: int, seq: int, dtype) -> None:
    """Replace attention "auto" in every attention module of `model` (a GPT or a PackedGPT, on its device) by
    the backend measured fastest for batches of `batch` sequences of `seq` tokens in `dtype`: done once,
    before compiling, so a compiled step never measures."""
    device = next(model.parameters()).device
    for module in model.modules():
        if getattr(module, "backend", None) == "auto":
            module.backend = auto_attention(batch, module.n_head, seq, module.head_dim, dtype, device)


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
