"""What a Slurm cluster says: the state of jobs (squeue, and sacct where the cluster keeps accounting), the GPUs
of its nodes, and whether a sweep's jobs fit them. Used by the Slurm executor and, to leave a run queued on
Slurm alone, by the local runner and the dry run."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from fasttrain.sweep.grid import RunSpec, SweepError, SweepSpec

def require_slurm() -> None:
    """sbatch on PATH and submitit installed, or a one-line error."""
    if shutil.which("sbatch") is None:
        raise SweepError("Slurm: sbatch is not on PATH; run the sweep on a Slurm login node, or drop --slurm "
                         "(and executor.slurm from the sweep file) to run it here")
    if importlib.util.find_spec("submitit") is None:
        raise SweepError("Slurm: the submitit package is missing: pip install 'fasttrain-repeat[slurm]'")


def _slurm_command(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SweepError(f"Slurm: `{' '.join(cmd[:2])} ...` failed: {e}") from None


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


@dataclass
class SlurmQueue:
    """What Slurm says of some jobs: those still in the queue, and (where accounting is kept) how the others
    ended."""
    states: dict = field(default_factory=dict)  # job id -> squeue state, jobs in the queue only
    where: dict = field(default_factory=dict)  # job id -> its nodes, or why it is pending
    ended: Optional[dict] = None  # job id -> sacct state; None when the cluster keeps no accounting

    @classmethod
    def query(cls, job_ids: list[str], accounting: bool = True) -> "SlurmQueue":
        queue = cls()
        if not job_ids:
            return queue
        ids = ",".join(sorted(set(job_ids)))
        out = _slurm_command(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%R"])
        if out.returncode != 0 and "Invalid job id" not in out.stderr:  # every job has left the queue
            raise SweepError(f"Slurm: squeue failed: {_one_line(out.stderr) or out.returncode}")
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job_id, state, where = (line.split("|") + ["", ""])[:3]
            queue.states[job_id.strip()] = state.strip()
            queue.where[job_id.strip()] = where.strip()
        if accounting:
            acct = _slurm_command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ids])
            if acct.returncode == 0:  # without accounting ("accounting storage is disabled") states come from
                queue.ended = {}      # squeue and the run folders alone
                for line in acct.stdout.splitlines():
                    job_id, _, state = line.partition("|")
                    queue.ended[job_id.strip()] = (state.split() or [""])[0]
        return queue


def _gpus_in_gres(gres: str) -> int:
    """GPUs of one node from sinfo's %G: 'gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2', '(null)'."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def largest_node_gpus(partition: Optional[str]) -> Optional[int]:
    """GPUs of the partition's largest node (None when sinfo does not say)."""
    out = _slurm_command(["sinfo", "-h", "-o", "%P|%G"])
    if out.returncode != 0:
        return None
    counts = []
    for line in out.stdout.splitlines():
        name, _, gres = line.partition("|")
        is_default = name.endswith("*")
        if (partition is None and is_default) or name.rstrip("*") == partition:
            counts.append(_gpus_in_gres(gres))
    return max(counts) if counts else None


def gpus_per_node(spec: SweepSpec, runs: list[RunSpec]) -> int:
    settings = spec.slurm
    if settings.gpus_per_run is not None:
        return settings.gpus_per_run
    return 0 if runs[0].config.train.device == "cpu" else spec.num_gpus // settings.nodes


def check_resources(spec: SweepSpec, runs: list[RunSpec]) -> None:
    settings = spec.slurm
    if settings.nodes > 1 and not spec.uses_deepspeed:
        raise SweepError(f"executor.slurm.nodes {settings.nodes}: only DeepSpeed runs span nodes; set num_gpus "
                         "(processes per run, over all nodes) or base deepspeed.zero_stage")
    gpus = gpus_per_node(spec, runs)
    if gpus > 0:
        largest = largest_node_gpus(settings.partition)
        where = f"partition {settings.partition}" if settings.partition else "the default partition"
        if largest is not None and gpus > largest:
            more = (f"; spread each run over nodes: nodes: {-(-gpus // largest)}, gpus_per_run: {largest}"
                    if largest else ": pick a GPU partition (executor.slurm.partition), or gpus_per_run: 0 "
                                     "(or base train.device: cpu) for CPU-only jobs")
            raise SweepError(f"executor.slurm.gpus_per_run {gpus}: the largest node of {where} has {largest} "
                             f"GPU(s){more}")
