"""Running a sweep: one subprocess per run, a manifest of states, resumable after a crash or a kill.

Sweep folder:
    manifest.json        every run's state (pending | running | done | failed | interrupted), start and end
                         times, attempts and final metrics; rewritten atomically after every change
    sweep.yaml           the sweep as last run
    throughput.json      measured training speed per model shape and device (for --dry-run estimates)
    runs/NAME/           a run folder: config.yaml, checkpoints/, metrics.jsonl, final.json, train.log,
                         eval.json (when the sweep evaluates)

Each run is `python -m fasttrain.cli train --config RUN/config.yaml --resume` (under `deepspeed --num_gpus N`
when the sweep asks for several GPUs or ZeRO), so a run killed with the sweep continues from its newest
checkpoint next time and a finished run is never trained again. A run folder holds one config for good: if
the sweep file changed what a run means, the sweep stops with an error naming the run.
"""
from __future__ import annotations

import datetime
import fcntl
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

from fasttrain.sweep.grid import RunSpec, SweepError, SweepSpec, expand

MANIFEST = "manifest.json"
STATES = ("pending", "running", "evaluating", "done", "failed", "interrupted")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---- manifest ----------------------------------------------------------------------------------------
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


# ---- run folders -------------------------------------------------------------------------------------
def _comparable(config_tree: dict) -> dict:
    tree = json.loads(json.dumps(config_tree))
    tree.get("train", {}).pop("out_dir", None)  # the folder is the run's identity, wherever the sweep lies
    return tree


def config_differences(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every value that differs (train.out_dir ignored)."""
    old, new = _comparable(old), _comparable(new)
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def prepare_run_folder(run: RunSpec) -> None:
    """Write RUN/config.yaml, or check that the one already there is the same run."""
    path = os.path.join(run.run_dir, "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            old = yaml.safe_load(f) or {}
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


# ---- commands ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(run: RunSpec, spec: SweepSpec, python: str = sys.executable) -> list[str]:
    config = os.path.join(run.run_dir, "config.yaml")
    if spec.uses_deepspeed:
        launcher = shutil.which("deepspeed") or "deepspeed"
        return [launcher, "--num_gpus", str(spec.num_gpus), "--master_port", str(_free_port()), "--module",
                "fasttrain.cli", "train", "--config", config, "--resume"]
    return [python, "-m", "fasttrain.cli", "train", "--config", config, "--resume"]


def eval_command(run: RunSpec, metrics, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "fasttrain.cli", "eval", run.run_dir, "--json", os.path.join(run.run_dir, "eval.json")]
    if isinstance(metrics, list):
        cmd += ["--metrics", ",".join(metrics)]
    return cmd


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the sweep process dies (even by SIGKILL), so no orphaned run keeps
    writing into a folder that a restarted sweep resumes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---- execution ---------------------------------------------------------------------------------------
@dataclass
class _Job:
    run: RunSpec
    commands: list
    proc: Optional[subprocess.Popen] = None
    phase: int = 0
    started: float = 0.0
    log: object = None

    @property
    def is_eval_phase(self) -> bool:
        return self.commands[self.phase][3:4] == ["eval"]


@dataclass
class SweepResult:
    sweep_dir: str
    runs: list
    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


class Progress:
    """A line per run, and a bar over all training steps of the sweep on a terminal (tqdm)."""

    def __init__(self, total_runs: int, total_steps: int, done_steps: int, enabled: bool = True,
                 stream=None):
        self.enabled = enabled
        self.total_runs = total_runs
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

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


def run_sweep(spec: SweepSpec, out_dir: Optional[str] = None, jobs: int = 1, progress: bool = True,
              python: str = sys.executable, on_run_done: Optional[Callable] = None) -> SweepResult:
    """Run every run of the sweep that is not finished yet; returns which finished and which failed."""
    if jobs < 1:
        raise SweepError(f"--jobs {jobs}: must be at least 1")
    runs = expand(spec, out_dir)
    sweep_dir = os.path.abspath(out_dir or spec.out_dir)
    if spec.uses_deepspeed and jobs > 1:
        print(f"note: runs use the deepspeed launcher on {spec.num_gpus} GPU(s): running them one at a time")
        jobs = 1
    os.makedirs(os.path.join(sweep_dir, "runs"), exist_ok=True)
    with SweepLock(sweep_dir):
        manifest = Manifest(sweep_dir)
        for run in runs:  # every folder is checked before anything is trained
            prepare_run_folder(run)
        spec.save(os.path.join(sweep_dir, "sweep.yaml"))
        manifest.doc["sweep_dir"] = sweep_dir
        manifest.doc["order"] = [r.name for r in runs]
        result = SweepResult(sweep_dir, runs)
        todo = []
        for run in runs:
            entry = manifest.entry(run.name)
            entry.update(run.axes())
            entry["run_dir"] = os.path.relpath(run.run_dir, sweep_dir)
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
        _execute(spec, todo, manifest, result, jobs, progress, python, on_run_done)
    return result


def _execute(spec, todo, manifest, result, jobs, progress_enabled, python, on_run_done) -> None:
    total_steps = sum(r.config.train.steps for r in result.runs)
    done_steps = sum(r.config.train.steps for r in result.runs if r.name in result.skipped)
    progress = Progress(len(result.runs), total_steps, done_steps, enabled=progress_enabled)
    index = {r.name: i + 1 for i, r in enumerate(result.runs)}
    width = len(str(len(result.runs)))
    if result.skipped:
        progress.line(f"{len(result.skipped)} of {len(result.runs)} runs already done; {len(todo)} to run")
    # with several at once, the costliest runs start first so that the last ones finish close together
    queue = sorted(todo, key=lambda r: -r.flops) if jobs > 1 else list(todo)
    active: dict[str, _Job] = {}
    env = _child_env(jobs)

    def tag(run):
        return f"[{index[run.name]:>{width}}/{len(result.runs)}] {run.name}"

    def start(job: _Job) -> None:
        cmd = job.commands[job.phase]
        job.log = open(os.path.join(job.run.run_dir, "eval.log" if job.is_eval_phase else "train.log"), "a")
        job.log.write(f"\n# {now_iso()} $ {' '.join(cmd)}\n")
        job.log.flush()
        job.proc = subprocess.Popen(cmd, stdout=job.log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
        manifest.update(job.run.name, pid=job.proc.pid)

    def launch(run: RunSpec) -> None:
        entry = manifest.entry(run.name)
        trained = is_trained(run, entry)
        commands = [] if trained else [train_command(run, spec, python)]
        if spec.evaluate:
            commands.append(eval_command(run, spec.evaluate, python))
        job = _Job(run, commands, started=time.time())
        if trained:  # only the evaluation is missing: training is not touched, nor its times
            manifest.update(run.name, state="evaluating", returncode=None, error=None)
            progress.line(f"{tag(run)}: evaluating")
        else:
            step = last_logged_step(run.run_dir)
            manifest.update(run.name, state="running", started=now_iso(), attempts=entry.get("attempts", 0) + 1,
                            finished=None, returncode=None, error=None)
            how = f"resuming after step {step}" if step > 0 else "starting"
            progress.line(f"{tag(run)}: {how} (N = {run.params:,}, {run.tokens:,} tokens, "
                          f"{run.config.train.steps} steps)")
        start(job)
        active[run.name] = job

    def training_finished(job: _Job) -> None:
        run, wall = job.run, time.time() - job.started
        final = read_json(os.path.join(run.run_dir, "final.json"))
        manifest.update(run.name, state="evaluating" if spec.evaluate else "done", finished=now_iso(),
                        wall_s=round(wall, 3), returncode=0, final=final)
        progress.line(f"{tag(run)}: trained in {wall:.0f} s, {_describe_final(final)}")

    def finish(job: _Job, rc: int) -> None:
        run = job.run
        job.log.close()
        del active[run.name]
        if rc != 0:
            log = os.path.join(run.run_dir, "eval.log" if job.is_eval_phase else "train.log")
            what = "evaluation" if job.is_eval_phase else "training"
            fields = dict(returncode=rc, error=f"{what} exited with {rc}: {_tail(log, 2)}")
            # a failed evaluation leaves the training done: the next sweep only evaluates again
            fields["state"] = "evaluating" if job.is_eval_phase else "failed"
            manifest.update(run.name, **fields)
            result.failed.append(run.name)
            progress.line(f"{tag(run)}: FAILED ({what} exited with {rc}; see {log})")
            return
        if job.is_eval_phase:
            evaluation = read_json(os.path.join(run.run_dir, "eval.json")) or {}
            manifest.update(run.name, state="done", eval=evaluation.get("results"), error=None)
            progress.line(f"{tag(run)}: evaluated")
        else:
            training_finished(job)
        result.done.append(run.name)
        if on_run_done:
            on_run_done(run, manifest.runs[run.name])

    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while queue or active:
            while queue and len(active) < jobs:
                launch(queue.pop(0))
            time.sleep(0.2)
            for job in list(active.values()):
                rc = job.proc.poll()
                if rc is None:
                    continue
                if rc == 0 and job.phase + 1 < len(job.commands):
                    job.log.close()
                    training_finished(job)
                    job.phase += 1
                    start(job)
                    continue
                finish(job, rc)
            current = [r for r in result.runs if r.name in active]
            steps_now = done_steps + sum(r.config.train.steps for r in result.runs if r.name in result.done)
            steps_now += sum(min(last_logged_step(r.run_dir), r.config.train.steps) for r in current)
            progress.steps(steps_now, ", ".join(r.name for r in current))
    except KeyboardInterrupt:
        for job in active.values():
            if job.proc.poll() is None:
                job.proc.terminate()
        for job in active.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            # an interrupted evaluation keeps its finished training; an interrupted training resumes
            manifest.update(job.run.name, state="evaluating" if job.is_eval_phase else "interrupted")
        progress.line(f"interrupted: re-run the same command to continue ({len(active)} run(s) resume from "
                      "their newest checkpoint)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
