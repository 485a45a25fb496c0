"""What runs inside a Slurm job of a sweep: one call of run_job per task (srun starts one task per process of
the run, i.e. per GPU, on every node of the job).

Each task starts `python -m fasttrain.cli train ... --resume` as a child process with the distributed
environment taken from Slurm (RANK, WORLD_SIZE, LOCAL_RANK from the task, MASTER_ADDR the first node of the
job, MASTER_PORT from the job id), so a DeepSpeed run spans the job's nodes; task 0 then runs the pack's
evaluation. Task 0 writes RUN/job.json into every run folder of the job (job id, host, phase, exit status), the
record the submitting side reads back when Slurm's accounting is not there.

Signals: Slurm delivers a signal for the job (`scancel --signal=USR1`, or the USR1 that sbatch --signal sends
before the time limit, or the SIGTERM of a cancel or a preemption) to every process of the job step, the trainer
included, so the trainer hears it directly; the task only notes it. A trainer that stopped at a checkpoint
exits with REQUEUE_EXIT_CODE; after a USR1, task 0 then requeues the job (`scontrol requeue`), which starts again
and resumes. After a SIGTERM the job is left to Slurm: it was cancelled (the sweep resubmits it next time), or
preempted (Slurm requeues it itself when the partition says so).

The job's command is submitit's own (`python -u -m submitit.core._submit FOLDER`) run through this module's
main(): submitit hands the job its work as a pickle it unpickles with pickle.load, which would run any code a
file planted in the sweep folder carried. main() first reads that pickle with an unpickler that knows only the
two names a genuine one holds (submitit's DelayedSubmission and run_job below), and refuses anything else.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from fasttrain.checkpoint.files import write_json_atomic
from fasttrain.sweep.manifest import now_iso
from fasttrain.train import REQUEUE_EXIT_CODE

JOB_RECORD = "job.json"


class JobFailed(RuntimeError):
    """Raised so that Slurm records the job as failed (the message lands in the job's log)."""


def master_port(job_id: str) -> int:
    """A port every task of the job derives alike, different between jobs that share a node."""
    return 20000 + int(job_id) % 20000


def distributed_env(task) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT of this task (submitit's JobEnvironment)."""
    if task.num_tasks == 1:
        return {}
    return {"RANK": str(task.global_rank), "WORLD_SIZE": str(task.num_tasks), "LOCAL_RANK": str(task.local_rank),
            "LOCAL_WORLD_SIZE": str(task.num_tasks // task.num_nodes), "MASTER_ADDR": task.hostnames[0],
            "MASTER_PORT": str(master_port(task.raw_job_id))}


class SignalNotes:
    """Remembers the signals this task received; the trainer (same job step) receives them too."""

    def __init__(self):
        self.received: list[str] = []
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.note)

    def note(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)

    @property
    def terminated(self) -> bool:
        return "SIGTERM" in self.received


def run_phase(command: list[str], log_path: str, env: dict, header: str) -> int:
    with open(log_path, "a") as log:
        log.write(f"\n# {now_iso()} {header} $ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:  # a poll loop, not proc.wait(): the signal handler runs between iterations
            rc = proc.poll()
            if rc is not None:
                return rc
            time.sleep(0.5)


def run_job(job: dict) -> Optional[int]:
    """One task of a sweep job. job: {"run_dirs": [...], "train": argv or None, "evaluate": argv or None}."""
    import submitit

    task = submitit.JobEnvironment()
    notes = SignalNotes()
    rank, run_dirs = task.global_rank, job["run_dirs"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **distributed_env(task))
    env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    record = {"job_id": task.job_id, "host": socket.gethostname(), "started": now_iso(),
              "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "phase": None, "returncode": None}
    header = f"slurm job {task.job_id} on {record['host']}" + (
        f" (rank {rank} of {task.num_tasks})" if task.num_tasks > 1 else "")

    def write_record(**fields) -> None:
        if rank == 0:
            record.update(fields)
            for run_dir in run_dirs:
                write_json_atomic(os.path.join(run_dir, JOB_RECORD), record)

    def log_path(name: str) -> str:
        return os.path.join(run_dirs[0], name if rank == 0 else name.replace(".log", f".rank{rank}.log"))

    def note_others(name: str) -> None:
        for run_dir in run_dirs[1:]:
            with open(os.path.join(run_dir, name), "a") as log:
                log.write(f"\n# {now_iso()} {header}: with {len(run_dirs) - 1} other run(s) in one process: its "
                          f"log is {log_path(name)}\n")

    if job["train"]:
        write_record(phase="training")
        if rank == 0:
            note_others("train.log")
        rc = run_phase(job["train"], log_path("train.log"), env, header)
        if rc == REQUEUE_EXIT_CODE:
            requeue = rank == 0 and not notes.terminated
            write_record(returncode=rc, finished=now_iso(), signals=notes.received, requeued=requeue)
            if requeue:  # the time limit is near, or someone asked for it: come back and resume
                subprocess.run(["scontrol", "requeue", task.job_id], check=False)
            return rc
        if rc != 0:
            write_record(returncode=rc, finished=now_iso(), signals=notes.received)
            raise JobFailed(f"training exited with {rc}: see {log_path('train.log')}")
    if rank != 0 or not job["evaluate"]:
        write_record(returncode=0, finished=now_iso(), signals=notes.received)
        return 0
    write_record(phase="evaluation")
    note_others("eval.log")
    rc = run_phase(job["evaluate"], log_path("eval.log"), env, header)
    write_record(returncode=rc, finished=now_iso(), signals=notes.received)
    if rc != 0:
        raise JobFailed(f"evaluation exited with {rc}: see {log_path('eval.log')}")
    return 0


def read_job_record(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, JOB_RECORD)) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# ---- the job's entry point -------------------------------------------------------------------------------
# What the pickle submitit writes for a job holds (cloudpickle of DelayedSubmission(run_job, payload)); the
# payload itself is plain data (lists, dicts, strings).
SUBMITTED_NAMES = {("submitit.core.utils", "DelayedSubmission"), ("fasttrain.sweep.slurm_job", "run_job")}


class _SubmittedJobUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SUBMITTED_NAMES:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def check_submitted(path: str) -> None:
    """Raise JobFailed unless the job pickle at `path` names only what a genuine one holds; nothing runs."""
    try:
        with open(path, "rb") as f:
            _SubmittedJobUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise JobFailed(f"{path}: refused: the job file names {e}, which a job of this sweep never holds; "
                        "submit the sweep again") from None


def main(argv: list[str]) -> None:
    """`python -m fasttrain.sweep.slurm_job -u -m submitit.core._submit FOLDER` (the executor's `python` is
    `python -m fasttrain.sweep.slurm_job`): check this job's pickle, then run submitit's job as it would."""
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.submission import submitit_main

    folder = argv[-1]
    os.environ["SUBMITIT_FOLDER"] = folder
    path = JobEnvironment().paths.submitted_pickle
    for _ in range(60):  # the submitting side may still be writing it (submitit waits as long)
        if path.exists():
            break
        time.sleep(1)
    if path.exists():  # else submitit fails on its own, naming the missing file
        check_submitted(str(path))
    sys.stdout.reconfigure(line_buffering=True)  # what -u gives submitit's own command
    sys.argv = ["submitit.core._submit", folder]
    submitit_main()


if __name__ == "__main__":
    main(sys.argv[1:])
