"""DeepSpeed checkpoints: their folder layout, completion markers, conversion to the universal format, the
consolidated export to one plain checkpoint file, and the check that makes them safe to hand to DeepSpeed.

A run trained through DeepSpeed writes <run>/ds_checkpoints/step_XXXXXXX/ (every rank's shards, written by
engine.save_checkpoint, plus rng_rank_NNNNN.pt). A checkpoint counts only once `complete.json` sits in its
folder: rank 0 writes it after every rank has returned from the save, and only then points DeepSpeed's
`latest` file at it. A run killed mid-save leaves a folder without the marker, which resume deletes.
Resuming under another world size converts a ZeRO checkpoint to DeepSpeed's universal format first
(ds_checkpoints/universal/step_XXXXXXX/).

DeepSpeed reads its own files with torch.load(weights_only=False), which would run any code a crafted
file carries. So before DeepSpeed (or its converters) reads a checkpoint folder, verify_safe() loads every
file in it with weights_only=True, allowing only the few DeepSpeed classes its files hold (DS_ALLOWED).

export_consolidated() turns a checkpoint into a plain checkpoint file (fasttrain.checkpoint.files: one state
dict; fp32 with the optimizer state, so the plain trainer resumes from it, or bf16 weights for evaluation);
the trainer exports the last checkpoint of a run to <run>/checkpoints/step_XXXXXXX.pt.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shutil

import torch

from fasttrain.checkpoint.files import (CheckpointError, read_json, rng_state, safe_load, save_atomic,
                                        write_json_atomic)
from fasttrain.config import config_from_dict
from fasttrain.model import GPT
from fasttrain.optim import make_optimizer

COMPLETE = "complete.json"  # written last into a checkpoint folder: the checkpoint is whole
_TAG = re.compile(r"^step_(\d{7,})$")


def ds_allowed() -> tuple:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files (model states, ZeRO shards)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, ZeroStageEnum, fragment_address


def verify_safe(folder: str) -> None:
    """Raise CheckpointError if any .pt file under `folder` would run code when DeepSpeed loads it."""
    allowed = ds_allowed()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
        safe_load(path, allowed=allowed, mmap=True)  # mmap: the tensors' bytes are not read


def ds_checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "ds_checkpoints")


def tag_name(step: int) -> str:
    return f"step_{step:07d}"


def read_marker(tag_dir: str) -> dict | None:
    """The completion record of a checkpoint folder, or None when it is not complete."""
    return read_json(os.path.join(tag_dir, COMPLETE))


def write_marker(tag_dir: str, record: dict) -> None:
    write_json_atomic(os.path.join(tag_dir, COMPLETE), record)


def list_ds_checkpoints(folder: str, complete: bool = True) -> list[tuple[int, str]]:
    """(step, folder) of the checkpoints in a ds_checkpoints folder, oldest first; only complete ones unless
    complete=False."""
    out = []
    for path in glob.glob(os.path.join(folder, "step_*")):
        m = _TAG.match(os.path.basename(path))
        if m and os.path.isdir(path) and (not complete or read_marker(path) is not None):
            out.append((int(m.group(1)), path))
    return sorted(out)


def point_latest(folder: str, tag: str) -> None:
    """DeepSpeed's own `latest` file (read by its tools), only ever pointing at a complete checkpoint."""
    tmp = os.path.join(folder, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(folder, "latest"))


def delete_checkpoint(tag_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tag_dir, COMPLETE))  # first: a half-deleted folder is never taken as complete
    shutil.rmtree(tag_dir, ignore_errors=True)


def prune_ds_checkpoints(run_dir: str, step: int, protected: set[int]) -> None:
    """Delete the checkpoints (and their universal conversions) older than `step`, except protected steps."""
    folder = ds_checkpoint_dir(run_dir)
    for old_step, old_dir in list_ds_checkpoints(folder, complete=False):
        if old_step < step and old_step not in protected:
            delete_checkpoint(old_dir)
            delete_checkpoint(os.path.join(folder, "universal", tag_name(old_step)))


def remove_incomplete(run_dir: str) -> None:
    """Delete what a run killed mid-save left: folders without their marker, scratch export folders."""
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
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint ({COMPLETE} is missing)")
    if read_marker(out_dir) is not None:
        return out_dir
    verify_safe(tag_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal(args)
    write_marker(out_dir, {**marker, "universal_from": os.path.basename(tag_dir)})
    return out_dir


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
    """Write a DeepSpeed checkpoint as one plain checkpoint file: {"model", "step", "config", "vocab_size"}
    plus, by default for fp32, "optimizer" (AdamW state in the plain trainer's parameter groups) and "rng",
    so the plain trainer resumes from it (not available from ZeRO stage 0 bf16 runs, whose export holds
    their bf16 weights). `source`: a run folder, its ds_checkpoints folder or one checkpoint folder (the
    newest complete one is taken). Returns out_path."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype: '{dtype}' is not one of fp32, bf16")
    if include_optimizer and dtype != "fp32":
        raise ValueError("the optimizer state goes only into an fp32 export (bf16 exports are for evaluation)")
    tag_dir = resolve_ds_checkpoint(source)
    verify_safe(tag_dir)
    marker = read_marker(tag_dir)
    cfg = config_from_dict(marker["config"], world_size=1)
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
        states = safe_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), allowed=ds_allowed())
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
        state["rng"] = safe_load(rng_file) if os.path.exists(rng_file) else rng_state()
    return save_atomic(state, out_path)


def _universal_tensor(folder: str, name: str, key: str) -> torch.Tensor:
    value = safe_load(os.path.join(folder, name, f"{key}.pt"), allowed=ds_allowed())
    return (value["param"] if isinstance(value, dict) else value).float()
