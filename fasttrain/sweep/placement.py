"""Which GPUs of this machine each job of a local sweep gets, and how many jobs run at once.

A job (a run, or a pack) gets its own device(s) through CUDA_VISIBLE_DEVICES: one GPU, or `num_gpus` of them
for a run that goes through the deepspeed launcher. Jobs start while enough GPUs are free, up to --jobs at once
(default: as many as the GPUs hold), so DeepSpeed runs go side by side on disjoint sets. On a machine without
a GPU, or when the runs ask for train.device: cpu, nothing is placed and --jobs alone says how many run at once.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fasttrain.sweep.grid import SweepError, SweepSpec


def gpu_count() -> int:
    """The number of CUDA devices this process sees (the hook the tests replace to fake a multi-GPU node)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus(device: str = "auto") -> list[str]:
    """The GPUs jobs may be placed on, as CUDA_VISIBLE_DEVICES entries. When the sweep itself runs under
    CUDA_VISIBLE_DEVICES, its entries (ids or UUIDs) are what a child's CUDA_VISIBLE_DEVICES must name."""
    if device == "cpu":
        return []
    count = gpu_count()
    if count == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def gpus_per_job(spec: SweepSpec) -> int:
    """Devices one job takes: num_gpus for runs under the deepspeed launcher, else one (a pack included)."""
    return spec.num_gpus if spec.uses_deepspeed else 1


def jobs_at_once(spec: SweepSpec, gpus: list[str], jobs: Optional[int]) -> tuple[int, Optional[str]]:
    """How many jobs run at once, and a note when --jobs was lowered."""
    if jobs is not None and jobs < 1:
        raise SweepError(f"--jobs {jobs}: must be at least 1")
    if not gpus:
        if spec.uses_deepspeed and (jobs or 1) > 1:
            return 1, (f"note: runs use the deepspeed launcher on {spec.num_gpus} GPU(s): running them one at a "
                       "time")
        return jobs or 1, None
    need = gpus_per_job(spec)
    if need > len(gpus):
        raise SweepError(f"num_gpus {need}: each run needs {need} GPUs but this machine shows {len(gpus)} "
                         f"(CUDA_VISIBLE_DEVICES={','.join(gpus)}); lower num_gpus or run the sweep on Slurm")
    fit = len(gpus) // need
    if jobs is None or jobs == fit:
        return fit, None
    if jobs > fit:
        what = "GPU" if need == 1 else f"set of {need} GPUs"
        return fit, (f"note: --jobs {jobs}: {len(gpus)} GPU(s) hold {fit} job(s) at once, one per {what}; "
                     "pack small runs (--pack K) to fill a GPU")
    return jobs, None


class DevicePool:
    """The GPUs not held by a running job; a job takes the lowest free ones."""

    def __init__(self, gpus: list[str]):
        self.order = {d: i for i, d in enumerate(gpus)}
        self.free = list(gpus)

    def take(self, n: int) -> Optional[list[str]]:
        if n > len(self.free):
            return None
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def give(self, devices: list[str]) -> None:
        self.free = sorted(self.free + list(devices), key=self.order.__getitem__)


def job_order(costs: list[float], at_once: int) -> list[int]:
    """The order jobs start in: with several at once the costliest first, so that the last ones finish close
    together; one at a time, the sweep's order."""
    indices = list(range(len(costs)))
    return sorted(indices, key=lambda i: -costs[i]) if at_once > 1 else indices


def simulate(durations: list[float], costs: list[float], at_once: int, gpus: list[str],
             need: int) -> tuple[list[dict], float]:
    """Replay the local executor on estimated durations: each job's devices, start and end (seconds from the
    start of the sweep), and the wall time of the whole."""
    pool = DevicePool(gpus) if gpus else None
    queue = job_order(costs, at_once)
    placed: list[Optional[dict]] = [None] * len(durations)
    running: list[tuple[float, int]] = []  # (end, job)
    now = 0.0
    while queue or running:
        while queue and len(running) < at_once:
            devices = pool.take(need) if pool else []
            if devices is None:
                break
            job = queue.pop(0)
            placed[job] = {"devices": devices, "start": now, "end": now + durations[job]}
            running.append((now + durations[job], job))
        running.sort()
        now, job = running.pop(0)
        if pool:
            pool.give(placed[job]["devices"])
    return placed, now
