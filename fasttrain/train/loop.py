"""The training loop of every trainer (plain, packed, DeepSpeed): when a step is logged, evaluated and
checkpointed, and how its throughput is timed. Each trainer passes what a step, a log line, an evaluation
and a checkpoint are for it.

    summary = run_steps(cfg, start_step, step, log, evaluate, checkpoint)

step(lr, logging) -> (loss, grad_norm) takes one optimizer step and returns device tensors without
waiting for the device (logging: log() will read this step, for what only the step itself can measure);
log(step, lr, loss, grad_norm, steps_timed, elapsed) is the only place that may (it runs every
train.log_every steps and at the end); evaluate(step) -> summary runs every train.eval_every steps and at the
end; checkpoint(step) runs at the steps is_checkpoint_step gives. Evaluation and checkpoint time is left out
of the throughput.
"""
from __future__ import annotations

import math
import time

from fasttrain.config import Config


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay or constant."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def is_checkpoint_step(step: int, cfg: Config) -> bool:
    t = cfg.train
    if step == t.steps:
        return True
    if t.checkpoint_every and step % t.checkpoint_every == 0:
        return True
    return t.checkpoint_log_spaced and step & (step - 1) == 0


def run_steps(cfg: Config, start_step: int, step, log, evaluate, checkpoint):
    """Steps start_step .. train.steps - 1; returns the last evaluate() result (None if no step ran)."""
    t = cfg.train
    summary = None
    tick, tick_step = time.time(), start_step
    for index in range(start_step, t.steps):
        lr = lr_at(index, cfg)
        done = index + 1
        logging = done % t.log_every == 0 or done == t.steps
        loss, grad_norm = step(lr, logging)
        if logging:
            log(done, lr, loss, grad_norm, done - tick_step, time.time() - tick)
            tick, tick_step = time.time(), done
        evaluating = bool(t.eval_every and done % t.eval_every == 0) or done == t.steps
        checkpointing = is_checkpoint_step(done, cfg)
        if evaluating:
            summary = evaluate(done)
        if checkpointing:
            checkpoint(done)
        if evaluating or checkpointing:
            tick = time.time()  # evaluation and checkpoint time is not training time
    return summary


def check_finite(loss: float, step: int, where: str = "") -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}{where}: lower optim.lr or check the data")


def protected_steps(cfg: Config) -> set[int]:
    """Checkpoints kept for good under train.checkpoint_log_spaced: steps 1, 2, 4, 8, ..."""
    if not cfg.train.checkpoint_log_spaced:
        return set()
    return {s for s in range(1, cfg.train.steps + 1) if s & (s - 1) == 0}
