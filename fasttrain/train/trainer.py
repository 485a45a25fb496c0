"""The plain trainer: one process, CPU or one GPU.

    cfg = load_config("configs/demo.yaml", ["--train.steps", "200"])
    summary = train(cfg)

Data order comes from the repetition schedule and is a pure function of (dataset, data config, seed):
batch k is the same whether the run went straight through or was killed and resumed. A resumed run
continues from its newest complete checkpoint (model, optimizer, RNG and step) and gives, on a CPU,
exactly the losses of the uninterrupted run.
"""
from __future__ import annotations

import json
import os

import torch

from fasttrain.config import Config, ConfigError, config_from_dict, seq_len
from fasttrain.data.sampler import open_training_stream
from fasttrain.model import GPT
from fasttrain.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from fasttrain.train.device import autocast, autocast_dtype, compiled, peak_flops, resolve_device
from fasttrain.train.loop import check_finite, protected_steps, run_steps
from fasttrain.train.metrics import MetricsLogger, step_record, write_json_atomic


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device, model_dims: int = 0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings), none on biases and LayerNorm gains.
    model_dims: leading dimensions that index stacked models (packed training), not counted as matrix dims."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() - model_dims >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() - model_dims < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")


def build_model(cfg: Config, vocab_size: int) -> GPT:
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's vocabulary ({vocab_size})")
    torch.manual_seed(cfg.train.seed)
    return GPT.from_config(cfg.model, vocab_size)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_config(saved: dict, cfg: Config, run_dir: str) -> None:
    """A run folder holds one config: resuming with a different one would mix two experiments."""
    current = cfg.to_dict()
    for section, values in current.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value:
                raise ConfigError(
                    f"{section}.{key}: {value!r} differs from {old!r} in the run being resumed ({run_dir}); "
                    "use the same config or another train.out_dir"
                )


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, micro_batch: int,
               lr: float, grad_clip: float, amp_dtype: torch.dtype | None = None, step_model=None,
               clip_fn=torch.nn.utils.clip_grad_norm_):
    """One optimizer step: forward and backward of every micro-batch (gradients accumulated as the mean
    over the batch), clipping, AdamW, zero_grad.

    tokens (global_batch, T + 1) on the model's device, or (K, global_batch, T + 1) for a PackedGPT, whose
    loss is each model's (K,): their sum backpropagates every model with exactly its own gradient.
    step_model: the module to call for the loss (e.g. torch.compile(model)), default model; clip_fn:
    clip_grad_norm_, or the packed trainer's per-model clipping. Returns the mean loss(es) and the pre-clip
    gradient norm(s) as device tensors: nothing here waits for the GPU.
    """
    step_model = model if step_model is None else step_model
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = tokens.shape[-2] // micro_batch
    loss_sum = 0
    for chunk in tokens.split(micro_batch, dim=-2):
        with autocast(tokens.device, amp_dtype):
            loss = step_model(chunk[..., :-1], chunk[..., 1:])
        (loss.sum() / accum).backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = clip_fn(list(model.parameters()), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm


def train(cfg: Config, resume: bool = False) -> dict:
    """Run (or resume) the training described by cfg; returns the final metrics."""
    t = cfg.train
    run_dir = t.out_dir
    device = resolve_device(t.device)
    amp_dtype = autocast_dtype(t.precision, device)
    micro = t.micro_batch or t.global_batch
    T = seq_len(cfg)

    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise ConfigError(f"train.out_dir: {run_dir} already holds checkpoints; pass --resume to continue it "
                          "or choose another train.out_dir")
    dataset, stream = open_training_stream(cfg)  # validates data and schedule before anything is written
    model = build_model(cfg, dataset.vocab_size).to(device)
    optimizer = make_optimizer(model, cfg, device)
    start_step = 0
    if resume and existing:
        saved = config_from_dict(load_saved_config(run_dir))
        check_same_config(saved.to_dict(), cfg, run_dir)
        ckpt = load_latest_checkpoint(run_dir, map_location=device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
            start_step = ckpt["step"]
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    step_model = compiled(model, t.compile_mode if t.compile else None)

    flops_per_step = model.flops_per_token(T) * t.global_batch * T
    peak = peak_flops(device)
    logger = MetricsLogger(run_dir, t.steps, start_step, tensorboard=t.tensorboard)
    protected = protected_steps(cfg)
    model.train()
    # prefetch=0: a read-ahead thread measured slower than reading in the loop (it competes for the GIL)
    batches = stream.iter_batches(start_step, t.steps - start_step, t.global_batch, prefetch=0)

    def step(lr, logging):
        tokens = next(batches).to(device, non_blocking=True)
        return train_step(model, optimizer, tokens, micro, lr, cfg.optim.grad_clip, amp_dtype, step_model)

    def log(done, lr, loss, grad_norm, steps_timed, elapsed):
        loss_value = loss.item()  # the only host sync of a step, and only when logging
        check_finite(loss_value, done)
        logger.log(step_record(done, t.global_batch * T, loss_value, lr, grad_norm, steps_timed, elapsed,
                               flops_per_step, peak))

    def evaluate(done):
        summary = {"step": done, **evaluate_during_training(model, dataset, cfg, device, amp_dtype)}
        logger.log(summary)
        model.train()
        return summary

    def checkpoint(done):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                 "rng": rng_state(), "config": cfg.to_dict(), "vocab_size": model.vocab_size}
        save_checkpoint(run_dir, done, state, keep=t.keep_checkpoints, protected=protected)

    summary = run_steps(cfg, start_step, step, log, evaluate, checkpoint)
    logger.close()
    return write_final(run_dir, summary, t.steps,
                       lambda: evaluate_during_training(model, dataset, cfg, device, amp_dtype))


def evaluate_during_training(model: GPT, dataset, cfg: Config, device, amp_dtype, batch_size: int | None = None) -> dict:
    from fasttrain.eval.loss import heldout_loss

    with autocast(device, amp_dtype):
        return heldout_loss(model, dataset, seq_len(cfg), max_tokens=cfg.train.eval_tokens,
                            batch_size=batch_size or cfg.train.micro_batch or cfg.train.global_batch, device=device)


def load_saved_config(run_dir: str) -> dict:
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)


def write_final(run_dir: str, summary: dict, steps: int, evaluate, write: bool = True) -> dict:
    """Write RUN/final.json (the last evaluation) and return it. An empty summary means the run was resumed
    after its last step: its final.json is read back, or, when the run was stopped between its last
    checkpoint and final.json, the evaluation is made again (evaluate() -> metrics)."""
    path = os.path.join(run_dir, "final.json")
    if not summary:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        summary = {"step": steps, **evaluate()}
    if write:
        write_json_atomic(path, summary)
    return summary
