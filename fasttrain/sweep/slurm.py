"""`fasttrain sweep --slurm` (or `executor: {slurm: ...}` in the sweep file): each job of the sweep (a run, or
a pack of runs) becomes one Slurm job, submitted through submitit, jobs of one submission as one job array.

A job has one task per process of its run (num_gpus of them, over `nodes` nodes; one for a plain run or a
pack); fasttrain/sweep/slurm_job.py is what each task runs. The manifest records every run's job id. Every
`fasttrain sweep` of the sweep first reconciles each run with Slurm and with its run folder:

    in the queue (squeue)                      queued / running: never submitted again
    gone, and its run folder finished          done
    gone after stopping at a checkpoint        interrupted: submitted again (it resumes)
    gone after `fasttrain sweep --cancel`      cancelled: submitted again
    gone otherwise (failed, or lost)           failed: submitted again while its failures <= retries

Where a job went is read from squeue, from sacct when the cluster keeps accounting (its state: FAILED,
TIMEOUT, OUT_OF_MEMORY, NODE_FAIL...), and from the record the job leaves in its run folders (RUN/job.json: exit
status and phase), so clusters without accounting (sacct fails) work the same. `--status` prints the
reconciled table without changing anything, `--cancel` cancels the sweep's jobs, `--wait` follows them
(resubmitting as above) until every run is done or out of retries.

The job's Python function reaches the node pickled by submitit in SWEEP/slurm/ (a reference to run_job and
plain lists of strings); nothing here reads a pickle back: states come from Slurm and the run folders.
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

from fasttrain.checkpoint.files import read_json
from fasttrain.sweep.cluster import require_slurm, _slurm_command, _one_line, SlurmQueue, gpus_per_node, check_resources
from fasttrain.sweep.grid import RunSpec, SlurmSettings, SweepError, SweepSpec, expand
from fasttrain.sweep.manifest import Manifest, SweepLock, now_iso
from fasttrain.sweep.runner import (SweepResult, _describe_final, _tail, eval_command,
                                    is_evaluated, last_logged_step, newest_checkpoint_step, plan_jobs, record_runs,
                                    resolve_pack, trainer_args)
from fasttrain.sweep.slurm_job import read_job_record, run_job
from fasttrain.train import REQUEUE_EXIT_CODE

RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING")
WAIT_POLL_S = 10.0  # --wait: seconds between two looks at the queue


# ---- submitting ----------------------------------------------------------------------------------------
def sbatch_parameters(spec: SweepSpec, runs: list[RunSpec], sweep_dir: str) -> dict:
    """submitit's SlurmExecutor parameters of every job of the sweep."""
    settings = spec.slurm
    gpus = gpus_per_node(spec, runs)
    params = {
        "job_name": f"fasttrain-{os.path.basename(sweep_dir)}",
        "nodes": settings.nodes,
        "ntasks_per_node": spec.num_gpus // settings.nodes,  # one process (one rank) per task
        "cpus_per_task": settings.cpus_per_gpu,
        "gpus_per_node": gpus or None,
        "stderr_to_stdout": True,
        # USR1 before the time limit: the trainer checkpoints and the job requeues itself (see slurm_job.py)
        "additional_parameters": {"signal": f"USR1@{settings.signal_seconds}", "requeue": True,
                                  **settings.sbatch},
    }
    for key in ("partition", "mem", "time", "account", "qos", "constraint"):
        params[key] = getattr(settings, key)  # None: no such sbatch line (submitit's own default time is 5 min)
    params["wckey"] = None
    return params


def submit(jobs: list[list[RunSpec]], spec: SweepSpec, runs: list[RunSpec], sweep_dir: str,
           python: str = sys.executable) -> list[str]:
    """Submit the jobs (one array when there are several); their job ids, in order."""
    import submitit
    from submitit.core.utils import FailedJobError

    # The job runs submitit's command through slurm_job.main, which checks the job's pickle before submitit loads it.
    executor = submitit.SlurmExecutor(folder=os.path.join(sweep_dir, "slurm"), max_num_timeout=0,
                                      python=f"{shlex.quote(python)} -m fasttrain.sweep.slurm_job")
    executor.update_parameters(**sbatch_parameters(spec, runs, sweep_dir))
    handles = []
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's error; it is passed on below
            with executor.batch():
                for job in jobs:
                    handles.append(executor.submit(run_job, job_payload(job, spec, python)))
    except FailedJobError as e:
        raise SweepError(f"Slurm refused the job{'s' if len(jobs) > 1 else ''}: {_one_line(str(e))} "
                         "(check executor.slurm in the sweep file)") from None
    return [h.job_id for h in handles]


def job_payload(job: list[RunSpec], spec: SweepSpec, python: str) -> dict:
    """The plain data a job's tasks run from: its run folders and the commands of its phases."""
    trained = all(os.path.exists(os.path.join(run.run_dir, "final.json")) for run in job)
    return {
        "run_dirs": [run.run_dir for run in job],
        "train": None if trained else [python, "-m", "fasttrain.cli", *trainer_args(job)],
        "evaluate": eval_command(job, spec.evaluate, python, spec.eval_options) if spec.evaluate else None,
    }


# ---- reconciling -----------------------------------------------------------------------------------------
@dataclass
class RunStatus:
    state: str  # pending | queued | running | evaluating | done | failed | interrupted | cancelled
    job_id: Optional[str] = None
    where: str = ""  # nodes, or why a queued job waits
    note: str = ""  # why it failed, or what comes next
    submit: bool = False  # needs a new job
    failure: Optional[str] = None  # a job that failed or was lost, seen now for the first time


def _trained(run: RunSpec) -> bool:
    return os.path.exists(os.path.join(run.run_dir, "final.json"))


def _finished(run: RunSpec, evaluate) -> bool:
    return _trained(run) and (not evaluate or is_evaluated(run))


def _why_gone(job_id: str, run: RunSpec, queue: SlurmQueue, record: Optional[dict]) -> str:
    """Why a job left the queue without finishing its run, in the words Slurm and the job left."""
    parts = []
    if queue.ended is not None and queue.ended.get(job_id):
        parts.append(queue.ended[job_id])
    if record is not None and record.get("returncode") is not None:
        log = os.path.join(run.run_dir, "eval.log" if record.get("phase") == "evaluation" else "train.log")
        parts.append(f"{record.get('phase')} exited with {record['returncode']}: {_tail(log, 2)}")
    elif record is not None and record.get("phase"):
        parts.append(f"stopped during its {record['phase']} on {record.get('host')} without an exit status "
                     "(killed, or its node failed)")
    else:
        parts.append("lost: it left the queue before it started" if queue.ended is None
                     else "it never started")
    return f"job {job_id}: " + "; ".join(parts)


def reconcile(runs: list[RunSpec], manifest: Manifest, spec: SweepSpec, queue: SlurmQueue) -> dict:
    """Each run's RunStatus from its manifest entry, the queue and its run folder (nothing is changed)."""
    retries = (spec.slurm or SlurmSettings()).retries  # --status without --slurm: the defaults it ran with
    out = {}
    for run in runs:
        entry = manifest.runs.get(run.name, {})
        job_id = entry.get("job_id")
        failures = entry.get("failures", 0)
        if job_id and job_id in queue.states:
            state = "running" if queue.states[job_id] in RUNNING else "queued"
            if entry.get("state") == "cancelled":
                out[run.name] = RunStatus("cancelled", job_id, queue.where.get(job_id, ""), "leaving the queue")
            else:
                out[run.name] = RunStatus(state, job_id, queue.where.get(job_id, ""), queue.states[job_id].lower())
            continue
        if _finished(run, spec.evaluate):
            out[run.name] = RunStatus("done", job_id)
            continue
        waiting = "evaluating" if _trained(run) else "pending"  # what the next job does
        if not job_id:  # never submitted, or its last job was already accounted for
            state = entry.get("state") if entry.get("state") in ("failed", "interrupted", "cancelled") else waiting
            if state == "failed" and failures > retries:
                out[run.name] = RunStatus("failed", None, note=f"{entry.get('error')} (failed {failures} times; "
                                          f"retries: {retries})")
            else:
                out[run.name] = RunStatus(state, None, note=entry.get("error") or "", submit=True)
            continue
        record = read_job_record(run.run_dir)
        record = record if record and record.get("job_id") == job_id else None
        if entry.get("state") == "cancelled":
            out[run.name] = RunStatus("cancelled", job_id, note=f"job {job_id} cancelled", submit=True)
        elif record is not None and record.get("returncode") == REQUEUE_EXIT_CODE:
            out[run.name] = RunStatus("interrupted", job_id, note=f"job {job_id} stopped at a checkpoint",
                                      submit=True)
        else:
            why = _why_gone(job_id, run, queue, record)
            failures += 1
            out[run.name] = RunStatus("failed", job_id, note=why, submit=failures <= retries, failure=why)
    return out


def _apply(statuses: dict, manifest: Manifest, runs: list[RunSpec]) -> None:
    """Write what reconcile found into the manifest; a job that has left the queue is accounted for once (its
    id stays in the run's `jobs`)."""
    for run in runs:
        status, entry = statuses[run.name], manifest.entry(run.name)
        if status.failure:
            entry.update(failures=entry.get("failures", 0) + 1, error=status.failure)
        if status.state == "done" and entry.get("state") != "done":
            record = read_job_record(run.run_dir) or {}
            evaluation = read_json(os.path.join(run.run_dir, "eval.json")) or {}
            entry.update(final=read_json(os.path.join(run.run_dir, "final.json")), error=None,
                         finished=record.get("finished") or now_iso(), eval=evaluation.get("results"))
        entry["state"] = status.state
        in_queue = status.state in ("queued", "running", "cancelled") and not status.submit
        if not in_queue:
            entry["job_id"] = None
        if status.state == "running" and status.where:
            entry["nodes"] = status.where


# ---- the commands ----------------------------------------------------------------------------------------
class Lines:
    """A line per change of a run's state (the same tags as the local runner's)."""

    def __init__(self, runs: list[RunSpec], retries: int, enabled: bool = True):
        self.retries = retries
        self.index = {r.name: i + 1 for i, r in enumerate(runs)}
        self.total, self.enabled = len(runs), enabled
        self.width = len(str(len(runs)))
        self.shown: dict = {}

    def tag(self, names: list[str]) -> str:
        numbers = ",".join(str(self.index[n]) for n in names)
        return f"[{numbers:>{self.width}}/{self.total}] " + (names[0] if len(names) == 1 else
                                                              f"pack of {len(names)} ({', '.join(names)})")

    def say(self, names: list[str], text: str) -> None:
        if self.enabled:
            print(f"{self.tag(names)}: {text}", flush=True)

    def first(self, statuses: dict) -> None:
        """Before the first round's changes: one line for what is done, queued or running already."""
        counts: dict = {}
        for name, status in statuses.items():
            if status.state in ("done", "queued", "running"):
                self.shown[name] = (status.state, status.job_id if status.state != "done" else None)
                counts[status.state] = counts.get(status.state, 0) + 1
        if counts and self.enabled and counts.get("done") != self.total:
            print(", ".join(f"{n} of {self.total} runs {state}" for state, n in counts.items()), flush=True)

    def change(self, name: str, status: RunStatus, entry: dict) -> None:
        key = (status.state, status.job_id if status.state in ("queued", "running") else None)
        before = self.shown.get(name)
        if before == key and not status.failure:
            return
        self.shown[name] = key
        if status.state == "queued" and before == ("running", status.job_id):
            self.say([name], f"requeued (job {status.job_id})")
        elif status.state == "running":
            self.say([name], f"running on {status.where} (job {status.job_id})")
        elif status.state == "done":
            self.say([name], "done" + (f", {_describe_final(entry.get('final'))}" if entry.get("final") else ""))
        elif status.state == "failed" and status.failure:
            what = "submitted again" if status.submit else "out of retries"
            self.say([name], f"FAILED ({status.note}); {what} (failures: {entry.get('failures', 0)}, retries: "
                             f"{self.retries})")
        elif status.state == "failed":
            self.say([name], f"failed earlier ({status.note})" + ("; submitted again" if status.submit else ""))
        elif status.state == "interrupted" and status.job_id:
            self.say([name], f"{status.note}; submitted again to resume")


def _runs_and_folder(spec: SweepSpec, out_dir: Optional[str]):
    runs = expand(spec, out_dir)
    sweep_dir = os.path.abspath(out_dir or spec.out_dir)
    return runs, sweep_dir


def _one_round(spec: SweepSpec, runs: list[RunSpec], sweep_dir: str, pack: int, lines: Lines,
               python: str, first: bool) -> dict:
    """Under the sweep's lock: reconcile every run, submit what needs a job, save the manifest. Later rounds
    of --wait leave cancelled runs alone (a --cancel from elsewhere is not undone)."""
    with SweepLock(sweep_dir):
        manifest = Manifest(sweep_dir)
        if first:
            record_runs(spec, runs, sweep_dir, manifest)
        queue = SlurmQueue.query([e["job_id"] for e in manifest.runs.values() if e.get("job_id")])
        statuses = reconcile(runs, manifest, spec, queue)
        if not first:
            for status in statuses.values():
                status.submit = status.submit and status.state != "cancelled"
        _apply(statuses, manifest, runs)
        if first:
            lines.first(statuses)
        for run in runs:
            lines.change(run.name, statuses[run.name], manifest.runs[run.name])
        # a fine-tune starts from its source's final weights: submitted once that run is done, never while
        # its source has stopped for good (failed out of retries, or cancelled)
        for run in runs:
            source = statuses.get(run.source) if run.source else None
            if source is not None and source.state in ("failed", "cancelled") and not source.submit:
                statuses[run.name].submit = False
        to_submit = [run for run in runs if statuses[run.name].submit
                     and (not run.source or statuses[run.source].state == "done")]
        if to_submit:
            waiting = {run.name: {"state": "evaluating" if _trained(run) else "pending"} for run in to_submit}
            jobs = plan_jobs(to_submit, waiting, pack)
            if first:
                check_resources(spec, runs)
            job_ids = submit(jobs, spec, runs, sweep_dir, python)
            submitted = now_iso()
            for job, job_id in zip(jobs, job_ids):
                names = [run.name for run in job]
                for run in job:
                    entry = manifest.entry(run.name)
                    entry.update(state="queued", job_id=job_id, submitted=submitted, executor="slurm",
                                 attempts=entry.get("attempts", 0) + 1, pack=names)
                    entry.setdefault("jobs", []).append(job_id)
                    statuses[run.name] = RunStatus("queued", job_id, submit=False)
                    lines.shown[run.name] = ("queued", job_id)
                step = newest_checkpoint_step(job[0].run_dir)
                how = ("to evaluate" if _trained(job[0]) else
                       f"to resume from step {step}" if step else "to start")
                lines.say(names, f"submitted as job {job_id} {how}")
        manifest.save()
        return statuses


def run_slurm_sweep(spec: SweepSpec, out_dir: Optional[str] = None, pack: Optional[int] = None,
                    wait: bool = False, retry_failed: bool = False, progress: bool = True,
                    python: str = sys.executable) -> SweepResult:
    """Reconcile, submit what needs a job; with wait, follow the jobs until every run is done or out of
    retries. The result's `done` and `failed` count runs finished and runs failed past their retries."""
    require_slurm()
    pack, note = resolve_pack(spec, pack)
    if note:
        print(note)
    runs, sweep_dir = _runs_and_folder(spec, out_dir)
    os.makedirs(os.path.join(sweep_dir, "runs"), exist_ok=True)
    if retry_failed:
        with SweepLock(sweep_dir):
            manifest = Manifest(sweep_dir)
            for entry in manifest.runs.values():
                if entry.get("state") == "failed":
                    entry["failures"] = 0
            manifest.save()
    lines = Lines(runs, spec.slurm.retries, enabled=progress)
    statuses = _one_round(spec, runs, sweep_dir, pack, lines, python, first=True)
    try:
        while wait and any(s.state not in ("done", "failed", "cancelled") or s.submit for s in statuses.values()):
            time.sleep(WAIT_POLL_S)
            statuses = _one_round(spec, runs, sweep_dir, pack, lines, python, first=False)
    except KeyboardInterrupt:
        print("stopped following the jobs; they keep running: `fasttrain sweep SWEEP.yaml --status` shows them")
        raise
    result = SweepResult(sweep_dir, runs)
    result.done = [r.name for r in runs if statuses[r.name].state == "done"]
    result.failed = [r.name for r in runs if statuses[r.name].state == "failed" and not statuses[r.name].submit]
    result.queued = [r.name for r in runs if statuses[r.name].state in ("queued", "running", "cancelled")
                     and not statuses[r.name].submit]
    return result


def sweep_status(spec: SweepSpec, out_dir: Optional[str] = None) -> tuple[list[RunSpec], dict, dict]:
    """(runs, statuses, manifest entries) reconciled with Slurm when the sweep has jobs; writes nothing."""
    runs, sweep_dir = _runs_and_folder(spec, out_dir)
    manifest = Manifest(sweep_dir)
    job_ids = [e["job_id"] for e in manifest.runs.values() if e.get("job_id")]
    if any(e.get("jobs") for e in manifest.runs.values()) and shutil.which("squeue"):  # submitted to Slurm
        statuses = reconcile(runs, manifest, spec, SlurmQueue.query(job_ids))
    else:  # a sweep run here: the manifest, checked against the run folders
        statuses = {}
        for run in runs:
            entry = manifest.runs.get(run.name, {})
            state = "done" if _finished(run, spec.evaluate) else entry.get("state", "pending")
            statuses[run.name] = RunStatus(state, entry.get("job_id"), note=entry.get("error") or "")
    return runs, statuses, manifest.runs


def format_status(runs: list[RunSpec], statuses: dict, entries: dict, sweep_dir: str) -> str:
    lines = [f"sweep {sweep_dir}: {len(runs)} runs",
             f"{'run':<32} {'state':<11} {'job':<12} {'tries':>5} {'step':>11}  where / why"]
    counts: dict = {}
    for run in runs:
        status, entry = statuses[run.name], entries.get(run.name, {})
        counts[status.state] = counts.get(status.state, 0) + 1
        job = status.job_id or (entry.get("jobs") or [""])[-1]
        step = f"{min(last_logged_step(run.run_dir), run.config.train.steps)}/{run.config.train.steps}"
        why = status.where if status.state in ("queued", "running") else status.note
        lines.append(f"{run.name:<32} {status.state:<11} {job or '-':<12} {entry.get('attempts', 0):>5} {step:>11}  "
                     f"{why}".rstrip())
    lines.append("states: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


def cancel(spec: SweepSpec, out_dir: Optional[str] = None) -> list[str]:
    """Cancel every queued or running job of the sweep; its runs resume when the sweep is submitted again."""
    runs, sweep_dir = _runs_and_folder(spec, out_dir)
    if not os.path.exists(os.path.join(sweep_dir, "manifest.json")):
        raise SweepError(f"{sweep_dir}: no sweep there yet (no manifest.json): nothing to cancel")
    with SweepLock(sweep_dir):
        manifest = Manifest(sweep_dir)
        submitted = {n: e["job_id"] for n, e in manifest.runs.items() if e.get("job_id")}
        if not submitted:
            return []
        require_slurm()
        queue = SlurmQueue.query(list(submitted.values()), accounting=False)
        live = sorted({job_id for job_id in submitted.values() if job_id in queue.states})
        if live:
            out = _slurm_command(["scancel", *live])
            if out.returncode != 0:
                raise SweepError(f"Slurm: scancel failed: {_one_line(out.stderr) or out.returncode}")
        for name, job_id in submitted.items():
            if job_id in queue.states:
                manifest.entry(name)["state"] = "cancelled"
        manifest.save()
        return live

