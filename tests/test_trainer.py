"""The plain trainer: learning, exact kill/resume, checkpoints, one-line errors for bad runs."""
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import yaml

from fasttrain.config import ConfigError, load_config
from fasttrain.data import open_dataset
from fasttrain.checkpoint.files import list_checkpoints
from fasttrain.optim import lr_at
from fasttrain.train.engine import Engine
from fasttrain.train.trainer import Run, train
from run_output import printed_steps

CLI_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_worker.py")





def _cfg(dataset_dir, out_dir, **over):
    tree = {
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 64},
        "data": {"path": dataset_dir, "seq_len": 32, "repeated_fraction": 0.1, "repeat_count": 4, "seed": 7},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"steps": 30, "global_batch": 8, "micro_batch": 4, "out_dir": str(out_dir), "log_every": 1,
                  "eval_tokens": 2048, "device": "cpu"},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    return tree


def _write_cfg(tmp_path, tree):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_lr_schedule():
    cfg = load_config(None, ["--model.preset", "100k", "--train.steps", "100", "--optim.warmup_steps", "10",
                             "--optim.lr", "1.0", "--optim.min_lr_ratio", "0.1"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


class ScriptedEngine(Engine):
    """An engine that trains nothing and records what the run lifecycle asks of it."""

    calls = []

    def newest_step(self):
        return 2

    def build(self, models, start_step):
        self.calls.append(("build", start_step))

    def step(self, batches, lr, logging):
        self.calls.append(("step", lr, logging))
        return torch.tensor(float(len(self.calls))), torch.tensor(1.0), torch.zeros(len(batches[0]))

    def read(self, loss, grad_norm, rows, repeated):
        return [(float(loss), float(grad_norm), {})]

    def evaluate(self, measure):
        time.sleep(0.05)
        self.calls.append(("eval", measure.step))
        return [{"test_loss": 1.0}]

    def save(self, step):
        self.calls.append(("checkpoint", step))

    def prune(self, step, protected):
        pass


def test_run_schedules_logs_evaluations_and_checkpoints(dataset_dir, tmp_path):
    # The one lifecycle of every engine: which steps log, evaluate and checkpoint, with which learning rate,
    # and a throughput clock that leaves evaluation and checkpoint time out.
    cfg = load_config(None, ["--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "1",
                             "--model.context_length", "32", "--data.path", dataset_dir, "--train.steps", "10",
                             "--train.global_batch", "2", "--train.log_every", "4", "--train.eval_every", "5",
                             "--train.checkpoint_every", "3", "--train.checkpoint_log_spaced", "true",
                             "--optim.warmup_steps", "2", "--train.device", "cpu", "--train.out_dir",
                             str(tmp_path / "run")])
    ScriptedEngine.calls = calls = []
    (summary,) = Run([cfg], ScriptedEngine).train(resume=True)
    assert summary["step"] == 10 and summary["test_loss"] == 1.0
    assert calls[0] == ("build", 2)
    assert [c[1] for c in calls if c[0] == "step"] == [lr_at(s, cfg) for s in range(2, 10)]
    assert [i + 3 for i, c in enumerate(c for c in calls if c[0] == "step") if c[2]] == [4, 8, 10]
    logged = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in logged] == [4, 8, 10]
    tokens_per_step = 2 * 32
    for r, steps_timed in zip(logged, (2, 4, 2)):  # the evaluations' sleeps are not counted
        assert r["tokens_per_s"] > steps_timed * tokens_per_step / 0.05
    # evaluations every 5 steps, at the log-spaced checkpoints (4, 8) and at the end
    assert [c[1] for c in calls if c[0] == "eval"] == [4, 5, 8, 10]
    assert [c[1] for c in calls if c[0] == "checkpoint"] == [3, 4, 6, 8, 9, 10]


def test_loss_falls_below_unigram_entropy(dataset_dir, tmp_path):
    tree = _cfg(dataset_dir, tmp_path / "run", train__steps=150, data__repeated_fraction=0.0, data__repeat_count=1,
                optim__warmup_steps=10, optim__lr=1e-2)
    summary = train(load_config(_write_cfg(tmp_path, tree)))
    ds = open_dataset(dataset_dir)
    counts = Counter(ds.train.tokens.tolist())
    total = sum(counts.values())
    unigram_entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    losses = _losses(str(tmp_path / "run"))
    assert losses[-1] < 0.6 * unigram_entropy, (losses[-1], unigram_entropy)
    assert summary["test_loss"] < 0.7 * unigram_entropy
    assert os.path.exists(tmp_path / "run" / "final.json") and os.path.exists(tmp_path / "run" / "config.yaml")


def test_micro_batching_does_not_change_the_result(dataset_dir, tmp_path):
    a = train(load_config(_write_cfg(tmp_path, _cfg(dataset_dir, tmp_path / "a", train__steps=6, train__micro_batch=8))))
    b = train(load_config(_write_cfg(tmp_path, _cfg(dataset_dir, tmp_path / "b", train__steps=6, train__micro_batch=2))))
    assert _losses(str(tmp_path / "a")) == pytest.approx(_losses(str(tmp_path / "b")), rel=1e-5)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


def test_run_stopped_before_final_json_resumes_to_it(dataset_dir, tmp_path, capsys):
    cfg = load_config(_write_cfg(tmp_path, _cfg(dataset_dir, tmp_path / "run", train__steps=6)))
    summary = train(cfg)
    assert printed_steps(capsys.readouterr().out) == list(range(1, 7))
    os.remove(tmp_path / "run" / "final.json")  # a kill between the last checkpoint and final.json
    assert train(cfg, resume=True) == summary
    assert printed_steps(capsys.readouterr().out) == []  # evaluated again, not trained again
    assert json.load(open(tmp_path / "run" / "final.json")) == summary


def test_compiled_training_matches_eager(dataset_dir, tmp_path):
    # train.compile runs the same step through torch.compile (inductor): same losses up to reordered sums.
    eager = train(load_config(_write_cfg(tmp_path, _cfg(dataset_dir, tmp_path / "eager", train__steps=6))))
    tree = _cfg(dataset_dir, tmp_path / "compiled", train__steps=6, train__compile=True,
                train__compile_mode="max-autotune-no-cudagraphs")
    compiled = train(load_config(_write_cfg(tmp_path, tree)))
    assert _losses(str(tmp_path / "compiled")) == pytest.approx(_losses(str(tmp_path / "eager")), rel=1e-4)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "fasttrain.cli", *args], capture_output=True, text=True, **kw)


def test_killed_run_resumes_to_identical_losses(dataset_dir, tmp_path):
    straight = tmp_path / "straight"
    cfg_path = _write_cfg(tmp_path, _cfg(dataset_dir, straight, train__checkpoint_every=4))
    assert _run_cli(["train", "--config", cfg_path], timeout=300).returncode == 0
    expected = _losses(str(straight))
    assert len(expected) == 30

    killed = tmp_path / "killed"
    cfg_path = _write_cfg(tmp_path, _cfg(dataset_dir, killed, train__checkpoint_every=4))
    # 0.2 s per step: the 22 steps after the step-8 checkpoint last over 4 s, so the kill lands mid-run.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, CLI_WORKER, "train", "--config", cfg_path],
                                env=dict(os.environ, FASTTRAIN_TEST_STEP_DELAY="0.2"), stdout=log, stderr=log)
    try:
        deadline = time.time() + 240
        while not any(s >= 8 for s, _ in list_checkpoints(str(killed))):
            assert proc.poll() is None, f"the run ended early: {(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.time() < deadline, "no step-8 checkpoint appeared"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL, mid-training
        proc.wait()
    done_before_kill = max(s for s, _ in list_checkpoints(str(killed)))
    assert 8 <= done_before_kill < 30, "the run finished before it could be killed"

    again = _run_cli(["train", "--config", cfg_path], timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarts over a run
    resumed = _run_cli(["train", "--config", cfg_path, "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # The resumed process ran only the steps after its checkpoint (a restart from 0 gives the same losses).
    assert printed_steps(resumed.stdout) == list(range(done_before_kill + 1, 31)), resumed.stdout
    assert _losses(str(killed)) == expected  # bit-identical on the CPU
    assert [s for s, _ in list_checkpoints(str(killed))] == [30]  # only the latest is kept by default


def test_resume_with_a_different_config_is_refused(dataset_dir, tmp_path):
    tree = _cfg(dataset_dir, tmp_path / "run", train__steps=8)
    train(load_config(_write_cfg(tmp_path, tree)))
    tree["optim"]["lr"] = 1e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        train(load_config(_write_cfg(tmp_path, tree)), resume=True)


@pytest.mark.parametrize("overrides, expected", [
    (["--optim.warmup_steps", "100"], "optim.warmup_steps"),
    (["--data.path", "/nonexistent/dataset"], "/nonexistent/dataset"),
    (["--train.steps", "100000"], "tokens"),  # more than the tiny corpus holds
    (["--model.n_head", "3"], "model.d_model"),
])
def test_bad_runs_fail_with_one_line(dataset_dir, tmp_path, overrides, expected):
    cfg_path = _write_cfg(tmp_path, _cfg(dataset_dir, tmp_path / "run"))
    res = _run_cli(["train", "--config", cfg_path, *overrides], timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], res.stderr
    assert not list_checkpoints(str(tmp_path / "run"))


def test_out_of_memory_fails_with_one_line(dataset_dir, tmp_path, monkeypatch, capsys):
    from fasttrain import cli

    def out_of_memory(cfg, resume=False):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "train", out_of_memory)
    assert cli.main(["train", "--config", _write_cfg(tmp_path, _cfg(dataset_dir, tmp_path / "run"))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of GPU memory: lower train.micro_batch")


def test_mfu_is_over_the_datasheet_peak_with_the_measured_matmul_beside_it(monkeypatch):
    from fasttrain import device
    from fasttrain.train.metrics import step_record

    record = step_record(10, 1000, 2.0, 1e-3, 0.5, steps_timed=10, elapsed=2.0, flops_per_step=1e12,
                         peak_flops=1e13, matmul_flops=8e12)
    assert record["tokens_per_s"] == 5000
    assert record["mfu"] == pytest.approx(0.5) and record["mfu_vs_matmul"] == pytest.approx(0.625)
    assert not {"mfu", "mfu_vs_matmul"} & set(step_record(10, 1000, 2.0, 1e-3, 0.5, 10, 2.0, 1e12, None, None))
    for name, peak in {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100 PCIe": 756e12,
                       "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "Some Other GPU": None}.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None, name=name: name)
        assert device.peak_flops(torch.device("cuda")) == peak
    assert device.peak_flops(torch.device("cpu")) is None


def test_engines_read_batches_ahead_on_a_gpu_only(dataset_dir, tmp_path):
    # A reader thread overlaps the GPU's work; on a CPU it competes with the step for the cores.
    from fasttrain.config import config_from_dict

    engine = Engine([config_from_dict(_cfg(dataset_dir, tmp_path / "r"))])
    assert engine.read_ahead == 0
    engine.device = torch.device("cuda")
    assert engine.read_ahead == 2
