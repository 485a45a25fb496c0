"""The optimizer and its learning-rate schedule: AdamW with decay on matrices only, warmup then cosine."""
from __future__ import annotations

import math

import torch

from fasttrain.config import Config


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device, model_dims: int = 0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings), none on biases and LayerNorm gains.
    model_dims: leading dimensions that index stacked models (packed training), not counted as matrix dims."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() - model_dims >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() - model_dims < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay or constant."""
    o, total_steps = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
