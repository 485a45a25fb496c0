"""One training run, top to bottom: the run folder, resume, the loop, final.json.

    summary = train(cfg)                        # one model, on a CPU or one GPU
    summaries = train([cfg_a, cfg_b, cfg_c])    # same-shape runs trained as one stacked model (packed.py)
    # under `deepspeed` or `torchrun`, or with deepspeed.zero_stage > 0: DeepSpeed ZeRO (distributed.py)

Data order comes from the repetition schedule and is a pure function of (dataset, data config, seed):
batch k is the same whether the run went straight through or was stopped and resumed. A resumed run
continues from its newest complete checkpoint (model, optimizer, RNG and step) and gives, on a CPU,
exactly the losses of the uninterrupted run.

What one model, a pack and DeepSpeed do differently lives in their engine (engine.py); everything a run
has whatever trains it is here, once:
  1. the data: each run's stream, its schedule validated before anything is written;
  2. the run folders: one writer each (a lock naming its holder), no silent restart over a finished or
     started run;
  3. the models: each run's init from train.seed, or train.init_from's weights;
  4. resume: the saved config must describe the same run; the engine loads its step's state;
  5. the loop: learning rate, logging (metrics.jsonl), evaluation and checkpoint schedule; SIGTERM or
     SIGUSR1 (a scheduler's time limit or preemption) ends it at the next step boundary with a checkpoint
     and exit status REQUEUE_EXIT_CODE, so that the job is run again with --resume;
  6. final.json: the last evaluation.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
import time
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from fasttrain.checkpoint.files import read_json, read_newest, remove_partial_files, write_json_atomic
from fasttrain.checkpoint.model import check_weights
from fasttrain.config import Config, ConfigError, config_differences, config_from_dict, launch_world_size
from fasttrain.data.sampler import iter_stacked_batches, open_training_stream
from fasttrain.device import autocast
from fasttrain.measure.loss import heldout_loss, repeated_subset_loss
from fasttrain.measure.prefix_matching import induction_scores
from fasttrain.model import GPT
from fasttrain.optim import lr_at
from fasttrain.train.distributed import DeepSpeedEngine
from fasttrain.train.engine import Engine, SingleEngine, build_model
from fasttrain.train.metrics import MetricsLogger, step_record
from fasttrain.train.packed import PackedEngine

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; run again with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """Training stopped at a step boundary on SIGTERM/SIGUSR1, its checkpoint written."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"{signal.Signals(signum).name} after step {step}: its checkpoint is written; run the same "
                         "command with --resume to continue")
        self.step, self.signum = step, signum


def train(cfgs: Config | list[Config], resume: bool = False) -> dict | list[dict]:
    """Train (or resume) one run, or several same-shape runs as one pack; returns the final metrics (a list
    for a list of configs, in order). Each run folder ends up the same whichever engine trained it."""
    one = isinstance(cfgs, Config)
    cfgs = [cfgs] if one else list(cfgs)
    summaries = Run(cfgs, choose_engine(cfgs)).train(resume)
    return summaries[0] if one else summaries


def choose_engine(cfgs: list[Config]) -> type[Engine]:
    if len(cfgs) > 1:
        return PackedEngine
    if launch_world_size() > 1 or cfgs[0].deepspeed.zero_stage > 0:
        return DeepSpeedEngine
    return SingleEngine


# ---- schedule ----------------------------------------------------------------------------------------
def is_checkpoint_step(step: int, cfg: Config) -> bool:
    t = cfg.train
    if step == t.steps:
        return True
    if t.checkpoint_every and step % t.checkpoint_every == 0:
        return True
    return t.checkpoint_log_spaced and step & (step - 1) == 0


def is_eval_step(step: int, cfg: Config) -> bool:
    t = cfg.train
    return step == t.steps or bool(t.eval_every and step % t.eval_every == 0) or (
        t.checkpoint_log_spaced and step & (step - 1) == 0)


def protected_steps(cfg: Config) -> set[int]:
    """Checkpoints kept for good under train.checkpoint_log_spaced: steps 1, 2, 4, 8, ..."""
    if not cfg.train.checkpoint_log_spaced:
        return set()
    return {s for s in range(1, cfg.train.steps + 1) if s & (s - 1) == 0}


def check_finite(loss: float, step: int, where: str = "") -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}{where}: lower optim.lr or check the data")


# ---- the run folder ----------------------------------------------------------------------------------
@contextmanager
def folder_lock(run_dir: str):
    """Hold RUN/.lock (flock) for the duration: a second trainer on the folder is refused, naming the holder.
    The kernel drops the lock of a process that dies, so a crashed or killed run's lock is taken over."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"train.out_dir: {run_dir} is in use by {holder}; wait for it to finish or stop it "
                              "(a folder has one writer at a time)") from None
        f.seek(0)
        f.truncate()
        f.write(f"fasttrain on host {socket.gethostname()}, pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def saved_config(run_dir: str) -> Config | None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tree = yaml.safe_load(f)
    return config_from_dict(tree, world_size=1)


def check_same_run(cfg: Config) -> None:
    """A run folder holds one run: resuming it with a config that describes another would mix two."""
    run_dir = cfg.train.out_dir
    saved = saved_config(run_dir)
    if saved is None:
        return
    diffs = config_differences(saved.to_dict(), cfg.to_dict())
    if diffs:
        key, change = diffs[0].split(": ", 1)
        old, new = change.split(" -> ", 1)
        raise ConfigError(f"{key}: {new} differs from {old} in the run being resumed ({run_dir}); use the same "
                          "config or another train.out_dir")


def init_weights(cfg: Config, model: GPT) -> None:
    """Load train.init_from's weights into `model` (same shape), for a run that starts from another's."""
    source = cfg.train.init_from
    if not os.path.exists(source):
        raise ConfigError(f"train.init_from: {source} does not exist; give a run folder or a checkpoint file")
    try:
        ckpt, path = read_newest(source)
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    m = cfg.model
    check_weights(ckpt["model"], model, path, f"the model (n_layer={m.n_layer}, d_model={m.d_model}, "
                  f"n_head={m.n_head}, context_length={m.context_length}, vocab_size={model.vocab_size})",
                  "train.init_from must name a run of this model's shape")
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})


# ---- evaluation during training ----------------------------------------------------------------------
@dataclass
class Measure:
    """What an evaluation during training records for run k at `step` (train.eval_metrics): measure(model, k).
    Engines that can share work between runs (a pack reading the test windows once) use its fields."""

    cfgs: list[Config]
    datasets: list
    streams: list
    step: int
    device: torch.device
    amp_dtype: torch.dtype | None

    def __call__(self, model, k: int, metrics=None) -> dict:
        cfg, dataset = self.cfgs[k], self.datasets[k]
        t, T = cfg.train, cfg.data.seq_len
        metrics = t.eval_metrics if metrics is None else metrics
        out = {}
        with autocast(self.device, self.amp_dtype):
            if "test" in metrics:
                out.update(heldout_loss(model, dataset, T, t.eval_tokens, t.micro_batch, self.device))
            if "repeated" in metrics:
                out.update(repeated_subset_loss(model, dataset, self.streams[k].schedule, T, t.eval_tokens,
                                                t.micro_batch, self.device, trained_sequences=self.step * t.global_batch))
        if "induction" in metrics and T >= 101:  # fp32 attention patterns; shorter contexts cannot hold one
            out.update(induction_scores(model, dataset, device=self.device, tokens=t.eval_tokens,
                                        batch_size=t.micro_batch))
        return out


# ---- the run -----------------------------------------------------------------------------------------
class Run:
    """The lifecycle of the runs `cfgs` (one, or a pack) trained by one engine."""

    def __init__(self, cfgs: list[Config], engine_cls: type[Engine]):
        self.cfgs, self.cfg = cfgs, cfgs[0]
        self.engine_cls = engine_cls

    def train(self, resume: bool) -> list[dict]:
        cfgs, t = self.cfgs, self.cfg.train
        engine = self.engine = self.engine_cls(cfgs)
        # 1. The data: every run's schedule is validated before anything is written.
        opened = [open_training_stream(c) for c in cfgs]
        self.datasets = [dataset for dataset, _ in opened]
        self.streams = [stream for _, stream in opened]
        with ExitStack() as stack:
            # 2. The run folders: one writer each; no silent restart over a run that holds checkpoints.
            message = None
            if engine.is_writer:
                try:
                    for c in cfgs:
                        stack.enter_context(folder_lock(c.train.out_dir))
                        remove_partial_files(c.train.out_dir)  # left by a writer killed mid-write
                except ConfigError as e:
                    message = str(e)
            message = engine.agree(message)
            if message:
                raise ConfigError(message)
            if not resume:
                for c in cfgs:
                    if engine.holds_checkpoints(c.train.out_dir):
                        raise ConfigError(f"train.out_dir: {c.train.out_dir} already holds checkpoints; pass --resume "
                                          "to continue it or choose another train.out_dir")
            # 3.-4. Where to start, each run's initial model, and the engine's state at the start.
            start_step = engine.newest_step() if resume else 0
            for c in cfgs:
                if start_step:
                    check_same_run(c)
            models = []
            for c, dataset in zip(cfgs, self.datasets):
                if c.model.vocab_size is not None and c.model.vocab_size < dataset.vocab_size:
                    raise ConfigError(f"model.vocab_size: {c.model.vocab_size} is smaller than the dataset's "
                                      f"vocabulary ({dataset.vocab_size})")
                model = build_model(c, dataset.vocab_size)
                if c.train.init_from and not start_step:
                    init_weights(c, model)
                models.append(model)
            engine.build(models, start_step)
            del models
            if engine.is_writer:
                for c in cfgs:
                    c.save(os.path.join(c.train.out_dir, "config.yaml"))
            # 5. The loop.
            self.loggers = [MetricsLogger(c.train.out_dir, t.steps, start_step, tensorboard=t.tensorboard,
                                          wandb=c.train.wandb, run_config=c.to_dict(), enabled=engine.is_writer,
                                          display=len(cfgs) == 1) for c in cfgs]
            try:
                summaries = self.loop(start_step)
            finally:
                for logger in self.loggers:
                    logger.close()
            # 6. final.json.
            return self.write_final(summaries)

    def loop(self, start_step: int) -> list[dict] | None:
        """Steps start_step .. train.steps - 1; returns the last evaluation (None if no step ran)."""
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        # Every run's batch of a step, stacked (K, batch, seq_len + 1); read ahead in a thread where the engine
        # says it pays (on a GPU), pinned for an asynchronous copy to the device.
        batches = iter_stacked_batches(self.streams, start_step, t.steps - start_step, t.global_batch,
                                       rank=engine.rank, world_size=engine.world_size, prefetch=engine.read_ahead,
                                       pin_memory=engine.device.type == "cuda")
        self.flops_per_step = self.flops_per_token() * t.global_batch * cfg.data.seq_len
        self.peak_flops, self.matmul_flops = engine.peak_flops, engine.matmul_flops  # the MFU denominators
        protected = protected_steps(cfg)
        summaries = None
        stop = StopSignal()
        with stop.installed(), closing(batches):
            tick, tick_step = time.time(), start_step
            for index in range(start_step, t.steps):
                lr = lr_at(index, cfg)
                done = index + 1
                logging = done % t.log_every == 0 or done == t.steps
                tokens, repeated = next(batches)
                loss, grad_norm, rows = engine.step(tokens, lr, logging)
                if logging:
                    self.log(done, lr, loss, grad_norm, rows, repeated, done - tick_step, time.time() - tick)
                    tick, tick_step = time.time(), done
                evaluating, checkpointing = is_eval_step(done, cfg), is_checkpoint_step(done, cfg)
                if evaluating:
                    summaries = self.evaluate(done)
                stopping = engine.any_rank(stop.signum is not None) and done < t.steps
                if checkpointing or stopping:
                    self.checkpoint(done, protected)
                if stopping:
                    raise StopRequested(done, stop.signum or signal.SIGTERM)
                if evaluating or checkpointing:
                    tick = time.time()  # evaluation and checkpoint time is not training time
        if summaries is not None:
            self.engine.finish(t.steps)
        return summaries

    def flops_per_token(self) -> float:
        with torch.device("meta"):
            model = GPT.from_config(self.cfg.model, self.datasets[0].vocab_size)
        return model.flops_per_token(self.cfg.data.seq_len)

    def log(self, done, lr, loss, grad_norm, rows, repeated, steps_timed, elapsed) -> None:
        """One metrics line per run: the only place a step waits for the device."""
        t = self.cfg.train
        tokens_per_step = t.global_batch * self.cfg.data.seq_len
        values = self.engine.read(loss, grad_norm, rows, repeated)
        for k, (c, logger) in enumerate(zip(self.cfgs, self.loggers)):
            loss_k, norm_k, split = values[k]
            check_finite(loss_k, done, f" in {c.train.out_dir}" if len(self.cfgs) > 1 else "")
            record = step_record(done, tokens_per_step, loss_k, lr, norm_k, steps_timed, elapsed,
                                 self.flops_per_step, self.peak_flops, self.matmul_flops)
            record.update(split)
            logger.log(record)
        if len(self.cfgs) > 1 and self.engine.is_writer:
            losses = [v[0] for v in values]
            tok_s = len(self.cfgs) * steps_timed * tokens_per_step / max(elapsed, 1e-9)
            print(f"step {done}/{t.steps} {len(self.cfgs)} runs: loss {min(losses):.4f}..{max(losses):.4f} "
                  f"lr {lr:.3g} tok/s {tok_s:.4g} in all", flush=True)

    def evaluate(self, done: int, log: bool = True) -> list[dict]:
        engine = self.engine
        tokens = done * self.cfg.train.global_batch * self.cfg.data.seq_len
        measure = Measure(self.cfgs, self.datasets, self.streams, done, engine.device, engine.amp_dtype)
        summaries = [{"step": done, "tokens": tokens, **result} for result in engine.evaluate(measure)]
        if not log:
            return summaries
        for logger, summary in zip(self.loggers, summaries):
            logger.log(summary)
        if len(self.cfgs) > 1 and engine.is_writer:
            test = [s["test_loss"] for s in summaries if "test_loss" in s]
            if test:
                print(f"step {done} {len(self.cfgs)} runs: test_loss {min(test):.4f}..{max(test):.4f}", flush=True)
        return summaries

    def checkpoint(self, done: int, protected: set[int]) -> None:
        engine = self.engine
        engine.save(done)
        # Older checkpoints go only once every run has its new one: a kill in between leaves a step that
        # all runs share.
        if not self.cfg.train.keep_checkpoints and engine.is_writer:
            engine.prune(done, protected)

    def write_final(self, summaries: list[dict] | None) -> list[dict]:
        """Write RUN/final.json (the last evaluation) and return it. No summary means the run was resumed after
        its last step: its final.json is read back, or, when the run was stopped between its last checkpoint
        and final.json, the evaluation is made again."""
        if summaries is None:
            kept = [read_json(os.path.join(c.train.out_dir, "final.json")) for c in self.cfgs]
            if all(s is not None for s in kept):
                return kept
            summaries = self.evaluate(self.cfg.train.steps, log=False)
            self.engine.finish(self.cfg.train.steps)
        if self.engine.is_writer:
            for c, summary in zip(self.cfgs, summaries):
                write_json_atomic(os.path.join(c.train.out_dir, "final.json"), summary)
        return summaries


class StopSignal:
    """SIGTERM/SIGUSR1 noted by a handler, acted on by the loop at the next step boundary."""

    def __init__(self):
        self.signum = None

    @contextmanager
    def installed(self):
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        else:  # signal handlers can only be set from the main thread
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        self.signum = signum
