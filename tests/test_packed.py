"""Packed training: K runs trained as one stacked model give each run what train() alone gives it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fasttrain.config import ConfigError, config_from_dict
from fasttrain.data import open_dataset
from fasttrain.checkpoint.files import list_checkpoints
from fasttrain.model import GPT
from fasttrain.measure.loss import heldout_loss
from fasttrain.train.packed import (
    PackedGPT,
    check_packable,
    clip_grad_norm_per_model,
    packed_heldout_loss,
    packing_key,
)
from fasttrain.train.trainer import train
from run_output import printed_steps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (repeated_fraction, repeat_count, placement, data seed, init seed): every per-run axis of a sweep differs.
RUNS = [(0.0, 1, "uniform", 1, 0), (0.2, 4, "uniform", 2, 1), (0.5, 8, "even", 3, 2)]




def _cfg(dataset_dir, out_dir, run, **train_over):
    f, E, placement, data_seed, init_seed = run
    tree = {
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 32},
        "data": {"path": dataset_dir, "seq_len": 32, "repeated_fraction": f, "repeat_count": E,
                 "placement": placement, "seed": data_seed},
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "train": {"steps": 12, "global_batch": 8, "micro_batch": 4, "out_dir": str(out_dir), "log_every": 1,
                  "eval_tokens": 1024, "device": DEVICE, "seed": init_seed, "precision": "fp32",
                  "checkpoint_every": 4, **train_over},
    }
    return config_from_dict(tree)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(run_dir):
    return [r["loss"] for r in _records(run_dir) if "loss" in r]


def _final_checkpoint(run_dir):
    return torch.load(list_checkpoints(run_dir)[-1][1], map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def separate_runs(dataset_dir, tmp_path_factory):
    """The reference: each run trained alone by the plain trainer."""
    root = tmp_path_factory.mktemp("separate")
    dirs = [str(root / f"run{i}") for i in range(len(RUNS))]
    summaries = [train(_cfg(dataset_dir, d, run)) for d, run in zip(dirs, RUNS)]
    return dirs, summaries


def test_packed_runs_equal_separate_runs(dataset_dir, separate_runs, tmp_path):
    dirs, summaries = separate_runs
    packed_dirs = [str(tmp_path / f"run{i}") for i in range(len(RUNS))]
    packed_summaries = train([_cfg(dataset_dir, d, run) for d, run in zip(packed_dirs, RUNS)])

    for alone, packed, s_alone, s_packed in zip(dirs, packed_dirs, summaries, packed_summaries):
        assert len(_losses(packed)) == 12
        assert _losses(packed) == pytest.approx(_losses(alone), rel=1e-5)
        assert s_packed["test_loss"] == pytest.approx(s_alone["test_loss"], rel=1e-5)
        # The run folder holds what the plain trainer writes, record for record and key for key.
        assert sorted(os.listdir(packed)) == sorted(os.listdir(alone))
        assert [s for s, _ in list_checkpoints(packed)] == [s for s, _ in list_checkpoints(alone)] == [12]
        rec_alone, rec_packed = _records(alone), _records(packed)
        assert [sorted(r) for r in rec_packed] == [sorted(r) for r in rec_alone]
        for a, b in zip(rec_alone[:-1], rec_packed[:-1]):  # the last record is the evaluation
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) and b["lr"] == a["lr"]
        with open(os.path.join(packed, "final.json")) as f:
            assert json.load(f) == s_packed
        ck_alone, ck_packed = _final_checkpoint(alone), _final_checkpoint(packed)
        assert sorted(ck_packed) == sorted(ck_alone) and ck_packed["step"] == 12
        assert ck_packed["config"]["train"].pop("out_dir") == packed
        assert ck_alone["config"]["train"].pop("out_dir") == alone
        assert ck_packed["config"] == ck_alone["config"]
        assert list(ck_packed["model"]) == list(ck_alone["model"])
        for name, p in ck_alone["model"].items():
            torch.testing.assert_close(ck_packed["model"][name].cpu(), p.cpu(), rtol=0, atol=1e-4)
        opt_alone, opt_packed = ck_alone["optimizer"], ck_packed["optimizer"]
        assert opt_packed["param_groups"] == opt_alone["param_groups"]
        for i, state in opt_alone["state"].items():
            assert float(opt_packed["state"][i]["step"]) == float(state["step"])
            torch.testing.assert_close(opt_packed["state"][i]["exp_avg_sq"].cpu(), state["exp_avg_sq"].cpu(),
                                       rtol=1e-3, atol=1e-9)
    # Different data and init seeds really made different runs.
    assert len({round(_losses(d)[-1], 4) for d in packed_dirs}) == len(RUNS)


def test_compiled_pack_equals_separate_runs(dataset_dir, separate_runs, tmp_path):
    # train.compile on a pack compiles the stacked model and the per-model clipping: same losses.
    dirs, summaries = separate_runs
    packed_dirs = [str(tmp_path / f"run{i}") for i in range(len(RUNS))]
    packed_summaries = train([_cfg(dataset_dir, d, run, compile=True, compile_mode="max-autotune-no-cudagraphs")
                                     for d, run in zip(packed_dirs, RUNS)])
    for alone, packed, s_alone, s_packed in zip(dirs, packed_dirs, summaries, packed_summaries):
        assert _losses(packed) == pytest.approx(_losses(alone), rel=1e-4)
        assert s_packed["test_loss"] == pytest.approx(s_alone["test_loss"], rel=1e-4)


def _simulate_kill(run_dir, keep_up_to):
    """What a kill after the checkpoint of step keep_up_to leaves: later checkpoints and final.json gone
    (metrics.jsonl keeps its later lines; a resume must drop them)."""
    for step, path in list_checkpoints(run_dir):
        if step > keep_up_to:
            os.remove(path)
    os.remove(os.path.join(run_dir, "final.json"))


def test_killed_pack_resumes_to_identical_losses(dataset_dir, separate_runs, tmp_path, capsys):
    straight = [str(tmp_path / "straight" / f"run{i}") for i in range(len(RUNS))]
    train([_cfg(dataset_dir, d, run, keep_checkpoints=True) for d, run in zip(straight, RUNS)])
    expected = [_losses(d) for d in straight]

    killed = [str(tmp_path / "killed" / f"run{i}") for i in range(len(RUNS))]
    for src, dst in zip(straight, killed):
        shutil.copytree(src, dst)
    cfgs = [_cfg(dataset_dir, d, run, keep_checkpoints=True) for d, run in zip(killed, RUNS)]
    for c in cfgs:
        c.save(os.path.join(c.train.out_dir, "config.yaml"))  # the copies' own out_dir
    # Killed while the group wrote its step-8 checkpoints: run 0 had written its own, the others not yet.
    _simulate_kill(killed[0], keep_up_to=8)
    for d in killed[1:]:
        _simulate_kill(d, keep_up_to=4)
    with pytest.raises(ConfigError, match="--resume"):  # never silently restarts over a run
        train(cfgs)
    capsys.readouterr()
    train(cfgs, resume=True)
    # Only the steps after the common checkpoint ran (a restart from 0 would give the same losses).
    assert printed_steps(capsys.readouterr().out) == list(range(5, 13))
    if DEVICE == "cpu":
        assert [_losses(d) for d in killed] == expected  # bit-identical
    else:  # GPU attention backward may accumulate in a different order
        for d, losses in zip(killed, expected):
            assert _losses(d) == pytest.approx(losses, rel=1e-5)
    assert all(os.path.exists(os.path.join(d, "final.json")) for d in killed)
    # Killed after the last checkpoints, before final.json: the resume evaluates again and writes it.
    finals = [json.load(open(os.path.join(d, "final.json"))) for d in killed]
    for d in killed:
        os.remove(os.path.join(d, "final.json"))
    assert train(cfgs, resume=True) == finals
    assert printed_steps(capsys.readouterr().out) == []  # evaluated again, not trained again
    assert [json.load(open(os.path.join(d, "final.json"))) for d in killed] == finals

    # A packed run's checkpoint is a plain one: the plain trainer resumes it alone to the same losses.
    alone = str(tmp_path / "alone")
    shutil.copytree(straight[1], alone)
    _simulate_kill(alone, keep_up_to=8)
    cfg = _cfg(dataset_dir, alone, RUNS[1], keep_checkpoints=True)
    cfg.save(os.path.join(alone, "config.yaml"))
    train(cfg, resume=True)
    assert printed_steps(capsys.readouterr().out) == list(range(9, 13))
    assert _losses(alone) == pytest.approx(expected[1], rel=1e-6)
    assert _losses(alone) == pytest.approx(_losses(separate_runs[0][1]), rel=1e-5)


def test_pack_under_a_distributed_launcher_is_refused(dataset_dir, tmp_path):
    # Every rank would train the same pack into the same folders: refused before anything is written.
    paths = []
    for i, run in enumerate(RUNS[:2]):
        cfg = _cfg(dataset_dir, tmp_path / f"run{i}", run)
        paths += ["--config", str(tmp_path / f"run{i}.yaml")]
        cfg.save(paths[-1])
    env = dict(os.environ, WORLD_SIZE="2")
    done = subprocess.run([sys.executable, "-m", "fasttrain.cli", "train", *paths], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2 and "packed training runs in one process" in done.stderr
    assert not os.path.exists(tmp_path / "run0")


@pytest.mark.parametrize("key, value, expected", [
    ("model.d_model", 64, "model.d_model"),
    ("model.attention", "triton", "model.attention"),
    ("data.seq_len", 16, "data.seq_len"),
    ("optim.lr", 1e-3, "optim.lr"),
    ("train.global_batch", 16, "train.global_batch"),
])
def test_mismatched_runs_are_refused(dataset_dir, tmp_path, key, value, expected):
    a = _cfg(dataset_dir, tmp_path / "a", RUNS[0])
    b = _cfg(dataset_dir, tmp_path / "b", RUNS[1])
    section, name = key.split(".")
    setattr(getattr(b, section), name, value)
    with pytest.raises(ConfigError, match=expected) as err:
        train([a, b])
    assert "differs" in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")  # nothing written
    assert packing_key(a) != packing_key(b)


def test_packing_rules(dataset_dir, tmp_path):
    runs = [_cfg(dataset_dir, tmp_path / f"r{i}", run) for i, run in enumerate(RUNS)]
    assert len({packing_key(c) for c in runs}) == 1  # f, E, placement, seeds may differ
    check_packable(runs)
    same_dir = [runs[0], _cfg(dataset_dir, tmp_path / "r0", RUNS[1])]
    with pytest.raises(ConfigError, match="train.out_dir"):
        check_packable(same_dir)
    dropout = [_cfg(dataset_dir, tmp_path / f"d{i}", run) for i, run in enumerate(RUNS[:2])]
    for c in dropout:
        c.model.dropout = 0.1
    with pytest.raises(ConfigError, match="model.dropout"):
        check_packable(dropout)


def _gpts(k, attention, loss, seed=0):
    models = []
    for i in range(k):
        torch.manual_seed(seed + i)
        models.append(GPT(2, 32, 2, 96, 32, attention=attention, loss=loss).to(DEVICE))
    return models


@pytest.mark.parametrize("attention, loss", [("torch", "torch"), ("triton", "triton")])
def test_packed_model_matches_gpt(attention, loss):
    """Forward, backward and per-model clipping of the stacked module against each GPT alone."""
    models = _gpts(3, attention, loss)
    packed = PackedGPT.from_models(models, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 96, (3, 2, 17), generator=gen).to(DEVICE)
    losses = packed(idx[..., :-1], idx[..., 1:])
    losses.sum().backward()
    logits = packed(idx[..., :-1])
    for k, model in enumerate(models):
        loss_k = model(idx[k, :, :-1], idx[k, :, 1:])
        loss_k.backward()
        torch.testing.assert_close(losses[k], loss_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits[k], model(idx[k, :, :-1]), rtol=1e-5, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(packed.get_parameter(name).grad[k], p.grad, rtol=1e-4, atol=1e-6)
    # Per-model clipping: each model scaled by its own norm, as clip_grad_norm_ does for it alone.
    norms = clip_grad_norm_per_model(packed.parameters(), 0.5)
    for k, model in enumerate(models):
        norm_k = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        torch.testing.assert_close(norms[k], norm_k, rtol=1e-5, atol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(packed.get_parameter(name).grad[k], p.grad, rtol=1e-4, atol=1e-6)
    assert len(set(norms.tolist())) == 3


@pytest.mark.parametrize("attention, loss", [("torch", "torch"), ("triton", "triton")])
def test_packed_heldout_loss_matches_each_model(dataset_dir, attention, loss):
    # The pack's evaluation during training: one pass of the stacked model gives each run its own
    # held-out metrics, as heldout_loss of that run alone (batch of 3 windows: the last batch is short).
    dataset = open_dataset(dataset_dir)
    models = []
    for i in range(3):
        torch.manual_seed(i)
        models.append(GPT(2, 32, 2, dataset.vocab_size, 32, attention=attention, loss=loss).to(DEVICE))
    packed = PackedGPT.from_models(models, device=DEVICE)
    results = packed_heldout_loss(packed, dataset, 32, max_tokens=8 * 32, batch_size=3, device=DEVICE)
    for model, result in zip(models, results):
        alone = heldout_loss(model, dataset, 32, max_tokens=8 * 32, batch_size=3, device=DEVICE)
        assert result.keys() == alone.keys() and result["test_tokens"] == alone["test_tokens"] == 8 * 32
        for key in ("test_loss", "test_loss_stderr", "test_bits_per_byte"):
            assert result[key] == pytest.approx(alone[key], rel=1e-5)
    assert len({round(r["test_loss"], 6) for r in results}) == 3


@pytest.mark.parametrize("logits_budget", [None, 2 * 20 * 50, 500])  # all models at once, groups of 2, model by model
def test_packed_linear_cross_entropy(monkeypatch, logits_budget):
    import fasttrain.train.packed as packed_module

    if logits_budget:
        monkeypatch.setattr(packed_module, "LOGITS_PER_CHUNK", logits_budget)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(3, 50, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 50, (3, 20), generator=gen).to(DEVICE)
    targets[1, :7] = -100  # ignored tokens leave model 1 a smaller count
    upstream = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    loss = packed_module.packed_linear_cross_entropy(hidden, weight, targets)
    (loss * upstream).sum().backward()

    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.stack([torch.nn.functional.cross_entropy(ref_hidden[k] @ ref_weight[k].T, targets[k])
                       for k in range(3)])
    (ref * upstream).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_weight.grad, rtol=1e-4, atol=1e-6)
