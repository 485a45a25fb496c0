"""DeepSpeed ZeRO training with 2 CPU processes against the single-process trainer (fp32, same global batch).

Each launched run costs about 10 s on 2 cores, so the runs are shared between tests (module fixtures):
the plain baseline, one 2-process run per ZeRO stage (stage 2 through the deepspeed launcher, the others
through torchrun; stages 1 and 3 with gradient accumulation).
"""
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import deepspeed  # noqa: F401  (a dependency: a missing or broken install must fail, not skip)
import pytest
import torch
import yaml

from fasttrain.checkpoint import load_model
from fasttrain.checkpoint.deepspeed import (
    COMPLETE,
    export_consolidated,
    list_ds_checkpoints,
    resolve_ds_checkpoint,
)
from fasttrain.config import ConfigError, batch_layout, config_from_dict
from fasttrain.data import prepare_dataset
from fasttrain.train.distributed import deepspeed_config
from fasttrain.train.trainer import train
from run_output import printed_steps

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_worker.py")
STEPS = 6
TOL = 1e-5


def documents(n=300, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(150)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) + "." for _ in range(n)]


def config_tree(data, out_dir, zero_stage=0, micro_batch=None, **train):
    # The runs stay on CPU processes even where a GPU exists: fp32 comparisons, gloo, any number of ranks.
    return {
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 32},
        "data": {"path": data, "repeated_fraction": 0.25, "repeat_count": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": micro_batch, "log_every": 1,
                  "eval_tokens": 256, "precision": "fp32", "device": "cpu", "checkpoint_every": 3,
                  "keep_checkpoints": True, "out_dir": out_dir, **train},
        "deepspeed": {"zero_stage": zero_stage},
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config_path, nproc, launcher="torchrun", resume=False):
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port,
               "--no_local_rank"]
    return cmd + [WORKER, "train", "--config", config_path] + (["--resume"] if resume else [])


def launch_env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    env.pop("TRITON_INTERPRET", None)  # the tiny model uses no Triton kernel
    return env


def process_tree(pid):
    """pid and every process below it. torchrun starts each rank in a session of its own, so killing the
    launcher's process group would leave the ranks training."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(proc):
    """SIGKILL the launcher and its ranks at once; returns once none of them runs any more."""
    pids = process_tree(proc.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    for pid in pids[1:]:  # the ranks, now children of init, which reaps them
        while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
    return pids


def write_config(tree, path):
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return str(path)


def run_launched(tree, path, nproc=2, launcher="torchrun", resume=False, timeout=240):
    config_path = write_config(tree, path)
    proc = subprocess.run(launch_command(config_path, nproc, launcher, resume), env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_weights(run_dir, step=STEPS):
    return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step:07d}.pt"), weights_only=True)["model"]


def assert_same_losses(run_dir, baseline_dir, steps):
    got, want = losses(run_dir), losses(baseline_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in steps:
        assert abs(got[s] - want[s]) < TOL, f"step {s}: loss {got[s]} vs single-process {want[s]}"


def assert_ran_on(run_dir, world_size, zero_stage, step=STEPS):
    """The checkpoint of `step` was written by world_size processes: its marker says so, and under ZeRO
    1-3 every rank wrote its own optimizer shard (DeepSpeed's zero_pp_rank_R_* files)."""
    tag_dir = os.path.join(run_dir, "ds_checkpoints", f"step_{step:07d}")
    marker = os.path.join(tag_dir, COMPLETE)
    assert os.path.exists(marker), f"{marker} is missing: the run did not go through the DeepSpeed trainer"
    with open(marker) as f:
        assert json.load(f)["world_size"] == world_size
    if zero_stage > 0:
        ranks = {int(name.split("_")[3]) for name in os.listdir(tag_dir)
                 if name.startswith("zero_pp_rank_") and name.endswith("optim_states.pt")}
        assert ranks == set(range(world_size)), f"ZeRO optimizer shards of ranks {sorted(ranks)} in {tag_dir}"


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff < TOL, f"{k}: differs by {diff}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    prepare_dataset(str(root / "data"), documents(), vocab_size=300, test_fraction=0.2, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def plain(root):
    """The single-process trainer's run: checkpoints at steps 3 and 6."""
    run_dir = str(root / "plain")
    train(config_from_dict(config_tree(str(root / "data"), run_dir)))
    return run_dir


LAYOUTS = {0: ("torchrun", None), 1: ("torchrun", 2), 2: ("deepspeed", None), 3: ("torchrun", 2)}


@pytest.fixture(scope="module")
def zero_run(root):
    """zero_run(stage) -> the folder of a finished 2-process run of that ZeRO stage (run once, shared)."""
    done = {}

    def get(stage):
        if stage not in done:
            launcher, micro = LAYOUTS[stage]
            run_dir = str(root / f"zero{stage}")
            run_launched(config_tree(str(root / "data"), run_dir, stage, micro), root / f"zero{stage}.yaml",
                         launcher=launcher)
            done[stage] = run_dir
        return done[stage]

    return get


# ---- the generated DeepSpeed config ---------------------------------------------------------------
def test_deepspeed_config_comes_from_ours(root):
    cfg = config_from_dict(config_tree("unused", "unused", zero_stage=2, micro_batch=2))
    ds = deepspeed_config(cfg, world_size=2, bf16=False)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds
    assert batch_layout(cfg, 1) == (2, 4) and batch_layout(cfg, 4) == (2, 1)

    cfg.deepspeed.extra = {"zero_optimization": {"overlap_comm": True, "stage": 2}, "gradient_clipping": 1.0,
                           "wall_clock_breakdown": True}
    ds = deepspeed_config(cfg, world_size=2, bf16=True)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True and ds["bf16"] == {"enabled": True}
    for extra, key in [({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
                       ({"train_batch_size": 16}, "train_batch_size"),
                       ({"bf16": True}, "bf16"),
                       ({"optimizer": {"type": "Adam"}}, "optimizer"),
                       ({"scheduler": {"type": "WarmupLR"}}, "scheduler")]:
        cfg.deepspeed.extra = extra
        with pytest.raises(ConfigError, match=f"deepspeed.extra.{key}"):
            deepspeed_config(cfg, world_size=2, bf16=False)


def test_batch_that_does_not_split_over_the_ranks_is_refused():
    cfg = config_from_dict(config_tree("unused", "unused", micro_batch=4))
    with pytest.raises(ConfigError, match="train.micro_batch"):
        batch_layout(cfg, 4)  # 8 sequences over 4 ranks of 4
    cfg.train.micro_batch = None
    with pytest.raises(ConfigError, match="train.global_batch: 8 is not divisible by the 3 processes"):
        batch_layout(cfg, 3)


# ---- 2 processes against 1 ------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(stage, zero_run, plain):
    run_dir = zero_run(stage)
    assert_ran_on(run_dir, 2, stage)
    assert_same_losses(run_dir, plain, range(1, STEPS + 1))
    assert_same_weights(final_weights(run_dir), final_weights(plain))  # the automatic consolidated export
    with open(os.path.join(run_dir, "final.json")) as f, open(os.path.join(plain, "final.json")) as g:
        assert abs(json.load(f)["test_loss"] - json.load(g)["test_loss"]) < TOL
    folder = os.path.join(run_dir, "ds_checkpoints")
    assert [s for s, _ in list_ds_checkpoints(folder)] == [3, 6]
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "step_0000006"


@pytest.mark.timeout(300)
def test_compiled_zero_run_matches_single_process(root, plain):
    # train.compile under DeepSpeed compiles the engine's module in place; same losses up to reordered sums.
    run_dir = str(root / "zero2-compiled")
    tree = config_tree(str(root / "data"), run_dir, 2, compile=True, compile_mode="max-autotune-no-cudagraphs")
    run_launched(tree, root / "zero2-compiled.yaml")
    assert_ran_on(run_dir, 2, 2)
    assert_same_losses(run_dir, plain, range(1, STEPS + 1))


@pytest.mark.timeout(300)
def test_killed_run_resumes_from_its_last_complete_checkpoint(root, plain):
    run_dir = str(root / "killed")
    config_path = write_config(config_tree(str(root / "data"), run_dir, 2, checkpoint_every=2, keep_checkpoints=False),
                               root / "killed.yaml")
    folder = os.path.join(run_dir, "ds_checkpoints")
    log = open(root / "killed.log", "w")
    proc = subprocess.Popen(launch_command(config_path, 2), env=launch_env(FASTTRAIN_TEST_STEP_DELAY="0.7"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 200
        while not os.path.exists(os.path.join(folder, "step_0000002", COMPLETE)):
            assert proc.poll() is None, f"the run ended early: {open(root / 'killed.log').read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        killed = kill_tree(proc)  # the launcher and both ranks, mid-training
    assert len(killed) >= 3, f"the launcher and 2 ranks, got processes {killed}"
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    # A kill during a later save: a checkpoint folder without its marker must never be resumed from.
    half = os.path.join(folder, "step_0000005")
    os.makedirs(half, exist_ok=True)
    with open(os.path.join(half, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"cut short")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_ds_checkpoint(half)

    resumed_from = max(s for s, _ in list_ds_checkpoints(folder))
    assert 2 <= resumed_from < STEPS
    resumed = run_launched(config_tree(str(root / "data"), run_dir, 2, checkpoint_every=2, keep_checkpoints=False),
                           root / "killed.yaml", resume=True)
    # Only the steps after the checkpoint ran (a restart from 0 would give the same losses).
    assert printed_steps(resumed.stdout) == list(range(resumed_from + 1, STEPS + 1)), resumed.stdout[-3000:]
    assert_ran_on(run_dir, 2, 2)
    assert_same_losses(run_dir, plain, range(1, STEPS + 1))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))  # lines after the checkpoint were dropped, then rewritten
    assert not os.path.exists(half)
    assert [s for s, _ in list_ds_checkpoints(folder)] == [6]  # older ones pruned (keep_checkpoints false)
    assert_same_weights(final_weights(run_dir), final_weights(plain))


@pytest.mark.timeout(300)
def test_zero3_checkpoint_resumes_with_another_world_size(root, zero_run, plain):
    source = zero_run(3)
    run_dir = str(root / "one_process")
    shutil.copytree(os.path.join(source, "ds_checkpoints", "step_0000003"),
                    os.path.join(run_dir, "ds_checkpoints", "step_0000003"))
    tree = config_tree(str(root / "data"), run_dir, 3, 2)
    config_from_dict(tree).save(os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(source, "metrics.jsonl")) as f, open(os.path.join(run_dir, "metrics.jsonl"), "w") as g:
        g.writelines(line for line in f if json.loads(line)["step"] <= 3)
    resumed = run_launched(tree, root / "one_process.yaml", nproc=1, resume=True)
    assert printed_steps(resumed.stdout) == list(range(4, STEPS + 1)), resumed.stdout[-3000:]
    assert_ran_on(source, 2, 3, step=3)
    assert_ran_on(run_dir, 1, 3)
    assert os.path.exists(os.path.join(run_dir, "ds_checkpoints", "universal", "step_0000003", COMPLETE))
    assert_same_losses(run_dir, plain, range(1, STEPS + 1))
    assert_same_weights(final_weights(run_dir), final_weights(plain))


# ---- consolidated export -> the plain trainer -------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 3])
def test_exported_checkpoint_continues_in_the_plain_trainer(stage, root, zero_run, plain, capsys):
    source = os.path.join(zero_run(stage), "ds_checkpoints", "step_0000003")
    run_dir = str(root / f"plain_from_zero{stage}")
    cfg = config_from_dict(config_tree(str(root / "data"), run_dir))
    os.makedirs(run_dir)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(plain, "metrics.jsonl")) as f, open(os.path.join(run_dir, "metrics.jsonl"), "w") as g:
        g.writelines(line for line in f if json.loads(line)["step"] <= 3)
    path = export_consolidated(source, os.path.join(run_dir, "checkpoints", "step_0000003.pt"))

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 3 and {"model", "optimizer", "rng", "config", "vocab_size"} <= set(ckpt)
    assert_same_weights(ckpt["model"], final_weights(plain, 3))
    model, _ = load_model(path)  # what the evaluations read
    assert_same_weights(model.state_dict(), final_weights(plain, 3))

    capsys.readouterr()
    train(cfg, resume=True)
    assert printed_steps(capsys.readouterr().out) == list(range(4, STEPS + 1))
    assert_same_losses(run_dir, plain, range(4, STEPS + 1))
    assert_same_weights(final_weights(run_dir), final_weights(plain))


def test_bf16_export_holds_weights_only(root, zero_run, plain):
    path = export_consolidated(zero_run(3), str(root / "zero3_bf16.pt"), dtype="bf16")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == STEPS and "optimizer" not in ckpt
    assert all(v.dtype == torch.bfloat16 for v in ckpt["model"].values())
    model, _ = load_model(path)
    for k, v in final_weights(plain).items():
        assert torch.allclose(model.state_dict()[k].float(), v, rtol=1e-2, atol=1e-3), k
