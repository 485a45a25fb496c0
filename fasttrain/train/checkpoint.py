"""Atomic checkpoints: written to a temporary file and renamed, so a kill never leaves a half-written one.

A run folder holds checkpoints/step_0000100.pt, ... ; the newest one that loads is the resume point.
"""
from __future__ import annotations

import glob
import os
import re

import torch

_NAME = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:07d}.pt")


def save_checkpoint(run_dir: str, step: int, state: dict, keep: bool = False, protected: set[int] = frozenset()) -> str:
    """Write state atomically as the checkpoint of `step`; unless keep, delete older unprotected ones."""
    path = save_atomic(state, checkpoint_path(run_dir, step))
    if not keep:
        prune_checkpoints(run_dir, step, protected)
    return path


def save_atomic(state: dict, path: str) -> str:
    """torch.save to a temporary file, fsync, rename: the file at `path` is always complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def prune_checkpoints(run_dir: str, step: int, protected: set[int] = frozenset()) -> None:
    """Delete the checkpoints older than `step`, except the protected steps."""
    for old_step, old_path in list_checkpoints(run_dir):
        if old_step < step and old_step not in protected:
            os.remove(old_path)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first (temporary files are ignored)."""
    out = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")):
        m = _NAME.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def load_latest_checkpoint(run_dir: str, map_location="cpu") -> dict | None:
    """The newest checkpoint that loads, or None when there is none."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # a file damaged after it was written: fall back to the previous one
            print(f"warning: skipping unreadable checkpoint {path}: {e}")
    return None
