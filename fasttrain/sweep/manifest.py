"""A sweep folder's record of its runs: SWEEP_DIR/manifest.json, and the lock that gives it one writer.

manifest.json holds {"runs": {name: entry}} plus sweep-level fields (sweep_dir, the runs' order, created and
updated times). An entry holds a run's state (one of STATES; queued and cancelled for Slurm jobs), its start
and end times, attempts, the pack it trained in, its GPUs or Slurm job ids, and its final metrics. The file
is rewritten atomically after every change, so a crash at any moment leaves the previous or the new version,
never half of one.
"""
from __future__ import annotations

import datetime
import fcntl
import os

from fasttrain.checkpoint.files import read_json, write_json_atomic
from fasttrain.sweep.grid import SweepError

MANIFEST = "manifest.json"
STATES = ("pending", "queued", "running", "evaluating", "done", "failed", "interrupted", "cancelled")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


class Manifest:
    """SWEEP_DIR/manifest.json: {"runs": {name: entry}} plus sweep-level fields, saved atomically."""

    def __init__(self, sweep_dir: str):
        self.path = os.path.join(sweep_dir, MANIFEST)
        doc = read_json(self.path) if os.path.exists(self.path) else None
        if os.path.exists(self.path) and doc is None:
            raise SweepError(f"{self.path}: unreadable; the run folders are intact: move it away and re-run "
                             "the sweep to rebuild it")
        self.doc = doc or {"version": 1, "created": now_iso(), "runs": {}}

    @property
    def runs(self) -> dict:
        return self.doc["runs"]

    def entry(self, name: str) -> dict:
        return self.runs.setdefault(name, {"state": "pending", "attempts": 0})

    def update(self, name: str, **fields) -> None:
        self.entry(name).update(fields)
        self.save()

    def save(self) -> None:
        self.doc["updated"] = now_iso()
        write_json_atomic(self.path, self.doc)


class SweepLock:
    """An exclusive lock on the sweep folder: two sweeps never run the same folder at once."""

    def __init__(self, sweep_dir: str):
        self.path = os.path.join(sweep_dir, ".lock")
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise SweepError(f"{os.path.dirname(self.path)} is being run by another `fasttrain sweep` ({holder}); "
                             "wait for it or stop it first") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
