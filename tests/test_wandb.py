"""Weights & Biases: an offline W&B run holds every record of metrics.jsonl at its step and the resolved config,
a resumed run continues it without sending a step twice, and sweeps group their runs. The offline run is
read back from the .wandb file wandb's own writer (wandb-core) left, record by record."""
import glob
import json
import math
import os
import struct

import pytest
import wandb  # in the test extra: a missing or broken install must fail, not skip
from wandb.proto import wandb_internal_pb2
from wandb.sdk.lib.proto_util import dict_from_proto_list

from fasttrain import cli
from fasttrain.config import ConfigError, config_from_dict, load_config
from fasttrain.sweep.grid import expand, spec_from_dict
from fasttrain.train.engine import SingleEngine
from fasttrain.train.metrics import read_metrics
from fasttrain.train.trainer import train
from test_sweep_grid import sweep_tree

TIMING = ("tokens_per_s", "mfu")  # measured anew when a step is trained again


def wandb_records(path):
    """The protobuf records of a .wandb file: a header (':W&B', magic 0xBEE1, version), then LevelDB log
    blocks of 32 KiB whose chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) make records."""
    data = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, chunks, block = 7, [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def offline_runs(run_dir):
    """[(run record, {step: history row})] of every offline W&B run under RUN/wandb, oldest first."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run, rows = None, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                items = dict_from_proto_list(record.history.item)  # item.key or item.nested_key
                assert record.history.step.num not in rows  # one row per step
                rows[record.history.step.num] = items
        out.append((run, rows))
    return out


def same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-12) if isinstance(a, float) else a == b


def run_config(dataset_dir, out_dir, **train):
    return config_from_dict({
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 128},
        "data": {"path": dataset_dir, "seq_len": 128, "repeated_fraction": 0.1, "repeat_count": 4, "seed": 7},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 8, "global_batch": 4, "out_dir": str(out_dir), "log_every": 1, "eval_every": 4,
                  "checkpoint_every": 3, "eval_tokens": 1024, "eval_metrics": ["test", "repeated", "induction"],
                  "device": "cpu", **train},
    })


def test_offline_run_holds_every_metric_and_a_resumed_run_continues_it(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the offline files go into the run folder
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = str(tmp_path / "run")
    cfg = run_config(dataset_dir, run_dir, wandb={"project": "repeat", "name": "r1", "group": "g", "mode": "offline"})

    # Killed while training step 6: steps 1-5 logged (and sent), the newest checkpoint is step 3.
    original, trained = SingleEngine.step, []

    def killed_at_step_6(self, batches, lr, logging):
        trained.append(lr)
        if len(trained) == 6:
            raise RuntimeError("killed")
        return original(self, batches, lr, logging)

    monkeypatch.setattr(SingleEngine, "step", killed_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    monkeypatch.setattr(SingleEngine, "step", original)
    assert max(r["step"] for r in read_metrics(run_dir)) == 5
    train(cfg, resume=True)  # steps 4-8 again, metrics.jsonl cut back to step 3 first

    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "test_loss" in r] == [4, 8]
    first, resumed = offline_runs(run_dir)
    run_id = json.load(open(os.path.join(run_dir, "wandb.json")))["id"]
    for run, _ in (first, resumed):  # one W&B run, continued
        assert (run.run_id, run.project, run.display_name, run.run_group) == (run_id, "repeat", "r1", "g")
    config = dict_from_proto_list(first[0].config.update)
    assert config["train"]["out_dir"] == run_dir and config["data"]["repeat_count"] == 4
    assert config["model"]["n_layer"] == 2 and config["train"]["wandb"]["mode"] == "offline"
    # every step once: 1-5 from the killed run, 6-8 after the resume (4 and 5, trained again, not resent)
    assert sorted(first[1]) == [1, 2, 3, 4, 5] and sorted(resumed[1]) == [6, 7, 8]
    history = {**first[1], **resumed[1]}
    for record in records:
        row = history[record["step"]]
        for key, value in record.items():
            if key == "step" or (key in TIMING and record["step"] in (4, 5)):
                continue
            assert same(value, row[key]), (record["step"], key, value, row[key])
    assert len(history[8]["induction_scores"]) == 2  # lists (per layer, per head) arrive as lists


def test_sweeps_group_their_runs_under_the_sweep_folder(tmp_path):
    tree = sweep_tree(tmp_path, out_dir=str(tmp_path / "repeat-small"), budget={"steps": 10},
                      grid={"sizes": ["100k"], "repeated_fraction": [0.1], "repeat_count": [2, 4]})
    tree["base"]["train"]["wandb"] = {"project": "p", "mode": "offline"}
    runs = expand(spec_from_dict(tree))
    assert [(r.config.train.wandb.group, r.config.train.wandb.name) for r in runs] == [
        ("repeat-small", "100k_f0_s0"), ("repeat-small", "100k_f0.1_E2_uniform_s0"),
        ("repeat-small", "100k_f0.1_E4_uniform_s0")]
    assert all(r.config.train.wandb.project == "p" for r in runs)
    tree["finetune"] = {"data": {"path": str(tmp_path / "code")}, "budget": {"steps": 5}}
    finetunes = [r for r in expand(spec_from_dict(tree)) if r.source]
    assert [(r.config.train.wandb.group, r.config.train.wandb.name) for r in finetunes][0] == (
        "repeat-small", "100k_f0_s0_ft")
    del tree["finetune"]
    tree["base"]["train"]["wandb"]["group"] = "mine"
    assert {r.config.train.wandb.group for r in expand(spec_from_dict(tree))} == {"mine"}
    del tree["base"]["train"]["wandb"]
    assert all(r.config.train.wandb is None for r in expand(spec_from_dict(tree)))


def test_wandb_config_section():
    base = ["--model.preset", "100k", "--optim.warmup_steps", "1"]
    assert load_config(None, base).train.wandb is None
    w = load_config(None, base + ["--train.wandb.mode", "offline"]).train.wandb
    assert (w.project, w.mode, w.name) == ("fasttrain", "offline", None)
    with pytest.raises(ConfigError, match="train.wandb.mode: 'cloud' is not one of online, offline, disabled"):
        load_config(None, base + ["--train.wandb.mode", "cloud"])
    with pytest.raises(ConfigError, match="unknown config key 'train.wandb.team'"):
        config_from_dict({"model": {"preset": "100k"}, "train": {"wandb": {"team": "x"}}})


def test_without_wandb_installed_train_fails_with_one_line(dataset_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # `import wandb` raises ImportError
    code = cli.main(["train", "--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "1",
                     "--model.context_length", "32", "--data.path", dataset_dir, "--train.steps", "2",
                     "--optim.warmup_steps", "1", "--train.device", "cpu", "--train.out_dir", str(tmp_path / "run"),
                     "--train.wandb.mode", "offline"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: train.wandb needs the wandb package: pip install 'fasttrain-repeat[wandb]' "
                                 "(or remove train.wandb)")
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
