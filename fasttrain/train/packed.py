"""Packed training: several same-shape runs of a sweep trained at once, as one stacked model.

    summaries = train_packed([cfg_a, cfg_b, cfg_c])          # one summary per run, as train() returns

A 1M-parameter model cannot keep a GPU busy: one training step is a few hundred tiny kernel launches.
Runs of a sweep that share the model shape, seq_len, batch, steps, optimizer and precision (and differ in
f, E, placement, data seed, dataset or init seed) are stacked: every parameter of PackedGPT has a leading
model dimension K, linear layers are batched matmuls, and attention folds the model dimension into the
batch, so every attention backend runs unchanged. A step of K packed runs costs about the launches of one.

Each run keeps what makes it a run of its own:
  - its init: built by the plain trainer's build_model with its own train.seed, then stacked;
  - its data: its own TrainingStream (schedule, seed, even dataset, if the vocabularies match);
  - its AdamW state: one AdamW over stacked tensors is K independent AdamWs, since the update is
    elementwise and every hyperparameter is shared;
  - its gradient clipping: the norm is taken per model;
  - its run folder, written as the plain trainer writes it: config.yaml, checkpoints with the plain GPT
    state dicts (so `fasttrain train --resume`, eval and export take them, and a packed group resumes
    from plain checkpoints), metrics.jsonl and final.json.
Runs that share a dataset are evaluated together: the stacked model reads the test windows once and gives
each run the held-out metrics heldout_loss would give it alone.
Losses equal K separate train() runs up to floating-point reduction order (fp32 on a CPU: ~1e-6 relative).
In metrics.jsonl, tokens_per_s and mfu are each run's own share; the group trains K times that.
"""
from __future__ import annotations

import copy
import functools
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.config import Config, ConfigError, config_from_dict, seq_len
from fasttrain.data.sampler import open_training_stream
from fasttrain.model import GPT, causal_attention
from fasttrain.train.checkpoint import checkpoint_path, list_checkpoints, prune_checkpoints, save_checkpoint
from fasttrain.train.device import autocast, autocast_dtype, compiled, peak_flops, resolve_device
from fasttrain.train.loop import check_finite, protected_steps, run_steps
from fasttrain.train.metrics import MetricsLogger, step_record
from fasttrain.train.trainer import (
    build_model,
    check_same_config,
    evaluate_during_training,
    load_saved_config,
    make_optimizer,
    rng_state,
    set_rng_state,
    train_step,
    write_final,
)

# Elements of one group's logits in the packed fused loss (512 MB in bf16), the single-model kernel's budget.
LOGITS_PER_CHUNK = 2**28
# Keys that may differ between packed runs; everything else in the config must be equal.
PER_RUN_KEYS = ("data.path", "data.repeated_fraction", "data.repeat_count", "data.placement", "data.seed",
                "train.seed", "train.out_dir", "model.init_std")


# ---- the stacked model -------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """K independent nn.Linear layers: weight (K, out, in), bias (K, out); x (K, N, in) -> (K, N, out)."""

    def __init__(self, num_models: int, in_features: int, out_features: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_models, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(num_models, out_features, device=device))

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class PackedLayerNorm(nn.Module):
    """K independent nn.LayerNorm(d): weight, bias (K, d); x (K, N, d)."""

    def __init__(self, num_models: int, d: int, device=None, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_models, d, device=device))
        self.bias = nn.Parameter(torch.empty(num_models, d, device=device))

    def forward(self, x):
        normalized = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias.unsqueeze(1), normalized, self.weight.unsqueeze(1))


class PackedEmbedding(nn.Module):
    """K independent tables: weight (K, num, d). idx (K, ...) -> (K, ..., d), row idx[k] of table k."""

    def __init__(self, num_models: int, num: int, d: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_models, num, d, device=device))

    def forward(self, idx):
        K, num, d = self.weight.shape
        offsets = torch.arange(K, device=idx.device).view(K, *[1] * (idx.dim() - 1)) * num
        return F.embedding(idx + offsets, self.weight.view(K * num, d))


class PackedCausalSelfAttention(nn.Module):
    def __init__(self, num_models: int, d_model: int, n_head: int, backend: str, device=None):
        super().__init__()
        self.n_head, self.head_dim, self.backend = n_head, d_model // n_head, backend
        self.c_attn = PackedLinear(num_models, d_model, 3 * d_model, device)
        self.c_proj = PackedLinear(num_models, d_model, d_model, device)

    def forward(self, x, seq: int):
        K, N, C = x.shape
        # The model dimension folds into the batch: (K * B, T, heads, head_dim), any backend.
        q, k, v = self.c_attn(x).view(K * N // seq, seq, 3, self.n_head, self.head_dim).unbind(dim=2)
        y = causal_attention(q, k, v, self.backend).reshape(K, N, C)
        return self.c_proj(y)


class PackedMLP(nn.Module):
    def __init__(self, num_models: int, d_model: int, device=None):
        super().__init__()
        self.c_fc = PackedLinear(num_models, d_model, 4 * d_model, device)
        self.c_proj = PackedLinear(num_models, 4 * d_model, d_model, device)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class PackedBlock(nn.Module):
    def __init__(self, num_models: int, d_model: int, n_head: int, attention: str, device=None):
        super().__init__()
        self.ln_1 = PackedLayerNorm(num_models, d_model, device)
        self.attn = PackedCausalSelfAttention(num_models, d_model, n_head, attention, device)
        self.ln_2 = PackedLayerNorm(num_models, d_model, device)
        self.mlp = PackedMLP(num_models, d_model, device)

    def forward(self, x, seq: int):
        x = x + self.attn(self.ln_1(x), seq)
        return x + self.mlp(self.ln_2(x))


class PackedGPT(nn.Module):
    """K same-shape GPTs (fasttrain.model.GPT, dropout 0) as one module. Parameter names are GPT's, each
    tensor with a leading model dimension: packed.state_dict()[name][k] is model k's GPT state_dict()[name]."""

    def __init__(self, num_models: int, n_layer: int, d_model: int, n_head: int, vocab_size: int,
                 context_length: int, attention: str = "torch", loss: str = "torch", device=None):
        super().__init__()
        self.num_models, self.n_layer, self.d_model, self.n_head = num_models, n_layer, d_model, n_head
        self.vocab_size, self.context_length, self.loss_backend = vocab_size, context_length, loss
        self.wte = PackedEmbedding(num_models, vocab_size, d_model, device)
        self.wpe = PackedEmbedding(num_models, context_length, d_model, device)
        self.blocks = nn.ModuleList(PackedBlock(num_models, d_model, n_head, attention, device) for _ in range(n_layer))
        self.ln_f = PackedLayerNorm(num_models, d_model, device)

    @classmethod
    def from_models(cls, models: list[GPT], device=None) -> "PackedGPT":
        """Stack GPTs of one shape (their current weights) into a PackedGPT on `device`."""
        first = models[0]
        attn = first.blocks[0].attn
        if first.drop.p > 0:
            raise ConfigError("model.dropout: packed training needs 0 (dropout masks would differ from separate "
                              "runs); train these runs one at a time")
        packed = cls(len(models), first.n_layer, first.d_model, first.n_head, first.vocab_size, first.context_length,
                     attn.backend, first.loss_backend, device=device)
        names = [name for name, _ in packed.named_parameters()]
        if names != list(first.state_dict()):  # the mapping below relies on identical names and order
            raise RuntimeError("PackedGPT's parameters no longer mirror GPT's: update fasttrain/train/packed.py")
        for k, model in enumerate(models):
            packed.load_model(k, model.state_dict())
        return packed

    @torch.no_grad()
    def load_model(self, k: int, state_dict: dict) -> None:
        """Copy a GPT state dict into slot k."""
        for name, p in self.named_parameters():
            p[k].copy_(state_dict[name])

    def model_state(self, k: int) -> dict:
        """Slot k as a GPT state dict (views: copy before the packed weights change)."""
        return {name: p[k] for name, p in self.named_parameters()}

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (K, B, T) -> final hidden states (K, B * T, d_model)."""
        K, B, T = idx.shape
        if K != self.num_models:
            raise ValueError(f"idx holds {K} models' batches, the pack has {self.num_models}")
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context length {self.context_length}")
        x = self.wte(idx) + self.wpe.weight[:, :T].unsqueeze(1)
        x = x.view(K, B * T, self.d_model)
        for block in self.blocks:
            x = block(x, T)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (K, B, T). Without targets: logits (K, B, T, V). With targets (K, B, T; -100 = ignore): each
        model's mean cross-entropy over its counted tokens, (K,); their sum backpropagates every model at once."""
        K, B, T = idx.shape
        x = self.hidden_states(idx)
        if targets is None:
            return torch.bmm(x, self.wte.weight.transpose(1, 2)).view(K, B, T, -1)
        targets = targets.reshape(K, B * T)
        if self.loss_backend == "triton":
            return packed_linear_cross_entropy(x, self.wte.weight, targets)
        logits = torch.bmm(x, self.wte.weight.transpose(1, 2))
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), reduction="none").view(K, -1)
        counted = (targets != -100).sum(dim=1).clamp_min(1)
        return losses.sum(dim=1) / counted


class PackedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden[k] @ weight[k].T against targets[k] for every model k, a group of
    models at a time: one bmm for the group's logits, the Triton cross-entropy kernel writing d loss / d
    logits over them in place (already divided by each model's token count), then two bmms that finish the
    gradients during the forward pass, as kernels/linear_cross_entropy.py does for one model. Only one
    group's logits exist at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, models_per_chunk, grad_enabled):
        from fasttrain.kernels.cross_entropy import check_targets, launch_cross_entropy

        K, N, _ = hidden.shape
        V = weight.shape[1]
        # the range check syncs with the host: on a GPU it is skipped, as in GPT.forward
        valid, _ = check_targets(targets, V, -100, validate=hidden.device.type != "cuda")
        counts = valid.sum(dim=1).clamp_min(1).to(torch.float32)
        grad_scale = (1.0 / counts).repeat_interleave(N)  # per token: 1 / its model's count
        needs = grad_enabled and any(ctx.needs_input_grad[:2])
        losses = torch.empty(K, N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        grad_hidden = torch.empty_like(hidden) if needs else None
        grad_weight = torch.empty_like(weight) if needs else None
        buffer = hidden.new_empty(min(models_per_chunk, K) * N * V)
        for start in range(0, K, models_per_chunk):
            end = min(start + models_per_chunk, K)
            logits = buffer[: (end - start) * N * V].view(end - start, N, V)
            torch.bmm(hidden[start:end], weight[start:end].transpose(1, 2), out=logits)
            rows = logits.view(-1, V)
            launch_cross_entropy(rows, targets[start:end].reshape(-1), -100, 0.0, losses=losses[start:end].view(-1),
                                 lse=lse[start:end].view(-1), grad=rows if needs else None,
                                 grad_scale=grad_scale[start * N:end * N] if needs else None)
            if needs:
                torch.bmm(logits, weight[start:end], out=grad_hidden[start:end])
                torch.bmm(logits.transpose(1, 2), hidden[start:end], out=grad_weight[start:end])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum(dim=1) / counts

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.view(-1, 1, 1)
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), None, None, None


# Runs eagerly under torch.compile, as the single-model kernel does (Dynamo cannot trace the interpreter).
@torch.compiler.disable
def packed_linear_cross_entropy(hidden, weight, targets):
    """hidden (K, N, d), weight (K, V, d), targets (K, N; -100 = ignore) -> (K,) mean losses, fp32."""
    from fasttrain.kernels import linear_cross_entropy

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    K, N, _ = hidden.shape
    models_per_chunk = LOGITS_PER_CHUNK // (N * weight.shape[1])
    if models_per_chunk < 1:  # one model's logits alone pass the budget: its token-chunked kernel, model by model
        return torch.stack([linear_cross_entropy(hidden[k], weight[k], targets[k],
                                                 validate_targets=hidden.device.type != "cuda") for k in range(K)])
    with torch.autocast(device_type, enabled=False):
        return PackedLinearCrossEntropy.apply(hidden.contiguous(), weight, targets.contiguous(), models_per_chunk,
                                              torch.is_grad_enabled())


# ---- held-out loss of every model at once ---------------------------------------------------------------
@torch.no_grad()
def packed_heldout_loss(packed: PackedGPT, dataset, seq_len: int, max_tokens: int, batch_size: int, device,
                        amp_dtype=None) -> list[dict]:
    """fasttrain.eval.loss.heldout_loss of each model of the pack, for runs that share the dataset: the same
    test windows go through the stacked model once, instead of once per run."""
    from fasttrain.eval.common import read_windows
    from fasttrain.eval.loss import heldout_record, heldout_window_ids, loss_record, predicted_bytes

    windows = read_windows(dataset, "test", heldout_window_ids(dataset, seq_len, max_tokens), seq_len)
    tokens = torch.from_numpy(windows)
    nats = torch.zeros(packed.num_models, dtype=torch.float64, device=device)
    packed.eval()
    for start in range(0, len(tokens), max(1, batch_size)):
        chunk = tokens[start:start + batch_size].to(device)
        batch = chunk.expand(packed.num_models, *chunk.shape)  # every model reads the same windows
        with autocast(device, amp_dtype):
            mean_losses = packed(batch[..., :-1], batch[..., 1:])
        nats += mean_losses.double() * chunk[:, 1:].numel()
    n_tokens, n_bytes = windows.shape[0] * seq_len, predicted_bytes(dataset, windows)
    return [heldout_record(loss_record(total, n_tokens, n_bytes)) for total in nats.tolist()]


# ---- optimizer and step ------------------------------------------------------------------------------
def make_packed_optimizer(packed: PackedGPT, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """The plain trainer's AdamW over the stacked tensors (the leading dimension is the model). The groups
    list parameters in GPT's order, so a run's slice of the state is its own make_optimizer's state."""
    return make_optimizer(packed, cfg, device, model_dims=1)


def clip_grad_norm_per_model(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each model of the pack on its own: returns the (K,)
    total gradient norms before clipping; no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (params, K)
    total = torch.linalg.vector_norm(norms, dim=0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return total


def run_optimizer_state(packed_state: dict, k: int) -> dict:
    """Run k's slice of the packed optimizer's state_dict(): the state dict its plain AdamW would have."""
    state = {i: {key: (value.clone() if key == "step" else value[k].clone()) for key, value in s.items()}
             for i, s in packed_state["state"].items()}
    return {"state": state, "param_groups": copy.deepcopy(packed_state["param_groups"])}


def stack_optimizer_states(states: list[dict]) -> dict:
    """The inverse of run_optimizer_state: K plain AdamW state dicts (same step) -> the packed one."""
    first = states[0]
    stacked = {}
    for i, s in first["state"].items():
        stacked[i] = {key: (value if key == "step" else torch.stack([st["state"][i][key] for st in states]))
                      for key, value in s.items()}
    return {"state": stacked, "param_groups": first["param_groups"]}


# ---- which runs pack together --------------------------------------------------------------------------
def packing_key(cfg: Config) -> str:
    """Runs with equal keys can be packed (e.g. for a sweep runner to group its pending runs)."""
    tree = cfg.to_dict()
    for dotted in PER_RUN_KEYS:
        section, key = dotted.split(".")
        tree[section].pop(key, None)
    tree["data"]["seq_len"] = seq_len(cfg)  # None and the context length mean the same
    tree["model"].pop("preset")  # validation resolved it into the sizes compared here
    return json.dumps(tree, sort_keys=True)


def check_packable(cfgs: list[Config]) -> None:
    """Raise ConfigError naming the first key that keeps these runs from being trained as one pack."""
    if not cfgs:
        raise ConfigError("packed training needs at least one run config")
    first = cfgs[0]
    base = json.loads(packing_key(first))
    for cfg in cfgs[1:]:
        other = json.loads(packing_key(cfg))
        for section in base:
            for key in base[section]:
                if base[section][key] != other[section][key]:
                    raise ConfigError(
                        f"{section}.{key}: {other[section][key]!r} in {cfg.train.out_dir} differs from "
                        f"{base[section][key]!r} in {first.train.out_dir}; packed runs may differ only in "
                        f"{', '.join(PER_RUN_KEYS)}: train the others in another pack")
    out_dirs = [os.path.abspath(c.train.out_dir) for c in cfgs]
    if len(set(out_dirs)) != len(out_dirs):
        raise ConfigError("train.out_dir: two packed runs write to the same folder; give each its own")
    if first.model.dropout > 0:
        raise ConfigError("model.dropout: packed training needs 0 (dropout masks would differ from separate "
                          "runs); train these runs one at a time")
    if first.deepspeed.zero_stage:
        raise ConfigError("deepspeed.zero_stage: packed training runs on one device; set it to 0")


# ---- the training loop ---------------------------------------------------------------------------------
def _resume_step(cfgs: list[Config]) -> int:
    """The newest step at which EVERY run has a checkpoint (0: none has any). A kill while the group was
    writing its checkpoints leaves some runs one checkpoint ahead: they step back to the common one."""
    steps = [{s for s, _ in list_checkpoints(c.train.out_dir)} for c in cfgs]
    if not any(steps):
        return 0
    common = set.intersection(*steps)
    if not common:
        have = ", ".join(f"{c.train.out_dir}: {max(s) if s else 'none'}" for c, s in zip(cfgs, steps))
        raise ConfigError(f"the packed runs have no checkpoint step in common (newest: {have}); resume them "
                          "one at a time, or pack runs that stopped at the same step")
    return max(common)


def train_packed(cfgs: list[Config], resume: bool = False) -> list[dict]:
    """Train (or resume) the runs described by cfgs as one pack; returns each run's final metrics, in order.
    Each run folder ends up as train(cfg) would leave it."""
    check_packable(cfgs)
    cfg, K = cfgs[0], len(cfgs)
    t = cfg.train
    device = resolve_device(t.device)
    amp_dtype = autocast_dtype(t.precision, device)
    micro = t.micro_batch or t.global_batch
    T = seq_len(cfg)

    if not resume:
        for c in cfgs:
            if list_checkpoints(c.train.out_dir):
                raise ConfigError(f"train.out_dir: {c.train.out_dir} already holds checkpoints; pass --resume to "
                                  "continue it or choose another train.out_dir")
    opened = [open_training_stream(c) for c in cfgs]  # validates data and schedules before anything is written
    datasets = [dataset for dataset, _ in opened]
    vocabs = {c.model.vocab_size or d.vocab_size for c, d in zip(cfgs, datasets)}
    if len(vocabs) > 1:
        raise ConfigError(f"model.vocab_size: the packed runs' datasets have different vocabularies {sorted(vocabs)}; "
                          "pack runs on one tokenizer or set model.vocab_size")
    models = [build_model(c, d.vocab_size) for c, d in zip(cfgs, datasets)]
    packed = PackedGPT.from_models(models, device=device)
    vocab = models[0].vocab_size
    del models
    optimizer = make_packed_optimizer(packed, cfg, device)
    start_step = _resume_step(cfgs) if resume else 0
    if start_step:
        ckpts = []
        for k, c in enumerate(cfgs):
            check_same_config(config_from_dict(load_saved_config(c.train.out_dir)).to_dict(), c, c.train.out_dir)
            ckpt = torch.load(checkpoint_path(c.train.out_dir, start_step), map_location="cpu", weights_only=False)
            packed.load_model(k, ckpt["model"])
            ckpts.append(ckpt)
        optimizer.load_state_dict(stack_optimizer_states([ck["optimizer"] for ck in ckpts]))
        set_rng_state(ckpts[0]["rng"])
        del ckpts
    for c in cfgs:
        os.makedirs(c.train.out_dir, exist_ok=True)
        c.save(os.path.join(c.train.out_dir, "config.yaml"))
    compile_mode = t.compile_mode if t.compile else None
    step_model = compiled(packed, compile_mode)
    clip_fn = compiled(clip_grad_norm_per_model, compile_mode)
    with torch.device("meta"):  # one plain GPT that each run's weights are copied into to evaluate and save
        single = GPT.from_config(cfg.model, vocab)
    single = single.to_empty(device=device)

    flops_per_step = single.flops_per_token(T) * t.global_batch * T
    peak = peak_flops(device)
    loggers = [MetricsLogger(c.train.out_dir, t.steps, start_step, tensorboard=t.tensorboard, display=False)
               for c in cfgs]
    protected = protected_steps(cfg)
    packed.train()
    streams = [stream.iter_batches(start_step, t.steps - start_step, t.global_batch, prefetch=0)
               for _, stream in opened]
    pin = device.type == "cuda"

    def step(lr, logging):
        tokens = torch.empty((K, t.global_batch, T + 1), dtype=torch.int64, pin_memory=pin)
        torch.stack([next(batches) for batches in streams], out=tokens)
        return train_step(packed, optimizer, tokens.to(device, non_blocking=True), micro, lr, cfg.optim.grad_clip,
                          amp_dtype, step_model, clip_fn)

    def log(done, lr, loss, grad_norm, steps_timed, elapsed):
        losses, norms = loss.tolist(), grad_norm.tolist()  # the only host sync of a step, when logging
        for k, c in enumerate(cfgs):
            check_finite(losses[k], done, f" in {c.train.out_dir}")
            loggers[k].log(step_record(done, t.global_batch * T, losses[k], lr, norms[k], steps_timed, elapsed,
                                       flops_per_step, peak))
        tok_s = K * steps_timed * t.global_batch * T / max(elapsed, 1e-9)
        print(f"step {done}/{t.steps} {K} runs: loss {min(losses):.4f}..{max(losses):.4f} lr {lr:.3g} "
              f"tok/s {tok_s:.4g} in all", flush=True)

    def run_model(k):
        """Run k's current weights in the plain GPT, to evaluate or save."""
        single.load_state_dict(packed.model_state(k))
        return single

    shared_dataset = len({os.path.realpath(c.data.path) for c in cfgs}) == 1

    def heldout_losses():
        """Each run's held-out metrics, as the plain trainer's evaluation gives them."""
        if shared_dataset:  # one pass of the stacked model over the test windows
            return packed_heldout_loss(packed, datasets[0], T, t.eval_tokens, micro, device, amp_dtype)
        return [evaluate_during_training(run_model(k), datasets[k], c, device, amp_dtype) for k, c in enumerate(cfgs)]

    def evaluate(done):
        summaries = [{"step": done, **result} for result in heldout_losses()]
        for logger, summary in zip(loggers, summaries):
            logger.log(summary)
        test_losses = [summary["test_loss"] for summary in summaries]
        print(f"step {done} {K} runs: test_loss {min(test_losses):.4f}..{max(test_losses):.4f}", flush=True)
        packed.train()
        return summaries

    def checkpoint(done):
        packed_optimizer_state = optimizer.state_dict()
        for k, c in enumerate(cfgs):
            state = {"model": run_model(k).state_dict(), "optimizer": run_optimizer_state(packed_optimizer_state, k),
                     "step": done, "rng": rng_state(), "config": c.to_dict(), "vocab_size": vocab}
            # Older checkpoints go only once every run has its new one: a kill in between leaves a step
            # that all runs share.
            save_checkpoint(c.train.out_dir, done, state, keep=True)
        if not t.keep_checkpoints:
            for c in cfgs:
                prune_checkpoints(c.train.out_dir, done, protected)

    summaries = run_steps(cfg, start_step, step, log, evaluate, checkpoint) or [{} for _ in cfgs]
    for logger in loggers:
        logger.close()
    final_losses = functools.cache(heldout_losses)  # evaluated once, if a run lacks its final.json
    return [write_final(c.train.out_dir, summary, t.steps, lambda k=k: final_losses()[k])
            for k, (c, summary) in enumerate(zip(cfgs, summaries))]
