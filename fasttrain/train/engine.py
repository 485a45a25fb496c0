"""Engines: what differs between training one model, a pack of models, and DeepSpeed.

The run lifecycle (trainer.py) owns everything a run has whatever trains it: the run folder, resume,
the loop and its schedule, metrics and final.json. An engine supplies the rest:

    build(models, start_step)     take each run's initial GPT, make the optimizer, load step start_step's state
    step(tokens, lr, logging)     one optimizer step on every run's batch, tokens (runs, batch, seq_len + 1) on
                                  the host; returns device tensors, no host sync
    read_ahead                    how many steps of batches the trainer reads ahead in a background thread
    read(loss, grad_norm, rows, repeated)   the logged values on the host, per run: (loss, grad_norm,
                                  {"loss_repeated", "loss_unique"}) with rows the per-sequence losses
    evaluate(measure)             each run's evaluation, measure(model, k) -> dict (the pack may share work)
    save(step) / finish(step)     write each run's checkpoint; after the last step, anything more
    newest_step(), holds_checkpoints(run_dir)    where a resume starts

This file holds the base class and the plain engine (one model, CPU or one GPU); packed.py and
distributed.py hold the other two.
"""
from __future__ import annotations

import torch

from fasttrain.checkpoint.files import (CheckpointError, checkpoint_path, list_checkpoints, prune_checkpoints,
                                        read_checkpoint, read_newest, rng_state, save_checkpoint,
                                        set_rng_state)
from fasttrain.config import Config, ConfigError
from fasttrain.device import autocast, autocast_dtype, compiled, measured_matmul_flops, peak_flops, resolve_device
from fasttrain.model import GPT, resolve_attention
from fasttrain.optim import load_optimizer_state, make_optimizer, optimizer_state, set_lr


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, micro_batch: int,
               lr: float | None, grad_clip: float, amp_dtype: torch.dtype | None = None, step_model=None,
               clip_fn=torch.nn.utils.clip_grad_norm_, per_sequence: bool = True, zero_grad=None,
               autocast_cache: bool = True):
    """One optimizer step: forward and backward of every micro-batch (gradients accumulated as the mean
    over the batch), clipping, AdamW, zero_grad.

    tokens (global_batch, T + 1) on the model's device, or (K, global_batch, T + 1) for a PackedGPT, whose
    loss is each model's (K,): their sum backpropagates every model with exactly its own gradient.
    lr: set on the optimizer first (None: the caller has set it, as a captured step's tensor).
    step_model: the module to call for the loss (e.g. torch.compile(model)), default model; clip_fn:
    clip_grad_norm_, or the packed trainer's per-model clipping; zero_grad: what clears the gradients after
    the step, default optimizer.zero_grad(set_to_none=True). Returns the mean loss(es), the pre-clip
    gradient norm(s) and each sequence's mean token loss (..., global_batch; None without per_sequence, for
    a model that does not return its token losses), as device tensors: nothing here waits for the GPU, so
    a CUDA graph can capture the whole step.
    """
    step_model = model if step_model is None else step_model
    if lr is not None:
        set_lr(optimizer, lr)
    accum = tokens.shape[-2] // micro_batch
    loss_sum, rows = 0, []
    for chunk in tokens.split(micro_batch, dim=-2):
        with autocast(tokens.device, amp_dtype, cache=autocast_cache):
            if per_sequence:
                loss, token_losses = step_model(chunk[..., :-1], chunk[..., 1:], return_token_losses=True)
                rows.append(token_losses.mean(dim=-1))
            else:
                loss = step_model(chunk[..., :-1], chunk[..., 1:])
        (loss.sum() / accum).backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = clip_fn(list(model.parameters()), grad_clip or float("inf"))
    optimizer.step()
    if zero_grad is None:
        optimizer.zero_grad(set_to_none=True)
    else:
        zero_grad()
    return loss_sum / accum, grad_norm, torch.cat(rows, dim=-1) if rows else None


class GraphedStep:
    """A training step replayed as one CUDA graph (train.cuda_graph). step_fn(tokens on the device) runs a
    whole step and returns device tensors, reading its learning rate from the optimizer's lr tensor. The
    first `eager_steps` calls run it as it is, on a side stream (they are real steps, and pay for
    compilation, autotuning and lazy initialization, none of which a capture may do); the next call
    captures it and every call from then on copies the batch into the graph's input buffer, fills the
    learning rate and replays. The returned tensors are the graph's: overwritten by the next step."""

    def __init__(self, step_fn, optimizer: torch.optim.Optimizer, device: torch.device, eager_steps: int = 2):
        self.step_fn, self.optimizer, self.device = step_fn, optimizer, device
        self.eager_steps, self.calls = eager_steps, 0
        self.graph = self.tokens = self.outputs = None

    def __call__(self, tokens: torch.Tensor, lr: float):
        set_lr(self.optimizer, lr)
        if self.calls < self.eager_steps:
            self.calls += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                outputs = self.step_fn(tokens.to(self.device, non_blocking=True))
            torch.cuda.current_stream(self.device).wait_stream(side)
            return outputs
        if self.graph is None:
            self.tokens = tokens.to(self.device)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the batch reader thread may allocate pinned memory while this thread captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.step_fn(self.tokens)
        else:
            self.tokens.copy_(tokens, non_blocking=True)
        self.graph.replay()
        return self.outputs


def loss_split(sums: list[float], counts: list[int]) -> dict:
    """{"loss_repeated", "loss_unique"}: the mean loss of the step's repeated and unique sequences, from the
    summed per-sequence losses and counts of each kind (a kind absent from the batch is left out)."""
    split = {}
    for name, total, n in zip(("loss_repeated", "loss_unique"), sums, counts):
        if n:
            split[name] = total / n
    return split


def split_sums(rows: torch.Tensor, repeated) -> tuple[list[float], list[int]]:
    """([sum over repeated rows, sum over unique rows], [their counts]) of per-sequence losses rows (B,)."""
    mask = torch.as_tensor(repeated, dtype=torch.bool)
    rows = rows.double()
    return [float(rows[mask].sum()), float(rows[~mask].sum())], [int(mask.sum()), int((~mask).sum())]


def build_model(cfg: Config, vocab_size: int) -> GPT:
    """The run's initial model: GPT-2 init drawn from train.seed (on the CPU, the same on every machine)."""
    torch.manual_seed(cfg.train.seed)
    return GPT.from_config(cfg.model, vocab_size)


class Engine:
    """Base: one process, runs cfgs (one, or several for a pack). See the module docstring."""

    rank, world_size = 0, 1

    def __init__(self, cfgs: list[Config]):
        self.cfgs, self.cfg = cfgs, cfgs[0]
        self.device = resolve_device(self.cfg.train.device)
        self.amp_dtype = autocast_dtype(self.cfg.train.precision, self.device)
        self.micro_batch = self.cfg.train.micro_batch
        if self.cfg.model.attention == "cudnn" and self.device.type != "cuda":
            raise ConfigError("model.attention: cudnn needs a CUDA GPU (cuDNN's attention); use auto or torch")
        self.cuda_graph = self.cfg.train.cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ConfigError("train.cuda_graph: needs a CUDA GPU; set it false")

    @property
    def read_ahead(self) -> int:
        """Steps of batches read ahead by a background thread. On a GPU the reading (K streams for a pack)
        then overlaps the device's work instead of standing between two steps; on a CPU the same cores run
        the step and the thread only competes with it for them and for the GIL (measured slower): none."""
        return 2 if self.device.type == "cuda" else 0

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run folders (rank 0)."""
        return self.rank == 0

    @property
    def peak_flops(self) -> float | None:
        """Datasheet dense bf16 peak FLOP/s of every device of the run together (None where unknown)."""
        return peak_flops(self.device)

    @property
    def matmul_flops(self) -> float | None:
        """bf16 matmul FLOP/s measured on every device of the run together (None on CPUs)."""
        return measured_matmul_flops(self.device) if self.device.type == "cuda" else None

    def holds_checkpoints(self, run_dir: str) -> bool:
        return bool(list_checkpoints(run_dir))

    def agree(self, message: str | None) -> str | None:
        """Rank 0's message, on every rank (one process: the message itself)."""
        return message

    def any_rank(self, flag: bool) -> bool:
        """Whether any rank raised the flag (one process: the flag itself)."""
        return flag

    def finish(self, step: int) -> None:
        """After the last step (its checkpoint is written)."""


class SingleEngine(Engine):
    """One model on one device: the plain trainer."""

    def newest_step(self) -> int:
        """The step of the newest readable checkpoint (0: none). A damaged file falls back to the one before."""
        self._resume_state = None
        if not list_checkpoints(self.cfg.train.out_dir):
            return 0
        self._resume_state, _ = read_newest(self.cfg.train.out_dir)
        return self._resume_state["step"]

    def build(self, models: list[GPT], start_step: int) -> None:
        (model,) = models
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, self.cfg, self.device, capturable=self.cuda_graph)
        if start_step:
            ckpt = self._resume_state
            if ckpt is None or ckpt["step"] != start_step:
                ckpt = read_checkpoint(checkpoint_path(self.cfg.train.out_dir, start_step))
            try:
                self.model.load_state_dict(ckpt["model"])
                load_optimizer_state(self.optimizer, ckpt["optimizer"])
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{checkpoint_path(self.cfg.train.out_dir, start_step)}: does not hold this "
                                      f"run's model and optimizer ({str(e).splitlines()[0]})") from None
            set_rng_state(ckpt["rng"])
        self._resume_state = None
        t = self.cfg.train
        resolve_attention(self.model, self.micro_batch, self.cfg.data.seq_len, self.amp_dtype or torch.float32)
        self.step_model = compiled(self.model, t.compile_mode if t.compile else None)
        self.model.train()
        self.graphed = GraphedStep(self.run_step, self.optimizer, self.device) if self.cuda_graph else None

    def run_step(self, tokens: torch.Tensor, lr: float | None = None):
        """The whole step on a batch already on the device (what a CUDA graph captures)."""
        return train_step(self.model, self.optimizer, tokens, self.micro_batch, lr, self.cfg.optim.grad_clip,
                          self.amp_dtype, self.step_model, autocast_cache=not self.cuda_graph)

    def step(self, tokens: torch.Tensor, lr: float, logging: bool):
        if self.graphed is not None:
            return self.graphed(tokens[0], lr)
        return self.run_step(tokens[0].to(self.device, non_blocking=True), lr)

    def read(self, loss, grad_norm, rows, repeated) -> list[tuple[float, float, dict]]:
        loss_value = loss.item()  # the only host sync of a step, and only when logging
        return [(loss_value, float(grad_norm), loss_split(*split_sums(rows.cpu(), repeated[0])))]

    def evaluate(self, measure) -> list[dict]:
        result = measure(self.model, 0)
        self.model.train()
        return [result]

    def save(self, step: int) -> None:
        c = self.cfg
        state = {"model": self.model.state_dict(), "optimizer": optimizer_state(self.optimizer), "step": step,
                 "rng": rng_state(), "config": c.to_dict(), "vocab_size": self.model.vocab_size}
        save_checkpoint(c.train.out_dir, step, state)

    def prune(self, step: int, protected: set[int]) -> None:
        prune_checkpoints(self.cfg.train.out_dir, step, protected)
