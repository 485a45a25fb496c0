import os
import sys

import pytest
import yaml

from fasttrain.sweep.grid import SweepError, expand, load_sweep, run_name, spec_from_dict
from fasttrain.sweep.runner import config_differences, eval_command, prepare_run_folder, train_command


def sweep_tree(tmp_path, **changes):
    tree = {
        "out_dir": str(tmp_path / "sweep"),
        "base": {"model": {"context_length": 64}, "data": {"path": str(tmp_path / "data"), "seq_len": 64, "seed": 100},
                 "optim": {"lr": 1e-3, "warmup_steps": 2}, "train": {"global_batch": 8}},
        "grid": {"sizes": ["100k", "340k"], "repeated_fraction": [0.1, 0.5], "repeat_count": [2, 100],
                 "placement": ["uniform", "even"], "seeds": [0, 1]},
        "budget": {"tokens_per_param": 2},
    }
    tree.update(changes)
    return tree


def test_expansion_names_counts_and_automatic_baselines(tmp_path):
    runs = expand(spec_from_dict(sweep_tree(tmp_path)))
    # per (size, seed): 1 baseline + 2 f x 2 E x 2 placements
    assert len(runs) == 2 * 2 * (1 + 2 * 2 * 2)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[:3] == ["100k_f0_s0", "100k_f0.1_E2_uniform_s0", "100k_f0.1_E2_even_s0"]
    assert "340k_f0.5_E100_even_s1" in names
    baselines = [r for r in runs if r.is_baseline]
    assert [r.name for r in baselines] == ["100k_f0_s0", "100k_f0_s1", "340k_f0_s0", "340k_f0_s1"]
    for r in baselines:
        assert r.config.data.repeated_fraction == 0.0 and r.config.data.repeat_count == 1
    r = next(r for r in runs if r.name == "340k_f0.5_E100_even_s1")
    c = r.config
    assert (c.model.preset, c.model.n_layer, c.model.d_model) == ("340k", 3, 96)
    assert (c.data.repeated_fraction, c.data.repeat_count, c.data.placement) == (0.5, 100, "even")
    assert c.train.seed == 1 and c.data.seed == 101  # data seed = base data seed + seed
    assert c.train.out_dir == os.path.join(str(tmp_path / "sweep"), "runs", r.name)
    assert c.data.path == str(tmp_path / "data")
    # token budget: 2 tokens per non-embedding parameter, in whole steps of 8 x 64 tokens
    assert r.params == 335_712
    assert c.train.steps == round(2 * 335_712 / (8 * 64))
    assert r.tokens == c.train.steps * 8 * 64
    assert r.flops == 6 * r.params * r.tokens
    assert c.train.checkpoint_every == max(1, c.train.steps // 10)


def test_run_names_are_stable():
    assert run_name("1.5m", 0.1, 100, "uniform", 0) == "1.5m_f0.1_E100_uniform_s0"
    assert run_name("800m", 0.03, 1220, "even", 2) == "800m_f0.03_E1220_even_s2"
    assert run_name("3m", 0.0, 1, "uniform", 0) == "3m_f0_s0"


def test_fixed_and_per_size_budgets_and_overrides(tmp_path):
    tree = sweep_tree(tmp_path, budget={"tokens": {"100k": 51_200, "340k": 102_400}},
                      per_size={"340k": {"optim": {"lr": 5e-4}}})
    tree["grid"] = {"sizes": ["100k", "340k"], "repeated_fraction": 0.1, "repeat_count": 4}
    runs = expand(spec_from_dict(tree))
    assert [r.name for r in runs] == ["100k_f0_s0", "100k_f0.1_E4_uniform_s0", "340k_f0_s0", "340k_f0.1_E4_uniform_s0"]
    assert [r.config.train.steps for r in runs] == [100, 100, 200, 200]
    assert [r.config.optim.lr for r in runs] == [1e-3, 1e-3, 5e-4, 5e-4]
    tree["budget"] = {"steps": 7}
    assert {r.config.train.steps for r in expand(spec_from_dict(tree))} == {7}


@pytest.mark.parametrize("change, message", [
    ({"grid": {"sizes": ["7m"]}}, "unknown preset '7m'"),
    ({"grid": {"sizes": ["100k"], "repeat_count": [1]}}, "at least 2"),
    ({"grid": {"sizes": ["100k"], "repeated_fraction": [1.5]}}, r"must be in \[0, 1\]"),
    ({"grid": {"sizes": ["100k"], "color": [1]}}, "unknown axis"),
    ({"budget": {"tokens": 1e6, "steps": 3}}, "exactly one of"),
    ({"budget": {"tokens": {"100k": 1e6}}}, "no value for size 340k"),
    ({"per_size": {"900k": {}}}, "not one of grid.sizes"),
    ({"base": {"optim": {"lr": -1}}}, "run 100k_f0_s0: optim.lr"),
    ({"base": {"train": {"global_batch": 8, "colour": 1}}}, "unknown config key 'train.colour'"),
])
def test_bad_sweep_files_name_what_to_change(tmp_path, change, message):
    with pytest.raises(SweepError, match=message):
        expand(spec_from_dict(sweep_tree(tmp_path, **change)))


def test_load_sweep_file_and_run_folder_config_guard(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_tree(tmp_path)))
    spec = load_sweep(str(path))
    run = expand(spec)[0]
    prepare_run_folder(run)  # writes config.yaml
    prepare_run_folder(run)  # same config: fine
    assert os.path.exists(os.path.join(run.run_dir, "config.yaml"))
    tree = sweep_tree(tmp_path)
    tree["base"]["optim"]["lr"] = 2e-3
    changed = expand(spec_from_dict(tree))[0]
    with pytest.raises(SweepError, match=r"run 100k_f0_s0: .*optim.lr: 0.001 -> 0.002"):
        prepare_run_folder(changed)
    assert config_differences({"train": {"out_dir": "/a", "steps": 1}}, {"train": {"out_dir": "/b", "steps": 1}}) == []


def test_commands_plain_deepspeed_and_eval(tmp_path):
    spec = spec_from_dict(sweep_tree(tmp_path))
    run = expand(spec)[0]
    config = os.path.join(run.run_dir, "config.yaml")
    assert train_command([run], spec) == [sys.executable, "-m", "fasttrain.cli", "train", "--config", config, "--resume"]
    tree = sweep_tree(tmp_path, num_gpus=4)
    spec4 = spec_from_dict(tree)
    cmd = train_command(expand(spec4)[:1], spec4)
    assert os.path.basename(cmd[0]) == "deepspeed"
    assert cmd[1:3] == ["--num_gpus", "4"] and cmd[3] == "--master_port"
    assert cmd[5:] == ["--module", "fasttrain.cli", "train", "--config", config, "--resume"]
    tree = sweep_tree(tmp_path)
    tree["base"]["deepspeed"] = {"zero_stage": 2}
    assert spec_from_dict(tree).uses_deepspeed
    assert eval_command([run], ["test", "copying"])[-2:] == ["--metrics", "test,copying"]
    assert eval_command([run], True)[3:] == ["eval", run.run_dir, "--json", os.path.join("{run}", "eval.json")]
    with pytest.raises(SweepError, match="not a metric"):
        spec_from_dict(sweep_tree(tmp_path, evaluate=["test", "perplexity"]))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_demo_grid(tmp_path, scale):
    from fasttrain.sweep.demo import demo_scale, demo_spec

    spec = demo_spec(str(tmp_path / "demo"), scale)
    runs = expand(spec)
    s = demo_scale(scale)
    assert len(runs) == len(s.sizes) * (1 + len(s.repeat_counts))
    assert sum(r.is_baseline for r in runs) == len(s.sizes)
    # a repeated run sees the same number of tokens as its baseline; every repeat count places whole sequences
    for r in runs:
        assert abs(r.tokens - s.tokens[r.size]) <= s.global_batch * s.seq_len
        assert r.config.optim.lr == s.lr[r.size]
        S = r.config.train.steps * r.config.train.global_batch
        assert r.is_baseline or r.repeated_fraction * S / r.repeat_count >= 0.5  # rounds to >= 1 sequence
        assert r.config.data.path == str(tmp_path / "demo" / "data")
    params = sorted({r.params for r in runs})
    assert len(params) == len(s.sizes) and params == [r.params for r in runs if r.is_baseline]
    assert spec.evaluate


def test_demo_sweep_file_matches_the_demo_grid(tmp_path):
    from fasttrain.sweep.demo import demo_spec

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from_file = expand(load_sweep(os.path.join(root, "configs", "demo_sweep.yaml")), out_dir=str(tmp_path / "a"))
    demo = demo_spec(str(tmp_path / "demo"), 1)
    from_demo = expand(demo, out_dir=str(tmp_path / "a"))
    assert [r.name for r in from_file] == [r.name for r in from_demo]
    for a, b in zip(from_file, from_demo):
        ta, tb = a.config.to_dict(), b.config.to_dict()
        ta["data"].pop("path"), tb["data"].pop("path")
        assert ta == tb, a.name
