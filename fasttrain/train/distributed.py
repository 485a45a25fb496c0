"""Data-parallel training through DeepSpeed ZeRO (stage 0-3): several GPUs, several nodes, or CPU processes.

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
exactly one rank, whatever the world size). Rank 0 writes metrics.jsonl and final.json like the plain trainer.

Checkpoints (at the plain trainer's checkpoint steps) go through engine.save_checkpoint into
<out_dir>/ds_checkpoints/step_XXXXXXX/. A checkpoint counts only once `complete.json` sits in its folder:
rank 0 writes it after every rank has returned from the save, and only then points DeepSpeed's `latest` file
at it. A run killed mid-save leaves a folder without the marker, which resume ignores and deletes.
Resuming under another world size converts the checkpoint to DeepSpeed's universal format first
(ds_checkpoints/universal/step_XXXXXXX/); stage 0 loads directly.

`export_consolidated` turns a checkpoint into a plain-trainer checkpoint file (one state dict; fp32 with the
optimizer state, so the plain trainer resumes from it, or bf16 weights for evaluation); the last checkpoint
of a run is exported to <out_dir>/checkpoints/step_XXXXXXX.pt automatically.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import socket
import sys

import torch

from fasttrain.config import Config, ConfigError, config_from_dict, seq_len
from fasttrain.data.sampler import open_training_stream
from fasttrain.train.checkpoint import checkpoint_path, list_checkpoints, save_atomic
from fasttrain.train.device import autocast_dtype, peak_flops
from fasttrain.train.loop import check_finite, protected_steps, run_steps
from fasttrain.train.metrics import MetricsLogger, step_record, write_json_atomic
from fasttrain.train.trainer import (
    build_model,
    check_same_config,
    evaluate_during_training,
    load_saved_config,
    make_optimizer,
    rng_state,
    set_rng_state,
    write_final,
)

COMPLETE = "complete.json"  # written last into a checkpoint folder: the checkpoint is whole
_TAG = re.compile(r"^step_(\d{7,})$")

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
def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(sequences per forward pass per rank, gradient accumulation steps) for this world size."""
    t = cfg.train
    if t.global_batch % world_size:
        raise ConfigError(f"train.global_batch: {t.global_batch} is not divisible by the {world_size} processes; "
                          "use a multiple of the world size")
    micro = t.micro_batch or t.global_batch // world_size
    if t.global_batch % (world_size * micro):
        raise ConfigError(f"train.micro_batch: {t.global_batch} (train.global_batch) is not divisible by "
                          f"{world_size} processes x {micro} (train.micro_batch); choose a micro_batch that divides "
                          f"{t.global_batch // world_size}")
    return micro, t.global_batch // (world_size * micro)


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


def _init_distributed(device_name: str):
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


def _barrier():
    torch.distributed.barrier()


# ---- checkpoints ------------------------------------------------------------------------------
def ds_checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "ds_checkpoints")


def _tag(step: int) -> str:
    return f"step_{step:07d}"


def read_marker(tag_dir: str) -> dict | None:
    """The completion record of a checkpoint folder, or None when it is not complete."""
    try:
        with open(os.path.join(tag_dir, COMPLETE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def list_ds_checkpoints(folder: str, complete: bool = True) -> list[tuple[int, str]]:
    """(step, folder) of the checkpoints in a ds_checkpoints folder, oldest first; only complete ones unless
    complete=False."""
    out = []
    for path in glob.glob(os.path.join(folder, "step_*")):
        m = _TAG.match(os.path.basename(path))
        if m and os.path.isdir(path) and (not complete or read_marker(path) is not None):
            out.append((int(m.group(1)), path))
    return sorted(out)


def _write_marker(tag_dir: str, record: dict) -> None:
    write_json_atomic(os.path.join(tag_dir, COMPLETE), record)


def _point_latest(folder: str, tag: str) -> None:
    """DeepSpeed's own `latest` file (read by its tools), only ever pointing at a complete checkpoint."""
    tmp = os.path.join(folder, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(folder, "latest"))


def _delete_checkpoint(tag_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tag_dir, COMPLETE))  # first: a half-deleted folder is never taken as complete
    shutil.rmtree(tag_dir, ignore_errors=True)


def _save(engine, run_dir: str, step: int, record: dict, rank: int, protected: set[int], keep: bool) -> None:
    """Every rank saves its part; rank 0 then marks the checkpoint complete and prunes older ones."""
    folder = ds_checkpoint_dir(run_dir)
    tag_dir = os.path.join(folder, _tag(step))
    os.makedirs(tag_dir, exist_ok=True)
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank_{rank:05d}.pt"))
    engine.save_checkpoint(folder, tag=_tag(step), client_state={"step": step}, save_latest=False)
    # save_checkpoint ends with a barrier: every rank's files are written.
    if rank == 0:
        _write_marker(tag_dir, record)
        _point_latest(folder, _tag(step))
        if not keep:
            for old_step, old_dir in list_ds_checkpoints(folder, complete=False):
                if old_step < step and old_step not in protected:
                    _delete_checkpoint(old_dir)
                    _delete_checkpoint(os.path.join(folder, "universal", _tag(old_step)))


def _remove_incomplete(run_dir: str) -> None:
    folder = ds_checkpoint_dir(run_dir)
    for base in (folder, os.path.join(folder, "universal")):
        for _, tag_dir in list_ds_checkpoints(base, complete=False):
            if read_marker(tag_dir) is None:
                shutil.rmtree(tag_dir, ignore_errors=True)
    for tmp in glob.glob(os.path.join(folder, ".export-*")):
        shutil.rmtree(tmp, ignore_errors=True)


def to_universal(tag_dir: str, out_dir: str) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (one folder per parameter holding fp32,
    exp_avg and exp_avg_sq), which loads under any world size; returns out_dir."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    marker = read_marker(tag_dir)
    if marker is None:
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint ({COMPLETE} is missing)")
    if read_marker(out_dir) is not None:
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal(args)
    _write_marker(out_dir, {**marker, "universal_from": os.path.basename(tag_dir)})
    return out_dir


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


# ---- training ---------------------------------------------------------------------------------
def train_distributed(cfg: Config, resume: bool = False) -> dict:
    """Run (or resume) the training described by cfg on every process of the launch; returns the final
    metrics (on every rank)."""
    import deepspeed

    t = cfg.train
    run_dir = t.out_dir
    device = _init_distributed(t.device)
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    bf16 = autocast_dtype(t.precision, device) is not None  # DeepSpeed bf16: bf16 weights, fp32 master copy
    ds_config = deepspeed_config(cfg, world, bf16)
    micro, accum = batch_layout(cfg, world)
    T = seq_len(cfg)
    folder = ds_checkpoint_dir(run_dir)

    if not resume and (list_checkpoints(run_dir) or list_ds_checkpoints(folder, complete=False)):
        raise ConfigError(f"train.out_dir: {run_dir} already holds checkpoints; pass --resume to continue it "
                          "or choose another train.out_dir")
    dataset, stream = open_training_stream(cfg)  # validates data and schedule before anything is written
    model = build_model(cfg, dataset.vocab_size)
    flops_per_step = model.flops_per_token(T) * t.global_batch * T  # before ZeRO-3 partitions the parameters
    if rank > 0:  # rank 0 keeps the plain trainer's random stream; the others draw their own dropout masks
        torch.manual_seed(cfg.train.seed * 1_000_003 + rank)
    optimizer = make_optimizer(model, cfg, device)

    start_step, found = 0, None
    if resume:
        if os.path.exists(os.path.join(run_dir, "config.yaml")):
            check_same_config(config_from_dict(load_saved_config(run_dir)).to_dict(), cfg, run_dir)
        if rank == 0:
            _remove_incomplete(run_dir)
        _barrier()
        complete = list_ds_checkpoints(folder)
        if complete:
            found = complete[-1]
        elif list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} holds plain-trainer checkpoints only: continue it with the plain trainer "
                              "(one process, deepspeed.zero_stage=0)")
    load_dir = folder
    if found is not None:
        marker = read_marker(found[1])
        if marker["world_size"] != world and cfg.deepspeed.zero_stage > 0:
            load_dir = os.path.join(folder, "universal")
            if rank == 0:
                print(f"resuming a {marker['world_size']}-process checkpoint with {world} processes: converting "
                      f"{found[1]} to DeepSpeed's universal format", flush=True)
                to_universal(found[1], os.path.join(load_dir, _tag(found[0])))
            _barrier()
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if t.compile:  # compiles the module in place (nn.Module.compile): state dict names are unchanged
        engine.compile(compile_kwargs={} if t.compile_mode == "default" else {"mode": t.compile_mode})
    reapply_hyperparameters = _base_optimizer_fixups(optimizer)
    if found is not None:
        step, tag_dir = found
        path, client_state = engine.load_checkpoint(load_dir, tag=_tag(step), load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if path is None or client_state.get("step") != step:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        reapply_hyperparameters()
        rng_file = os.path.join(tag_dir, f"rng_rank_{rank:05d}.pt")
        if read_marker(tag_dir)["world_size"] == world and os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        start_step = step
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        cfg.save(os.path.join(run_dir, "config.yaml"))
    record = {"world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "bf16": bf16,
              "vocab_size": engine.module.vocab_size, "config": cfg.to_dict()}

    peak = peak_flops(device)
    logger = MetricsLogger(run_dir, t.steps, start_step, tensorboard=t.tensorboard, enabled=rank == 0)
    protected = protected_steps(cfg)
    grad_norm_from_engine = cfg.deepspeed.zero_stage > 0 or bf16  # plain fp32 data parallel reports none
    engine.train()
    if start_step < t.steps:
        batches = stream.iter_batches(start_step, t.steps - start_step, t.global_batch, rank=rank, world_size=world,
                                      prefetch=0)  # as the plain trainer: in-loop reads measured faster

    def step(lr, logging):
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = next(batches).to(device, non_blocking=True)
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for i, chunk in enumerate(tokens.split(micro)):
            loss = engine(chunk[:, :-1], chunk[:, 1:])
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps and averages over ranks
            loss_sum += loss.detach().float()
            if i == accum - 1 and logging and not grad_norm_from_engine:  # averaged over ranks by now
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()
                                                           if p.grad is not None])
            engine.step()  # called after every micro-batch; the weights change after the last one
        return loss_sum / accum, grad_norm

    def log(done, lr, loss, grad_norm, steps_timed, elapsed):
        dist.all_reduce(loss)
        loss_value = loss.item() / world
        check_finite(loss_value, done)
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        logger.log(step_record(done, t.global_batch * T, loss_value, lr, grad_norm, steps_timed, elapsed,
                               flops_per_step, peak * world if peak else None))

    def evaluate(done):
        summary = {"step": done, **_evaluate(engine, dataset, cfg, device, micro)}
        logger.log(summary)
        engine.train()
        return summary

    def checkpoint(done):
        _save(engine, run_dir, done, {"step": done, **record}, rank, protected, t.keep_checkpoints)

    summary = run_steps(cfg, start_step, step, log, evaluate, checkpoint)
    logger.close()
    summary = write_final(run_dir, summary, t.steps, lambda: _evaluate(engine, dataset, cfg, device, micro),
                          write=rank == 0)  # every rank evaluates (ZeRO-3 gathers the weights); rank 0 writes
    if rank == 0:
        export_path = checkpoint_path(run_dir, t.steps)
        if not os.path.exists(export_path):
            export_consolidated(os.path.join(folder, _tag(t.steps)), export_path, dtype="fp32")
    _barrier()
    return summary


def _evaluate(engine, dataset, cfg: Config, device, micro: int) -> dict:
    """Held-out loss on every rank (under ZeRO-3 a forward pass needs all ranks); rank 0 logs it."""
    return evaluate_during_training(engine.module, dataset, cfg, device, None, batch_size=micro)


# ---- export -----------------------------------------------------------------------------------
def resolve_ds_checkpoint(source: str) -> str:
    """The checkpoint folder meant by `source`: a checkpoint folder itself, or the newest complete one of a
    run folder or of its ds_checkpoints folder."""
    if os.path.isfile(os.path.join(source, COMPLETE)):
        return source
    if _TAG.match(os.path.basename(os.path.normpath(source))) and os.path.isdir(source):
        raise FileNotFoundError(f"{source} is not a complete checkpoint ({COMPLETE} is missing: it was being "
                                "written when the run stopped)")
    for folder in (ds_checkpoint_dir(source), source):
        complete = list_ds_checkpoints(folder)
        if complete:
            return complete[-1][1]
    raise FileNotFoundError(f"{source}: no complete DeepSpeed checkpoint found (expected a run folder, its "
                            f"ds_checkpoints folder, or a step_XXXXXXX folder holding {COMPLETE})")


def export_consolidated(source: str, out_path: str, dtype: str = "fp32", include_optimizer: bool | None = None) -> str:
    """Write a DeepSpeed checkpoint as one plain-trainer checkpoint file: {"model", "step", "config",
    "vocab_size"} plus, by default for fp32, "optimizer" (AdamW state in the plain trainer's parameter
    groups) and "rng", so the plain trainer resumes from it (not available from ZeRO stage 0 bf16 runs,
    whose export holds their bf16 weights). The plain trainer, the evaluations and
    fasttrain.load_model read it. `source`: a run folder, its ds_checkpoints folder or one checkpoint
    folder (the newest complete one is taken). Returns out_path."""
    from fasttrain.model import GPT

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype: '{dtype}' is not one of fp32, bf16")
    if include_optimizer and dtype != "fp32":
        raise ValueError("the optimizer state goes only into an fp32 export (bf16 exports are for evaluation)")
    tag_dir = resolve_ds_checkpoint(source)
    marker = read_marker(tag_dir)
    cfg = config_from_dict(marker["config"])
    step, vocab = marker["step"], marker["vocab_size"]
    partitioned = bool(glob.glob(os.path.join(tag_dir, "*optim_states.pt")))  # ZeRO (or bf16) optimizer shards
    stage0_bf16 = not partitioned and marker.get("bf16")  # DeepSpeed's own mixed-precision optimizer format
    if include_optimizer and stage0_bf16:
        raise ValueError(f"{tag_dir}: a ZeRO stage 0 bf16 checkpoint keeps DeepSpeed's own optimizer format; "
                         "export the weights only (or train bf16 runs with deepspeed.zero_stage >= 1)")
    if include_optimizer is None:
        include_optimizer = dtype == "fp32" and not stage0_bf16

    optimizer_state = None
    if partitioned:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
        weights = {k: v.float().contiguous() for k, v in weights.items()}
    else:  # stage 0: the whole model (and optimizer) lies in the model-states file; bf16 there: bf16 weights
        states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        weights = {k: v.float() for k, v in states["module"].items()}
        if include_optimizer:
            optimizer_state = states["optimizer"]

    if include_optimizer and optimizer_state is None:
        with torch.device("meta"):
            model = GPT.from_config(cfg.model, vocab)
        model.load_state_dict(weights, assign=True)
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
        scratch = os.path.join(os.path.dirname(tag_dir), f".export-{os.path.basename(tag_dir)}-{os.getpid()}")
        try:  # (the converter writes a `latest_universal` file beside its output: keep it in scratch too)
            universal = os.path.join(to_universal(tag_dir, os.path.join(scratch, "universal")), "zero")
            for name, p in model.named_parameters():
                optimizer.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": _universal_tensor(universal, name, "exp_avg").view_as(p).clone(),
                    "exp_avg_sq": _universal_tensor(universal, name, "exp_avg_sq").view_as(p).clone(),
                }
            optimizer_state = optimizer.state_dict()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    if dtype == "bf16":
        weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    state = {"model": weights, "step": step, "config": cfg.to_dict(), "vocab_size": vocab}
    if include_optimizer:
        state["optimizer"] = optimizer_state
        rng_file = os.path.join(tag_dir, "rng_rank_00000.pt")
        state["rng"] = torch.load(rng_file, weights_only=False) if os.path.exists(rng_file) else rng_state()
    return save_atomic(state, out_path)


def _universal_tensor(folder: str, name: str, key: str) -> torch.Tensor:
    value = torch.load(os.path.join(folder, name, f"{key}.pt"), map_location="cpu", weights_only=False)
    return (value["param"] if isinstance(value, dict) else value).float()


def main(argv: list[str] | None = None) -> int:
    """python -m fasttrain.train.distributed export RUN_OR_CHECKPOINT OUT.pt [--dtype bf16]"""
    parser = argparse.ArgumentParser(prog="python -m fasttrain.train.distributed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write a DeepSpeed checkpoint as one plain-trainer checkpoint file")
    p.add_argument("source", help="run folder, its ds_checkpoints folder, or a step_XXXXXXX checkpoint folder")
    p.add_argument("out", help="output .pt file")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no-optimizer", action="store_true", help="weights only (fp32 exports include the optimizer)")
    args = parser.parse_args(argv)
    try:
        path = export_consolidated(args.source, args.out, args.dtype, False if args.no_optimizer else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
