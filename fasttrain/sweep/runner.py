"""Running a sweep here: one subprocess per run (or per pack of runs), a manifest of states, resumable after a
crash or a kill. (`fasttrain sweep --slurm` submits the same jobs to Slurm instead: fasttrain/sweep/slurm.py.)

Sweep folder:
    manifest.json        every run's state (pending | queued | running | evaluating | done | failed |
                         interrupted | cancelled), start and end times, attempts, the pack it trained in, its
                         GPUs or Slurm job and final metrics; rewritten atomically after every change
    sweep.yaml           the sweep as last run
    throughput.json      measured training speed per model shape and device (for --dry-run estimates)
    runs/NAME/           a run folder: config.yaml, checkpoints/, metrics.jsonl, final.json, train.log,
                         eval.json (when the sweep evaluates)

Each run is `python -m fasttrain.cli train --config RUN/config.yaml --resume` (under the deepspeed launcher
when the sweep asks for several GPUs or ZeRO), so a run killed with the sweep continues from its newest
checkpoint next time and a finished run is never trained again. Fine-tune runs (a sweep's finetune stage)
start once the pretraining jobs have ended, each from its source run's weights. A trainer that exits with
REQUEUE_EXIT_CODE (it was signalled, finished its step and wrote a checkpoint) is queued again, not failed.
On a GPU machine each job gets its own GPU(s) through CUDA_VISIBLE_DEVICES (fasttrain/sweep/placement.py).
With `pack: K` (or --pack K), up to K runs that differ only in what packed training allows (f, E, placement,
seeds) and stopped at the same checkpoint step train as one job: `train --config A/config.yaml --config
B/config.yaml ... --resume`, one stacked model on one device, then `eval A B ...`, one process for the pack's
evaluations. A run that trains alone is a pack of one. A run folder holds one config for good: if the sweep
file changed what a run means, the sweep stops with an error naming the run.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml
from tqdm import tqdm

from fasttrain.checkpoint.files import list_checkpoints, read_json
from fasttrain.config import ConfigError, config_differences, config_from_dict
from fasttrain.sweep.cluster import SlurmQueue
from fasttrain.sweep.grid import RunSpec, SweepError, SweepSpec, expand
from fasttrain.sweep.manifest import Manifest, SweepLock, now_iso
from fasttrain.sweep.placement import DevicePool, gpus_per_job, job_order, jobs_at_once, visible_gpus
from fasttrain.train import REQUEUE_EXIT_CODE
from fasttrain.train.packed import packing_key


# ---- run folders -------------------------------------------------------------------------------------
def prepare_run_folder(run: RunSpec) -> None:
    """Write RUN/config.yaml, or check that the one already there is the same run."""
    path = os.path.join(run.run_dir, "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            old = yaml.safe_load(f) or {}
        try:
            old = config_from_dict(old, world_size=1).to_dict()  # resolved as the run's config is
        except ConfigError as e:
            raise SweepError(f"run {run.name}: its config.yaml is not valid ({e}); delete {run.run_dir} to train "
                             "that run again") from None
        diffs = config_differences(old, run.config.to_dict())
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise SweepError(
                f"run {run.name}: the sweep file now gives it a different config than the one it was started "
                f"with ({shown}); restore the sweep file, give the sweep another out_dir, or delete "
                f"{run.run_dir} to train that run again"
            )
        return
    os.makedirs(run.run_dir, exist_ok=True)
    run.config.save(path)


def is_trained(run: RunSpec, entry: dict) -> bool:
    return entry.get("state") in ("done", "evaluating") and os.path.exists(os.path.join(run.run_dir, "final.json"))


def is_evaluated(run: RunSpec) -> bool:
    """eval.json exists and is newer than final.json (a run trained further is evaluated again)."""
    final, evaluation = os.path.join(run.run_dir, "final.json"), os.path.join(run.run_dir, "eval.json")
    return os.path.exists(evaluation) and os.path.getmtime(evaluation) >= os.path.getmtime(final)


def is_finished(run: RunSpec, entry: dict, evaluate: bool) -> bool:
    return is_trained(run, entry) and (not evaluate or is_evaluated(run))


def last_logged_step(run_dir: str) -> int:
    """Step of the newest line of metrics.jsonl (0 when none); reads only the file's tail."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, AttributeError):
            continue
    return 0


def newest_checkpoint_step(run_dir: str) -> int:
    """Step of the newest complete checkpoint in the run folder (0 when none)."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][0] if checkpoints else 0


# ---- packs -------------------------------------------------------------------------------------------
def resolve_pack(spec: SweepSpec, pack: Optional[int] = None) -> tuple[int, Optional[str]]:
    """The pack size to use (--pack overrides the sweep file's `pack`) and a note when packing is off."""
    size = spec.pack if pack is None else pack
    if size < 1:
        raise SweepError(f"--pack {size}: must be at least 1 (1 trains each run in its own process)")
    if size > 1 and spec.uses_deepspeed:
        return 1, (f"note: pack {size} ignored: the runs use the deepspeed launcher on {spec.num_gpus} GPU(s), "
                   "and packed training runs on one device; training them one at a time")
    return size, None


def group_packs(runs: list[RunSpec], pack: int) -> list[list[RunSpec]]:
    """Runs to train, grouped into packs of at most `pack`: runs in a pack can be stacked (equal packing_key)
    and resume from the same checkpoint step. Packs keep the sweep's order, inside and between them."""
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault((packing_key(run.config), newest_checkpoint_step(run.run_dir)), []).append(run)
    order = {run.name: i for i, run in enumerate(runs)}
    packs = [members[i:i + pack] for members in groups.values() for i in range(0, len(members), pack)]
    return sorted(packs, key=lambda members: order[members[0].name])


def plan_jobs(runs: list[RunSpec], entries: dict, pack: int) -> list[list[RunSpec]]:
    """The jobs that finish these (unfinished) runs, in the sweep's order: packs of runs that need training,
    and packs of runs that need only their evaluation."""
    trained = [run for run in runs if is_trained(run, entries.get(run.name, {}))]
    trained_names = {run.name for run in trained}
    jobs = group_packs([run for run in runs if run.name not in trained_names], pack)
    jobs += [trained[i:i + pack] for i in range(0, len(trained), pack)]  # evaluated in one process a pack
    order = {run.name: i for i, run in enumerate(runs)}
    return sorted(jobs, key=lambda members: order[members[0].name])


# ---- commands ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_args(pack: list[RunSpec]) -> list[str]:
    """`train --config A/config.yaml [--config B/config.yaml ...] --resume`: one process trains (or resumes) the
    pack, all its runs stacked in one model; under a launcher, one such process per rank."""
    configs = [arg for run in pack for arg in ("--config", os.path.join(run.run_dir, "config.yaml"))]
    return ["train", *configs, "--resume"]


def train_command(pack: list[RunSpec], spec: SweepSpec, python: str = sys.executable,
                  devices: Optional[list[str]] = None) -> list[str]:
    """The command that trains (or resumes) a pack of runs here. devices: the GPUs the job was given (its
    CUDA_VISIBLE_DEVICES); the deepspeed launcher then starts one rank on each of them."""
    if spec.uses_deepspeed:
        if len(pack) > 1:
            raise SweepError("packed training runs on one device: a sweep using deepspeed trains one run at a time")
        launcher = shutil.which("deepspeed") or "deepspeed"
        # with CUDA_VISIBLE_DEVICES set and no --num_gpus, the launcher takes exactly those devices
        gpus = [] if devices else ["--num_gpus", str(spec.num_gpus)]
        return [launcher, *gpus, "--master_port", str(_free_port()), "--module", "fasttrain.cli", *trainer_args(pack)]
    return [python, "-m", "fasttrain.cli", *trainer_args(pack)]


def eval_command(runs: list[RunSpec], metrics, python: str = sys.executable,
                 options: dict | None = None) -> list[str]:
    """The command that evaluates runs into RUN/eval.json: one process for all of them (start-up, CUDA
    context and kernel autotuning paid once). options: the sweep's eval_options (copies, tokens)."""
    cmd = [python, "-m", "fasttrain.cli", "eval", *(run.run_dir for run in runs),
           "--json", os.path.join("{run}", "eval.json")]
    if isinstance(metrics, list):
        cmd += ["--metrics", ",".join(metrics)]
    for key, value in (options or {}).items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the sweep process dies (even by SIGKILL), so no orphaned run keeps
    writing into a folder that a restarted sweep resumes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---- execution ---------------------------------------------------------------------------------------
@dataclass
class _Phase:
    command: list
    runs: list  # the runs it trains or evaluates
    is_eval: bool

    @property
    def log_path(self) -> str:
        """One log per phase, in its first run's folder (the others' logs point to it)."""
        return os.path.join(self.runs[0].run_dir, "eval.log" if self.is_eval else "train.log")


@dataclass
class _Job:
    """A pack of runs (one run when it trains alone) and the commands that finish it, one after the other:
    the pack's training, then its evaluation. Runs that need only their evaluation form packs of their own."""
    runs: list
    phases: list
    devices: list = field(default_factory=list)  # its GPUs (CUDA_VISIBLE_DEVICES), none on a CPU
    proc: Optional[subprocess.Popen] = None
    phase: int = 0
    started: float = 0.0
    log: object = None

    @property
    def current(self) -> _Phase:
        return self.phases[self.phase]

    @property
    def trained(self) -> bool:
        """Its training (if it had one) has finished."""
        return self.current.is_eval


@dataclass
class SweepResult:
    sweep_dir: str
    runs: list
    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    queued: list = field(default_factory=list)  # on Slurm: runs whose job is queued or running


class Progress:
    """A line per run, and a bar over all training steps of the sweep on a terminal (tqdm)."""

    def __init__(self, total_runs: int, total_steps: int, done_steps: int, enabled: bool = True,
                 stream=None):
        self.enabled = enabled
        self.total_runs = total_runs
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", desc="sweep", dynamic_ncols=True)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def steps(self, done_steps: int, current: str) -> None:
        if self.bar is not None:
            self.bar.n = done_steps
            self.bar.set_postfix_str(current)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _child_env(jobs: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _describe_final(final: Optional[dict]) -> str:
    if not final:
        return ""
    parts = []
    if "test_loss" in final:
        parts.append(f"test loss {final['test_loss']:.4f}")
    if "repeated_loss" in final:
        parts.append(f"repeated-subset loss {final['repeated_loss']:.4f}")
    return ", ".join(parts)


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-4000:]
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def record_runs(spec: SweepSpec, runs: list[RunSpec], sweep_dir: str, manifest: Manifest) -> None:
    """Check or write every run folder's config (before anything is trained), keep the sweep file beside the
    manifest, and give every run its manifest entry with its axes."""
    for run in runs:
        prepare_run_folder(run)
    spec.save(os.path.join(sweep_dir, "sweep.yaml"))
    manifest.doc["sweep_dir"] = sweep_dir
    manifest.doc["order"] = [r.name for r in runs]
    for run in runs:
        entry = manifest.entry(run.name)
        entry.update(run.axes())
        entry["run_dir"] = os.path.relpath(run.run_dir, sweep_dir)


def run_sweep(spec: SweepSpec, out_dir: Optional[str] = None, jobs: Optional[int] = None, progress: bool = True,
              python: str = sys.executable, on_run_done: Optional[Callable] = None,
              pack: Optional[int] = None) -> SweepResult:
    """Run every run of the sweep that is not finished yet, here; returns which finished and which failed.
    jobs: at most this many at once (default: one per GPU or GPU set, one on a CPU).
    pack: runs trained together (default: the sweep file's `pack`)."""
    pack, note = resolve_pack(spec, pack)
    if note:
        print(note)
    runs = expand(spec, out_dir)
    sweep_dir = os.path.abspath(out_dir or spec.out_dir)
    gpus = visible_gpus(runs[0].config.train.device)
    at_once, note = jobs_at_once(spec, gpus, jobs)
    if note:
        print(note)
    os.makedirs(os.path.join(sweep_dir, "runs"), exist_ok=True)
    with SweepLock(sweep_dir):
        manifest = Manifest(sweep_dir)
        _refuse_runs_on_slurm(manifest)
        record_runs(spec, runs, sweep_dir, manifest)
        result = SweepResult(sweep_dir, runs)
        todo = []
        for run in runs:
            entry = manifest.entry(run.name)
            if is_finished(run, entry, spec.evaluate):
                result.skipped.append(run.name)
                if entry["state"] != "done":  # killed after its last step, before the manifest said so
                    entry["state"] = "done"
                    if spec.evaluate:
                        entry["eval"] = (read_json(os.path.join(run.run_dir, "eval.json")) or {}).get("results")
            else:
                if entry.get("state") == "running":  # the sweep that ran it was killed
                    entry["state"] = "interrupted"
                todo.append(run)
        manifest.save()
        pretrain = [run for run in todo if not run.source]
        LocalExecutor(spec, manifest, result, at_once, progress, python, on_run_done, gpus=gpus).run(
            plan_jobs(pretrain, manifest.runs, pack))
        # fine-tune runs start from their source's final weights: only once that run is done
        finished = set(result.done) | set(result.skipped)
        ready = [run for run in todo if run.source and run.source in finished]
        for run in todo:
            if run.source and run.source not in finished:
                manifest.entry(run.name).update(state="pending", error=f"its source run {run.source} is not done")
                result.failed.append(run.name)
        manifest.save()
        if ready:
            LocalExecutor(spec, manifest, result, at_once, progress, python, on_run_done, gpus=gpus).run(
                plan_jobs(ready, manifest.runs, pack))
    return result


def _refuse_runs_on_slurm(manifest: Manifest) -> None:
    """A run whose Slurm job is still queued or running is not started here as well."""
    submitted = {name: e["job_id"] for name, e in manifest.runs.items() if e.get("job_id")}
    if not submitted or shutil.which("squeue") is None:
        return
    try:
        queue = SlurmQueue.query(list(submitted.values()), accounting=False)
    except SweepError:  # the controller does not answer: the trainers' run-folder locks still guard the runs
        return
    for name, job_id in submitted.items():
        if job_id in queue.states:
            raise SweepError(f"run {name} is on Slurm as job {job_id} ({queue.states[job_id]}): follow it with "
                             "`fasttrain sweep SWEEP.yaml --status`, or stop its jobs with --cancel before running "
                             "the sweep here")


class LocalExecutor:
    """Runs a sweep's jobs as subprocesses of this one, up to `jobs` at once, each on its own GPU(s) when there
    are some, and records every change of a run's state in the manifest. A job is a pack of runs (one run
    when it trains alone) with its phases: the pack's training, then its evaluation."""

    def __init__(self, spec: SweepSpec, manifest: Manifest, result: SweepResult, jobs: int,
                 progress: bool = True, python: str = sys.executable, on_run_done: Optional[Callable] = None,
                 gpus: Optional[list[str]] = None):
        self.spec, self.manifest, self.result = spec, manifest, result
        self.jobs, self.python, self.on_run_done = jobs, python, on_run_done
        self.pool = DevicePool(gpus) if gpus else None
        self.need = gpus_per_job(spec)
        self.queue: list[list[RunSpec]] = []
        runs = result.runs
        self.total_steps = sum(r.config.train.steps for r in runs)
        self.skipped_steps = sum(r.config.train.steps for r in runs if r.name in result.skipped)
        self.progress = Progress(len(runs), self.total_steps, self.skipped_steps, enabled=progress)
        self.index = {r.name: i + 1 for i, r in enumerate(runs)}
        self.width = len(str(len(runs)))
        self.active: dict[str, _Job] = {}  # by the name of the job's first run
        self.env = _child_env(jobs)

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self, packs: list[list[RunSpec]]) -> None:
        """Run every job to its end; on Ctrl-C or SIGTERM, stop the running ones and record where they are."""
        result = self.result
        if result.skipped:
            self.progress.line(f"{len(result.skipped)} of {len(result.runs)} runs already done; "
                               f"{sum(map(len, packs))} to run")
        self.queue = [packs[i] for i in job_order([sum(r.flops for r in p) for p in packs], self.jobs)]
        previous_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            while self.queue or self.active:
                while self.queue and len(self.active) < self.jobs:
                    devices = self.pool.take(self.need) if self.pool else []
                    if devices is None:
                        break  # every GPU is busy
                    self.launch(self.queue.pop(0), devices)
                time.sleep(0.2)
                self.poll()
                self.show_steps()
        except KeyboardInterrupt:
            self.interrupt()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            self.progress.close()

    def poll(self) -> None:
        """Move every job whose process ended on to its next phase, or retire it."""
        for name, job in list(self.active.items()):
            rc = job.proc.poll()
            if rc is None:
                continue
            if self.phase_finished(job, rc):
                job.phase += 1
                self.start_phase(job)
            else:
                del self.active[name]
                if self.pool:
                    self.pool.give(job.devices)

    def show_steps(self) -> None:
        result = self.result
        current = [r for job in self.active.values() for r in job.runs]
        steps_now = self.skipped_steps + sum(r.config.train.steps for r in result.runs if r.name in result.done)
        steps_now += sum(min(last_logged_step(r.run_dir), r.config.train.steps) for r in current
                         if r.name not in result.done)
        self.progress.steps(steps_now, ", ".join(r.name for r in current))

    def interrupt(self) -> None:
        """Stop the running processes and leave every unfinished run resumable."""
        for job in self.active.values():
            if job.proc.poll() is None:
                job.proc.terminate()
        runs_left = 0
        for job in self.active.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.log.close()
            # an interrupted evaluation keeps its finished training; an interrupted training resumes
            for run in job.runs:
                if run.name not in self.result.done and run.name not in self.result.failed:
                    self.manifest.entry(run.name)["state"] = "evaluating" if job.trained else "interrupted"
                    runs_left += 1
        self.manifest.save()
        self.progress.line(f"interrupted: re-run the same command to continue ({runs_left} run(s) resume from "
                           "their newest checkpoint)")

    # ---- starting --------------------------------------------------------------------------------------
    def tag(self, runs: list) -> str:
        numbers = ",".join(str(self.index[r.name]) for r in runs)
        names = runs[0].name if len(runs) == 1 else f"pack of {len(runs)} ({', '.join(r.name for r in runs)})"
        return f"[{numbers:>{self.width}}/{len(self.result.runs)}] {names}"

    def launch(self, runs: list, devices: list[str]) -> None:
        """Start a job on its devices: its training, or only its evaluation when its runs are trained already."""
        spec, manifest = self.spec, self.manifest
        first = runs[0]
        trained = is_trained(first, manifest.entry(first.name))  # plan_jobs never mixes trained and untrained
        phases = [] if trained else [_Phase(train_command(runs, spec, self.python, devices), runs, is_eval=False)]
        if spec.evaluate:
            command = eval_command(runs, spec.evaluate, self.python, spec.eval_options)
            phases.append(_Phase(command, runs, is_eval=True))
        job = _Job(runs, phases, devices=devices, started=time.time())
        if devices:
            for run in runs:
                manifest.entry(run.name)["devices"] = devices
        if trained:  # only the evaluation is missing: training is not touched, nor its times
            for run in runs:
                manifest.entry(run.name).update(state="evaluating", returncode=None, error=None)
            manifest.save()
            self.progress.line(f"{self.tag(runs)}: evaluating")
        else:
            started = now_iso()
            for run in runs:
                entry = manifest.entry(run.name)
                entry.update(state="running", started=started, attempts=entry.get("attempts", 0) + 1,
                             finished=None, returncode=None, error=None, pack=[r.name for r in runs])
            manifest.save()
            step = newest_checkpoint_step(first.run_dir)
            how = f"resuming from step {step}" if step > 0 else "starting"
            each = " each" if len(runs) > 1 else ""
            where = f" on GPU {','.join(devices)}" if devices else ""
            self.progress.line(f"{self.tag(runs)}: {how}{where} (N = {first.params:,}, {first.tokens:,} tokens, "
                               f"{first.config.train.steps} steps{each})")
        self.start_phase(job)
        self.active[first.name] = job

    def start_phase(self, job: _Job) -> None:
        phase = job.current
        env, shown = self.env, ""
        if job.devices:
            env = dict(self.env, CUDA_VISIBLE_DEVICES=",".join(job.devices))
            shown = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} "
        job.log = open(phase.log_path, "a")
        job.log.write(f"\n# {now_iso()} $ {shown}{' '.join(phase.command)}\n")
        job.log.flush()
        for run in phase.runs[1:]:
            with open(os.path.join(run.run_dir, os.path.basename(phase.log_path)), "a") as log:
                log.write(f"\n# {now_iso()} {'evaluated' if phase.is_eval else 'trained'} with "
                          f"{len(phase.runs) - 1} other run(s) in one process: its log is {phase.log_path}\n")
        job.proc = subprocess.Popen(phase.command, stdout=job.log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
        for run in phase.runs:
            self.manifest.entry(run.name)["pid"] = job.proc.pid
        self.manifest.save()

    # ---- ending ----------------------------------------------------------------------------------------
    def phase_finished(self, job: _Job, rc: int) -> bool:
        """Record the phase that just ended; True when the job has another phase to run."""
        job.log.close()
        phase = job.current
        if phase.is_eval:
            self.evaluation_finished(phase, rc)
        elif rc == REQUEUE_EXIT_CODE:
            self.requeue(job)
            return False
        elif rc != 0:
            self.phase_failed(phase, job.runs, rc)
            return False  # nothing to evaluate: the whole pack failed
        else:
            self.training_finished(job)
        return job.phase + 1 < len(job.phases)

    def requeue(self, job: _Job) -> None:
        """The trainer was signalled and stopped at a checkpoint: its runs go back to the end of the queue."""
        for run in job.runs:
            self.manifest.entry(run.name).update(state="interrupted", returncode=REQUEUE_EXIT_CODE)
        self.manifest.save()
        step = newest_checkpoint_step(job.runs[0].run_dir)
        self.progress.line(f"{self.tag(job.runs)}: stopped at a checkpoint (step {step}, exit status "
                           f"{REQUEUE_EXIT_CODE}); queued again to resume")
        self.queue.append(job.runs)

    def training_finished(self, job: _Job) -> None:
        manifest, evaluate = self.manifest, self.spec.evaluate
        wall, finished = time.time() - job.started, now_iso()
        for run in job.runs:
            final = read_json(os.path.join(run.run_dir, "final.json"))
            manifest.entry(run.name).update(state="evaluating" if evaluate else "done", finished=finished,
                                            wall_s=round(wall, 3), returncode=0, final=final)
        manifest.save()
        for run in job.runs:
            in_pack = f" in the pack of {len(job.runs)}" if len(job.runs) > 1 else ""
            final = manifest.runs[run.name]["final"]
            self.progress.line(f"{self.tag([run])}: trained in {wall:.0f} s{in_pack}, {_describe_final(final)}")
            if not evaluate:
                self.run_done(run)

    def evaluation_finished(self, phase: _Phase, rc: int) -> None:
        """Runs whose eval.json the evaluation wrote are done; if it stopped early, the rest failed."""
        evaluated = [run for run in phase.runs if is_evaluated(run)]
        for run in evaluated:
            evaluation = read_json(os.path.join(run.run_dir, "eval.json")) or {}
            self.manifest.entry(run.name).update(state="done", eval=evaluation.get("results"), error=None)
        self.manifest.save()
        for run in evaluated:
            self.progress.line(f"{self.tag([run])}: evaluated")
            self.run_done(run)
        missing = [run for run in phase.runs if run not in evaluated]
        if missing:
            self.phase_failed(phase, missing, rc)

    def phase_failed(self, phase: _Phase, runs: list, rc: int) -> None:
        what = "evaluation" if phase.is_eval else "training"
        error = f"{what} exited with {rc}: {_tail(phase.log_path, 2)}"
        for run in runs:
            # a failed evaluation leaves the training done: the next sweep only evaluates again
            self.manifest.entry(run.name).update(state="evaluating" if phase.is_eval else "failed",
                                                 returncode=rc, error=error)
            self.result.failed.append(run.name)
        self.manifest.save()
        self.progress.line(f"{self.tag(runs)}: FAILED ({what} exited with {rc}; see {phase.log_path})")

    def run_done(self, run: RunSpec) -> None:
        self.result.done.append(run.name)
        if self.on_run_done:
            self.on_run_done(run, self.manifest.runs[run.name])


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
