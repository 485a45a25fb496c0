"""The local runner on a multi-GPU node: each job gets its own device(s) through CUDA_VISIBLE_DEVICES, as many
jobs at once as the GPUs hold. The node's GPUs are faked through the runner's device-count hook
(fasttrain.sweep.placement.gpu_count); the children see the CUDA_VISIBLE_DEVICES they were given and, on this
CPU machine, train on the CPU."""
import json
import os
import re
import stat
import sys

import pytest
import yaml

from fasttrain.sweep import placement
from fasttrain.sweep.cli import main as sweep_main
from fasttrain.sweep.grid import spec_from_dict
from fasttrain.sweep.placement import DevicePool, jobs_at_once, simulate
from fasttrain.sweep.plan import plan
from fasttrain.sweep.runner import run_sweep


def sweep_tree(out_dir, data_path, **changes):
    tree = {
        "out_dir": str(out_dir),
        "base": {"model": {"context_length": 16}, "data": {"path": data_path, "seq_len": 16},
                 "optim": {"lr": 3e-3, "warmup_steps": 2},
                 "train": {"global_batch": 4, "log_every": 4, "eval_tokens": 128, "precision": "fp32"}},
        "grid": {"sizes": ["100k"], "repeated_fraction": [0.1], "repeat_count": [2, 3, 4]},
        "budget": {"steps": 8},
    }
    tree.update(changes)
    return tree


def recording_launcher(path, real, log):
    """A script that notes its CUDA_VISIBLE_DEVICES and arguments when it starts and ends, running `real`."""
    path.write_text(f'#!/bin/sh\necho "start $CUDA_VISIBLE_DEVICES $*" >> {log}\n{real} "$@"\nrc=$?\n'
                    f'echo "end $CUDA_VISIBLE_DEVICES" >> {log}\nexit $rc\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(placement, "gpu_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_placement_rules(monkeypatch):
    spec = spec_from_dict(sweep_tree("out", "data"))
    ds = spec_from_dict(sweep_tree("out", "data", num_gpus=2))
    gpus = ["0", "1", "2", "3"]
    assert jobs_at_once(spec, gpus, None) == (4, None)
    assert jobs_at_once(spec, gpus, 2) == (2, None)
    at_once, note = jobs_at_once(spec, gpus, 8)
    assert at_once == 4 and "--jobs 8" in note and "one per GPU" in note
    assert jobs_at_once(ds, gpus, None) == (2, None)
    with pytest.raises(ValueError, match="num_gpus 2: each run needs 2 GPUs but this machine shows 1"):
        jobs_at_once(ds, ["0"], None)
    # on a CPU nothing changes: --jobs as given, and deepspeed runs one at a time
    assert jobs_at_once(spec, [], None) == (1, None) and jobs_at_once(spec, [], 3) == (3, None)
    assert jobs_at_once(ds, [], 3)[0] == 1
    # the sweep's own CUDA_VISIBLE_DEVICES names the devices a child may get; train.device cpu places nothing
    monkeypatch.setattr(placement, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert placement.visible_gpus() == ["5", "7"] and placement.visible_gpus("cpu") == []
    pool = DevicePool(["0", "1", "2", "3"])
    a, b = pool.take(2), pool.take(2)
    assert (a, b, pool.take(1)) == (["0", "1"], ["2", "3"], None)
    pool.give(b)
    pool.give(a)
    assert pool.free == ["0", "1", "2", "3"]
    # three 2-GPU jobs of 10 s on 4 GPUs: two side by side, the third on a freed pair; 20 s in all
    placed, wall = simulate([10.0, 10.0, 10.0], [1.0, 1.0, 1.0], 2, gpus, 2)
    assert [p["devices"] for p in placed] == [["0", "1"], ["2", "3"], ["0", "1"]] and wall == 20.0
    assert [p["start"] for p in placed] == [0.0, 0.0, 10.0]


def test_four_one_gpu_jobs_run_at_once_on_four_devices(tmp_path, dataset_dir, four_gpus, capsys):
    log = tmp_path / "launches.log"
    python = recording_launcher(tmp_path / "python", sys.executable, log)
    result = run_sweep(spec_from_dict(sweep_tree(tmp_path / "sweep", dataset_dir)), jobs=8, python=python)
    assert len(result.done) == 4 and not result.failed
    out = capsys.readouterr().out
    assert "--jobs 8: 4 GPU(s) hold 4 job(s) at once" in out
    events = [line.split(" ", 2) for line in log.read_text().splitlines()]
    train_starts = [e for e in events if e[0] == "start" and " train " in f" {e[2]} "]
    assert sorted(e[1] for e in train_starts) == ["0", "1", "2", "3"]  # one distinct device each
    first_end = next(i for i, e in enumerate(events) if e[0] == "end")
    assert all(events.index(e) < first_end for e in train_starts)  # all four started before any ended
    entries = json.loads((tmp_path / "sweep" / "manifest.json").read_text())["runs"]
    assert sorted(e["devices"][0] for e in entries.values()) == ["0", "1", "2", "3"]
    for name, e in entries.items():
        assert e["state"] == "done"
        train_log = (tmp_path / "sweep" / "runs" / name / "train.log").read_text()
        assert f"$ CUDA_VISIBLE_DEVICES={e['devices'][0]} {python} -m fasttrain.cli train" in train_log
        assert re.search(rf"{re.escape(name)}: starting on GPU {e['devices'][0]} ", out)


def test_deepspeed_runs_go_side_by_side_on_disjoint_gpu_pairs(tmp_path, dataset_dir, four_gpus, monkeypatch, capsys):
    # The deepspeed launcher cannot start ranks on faked GPUs: a stand-in records what it was given (its
    # CUDA_VISIBLE_DEVICES, from which the real launcher takes its devices) and fails the run.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launches.log"
    recording_launcher(bin_dir / "deepspeed", "sleep 1; false", log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep_tree(tmp_path / "sweep", dataset_dir, num_gpus=2)))

    # the plan shows the placement and the wall time: two runs side by side, then the other two
    assert sweep_main(["sweep", str(sweep_file), "--dry-run"]) == 0
    plan_out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in plan_out.splitlines() if line.startswith("100k_")}
    assert [re.search(r" (\d,\d) +pending", row).group(1) for row in rows.values()] == ["0,1", "2,3", "0,1", "2,3"]
    assert "placed on 4 GPUs (0,1,2,3), 2 at once, 2 GPUs each: estimated wall time" in plan_out
    doc = plan(spec_from_dict(sweep_tree(tmp_path / "sweep", dataset_dir, num_gpus=2)))
    one_run = doc["runs"][0]["remaining_s"]
    assert one_run > 0 and doc["placement"]["wall_s"] == pytest.approx(2 * one_run)
    assert [(p["devices"], p["start"]) for p in doc["placement"]["jobs"]] == [
        (["0", "1"], 0.0), (["2", "3"], 0.0), (["0", "1"], pytest.approx(one_run)), (["2", "3"], pytest.approx(one_run))]

    result = run_sweep(spec_from_dict(sweep_tree(tmp_path / "sweep", dataset_dir, num_gpus=2)))
    assert len(result.failed) == 4  # the stand-in launcher trains nothing
    events = [line.split(" ", 2) for line in log.read_text().splitlines()]
    starts = [e for e in events if e[0] == "start"]
    assert [e[1] for e in starts[:2]] == ["0,1", "2,3"]
    assert events[:2] == starts[:2]  # side by side: both started before either ended
    assert {e[1] for e in starts} == {"0,1", "2,3"} and len(starts) == 4
    assert all("--num_gpus" not in e[2] and "--module fasttrain.cli train" in e[2] for e in starts)
