"""The optimizer and its learning-rate schedule: AdamW with decay on matrices only, warmup then cosine."""
from __future__ import annotations

import math

import torch

from fasttrain.config import Config


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device, model_dims: int = 0,
                   capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings), none on biases and LayerNorm gains.
    model_dims: leading dimensions that index stacked models (packed training), not counted as matrix dims.
    capturable: a step a CUDA graph can capture (fused, capturable, the learning rate a tensor on the
    device that set_lr fills in place)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() - model_dims >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() - model_dims < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=device.type == "cuda" or capturable, capturable=capturable)
    if capturable:
        lr = torch.tensor(o.lr, dtype=torch.float32, device=device)
        for group in optimizer.param_groups:
            group["lr"] = lr
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a tensor one (a captured step reads it from the device) is filled in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# How this process runs the optimizer, kept when a state dict saved by another (CPU, GPU, captured) is loaded.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() as a checkpoint holds it: a tensor learning rate as a float, so the file is the
    same whether or not the step was captured."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's implementation (fused, capturable, its
    learning rate tensor) whatever wrote the state; a capturable optimizer's step counts go to the device."""
    kept = [{k: group[k] for k in ("lr", *_IMPLEMENTATION_KEYS) if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, kept):
        lr = own.pop("lr")
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        group.update(own)
        if group.get("capturable") or group.get("fused"):
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device != p.device:
                    optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay or constant."""
    o, total_steps = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
