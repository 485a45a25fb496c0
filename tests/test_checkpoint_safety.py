"""No file fasttrain reads can run code: a checkpoint carrying a pickled payload is refused, through every
entry point, before anything in it runs; checkpoints of the previous release load and resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import fasttrain
from fasttrain.checkpoint import CheckpointError
from fasttrain.checkpoint.deepspeed import ds_allowed
from fasttrain.checkpoint.files import checkpoint_path, list_checkpoints, safe_load
from fasttrain.config import load_config
from fasttrain.train import train

DS_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_worker.py")
PREVIOUS_RELEASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "previous_release")


class Payload:
    """Unpickling this runs `touch marker` (a real __reduce__ payload, as an attacker would write it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    """Rewrite the checkpoint at `path` with the payload inside, keeping everything else (a valid-looking file)."""
    state = torch.load(path, weights_only=True)
    state["optimizer"] = {"state": {}, "param_groups": [], "extra": Payload(marker)}
    torch.save(state, path)


def tree(dataset_dir, out_dir, **train_keys):
    return {
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2, "context_length": 32},
        "data": {"path": dataset_dir, "repeated_fraction": 0.25, "repeat_count": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 4, "global_batch": 4, "checkpoint_every": 2, "out_dir": str(out_dir), "device": "cpu",
                  "eval_tokens": 256, "log_every": 1, **train_keys},
    }


def write(path, content):
    path.write_text(yaml.safe_dump(content))
    return str(path)


def cli(*args, worker=None, timeout=300):
    entry = [DS_WORKER] if worker else ["-m", "fasttrain.cli"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused(res, marker):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "refused" in lines[0], res.stderr[-2000:]
    assert "posix.system" in lines[0] or "os.system" in lines[0]
    assert not os.path.exists(marker), "the payload ran"


@pytest.fixture(scope="module")
def trained(dataset_dir, tmp_path_factory):
    """A finished 4-step plain run with checkpoints at steps 2 and 4 (copied by each test that plants)."""
    root = tmp_path_factory.mktemp("safety")
    run = root / "run"
    train(load_config(write(root / "cfg.yaml", tree(dataset_dir, run, keep_checkpoints=True))))
    return run


def test_the_payload_is_real(trained, tmp_path):
    # The same file loaded the unsafe way runs its payload: the tests below would see it if fasttrain did.
    # (The one unsafe load in the repository, on purpose: it shows the payload is real.)
    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    shutil.copy(checkpoint_path(str(trained), 4), evil)
    plant(evil, marker)
    torch.load(evil, weights_only=False)
    assert os.path.exists(marker)


@pytest.mark.parametrize("command", ["eval", "export-hf", "eval-run-folder"])
def test_eval_and_export_refuse_a_payload(trained, tmp_path, command):
    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    shutil.copy(checkpoint_path(str(trained), 4), evil)
    plant(evil, marker)
    args = {"eval": ["eval", str(evil), "--json", str(tmp_path / "out.json")],
            "export-hf": ["export", str(evil), "--hf", str(tmp_path / "hf")],
            "eval-run-folder": ["eval", str(tmp_path)]}[command]
    if command == "eval-run-folder":  # a run folder whose only checkpoint is the planted one
        (tmp_path / "checkpoints").mkdir()
        shutil.move(evil, tmp_path / "checkpoints" / "step_0000004.pt")
    assert_refused(cli(*args), marker)
    assert not os.path.exists(tmp_path / "out.json") and not os.path.exists(tmp_path / "hf")


def test_load_model_refuses_a_payload(trained, tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    shutil.copy(checkpoint_path(str(trained), 4), evil)
    plant(evil, marker)
    with pytest.raises(CheckpointError, match="refused: loading it would run Python code it names"):
        fasttrain.load_model(str(evil))
    assert not os.path.exists(marker)


def test_resume_refuses_a_payload_and_keeps_the_run(trained, dataset_dir, tmp_path):
    # The newest checkpoint carries the payload: resume must neither run it nor silently fall back.
    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(trained, run)
    config = write(tmp_path / "cfg.yaml", tree(dataset_dir, run, keep_checkpoints=True, steps=6))
    os.remove(run / "final.json")
    plant(checkpoint_path(str(run), 4), marker)
    before = sorted(os.listdir(run / "checkpoints"))
    assert_refused(cli("train", "--config", config, "--resume", "--train.steps", "4"), marker)
    assert sorted(os.listdir(run / "checkpoints")) == before  # nothing written or deleted


def test_packed_resume_refuses_a_payload(dataset_dir, tmp_path):
    a, b, marker = tmp_path / "a", tmp_path / "b", tmp_path / "ran"
    configs = [write(tmp_path / f"{name}.yaml", tree(dataset_dir, tmp_path / name, seed=i))
               for i, name in enumerate("ab")]
    train([load_config(c) for c in configs])
    plant(checkpoint_path(str(b), 4), marker)
    for run in (a, b):
        os.remove(run / "final.json")
    res = cli("train", "--config", configs[0], "--config", configs[1], "--resume")
    assert_refused(res, marker)


def test_init_from_refuses_a_payload(trained, dataset_dir, tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    shutil.copy(checkpoint_path(str(trained), 4), evil)
    plant(evil, marker)
    config = write(tmp_path / "cfg.yaml", tree(dataset_dir, tmp_path / "run", init_from=str(evil)))
    assert_refused(cli("train", "--config", config), marker)
    assert not list_checkpoints(str(tmp_path / "run"))


@pytest.mark.timeout(600)
def test_deepspeed_resume_and_export_refuse_a_payload(dataset_dir, tmp_path):
    # DeepSpeed reads its own files with weights_only=False: they are checked before it sees them.
    run, marker = tmp_path / "run", tmp_path / "ran"
    ds_tree = tree(dataset_dir, run, keep_checkpoints=True, precision="fp32")
    ds_tree["deepspeed"] = {"zero_stage": 1}
    config = write(tmp_path / "cfg.yaml", ds_tree)
    res = cli("train", "--config", config, worker=True)
    assert res.returncode == 0, res.stderr[-3000:]
    states = run / "ds_checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt"
    state = safe_load(str(states), allowed=ds_allowed())  # our own, just written
    state["payload"] = Payload(marker)
    torch.save(state, states)
    os.remove(run / "final.json")
    assert_refused(cli("train", "--config", config, "--resume", worker=True), marker)
    assert_refused(cli("export", str(run), "--pt", str(tmp_path / "out.pt"), worker=True), marker)
    assert not os.path.exists(tmp_path / "out.pt")


# ---- the previous release's checkpoints ---------------------------------------------------------------
def test_previous_release_checkpoint_loads_and_resumes_exactly(dataset_dir, tmp_path):
    # tests/data/previous_release: a run of the previous release (4 steps, checkpoint every 2), stopped after
    # logging step 3, with its step-2 checkpoint; uninterrupted_metrics.jsonl is the same run gone straight
    # through. Its dataset is this suite's template dataset, which now lies elsewhere.
    run = tmp_path / "run"
    shutil.copytree(PREVIOUS_RELEASE, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"], config["train"]["out_dir"] = dataset_dir, str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    model, cfg = fasttrain.load_model(str(run))
    assert cfg.model.d_model == 16 and model.num_params(non_embedding=True) > 0
    summary = train(load_config(str(run)), resume=True)
    assert summary["step"] == 4
    with open(run / "metrics.jsonl") as f:
        resumed = [r for r in map(json.loads, f) if "loss" in r]
    with open(run / "uninterrupted_metrics.jsonl") as f:
        expected = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
