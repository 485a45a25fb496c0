"""Checkpoint files: where they lie, how they are written (atomically), and how they are read (safely).

A run folder holds checkpoints/step_0000100.pt, ... ; the newest one that loads is the resume point. A
checkpoint is a dict of tensors and plain values only:

    {"model": GPT state dict, "optimizer": AdamW state dict, "step": int, "rng": {"torch": ByteTensor,
     "cuda": [ByteTensor, ...]}, "config": the run config as a dict, "vocab_size": int}

so it loads with torch.load(weights_only=True), which runs no code. A file that needs more (a pickled
Python object, which loading would have to call) is refused with CheckpointError before anything in it
runs. Every file is written to a temporary name, fsynced and renamed, so a kill never leaves half of one.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import sys

import torch

_NAME = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe to load, or does not match what it is loaded into."""


class UnsafeCheckpoint(CheckpointError):
    """A file that would run code to load: refused, and never skipped for an older checkpoint."""


# ---- atomic files ---------------------------------------------------------------------------------
def write_json_atomic(path: str, doc: dict) -> None:
    """Write a JSON document so that `path` always holds a complete one: temporary file, fsync, rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    """A JSON document, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def save_atomic(state: dict, path: str) -> str:
    """torch.save to a temporary file, fsync, rename: the file at `path` is always complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---- a run's checkpoints ----------------------------------------------------------------------------
def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:07d}.pt")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first (temporary files are ignored)."""
    out = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")):
        m = _NAME.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(run_dir: str, step: int, state: dict) -> str:
    return save_atomic(state, checkpoint_path(run_dir, step))


def prune_checkpoints(run_dir: str, step: int, protected: set[int] = frozenset()) -> None:
    """Delete the checkpoints older than `step`, except the protected steps."""
    for old_step, old_path in list_checkpoints(run_dir):
        if old_step < step and old_step not in protected:
            os.remove(old_path)


def remove_partial_files(run_dir: str) -> None:
    """Delete the temporary files of writes that a kill interrupted (only their writer could finish them)."""
    for path in glob.glob(os.path.join(run_dir, "*.tmp-*")) + glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp-*")):
        os.remove(path)


def rng_state() -> dict:
    """The random generators' states, as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- reading, safely --------------------------------------------------------------------------------
def safe_load(path: str, map_location="cpu", allowed: tuple = (), mmap: bool = False):
    """torch.load that runs no code: tensors, plain values and the classes named in `allowed` only.

    A file holding anything else raises CheckpointError naming what it holds; nothing in it has run. A file
    that is damaged or not a PyTorch file raises CheckpointError too, saying so."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        names = unsafe_globals(path, allowed) if isinstance(e, pickle.UnpicklingError) else []
        if names:
            raise UnsafeCheckpoint(unsafe(path, names)) from None
        raise CheckpointError(unreadable(path, e)) from None


def unsafe_globals(path: str, allowed: tuple = ()) -> list[str]:
    """The Python objects (module.name) a checkpoint file's pickle would call, beyond the allowed ones."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a readable archive: nothing it names can be told
        return []
    allowed_names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    return [n for n in names if n not in allowed_names]


def unsafe(path: str, names: list[str]) -> str:
    return (f"{path}: refused: loading it would run Python code it names ({', '.join(names[:3])}); fasttrain reads "
            "only tensors and plain values. If you trust the file, load it in Python yourself and re-save its "
            "state dict with torch.save({'model': model.state_dict()}, path)")


def unreadable(path: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    if first.startswith("Weights only load failed"):  # torch's advice there (weights_only=False) is unsafe
        first = "not a pickle of tensors and plain values"
    return (f"{path}: cannot read the checkpoint ({type(e).__name__}: {first}); the file is truncated or is "
            "not a PyTorch checkpoint")


_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed / DDP wrappers, torch.compile


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents, on the CPU; a bare state dict (e.g. an exported one) is wrapped as
    {"model": ...}, and wrapper prefixes are stripped from its keys."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a fasttrain checkpoint (a dict with 'model')")
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {"model": ckpt}
        else:
            raise CheckpointError(f"{path}: has no 'model' entry (keys: {', '.join(map(str, list(ckpt)[:8]))}); "
                                  "not a fasttrain checkpoint")
    state = {}
    for key, value in ckpt["model"].items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    ckpt["model"] = state
    return ckpt


def resolve_checkpoint(path: str) -> list[str]:
    """A .pt file -> [it]; a run folder (or its checkpoints/ folder) -> its checkpoints, newest first."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")
    if not os.path.isdir(path):
        return [path]
    found = list_checkpoints(path) or list_checkpoints(os.path.dirname(os.path.abspath(path)))
    if not found:
        raise FileNotFoundError(f"{path}: holds no checkpoints (expected {os.path.join(path, 'checkpoints')}"
                                "/step_*.pt); train it first or pass a .pt file")
    return [p for _, p in reversed(found)]


def read_newest(path: str) -> tuple[dict, str]:
    """(contents, path) of the newest readable checkpoint among resolve_checkpoint(path). A damaged file is
    skipped with a warning when an older one exists; an unsafe one never is."""
    candidates = resolve_checkpoint(path)
    errors = []
    for candidate in candidates:
        try:
            return read_checkpoint(candidate), candidate
        except CheckpointError as e:
            if len(candidates) == 1 or isinstance(e, UnsafeCheckpoint):
                raise
            errors.append(str(e))
            print(f"warning: skipping unreadable checkpoint {candidate}", file=sys.stderr)
    raise CheckpointError(f"{path}: no readable checkpoint ({errors[0]})")
