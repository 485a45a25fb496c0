"""The run lifecycle every engine shares: one writer per folder, stop on a signal and resume exactly, a moved
folder resumes, init_from, the loss split by repeated and unique sequences, evaluations during training."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import fasttrain
from fasttrain.checkpoint.files import checkpoint_path, list_checkpoints
from fasttrain.config import load_config
from fasttrain.train import REQUEUE_EXIT_CODE, train
from fasttrain.train.trainer import folder_lock

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = {"plain": os.path.join(HERE, "cli_worker.py"), "packed": os.path.join(HERE, "cli_worker.py"),
           "deepspeed": os.path.join(HERE, "ds_worker.py")}


def tree(dataset_dir, out_dir, **train_keys):
    return {
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2, "context_length": 32},
        "data": {"path": dataset_dir, "repeated_fraction": 0.25, "repeat_count": 4},
        "optim": {"warmup_steps": 1, "lr": 3e-3},
        "train": {"steps": 12, "global_batch": 4, "checkpoint_every": 4, "out_dir": str(out_dir), "device": "cpu",
                  "eval_tokens": 256, "log_every": 1, **train_keys},
    }


def write(path, content):
    path.write_text(yaml.safe_dump(content))
    return str(path)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)


# ---- one writer per run folder ------------------------------------------------------------------------
def test_a_busy_run_folder_is_refused_naming_its_holder(dataset_dir, tmp_path):
    run = tmp_path / "run"
    config = write(tmp_path / "cfg.yaml", tree(dataset_dir, run))
    with folder_lock(str(run)):  # this process holds the folder, as a running trainer would
        res = subprocess.run([sys.executable, "-m", "fasttrain.cli", "train", "--config", config],
                             capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and f"pid {os.getpid()}" in lines[0] and "in use" in lines[0]
    assert not list_checkpoints(str(run)) and not os.path.exists(run / "metrics.jsonl")


def test_the_lock_of_a_dead_trainer_is_taken_over(dataset_dir, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fasttrain.train.trainer import folder_lock\n"
                               f"with folder_lock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # as a crashed node or an OOM kill would
    holder.wait()
    assert "pid" in (run / ".lock").read_text()  # its record is still there
    summary = train(load_config(write(tmp_path / "cfg.yaml", tree(dataset_dir, run, steps=2))))
    assert summary["step"] == 2


# ---- stop on a signal, resume exactly ---------------------------------------------------------------
def stop_mid_run(worker, configs, run_dirs, signum):
    args = [a for c in configs for a in ("--config", c)]
    proc = subprocess.Popen([sys.executable, worker, "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env(FASTTRAIN_TEST_STEP_DELAY="0.3"))
    deadline = time.time() + 240
    while time.time() < deadline:
        logged = os.path.exists(os.path.join(run_dirs[0], "metrics.jsonl")) and len(losses(run_dirs[0])) >= 3
        if logged:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


@pytest.mark.parametrize("engine", ["plain", "packed", "deepspeed"])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_is_exact(dataset_dir, tmp_path, engine):
    names = ["a", "b"] if engine == "packed" else ["a"]
    extra = {"deepspeed": {"zero_stage": 1}} if engine == "deepspeed" else {}
    straight, stopped = [], []
    for i, name in enumerate(names):
        for kind, out in (("straight", straight), ("stopped", stopped)):
            t = {**tree(dataset_dir, tmp_path / f"{kind}_{name}", seed=i, precision="fp32"), **extra}
            out.append(write(tmp_path / f"{kind}_{name}.yaml", t))
    run = [str(tmp_path / f"stopped_{name}") for name in names]
    ok = subprocess.run([sys.executable, WORKERS[engine], "train", *[a for c in straight for a in ("--config", c)]],
                        capture_output=True, text=True, env=env(), timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]

    code, err = stop_mid_run(WORKERS[engine], stopped, run, signal.SIGUSR1 if engine != "plain" else signal.SIGTERM)
    assert code == REQUEUE_EXIT_CODE, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIG")
    step = max(s for s, _ in list_checkpoints(run[0])) if engine != "deepspeed" else None
    if engine == "deepspeed":
        step = max(int(d.split("_")[1]) for d in os.listdir(os.path.join(run[0], "ds_checkpoints")) if d.startswith("step_"))
    assert 3 <= step < 12  # the checkpoint of the step the signal ended
    assert [s for s, _ in losses(run[0])] == list(range(1, step + 1))
    assert not os.path.exists(os.path.join(run[0], "final.json"))

    resumed = subprocess.run([sys.executable, WORKERS[engine], "train", *[a for c in stopped for a in ("--config", c)],
                              "--resume"], capture_output=True, text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in names:
        got, want = losses(tmp_path / f"stopped_{name}"), losses(tmp_path / f"straight_{name}")
        assert [s for s, _ in got] == list(range(1, 13))  # no step lost or logged twice
        assert got == want  # bit-identical on the CPU


# ---- a run folder is where it lies now -----------------------------------------------------------------
def test_a_moved_run_folder_resumes(dataset_dir, tmp_path):
    first = tmp_path / "first"
    train(load_config(write(tmp_path / "cfg.yaml", tree(dataset_dir, first, steps=8))))
    os.remove(first / "final.json")
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(first), moved)
    summary = train(load_config(str(moved), ["--train.steps", "8"]), resume=True)
    assert summary["step"] == 8 and os.path.exists(moved / "final.json") and not os.path.exists(first)
    assert yaml.safe_load((moved / "config.yaml").read_text())["train"]["out_dir"] == str(moved)


# ---- init_from ------------------------------------------------------------------------------------------
def test_init_from_starts_from_the_source_weights_with_a_fresh_optimizer(dataset_dir, tmp_path):
    source = tmp_path / "source"
    train(load_config(write(tmp_path / "src.yaml", tree(dataset_dir, source, steps=8))))
    src_model, _ = fasttrain.load_model(str(source))
    tuned = tmp_path / "tuned"
    cfg = load_config(write(tmp_path / "ft.yaml", tree(dataset_dir, tuned, steps=4, init_from=str(source))),
                      ["--optim.lr", "1e-12"])
    train(cfg)
    ckpt = torch.load(checkpoint_path(str(tuned), 4), weights_only=True)
    for name, value in src_model.state_dict().items():  # steps at lr 1e-12: still the source's weights
        assert torch.allclose(ckpt["model"][name], value, atol=1e-6), name
    assert all(s["step"].item() == 4 for s in ckpt["optimizer"]["state"].values())  # a fresh AdamW
    assert yaml.safe_load((tuned / "config.yaml").read_text())["train"]["init_from"] == str(source)
    scratch = tmp_path / "scratch"
    train(load_config(write(tmp_path / "s.yaml", tree(dataset_dir, scratch, steps=4))))
    assert losses(tuned)[0][1] < losses(scratch)[0][1] - 0.05  # it starts trained


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("shape", "does not match the model"),
    ("corrupt", "cannot read the checkpoint"),
])
def test_init_from_problems_are_one_line(dataset_dir, tmp_path, problem, message):
    source = tmp_path / "source"
    if problem != "missing":
        d_model = 32 if problem == "shape" else 16
        t = tree(dataset_dir, source, steps=4)
        t["model"]["d_model"] = d_model
        train(load_config(write(tmp_path / "src.yaml", t)))
        if problem == "corrupt":
            path = checkpoint_path(str(source), 4)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    config = write(tmp_path / "ft.yaml", tree(dataset_dir, tmp_path / "tuned", steps=2, init_from=str(source)))
    res = subprocess.run([sys.executable, "-m", "fasttrain.cli", "train", "--config", config], capture_output=True,
                         text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert message in lines[0] and ("init_from" in lines[0] or str(source) in lines[0])
    assert not list_checkpoints(str(tmp_path / "tuned"))


# ---- what metrics.jsonl records ---------------------------------------------------------------------
def test_the_logged_loss_splits_into_repeated_and_unique_sequences(dataset_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(write(tmp_path / "cfg.yaml", tree(dataset_dir, run, steps=6, global_batch=8, micro_batch=4)))
    train(cfg)
    from fasttrain.data.sampler import TrainingStream
    from fasttrain.data import open_dataset

    stream = TrainingStream.from_config(open_dataset(dataset_dir), cfg)
    model_losses = [r for r in records(run) if "loss" in r]
    assert any("loss_repeated" in r for r in model_losses)
    for r in model_losses:
        repeated = stream.describe_batch(r["step"] - 1, 8)["is_repeated"]
        n_rep = int(repeated.sum())
        assert ("loss_repeated" in r) == (n_rep > 0) and ("loss_unique" in r) == (n_rep < 8)
        if 0 < n_rep < 8:  # the step's loss is the mean over its sequences
            mean = (n_rep * r["loss_repeated"] + (8 - n_rep) * r["loss_unique"]) / 8
            assert mean == pytest.approx(r["loss"], rel=1e-5)


def test_evaluations_during_training_record_test_and_repeated_loss(dataset_dir, tmp_path):
    run = tmp_path / "run"
    t = tree(dataset_dir, run, steps=8, eval_every=4, checkpoint_log_spaced=True, eval_metrics=["test", "repeated"])
    t["model"]["context_length"] = 128
    t["data"]["seq_len"] = 104  # long enough for a prefix-matching sequence (101 tokens)
    summary = train(load_config(write(tmp_path / "cfg.yaml", t), ["--train.eval_metrics", "test,repeated,induction"]))
    evals = [r for r in records(run) if "test_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 4, 8]  # every 4 steps and at the log-spaced checkpoints
    for r in evals:
        assert r["tokens"] == r["step"] * 4 * 104 and r["repeated_loss"] > 0 and "induction_score_max" in r
    assert evals[-1]["repeated_times_seen"] == 4.0 and evals[0]["repeated_times_seen"] < 4.0
    assert summary == {k: v for k, v in evals[-1].items()}
