"""A real sweep, killed mid-run with SIGKILL and started again: every run completes once."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fasttrain.sweep.cli import main as sweep_main
from fasttrain.sweep.grid import SweepError, load_sweep
from fasttrain.sweep.runner import run_sweep

STEPS = 300  # long enough to kill the second run between two of its checkpoints


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fasttrain.data import prepare_dataset

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(150)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))) for _ in range(300)]
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_dataset(path, docs, vocab_size=280, test_fraction=0.1, progress=False)
    return path


def write_sweep(tmp_path, dataset, lr=3e-3):
    tree = {
        "out_dir": str(tmp_path / "sweep"),
        "base": {"model": {"context_length": 16}, "data": {"path": dataset, "seq_len": 16},
                 "optim": {"lr": lr, "warmup_steps": 5},
                 "train": {"global_batch": 4, "log_every": 10, "checkpoint_every": 25, "eval_tokens": 256,
                           "device": "cpu"}},
        "grid": {"sizes": ["100k"], "repeated_fraction": [0.1], "repeat_count": [2, 4]},
        "budget": {"steps": STEPS},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def manifest(tmp_path):
    with open(tmp_path / "sweep" / "manifest.json") as f:
        return json.load(f)["runs"]


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_sweep_resumes_without_recomputing(tmp_path, dataset):
    sweep_file = write_sweep(tmp_path, dataset)
    runs_dir = tmp_path / "sweep" / "runs"
    first, second, third = "100k_f0_s0", "100k_f0.1_E2_uniform_s0", "100k_f0.1_E4_uniform_s0"
    cmd = [sys.executable, "-m", "fasttrain.sweep", "sweep", sweep_file]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread is fastest and steadiest on a busy CPU
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        # kill the sweep once the second run has written a checkpoint (and the first is done)
        wait_for(lambda: list((runs_dir / second / "checkpoints").glob("step_*.pt")) if (runs_dir / second).exists()
                 else None, 240, "a checkpoint of the second run")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = manifest(tmp_path)
    assert before[first]["state"] == "done" and before[second]["state"] == "running"
    assert before[third]["state"] == "pending"
    # the trainer of the killed sweep dies with it (no orphan keeps writing into the run folder)
    wait_for(lambda: not pid_alive(before[second]["pid"]), 30, "the orphaned trainer to exit")
    assert not (runs_dir / second / "final.json").exists()
    first_final_mtime = os.path.getmtime(runs_dir / first / "final.json")
    first_ckpt = sorted((runs_dir / first / "checkpoints").glob("step_*.pt"))[-1]
    first_ckpt_mtime = os.path.getmtime(first_ckpt)

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 of 3 runs already done; 2 to run" in done.stdout
    after = manifest(tmp_path)
    assert {name: e["state"] for name, e in after.items()} == {first: "done", second: "done", third: "done"}
    # the finished run was not touched
    assert after[first]["finished"] == before[first]["finished"] and after[first]["attempts"] == 1
    assert os.path.getmtime(runs_dir / first / "final.json") == first_final_mtime
    assert os.path.getmtime(first_ckpt) == first_ckpt_mtime
    # the interrupted run resumed from its checkpoint instead of starting over
    assert after[second]["attempts"] == 2 and after[third]["attempts"] == 1
    log = (runs_dir / second / "train.log").read_text()
    second_attempt = log.split("\n# ")[-1]
    first_step = int(re.search(r"step (\d+)/", second_attempt).group(1))
    assert first_step > 25, second_attempt[:500]
    # every run has each logged step exactly once and a final evaluation
    for name in (first, second, third):
        steps = [json.loads(line)["step"] for line in (runs_dir / name / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        assert steps == list(range(10, STEPS + 1, 10)), name
        assert "test_loss" in json.loads((runs_dir / name / "final.json").read_text())
        assert after[name]["final"]["test_loss"] > 0

    # a third invocation has nothing to do
    again = run_sweep(load_sweep(sweep_file), progress=False)
    assert again.done == [] and sorted(again.skipped) == sorted([first, second, third])
    assert manifest(tmp_path)[first]["finished"] == before[first]["finished"]

    # changing what a run means is refused, naming the run, before anything is trained
    changed = write_sweep(tmp_path, dataset, lr=1e-3)
    with pytest.raises(SweepError, match=r"run 100k_f0_s0: .*optim.lr"):
        run_sweep(load_sweep(changed), progress=False)


def test_dry_run_prints_the_plan(tmp_path, dataset, capsys):
    sweep_file = write_sweep(tmp_path, dataset)
    assert sweep_main(["sweep", sweep_file, "--dry-run", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("100k_f0_s0", "100k_f0.1_E2_uniform_s0", "100k_f0.1_E4_uniform_s0"):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        # N (non-embedding), tokens = steps x 4 x 16, FLOPs = 6 N D, a measured speed, state, data check
        tokens = STEPS * 4 * 16
        assert "100k" in row and f"{tokens / 1e3:.3g}k" in row and f"{6 * 100_096 * tokens / 1e9:.3g}B" in row
        assert row.rstrip().endswith("pending  ok")
    assert "throughput: measured now (3 timed steps)" in out
    assert "with --jobs 2" in out
    assert not (tmp_path / "sweep" / "runs").exists()  # a dry run trains nothing and writes no run folder
    table = json.loads((tmp_path / "sweep" / "throughput.json").read_text())
    assert len(table) == 1 and list(table.values())[0]["tokens_per_s"] > 0
    # the second dry run reads the stored table instead of measuring again
    assert sweep_main(["sweep", sweep_file, "--dry-run"]) == 0
    assert "throughput: table (3 timed steps on cpu)" in capsys.readouterr().out


def test_signalled_trainer_is_queued_again(tmp_path, dataset):
    # A trainer signalled behind the sweep's back stops at a checkpoint (exit 75): the runner queues it again
    # instead of failing it, and it resumes where it stopped.
    sweep_file = write_sweep(tmp_path, dataset)
    tree = yaml.safe_load(open(sweep_file))
    tree["grid"]["repeated_fraction"] = [0.0]  # one run: the baseline
    sweep_file = str(tmp_path / "baseline.yaml")
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(tree))
    first = "100k_f0_s0"
    run_dir = tmp_path / "sweep" / "runs" / first
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fasttrain.sweep", "sweep", sweep_file], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        def trainer_at_step_30():
            entry = manifest(tmp_path).get(first, {}) if (tmp_path / "sweep" / "manifest.json").exists() else {}
            lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
            return entry.get("pid") if lines and json.loads(lines[-1]).get("step", 0) >= 30 else None

        os.kill(wait_for(trainer_at_step_30, 240, "the first run's trainer at step 30"), signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert re.search(rf"{first}: stopped at a checkpoint \(step \d+, exit status 75\); queued again to resume", out)
    after = manifest(tmp_path)
    assert {e["state"] for e in after.values()} == {"done"} and after[first]["attempts"] == 2
    second_attempt = (run_dir / "train.log").read_text().split("\n# ")[-1]
    assert int(re.search(r"step (\d+)/", second_attempt).group(1)) > 30
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(10, STEPS + 1, 10))
