"""The DeepSpeed engine: data-parallel training through ZeRO (stage 0-3) on several GPUs, several nodes, or
CPU processes.

The same config file as the plain trainer; `fasttrain train` comes here when it runs under a launcher with
more than one process, or when deepspeed.zero_stage > 0:

    deepspeed --num_gpus 8 --no_local_rank --module fasttrain.cli train --config run.yaml --deepspeed.zero_stage 2
    torchrun --nproc_per_node 8 -m fasttrain.cli train --config run.yaml --deepspeed.zero_stage 2

DeepSpeed's config is generated from ours (`deepspeed_config`): batch sizes and accumulation, bf16, gradient
clipping and the ZeRO stage. The optimizer is the plain trainer's AdamW (same parameter groups), and the
learning rate is set from `lr_at` before every step, so the two trainers cannot disagree: in fp32 they give
the same losses. `deepspeed.extra` may add any other DeepSpeed key (offload, bucket sizes, ...); a key that
our config already sets is refused unless it holds the same value.

Each rank reads its own slice of every global batch from the repetition schedule (every sequence is read by
exactly one rank, whatever the world size). Rank 0 writes the run folder, as the plain trainer does.
Checkpoints go through engine.save_checkpoint into <out_dir>/ds_checkpoints/step_XXXXXXX/ (the layout,
completion markers, universal conversion and the consolidated export are in fasttrain.checkpoint.deepspeed);
the last one is also exported as a plain checkpoint file that eval, export and load_model read.
"""
from __future__ import annotations

import logging
import os
import socket

import torch

from fasttrain.checkpoint.deepspeed import (ds_checkpoint_dir, export_consolidated, list_ds_checkpoints,
                                            point_latest, prune_ds_checkpoints, read_marker, remove_incomplete,
                                            tag_name, to_universal, verify_safe, write_marker)
from fasttrain.checkpoint.files import checkpoint_path, list_checkpoints, rng_state, safe_load, set_rng_state
from fasttrain.config import Config, ConfigError, batch_layout
from fasttrain.device import autocast_dtype
from fasttrain.model import GPT, resolve_attention
from fasttrain.optim import make_optimizer
from fasttrain.train.engine import Engine, loss_split, split_sums

# DeepSpeed keys generated from our config, and the setting they come from.
_GENERATED_FROM = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch",
    "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "train.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
}
# DeepSpeed keys that would replace what we build ourselves.
_REFUSED = {
    "optimizer": "the optimizer is AdamW from the optim section",
    "scheduler": "the learning rate follows optim.lr/schedule/warmup_steps",
    "fp16": "use train.precision (fp32 or bf16)",
    "amp": "use train.precision (fp32 or bf16)",
}


# ---- DeepSpeed configuration -------------------------------------------------------------------
def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config: generated from ours, then deepspeed.extra merged in (it may add keys, not
    change ours)."""
    micro, accum = batch_layout(cfg, world_size)
    generated = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": None,  # our metrics log reports progress
    }
    extra = cfg.deepspeed.extra
    for key, why in _REFUSED.items():
        if key in extra:
            raise ConfigError(f"deepspeed.extra.{key}: not allowed ({why}); remove it")
    return _merge(generated, extra, "")


def _merge(ours: dict, extra: dict, prefix: str) -> dict:
    out = dict(ours)
    for key, value in extra.items():
        path = prefix + key
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, path + ".")
        elif path in _GENERATED_FROM and value != out.get(key):
            raise ConfigError(f"deepspeed.extra.{path}: {value!r} contradicts {out.get(key)!r}, which comes from "
                              f"{_GENERATED_FROM[path]}; change that setting instead")
        elif any(owned.startswith(path + ".") for owned in _GENERATED_FROM):
            raise ConfigError(f"deepspeed.extra.{path}: expected a mapping, got {value!r}")
        else:
            out[key] = value
    return out


# ---- processes --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_name: str) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs: DeepSpeed's accelerator picks)."""
    if device_name == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # one process without a launcher (else DeepSpeed tries MPI discovery)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    accelerator = get_accelerator().device_name()
    if device_name != "auto" and device_name != accelerator:
        raise ConfigError(f"train.device: {device_name}, but DeepSpeed runs on '{accelerator}' here; set "
                          f"train.device=auto (or DS_ACCELERATOR={device_name} in the environment)")
    deepspeed.init_distributed(verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(accelerator)


def _base_optimizer_fixups(optimizer):
    """What to re-apply after DeepSpeed loads a checkpoint into `optimizer` (the AdamW we passed in).

    DeepSpeed 0.19's ZeRO-3 universal load copies the first parameter group's hyperparameters onto every
    group (weight decay lands on biases and LayerNorm gains) and hands all groups one shared `step`
    tensor (stepped once per group). Our config is the source of the hyperparameters anyway."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    def apply():
        for group, saved in zip(optimizer.param_groups, hyper):
            group.update(saved)
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    return apply


# ---- the engine ---------------------------------------------------------------------------------
class DeepSpeedEngine(Engine):
    """One run on every process of the launch, through deepspeed.initialize."""

    def __init__(self, cfgs: list[Config]):
        (cfg,) = cfgs
        t = cfg.train
        self.cfgs, self.cfg = cfgs, cfg
        self.device = init_distributed(t.device)
        self.dist = torch.distributed
        self.rank, self.world_size = self.dist.get_rank(), self.dist.get_world_size()
        # DeepSpeed bf16: bf16 weights and an fp32 master copy, so no autocast around its forward passes.
        self.bf16, self.amp_dtype = autocast_dtype(t.precision, self.device) is not None, None
        self.micro_batch, self.accum = batch_layout(cfg, self.world_size)
        self.ds_config = deepspeed_config(cfg, self.world_size, self.bf16)
        self.folder = ds_checkpoint_dir(t.out_dir)
        # A side channel for the per-step stop vote: on gloo it runs on the CPU, so it never waits for a GPU.
        self.control = self.dist.new_group(backend="gloo") if self.dist.get_backend() != "gloo" else None

    @property
    def peak_flops(self) -> float | None:
        peak = super().peak_flops
        return peak * self.world_size if peak else None

    @property
    def matmul_flops(self) -> float | None:
        rate = super().matmul_flops
        return rate * self.world_size if rate else None

    def agree(self, message: str | None) -> str | None:
        box = [message]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self.dist.all_reduce(vote, op=self.dist.ReduceOp.MAX, group=self.control)
        return bool(vote.item())

    def holds_checkpoints(self, run_dir: str) -> bool:
        return bool(list_checkpoints(run_dir) or list_ds_checkpoints(ds_checkpoint_dir(run_dir), complete=False))

    def newest_step(self) -> int:
        run_dir = self.cfg.train.out_dir
        if self.rank == 0:
            remove_incomplete(run_dir)
        self.dist.barrier()
        complete = list_ds_checkpoints(self.folder)
        if not complete:
            if list_checkpoints(run_dir):
                raise ConfigError(f"{run_dir} holds plain-trainer checkpoints only: continue it with the plain "
                                  "trainer (one process, deepspeed.zero_stage=0)")
            return 0
        return complete[-1][0]

    def build(self, models: list[GPT], start_step: int) -> None:
        import deepspeed

        (model,) = models
        cfg, t = self.cfg, self.cfg.train
        if self.rank > 0:  # rank 0 keeps the plain trainer's random stream; the others draw their own dropout masks
            torch.manual_seed(t.seed * 1_000_003 + self.rank)
        optimizer = make_optimizer(model, cfg, self.device)
        ds_config, load_dir, tag_dir = self.ds_config, self.folder, None
        if start_step:
            tag_dir = os.path.join(self.folder, tag_name(start_step))
            verify_safe(tag_dir)  # DeepSpeed reads its files with weights_only=False: nothing in them may run
            marker = read_marker(tag_dir)
            if marker["world_size"] != self.world_size and cfg.deepspeed.zero_stage > 0:
                load_dir = os.path.join(self.folder, "universal")
                if self.rank == 0:
                    print(f"resuming a {marker['world_size']}-process checkpoint with {self.world_size} processes: "
                          f"converting {tag_dir} to DeepSpeed's universal format", flush=True)
                    to_universal(tag_dir, os.path.join(load_dir, tag_name(start_step)))
                self.dist.barrier()
                verify_safe(os.path.join(load_dir, tag_name(start_step)))
                ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
            self.dist.barrier()
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.optimizer = optimizer
        resolve_attention(self.engine.module, self.micro_batch, cfg.data.seq_len,
                          torch.bfloat16 if self.bf16 else torch.float32)
        if t.compile:  # compiles the module in place (nn.Module.compile): state dict names are unchanged
            self.engine.compile(compile_kwargs={} if t.compile_mode == "default" else {"mode": t.compile_mode})
        reapply_hyperparameters = _base_optimizer_fixups(optimizer)
        if start_step:
            path, client_state = self.engine.load_checkpoint(load_dir, tag=tag_name(start_step),
                                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None or client_state.get("step") != start_step:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
            reapply_hyperparameters()
            rng_file = os.path.join(tag_dir, f"rng_rank_{self.rank:05d}.pt")
            if read_marker(tag_dir)["world_size"] == self.world_size and os.path.exists(rng_file):
                set_rng_state(safe_load(rng_file))
        self.record = {"world_size": self.world_size, "zero_stage": cfg.deepspeed.zero_stage, "bf16": self.bf16,
                       "vocab_size": self.engine.module.vocab_size, "config": cfg.to_dict()}
        # plain fp32 data parallel reports no gradient norm: it is taken from the gradients when logging
        self.grad_norm_from_engine = cfg.deepspeed.zero_stage > 0 or self.bf16
        self.engine.train()

    def step(self, tokens: torch.Tensor, lr: float, logging: bool):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = tokens[0].to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        grad_norm, rows = None, []
        for i, chunk in enumerate(tokens.split(self.micro_batch)):
            loss, token_losses = self.engine(chunk[:, :-1], chunk[:, 1:], return_token_losses=True)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps and averages over ranks
            loss_sum += loss.detach().float()
            rows.append(token_losses.mean(dim=-1))
            if i == self.accum - 1 and logging and not self.grad_norm_from_engine:  # averaged over ranks by now
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.engine.module.parameters()
                                                           if p.grad is not None])
            self.engine.step()  # called after every micro-batch; the weights change after the last one
        return loss_sum / self.accum, grad_norm, torch.cat(rows)

    def read(self, loss, grad_norm, rows, repeated) -> list[tuple[float, float, dict]]:
        """The mean loss over all ranks, and the repeated/unique split over the whole global batch."""
        sums, counts = split_sums(rows.cpu(), repeated[0])
        totals = torch.tensor([loss.item(), *sums, *counts], dtype=torch.float64, device=loss.device)
        self.dist.all_reduce(totals)
        values = totals.tolist()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return [(values[0] / self.world_size, grad_norm, loss_split(values[1:3], [int(v) for v in values[3:5]]))]

    def evaluate(self, measure) -> list[dict]:
        """On every rank (under ZeRO-3 a forward pass needs all ranks); rank 0 writes the result."""
        result = measure(self.engine.module, 0)
        self.engine.train()
        return [result]

    def save(self, step: int) -> None:
        """Every rank saves its part; rank 0 then marks the checkpoint complete."""
        tag_dir = os.path.join(self.folder, tag_name(step))
        os.makedirs(tag_dir, exist_ok=True)
        torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank_{self.rank:05d}.pt"))
        self.engine.save_checkpoint(self.folder, tag=tag_name(step), client_state={"step": step}, save_latest=False)
        # save_checkpoint ends with a barrier: every rank's files are written.
        if self.rank == 0:
            write_marker(tag_dir, {"step": step, **self.record})
            point_latest(self.folder, tag_name(step))

    def prune(self, step: int, protected: set[int]) -> None:
        prune_ds_checkpoints(self.cfg.train.out_dir, step, protected)

    def finish(self, step: int) -> None:
        """Rank 0 exports the last checkpoint as a plain checkpoint file (fp32, with the optimizer state)."""
        if self.rank == 0:
            export_path = checkpoint_path(self.cfg.train.out_dir, step)
            if not os.path.exists(export_path):
                export_consolidated(os.path.join(self.folder, tag_name(step)), export_path, dtype="fp32")
        self.dist.barrier()
