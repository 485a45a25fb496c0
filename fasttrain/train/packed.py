"""Packed training: several same-shape runs of a sweep trained at once, as one stacked model.

    summaries = train([cfg_a, cfg_b, cfg_c])          # fasttrain.train: one summary per run, in order

A 1M-parameter model cannot keep a GPU busy: one training step is a few hundred tiny kernel launches.
Runs of a sweep that share the model shape, seq_len, batch, steps, optimizer and precision (and differ in
f, E, placement, data seed, dataset or init seed) are stacked: every parameter of PackedGPT has a leading
model dimension K, linear layers are batched matmuls, and attention folds the model dimension into the
batch, so every attention backend runs unchanged. A step of K packed runs costs about the launches of one.

Each run keeps what makes it a run of its own:
  - its init: built by the run lifecycle from its own train.seed (or train.init_from), then stacked;
  - its data: its own TrainingStream (schedule, seed, even dataset, if the vocabularies match);
  - its AdamW state: one AdamW over stacked tensors is K independent AdamWs, since the update is
    elementwise and every hyperparameter is shared;
  - its gradient clipping: the norm is taken per model;
  - its run folder, written as the plain trainer writes it (the lifecycle in trainer.py is the same):
    config.yaml, checkpoints with the plain GPT state dicts (so `fasttrain train --resume`, eval and export
    take them, and a packed group resumes from plain checkpoints), metrics.jsonl and final.json.
Runs that share a dataset are evaluated together: the stacked model reads the test windows once and gives
each run the held-out metrics heldout_loss would give it alone.
Losses equal K separate train() runs up to floating-point reduction order (fp32 on a CPU: ~1e-6 relative).
In metrics.jsonl, tokens_per_s and mfu are each run's own share; the group trains K times that.
"""
from __future__ import annotations

import copy
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.checkpoint.files import (CheckpointError, checkpoint_path, list_checkpoints, prune_checkpoints,
                                        read_checkpoint, rng_state, save_checkpoint, set_rng_state)
from fasttrain.config import Config, ConfigError, launch_world_size
from fasttrain.device import autocast, compiled
from fasttrain.kernels.cross_entropy import check_targets, launch_cross_entropy, register_op
from fasttrain.measure.loss import heldout_record, heldout_window_ids, loss_record, predicted_bytes
from fasttrain.measure.stats import mean_and_stderr
from fasttrain.measure.windows import read_windows, window_documents
from fasttrain.model import GPT, causal_attention, resolve_attention
from fasttrain.optim import load_optimizer_state, make_optimizer, optimizer_state
from fasttrain.train.engine import Engine, GraphedStep, loss_split, split_sums, train_step

# Elements of one group's logits in the packed fused loss (512 MB in bf16), the single-model kernel's budget.
LOGITS_PER_CHUNK = 2**28
# Keys that may differ between packed runs; everything else in the config must be equal.
PER_RUN_KEYS = ("data.path", "data.repeated_fraction", "data.repeat_count", "data.placement", "data.seed",
                "train.seed", "train.out_dir", "train.init_from", "model.init_std")


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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_token_losses: bool = False):
        """idx (K, B, T). Without targets: logits (K, B, T, V). With targets (K, B, T; -100 = ignore): each
        model's mean cross-entropy over its counted tokens, (K,); their sum backpropagates every model at once.
        return_token_losses: also every token's loss (K, B, T), detached, from the same computation."""
        K, B, T = idx.shape
        x = self.hidden_states(idx)
        if targets is None:
            return torch.bmm(x, self.wte.weight.transpose(1, 2)).view(K, B, T, -1)
        targets = targets.reshape(K, B * T)
        if self.loss_backend == "triton":
            loss, token_losses = packed_linear_cross_entropy(x, self.wte.weight, targets, return_token_losses=True)
        else:
            logits = torch.bmm(x, self.wte.weight.transpose(1, 2))
            token_losses = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                           reduction="none").view(K, -1)
            counted = (targets != -100).sum(dim=1).clamp_min(1)
            loss = token_losses.sum(dim=1) / counted
        return (loss, token_losses.detach().view(K, B, T)) if return_token_losses else loss


@register_op("packed_linear_cross_entropy")
def _packed_loss_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, models_per_chunk: int,
                    need_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of hidden[k] @ weight[k].T against targets[k] for every model k, a group of
    models at a time: one bmm for the group's logits, the Triton cross-entropy kernel writing d loss / d
    logits over them in place (already divided by each model's token count), then two bmms that finish the
    gradients during the forward pass, as kernels/linear_cross_entropy.py does for one model. Only one
    group's logits exist at a time. Returns (losses (K,), token losses (K, N), grad_hidden, grad_weight), the
    gradients empty when not needed. A registered operator: no graph break, nothing waits for the host."""
    K, N, _ = hidden.shape
    V = weight.shape[1]
    counts = (targets != -100).sum(dim=1).clamp_min(1).to(torch.float32)
    grad_scale = (1.0 / counts).repeat_interleave(N)  # per token: 1 / its model's count
    losses = torch.empty(K, N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(losses)
    grad_hidden = torch.empty_like(hidden) if need_grads else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_grads else weight.new_empty(0)
    buffer = hidden.new_empty(min(models_per_chunk, K) * N * V)
    for start in range(0, K, models_per_chunk):
        end = min(start + models_per_chunk, K)
        logits = buffer[: (end - start) * N * V].view(end - start, N, V)
        torch.bmm(hidden[start:end], weight[start:end].transpose(1, 2), out=logits)
        rows = logits.view(-1, V)
        launch_cross_entropy(rows, targets[start:end].reshape(-1), -100, 0.0, losses=losses[start:end].view(-1),
                             lse=lse[start:end].view(-1), grad=rows if need_grads else None,
                             grad_scale=grad_scale[start * N:end * N] if need_grads else None)
        if need_grads:
            torch.bmm(logits, weight[start:end], out=grad_hidden[start:end])
            torch.bmm(logits.transpose(1, 2), hidden[start:end], out=grad_weight[start:end])
    return losses.sum(dim=1) / counts, losses, grad_hidden, grad_weight


def _packed_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])


def _packed_loss_backward(ctx, grad_loss, grad_token_losses, *unused):
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden.dim() == 1:  # not computed: no input needed a gradient
        return None, None, None, None, None
    scale = grad_loss.view(-1, 1, 1)
    return grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), None, None, None


_packed_loss_op.register_autograd(_packed_loss_backward, setup_context=_packed_loss_setup)


def packed_linear_cross_entropy(hidden, weight, targets, return_token_losses=False):
    """hidden (K, N, d), weight (K, V, d), targets (K, N; -100 = ignore) -> (K,) mean losses, fp32 (and with
    return_token_losses the (K, N) token losses, not differentiable)."""
    from fasttrain.kernels import linear_cross_entropy

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    K, N, _ = hidden.shape
    # the range check syncs with the host: on a GPU (and inside torch.compile) it is skipped, as in GPT.forward
    validate = hidden.device.type != "cuda"
    models_per_chunk = LOGITS_PER_CHUNK // (N * weight.shape[1])
    if models_per_chunk < 1:  # one model's logits alone pass the budget: its token-chunked kernel, model by model
        per_model = [linear_cross_entropy(hidden[k], weight[k], targets[k], validate_targets=validate,
                                          return_token_losses=True) for k in range(K)]
        losses, token_losses = torch.stack([loss for loss, _ in per_model]), torch.stack([t for _, t in per_model])
        return (losses, token_losses) if return_token_losses else losses
    check_targets(targets, weight.shape[1], -100, validate and not torch.compiler.is_compiling())
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        losses, token_losses, _, _ = _packed_loss_op(hidden.contiguous(), weight, targets.contiguous(),
                                                     models_per_chunk, need_grads)
    token_losses = token_losses.detach()
    return (losses, token_losses) if return_token_losses else losses


# ---- held-out loss of every model at once ---------------------------------------------------------------
@torch.no_grad()
def packed_heldout_loss(packed: PackedGPT, dataset, seq_len: int, max_tokens: int, batch_size: int, device,
                        amp_dtype=None) -> list[dict]:
    """fasttrain.measure.loss.heldout_loss of each model of the pack, for runs that share the dataset: the same
    test windows go through the stacked model once, instead of once per run."""
    window_ids = heldout_window_ids(dataset, seq_len, max_tokens)
    windows = read_windows(dataset, "test", window_ids, seq_len)
    tokens = torch.from_numpy(windows)
    nats = torch.zeros(packed.num_models, dtype=torch.float64, device=device)
    window_losses = []  # (K, windows in the batch): each window's mean loss, for the standard error
    packed.eval()
    for start in range(0, len(tokens), max(1, batch_size)):
        chunk = tokens[start:start + batch_size].to(device)
        batch = chunk.expand(packed.num_models, *chunk.shape)  # every model reads the same windows
        with autocast(device, amp_dtype):
            mean_losses, token_losses = packed(batch[..., :-1], batch[..., 1:], return_token_losses=True)
        nats += mean_losses.double() * chunk[:, 1:].numel()
        window_losses.append(token_losses.double().mean(dim=-1))
    n_tokens, n_bytes = windows.shape[0] * seq_len, predicted_bytes(dataset, windows)
    per_window = torch.cat(window_losses, dim=1).cpu().numpy()
    documents = window_documents(dataset, "test", window_ids, seq_len)
    return [heldout_record(loss_record(total, n_tokens, n_bytes, mean_and_stderr(per_window[k], documents)[1]))
            for k, total in enumerate(nats.tolist())]


# ---- optimizer and step ------------------------------------------------------------------------------
# The plain trainer's AdamW over the stacked tensors (make_optimizer with model_dims=1: the leading dimension
# is the model) lists parameters in GPT's order, so a run's slice of the state is its own AdamW's state.
def _clip_per_model(grads: list[torch.Tensor], per_model: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each model's gradients by min(1, max_norm / its total norm); per_model lists grads[i][k] for every
    gradient i and model k, in that order. Returns the (K,) norms before clipping. Foreach norms (a few
    launches whatever the number of tensors), no host sync."""
    norms = torch.stack(torch._foreach_norm(per_model)).view(len(grads), -1)  # (gradients, K)
    total = torch.linalg.vector_norm(norms, dim=0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for g in grads])
    return total


def clip_grad_norm_per_model(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each model of the pack on its own: returns the (K,)
    total gradient norms before clipping; no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return _clip_per_model(grads, [g[k] for g in grads for k in range(g.shape[0])], max_norm)


class FlatGradients:
    """Every gradient of a pack as a view of one flat buffer (parameter after parameter, each laid out like its
    parameter), assigned once: the backward adds into it, one memset clears it after the step instead of
    freeing and reallocating every gradient, and the per-model views the clipping takes norms over are made
    once. The addresses never change, as a captured CUDA graph needs; nothing may set a gradient to None."""

    def __init__(self, parameters):
        params = [p for p in parameters if p.requires_grad]
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.grads, offset = [], 0
        for p in params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            self.grads.append(p.grad)
            offset += p.numel()
        self.per_model = [g[k] for g in self.grads for k in range(g.shape[0])]

    def zero_(self) -> None:
        self.buffer.zero_()

    def clip(self, parameters, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_per_model over these gradients (the train_step clip_fn)."""
        return _clip_per_model(self.grads, self.per_model, max_norm)


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
    if launch_world_size() > 1:
        raise ConfigError("several --config: packed training runs in one process on one device; start it with "
                          "`fasttrain train`, not under deepspeed or torchrun")


# ---- the engine ---------------------------------------------------------------------------------------
class PackedEngine(Engine):
    """K same-shape runs as one PackedGPT on one device (see the module docstring)."""

    def __init__(self, cfgs: list[Config]):
        check_packable(cfgs)
        super().__init__(cfgs)

    def newest_step(self) -> int:
        """The newest step at which EVERY run has a checkpoint (0: none has any). A kill while the pack was
        writing its checkpoints leaves some runs one checkpoint ahead: they step back to the common one."""
        steps = [{s for s, _ in list_checkpoints(c.train.out_dir)} for c in self.cfgs]
        if not any(steps):
            return 0
        common = set.intersection(*steps)
        if not common:
            have = ", ".join(f"{c.train.out_dir}: {max(s) if s else 'none'}" for c, s in zip(self.cfgs, steps))
            raise ConfigError(f"the packed runs have no checkpoint step in common (newest: {have}); resume them "
                              "one at a time, or pack runs that stopped at the same step")
        return max(common)

    def build(self, models: list[GPT], start_step: int) -> None:
        vocabs = {m.vocab_size for m in models}
        if len(vocabs) > 1:
            raise ConfigError(f"model.vocab_size: the packed runs' datasets have different vocabularies "
                              f"{sorted(vocabs)}; pack runs on one tokenizer or set model.vocab_size")
        self.packed = PackedGPT.from_models(models, device=self.device)
        self.optimizer = make_optimizer(self.packed, self.cfg, self.device, model_dims=1, capturable=self.cuda_graph)
        if start_step:
            ckpts = []
            for k, c in enumerate(self.cfgs):
                path = checkpoint_path(c.train.out_dir, start_step)
                ckpt = read_checkpoint(path)
                try:
                    self.packed.load_model(k, ckpt["model"])
                except (KeyError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: does not hold this run's model ({str(e).splitlines()[0]})") from None
                ckpts.append(ckpt)
            load_optimizer_state(self.optimizer, stack_optimizer_states([ck["optimizer"] for ck in ckpts]))
            set_rng_state(ckpts[0]["rng"])
            del ckpts
        t = self.cfg.train
        resolve_attention(self.packed, len(self.cfgs) * self.micro_batch, self.cfg.data.seq_len,
                          self.amp_dtype or torch.float32)  # the models fold into the attention batch
        self.step_model = compiled(self.packed, t.compile_mode if t.compile else None)
        self.grads = FlatGradients(self.packed.parameters())
        self.graphed = GraphedStep(self.run_step, self.optimizer, self.device) if self.cuda_graph else None
        with torch.device("meta"):  # one plain GPT that each run's weights are copied into to evaluate and save
            single = GPT.from_config(self.cfg.model, models[0].vocab_size)
        self.single = single.to_empty(device=self.device)
        self.packed.train()

    def run_model(self, k: int) -> GPT:
        """Run k's current weights in the plain GPT, to evaluate or save."""
        self.single.load_state_dict(self.packed.model_state(k))
        return self.single

    def run_step(self, tokens: torch.Tensor, lr: float | None = None):
        """The whole step on the K batches already on the device (what a CUDA graph captures)."""
        return train_step(self.packed, self.optimizer, tokens, self.micro_batch, lr, self.cfg.optim.grad_clip,
                          self.amp_dtype, self.step_model, self.grads.clip, zero_grad=self.grads.zero_,
                          autocast_cache=not self.cuda_graph)

    def step(self, tokens: torch.Tensor, lr: float, logging: bool):
        # The K batches come stacked, in pinned memory on a GPU: copied asynchronously.
        if self.graphed is not None:
            return self.graphed(tokens, lr)
        return self.run_step(tokens.to(self.device, non_blocking=True), lr)

    def read(self, loss, grad_norm, rows, repeated) -> list[tuple[float, float, dict]]:
        losses, norms, rows = loss.tolist(), grad_norm.tolist(), rows.cpu()  # the only host sync, when logging
        return [(losses[k], norms[k], loss_split(*split_sums(rows[k], repeated[k]))) for k in range(len(self.cfgs))]

    def evaluate(self, measure) -> list[dict]:
        """Each run's evaluation. Runs on one dataset share the test loss: the stacked model reads the test
        windows once for all of them."""
        cfgs, t = self.cfgs, self.cfg.train
        shared = "test" in t.eval_metrics and len({os.path.realpath(c.data.path) for c in cfgs}) == 1
        shared_test = None
        if shared:
            shared_test = packed_heldout_loss(self.packed, measure.datasets[0], self.cfg.data.seq_len, t.eval_tokens,
                                              self.micro_batch, self.device, self.amp_dtype)
        results = []
        for k in range(len(cfgs)):
            metrics = [m for m in t.eval_metrics if not (shared and m == "test")]
            result = dict(shared_test[k]) if shared else {}
            if metrics:
                result.update(measure(self.run_model(k), k, metrics))
            results.append(result)
        self.packed.train()
        return results

    def save(self, step: int) -> None:
        packed_optimizer_state = optimizer_state(self.optimizer)
        for k, c in enumerate(self.cfgs):
            state = {"model": self.run_model(k).state_dict(),
                     "optimizer": run_optimizer_state(packed_optimizer_state, k), "step": step, "rng": rng_state(),
                     "config": c.to_dict(), "vocab_size": self.single.vocab_size}
            save_checkpoint(c.train.out_dir, step, state)

    def prune(self, step: int, protected: set[int]) -> None:
        for c in self.cfgs:
            prune_checkpoints(c.train.out_dir, step, protected)
