"""Packed sweeps: same-shape runs grouped into packs, each pack trained by one process, every run ending as it
would alone; a killed packed sweep continues its packs from their common checkpoint."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fasttrain.sweep.cli import main as sweep_main
from fasttrain.sweep.grid import SweepError, expand, load_sweep, spec_from_dict
from fasttrain.sweep.runner import plan_jobs, resolve_pack, run_sweep, train_command

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 160
CHECKPOINT_EVERY = 20
RUNS = ("100k_f0_s0", "100k_f0.1_E2_uniform_s0", "100k_f0.1_E4_uniform_s0")


def sweep_tree(out_dir, data_path, **changes):
    tree = {
        "out_dir": str(out_dir),
        "base": {"model": {"context_length": 16}, "data": {"path": data_path, "seq_len": 16},
                 "optim": {"lr": 3e-3, "warmup_steps": 5},
                 "train": {"global_batch": 4, "log_every": 10, "checkpoint_every": CHECKPOINT_EVERY,
                           "eval_tokens": 256, "device": DEVICE, "precision": "fp32"}},
        "grid": {"sizes": ["100k"], "repeated_fraction": [0.1], "repeat_count": [2, 4]},
        "budget": {"steps": STEPS},
    }
    tree.update(changes)
    return tree


def write_sweep(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def read_manifest(sweep_dir):
    with open(os.path.join(sweep_dir, "manifest.json")) as f:
        return json.load(f)["runs"]


def final_test_loss(sweep_dir, name):
    with open(os.path.join(sweep_dir, "runs", name, "final.json")) as f:
        return json.load(f)["test_loss"]


def logged_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest and steadiest on a busy CPU


@pytest.fixture(scope="module")
def alone(dataset_dir, tmp_path_factory):
    """The reference: the sweep with every run trained in its own process."""
    sweep_dir = tmp_path_factory.mktemp("alone") / "sweep"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        result = run_sweep(spec_from_dict(sweep_tree(sweep_dir, dataset_dir)), progress=False)
    assert sorted(result.done) == sorted(RUNS) and not result.failed
    assert {e["pack"] == [name] for name, e in read_manifest(sweep_dir).items()} == {True}
    return {name: final_test_loss(sweep_dir, name) for name in RUNS}


def test_runs_are_grouped_by_shape_and_checkpoint_step(tmp_path):
    tree = sweep_tree(tmp_path / "sweep", str(tmp_path / "data"), pack=3)
    tree["grid"] = {"sizes": ["100k", "340k"], "repeated_fraction": [0.1, 0.5], "repeat_count": [2, 4]}
    spec = spec_from_dict(tree)
    runs = expand(spec)
    by_name = {r.name: r for r in runs}
    assert resolve_pack(spec) == (3, None)
    names = lambda jobs: [[r.name for r in job] for job in jobs]  # noqa: E731
    # two sizes do not pack together; each size's runs fill packs of 3 in the sweep's order
    assert names(plan_jobs(runs, {}, 3)) == [
        ["100k_f0_s0", "100k_f0.1_E2_uniform_s0", "100k_f0.1_E4_uniform_s0"],
        ["100k_f0.5_E2_uniform_s0", "100k_f0.5_E4_uniform_s0"],
        ["340k_f0_s0", "340k_f0.1_E2_uniform_s0", "340k_f0.1_E4_uniform_s0"],
        ["340k_f0.5_E2_uniform_s0", "340k_f0.5_E4_uniform_s0"],
    ]
    assert names(plan_jobs(runs, {}, 1)) == [[r.name] for r in runs]
    # runs stopped at another checkpoint step form packs of their own
    for name in ("100k_f0.1_E2_uniform_s0", "100k_f0.5_E4_uniform_s0"):
        os.makedirs(os.path.join(by_name[name].run_dir, "checkpoints"))
        open(os.path.join(by_name[name].run_dir, "checkpoints", "step_0000010.pt"), "w").close()
    # trained runs that wait for their evaluation form packs of their own (one evaluation process each)
    for name in ("340k_f0.5_E4_uniform_s0", "340k_f0.1_E4_uniform_s0"):
        os.makedirs(by_name[name].run_dir)
        open(os.path.join(by_name[name].run_dir, "final.json"), "w").close()
    waiting = {"340k_f0.5_E4_uniform_s0": {"state": "evaluating"}, "340k_f0.1_E4_uniform_s0": {"state": "done"}}
    jobs = plan_jobs(runs, waiting, 3)
    assert names(jobs) == [
        ["100k_f0_s0", "100k_f0.1_E4_uniform_s0", "100k_f0.5_E2_uniform_s0"],
        ["100k_f0.1_E2_uniform_s0", "100k_f0.5_E4_uniform_s0"],
        ["340k_f0_s0", "340k_f0.1_E2_uniform_s0", "340k_f0.5_E2_uniform_s0"],
        ["340k_f0.1_E4_uniform_s0", "340k_f0.5_E4_uniform_s0"],
    ]
    # a pack is one command with every run's config
    cmd = train_command(jobs[0], spec)
    assert cmd[1:4] == ["-m", "fasttrain.cli", "train"] and cmd[-1] == "--resume"
    assert cmd[4:-1:2] == ["--config"] * 3
    assert cmd[5:-1:2] == [os.path.join(by_name[n].run_dir, "config.yaml") for n in names(jobs)[0]]


def test_pack_setting_is_validated_and_off_with_deepspeed(tmp_path):
    tree = sweep_tree(tmp_path / "sweep", str(tmp_path / "data"), pack=4)
    spec = spec_from_dict(tree)
    assert spec.pack == 4 and resolve_pack(spec, 2) == (2, None)  # --pack overrides the file
    with pytest.raises(SweepError, match="--pack 0: must be at least 1"):
        resolve_pack(spec, 0)
    for bad in (0, "two", 1.5, True):
        with pytest.raises(SweepError, match="pack"):
            spec_from_dict(sweep_tree(tmp_path, "data", pack=bad))
    size, note = resolve_pack(spec_from_dict(sweep_tree(tmp_path, "data", pack=4, num_gpus=2)))
    assert size == 1 and "pack 4 ignored" in note and "deepspeed" in note
    assert spec_from_dict(sweep_tree(tmp_path, "data")).pack == 1


def test_packed_sweep_equals_runs_trained_alone(tmp_path, dataset_dir, alone, capsys):
    sweep_dir = str(tmp_path / "sweep")
    sweep_file = write_sweep(tmp_path / "sweep.yaml", sweep_tree(sweep_dir, dataset_dir, evaluate=["test"]))
    assert sweep_main(["sweep", sweep_file, "--pack", "2"]) == 0
    out = capsys.readouterr().out
    assert f"[1,2/3] pack of 2 ({RUNS[0]}, {RUNS[1]}): starting" in out
    assert f"[3/3] {RUNS[2]}: starting" in out
    for name in RUNS:
        assert final_test_loss(sweep_dir, name) == pytest.approx(alone[name], rel=1e-4), name
        assert logged_steps(os.path.join(sweep_dir, "runs", name)) == list(range(10, STEPS + 1, 10))
    entries = read_manifest(sweep_dir)
    assert {name: e["state"] for name, e in entries.items()} == dict.fromkeys(RUNS, "done")
    assert entries[RUNS[0]]["pack"] == entries[RUNS[1]]["pack"] == list(RUNS[:2])
    assert entries[RUNS[2]]["pack"] == [RUNS[2]]
    for key in ("started", "finished", "wall_s"):  # one training process for the pack
        assert entries[RUNS[0]][key] == entries[RUNS[1]][key] != entries[RUNS[2]][key], key
    for name, e in entries.items():
        assert e["attempts"] == 1 and e["returncode"] == 0 and e["error"] is None
        assert e["final"]["test_loss"] == final_test_loss(sweep_dir, name)
        assert e["eval"]["test_loss"] > 0  # each run of the pack evaluated on its own
    # the pack's training log is in its first run's folder; the other run's log says so
    first_log = open(os.path.join(sweep_dir, "runs", RUNS[0], "train.log")).read()
    assert first_log.count("--config") == 2 and f"step {STEPS}/{STEPS}" in first_log
    other_log = open(os.path.join(sweep_dir, "runs", RUNS[1], "train.log")).read()
    assert f"its log is {os.path.join(sweep_dir, 'runs', RUNS[0], 'train.log')}" in other_log
    assert "step " not in other_log
    # the pack is evaluated in one process too, logged in its first run's eval.log
    first_eval_log = open(os.path.join(sweep_dir, "runs", RUNS[0], "eval.log")).read()
    assert all(os.path.join(sweep_dir, "runs", name) in first_eval_log for name in RUNS[:2])
    other_eval_log = open(os.path.join(sweep_dir, "runs", RUNS[1], "eval.log")).read()
    assert f"its log is {os.path.join(sweep_dir, 'runs', RUNS[0], 'eval.log')}" in other_eval_log

    # the plan of a packed sweep: pack column and a time per pack, with what it assumes
    assert sweep_main(["sweep", sweep_file, "--pack", "3", "--dry-run", "--no-measure"]) == 0
    plan_out = capsys.readouterr().out
    assert "3 runs on" in plan_out and "0 packs of up to 3 runs left" in plan_out
    assert "assumed to train K times as fast as one run" in plan_out


def test_killed_packed_sweep_resumes_its_pack(tmp_path, dataset_dir, alone, capsys):
    sweep_dir = str(tmp_path / "sweep")
    sweep_file = write_sweep(tmp_path / "sweep.yaml", sweep_tree(sweep_dir, dataset_dir, pack=3))
    run_dirs = [os.path.join(sweep_dir, "runs", name) for name in RUNS]

    # the plan before anything ran: one pack whose time is one run's time
    assert sweep_main(["sweep", sweep_file, "--dry-run", "--no-measure"]) == 0
    plan_out = capsys.readouterr().out
    assert "1 pack of up to 3 runs left" in plan_out
    assert all(re.search(rf"^{re.escape(n)} .* 1 +pending  ", plan_out, re.M) for n in RUNS), plan_out

    proc = subprocess.Popen([sys.executable, "-m", "fasttrain.sweep", "sweep", sweep_file], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not all(os.path.isdir(os.path.join(d, "checkpoints")) and
                      any(f.endswith(".pt") for f in os.listdir(os.path.join(d, "checkpoints"))) for d in run_dirs):
            assert time.time() < deadline and proc.poll() is None, "no checkpoint in every run of the pack"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    before = read_manifest(sweep_dir)
    assert {name: (e["state"], e["attempts"], e["pack"]) for name, e in before.items()} == {
        name: ("interrupted", 1, list(RUNS)) for name in RUNS}
    assert not any(os.path.exists(os.path.join(d, "final.json")) for d in run_dirs)
    # the packs the next sweep forms: one, unless the kill fell between two runs' checkpoint writes
    expected = [[r.name for r in job] for job in plan_jobs(expand(load_sweep(sweep_file)), before, 3)]

    result = run_sweep(load_sweep(sweep_file), progress=False)
    assert sorted(result.done) == sorted(RUNS) and not result.failed
    after = read_manifest(sweep_dir)
    for job in expected:
        for name in job:
            assert after[name]["state"] == "done" and after[name]["attempts"] == 2 and after[name]["pack"] == job
        # the second attempt continued from a checkpoint instead of starting over
        log = open(os.path.join(sweep_dir, "runs", job[0], "train.log")).read()
        second_attempt = log.split("\n# ")[-1]
        assert int(re.search(r"step (\d+)/", second_attempt).group(1)) > CHECKPOINT_EVERY, second_attempt[:300]
    for name, run_dir in zip(RUNS, run_dirs):
        assert logged_steps(run_dir) == list(range(10, STEPS + 1, 10)), name
        assert final_test_loss(sweep_dir, name) == pytest.approx(alone[name], rel=1e-4), name


def test_pack_evaluation_that_stops_early_fails_only_the_runs_left(tmp_path, dataset_dir):
    # Three trained runs are evaluated in one process; the second one's checkpoint is gone, so the process
    # stops there: the first run is done, the other two wait for their evaluation (and say why).
    sweep_dir = str(tmp_path / "sweep")
    tree = sweep_tree(sweep_dir, dataset_dir, budget={"steps": 20}, pack=3)
    result = run_sweep(spec_from_dict(tree), progress=False)
    assert sorted(result.done) == sorted(RUNS)
    broken = os.path.join(sweep_dir, "runs", RUNS[1], "checkpoints")
    for name in os.listdir(broken):
        os.remove(os.path.join(broken, name))
    result = run_sweep(spec_from_dict({**tree, "evaluate": ["test"]}), progress=False)
    assert result.done == [RUNS[0]] and result.failed == list(RUNS[1:])
    entries = read_manifest(sweep_dir)
    assert entries[RUNS[0]]["state"] == "done" and entries[RUNS[0]]["eval"]["test_loss"] > 0
    for name in RUNS[1:]:
        assert entries[name]["state"] == "evaluating" and "evaluation exited with" in entries[name]["error"]
    assert not os.path.exists(os.path.join(sweep_dir, "runs", RUNS[2], "eval.json"))
