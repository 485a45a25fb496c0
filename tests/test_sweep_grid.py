import os
import re
import sys

import pytest
import yaml

from fasttrain.sweep.grid import SweepError, expand, load_sweep, run_name, spec_from_dict
from fasttrain.config import config_differences
from fasttrain.sweep.plan import budget_note
from fasttrain.sweep.runner import eval_command, prepare_run_folder, train_command


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
    # eval_options pass through to `fasttrain eval`
    spec = spec_from_dict(sweep_tree(tmp_path, evaluate=True, eval_options={"copies": 11, "tokens": "1_000_000"}))
    assert spec.eval_options == {"copies": 11, "tokens": 1000000}
    assert spec_from_dict(spec.to_dict()).eval_options == spec.eval_options
    assert eval_command([run], True, options=spec.eval_options)[-4:] == ["--copies", "11", "--tokens", "1000000"]
    for options, message in (({"copies": 1}, "eval_options.copies: 1 must be at least 2"),
                             ({"copy": 3}, "eval_options.copy: unknown option"),
                             ({"tokens": 2.5}, "eval_options.tokens: expected an integer"),
                             ([11], "eval_options: expected a mapping")):
        with pytest.raises(SweepError, match=message):
            spec_from_dict(sweep_tree(tmp_path, eval_options=options))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_demo_grid(tmp_path, scale):
    from fasttrain.sweep.demo import demo_scale, demo_spec

    spec = demo_spec(str(tmp_path / "demo"), scale)
    runs = expand(spec)
    s = demo_scale(scale)
    assert len(runs) == len(s.sizes) * (1 + len(s.repeat_counts))
    assert sum(r.is_baseline for r in runs) == len(s.sizes)
    # every run of every size sees the same number of tokens; every repeat count places whole sequences
    assert len({r.tokens for r in runs}) == 1
    for r in runs:
        assert abs(r.tokens - s.tokens) <= s.global_batch * s.seq_len
        assert r.config.optim.lr == s.lr[r.size]
        S = r.config.train.steps * r.config.train.global_batch
        assert r.is_baseline or r.repeated_fraction * S / r.repeat_count >= 0.5  # rounds to >= 1 sequence
        assert r.config.data.path == str(tmp_path / "demo" / "data")
    params = sorted({r.params for r in runs})
    assert len(params) == len(s.sizes) and params == [r.params for r in runs if r.is_baseline]
    assert spec.evaluate
    # evaluations during training: `evaluations` of them, the last at the end
    steps = runs[0].config.train.steps
    assert runs[0].config.train.eval_every == steps // s.evaluations


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


def test_default_budget_gives_every_size_the_same_tokens(tmp_path):
    tree = sweep_tree(tmp_path)
    del tree["budget"]
    runs = expand(spec_from_dict(tree))
    largest = 335_712  # 340k, non-embedding
    assert {r.tokens for r in runs} == {round(20 * largest / (8 * 64)) * 8 * 64}
    assert budget_note(runs) == ""
    # per-size budgets stay possible; the dry run warns that they confound N with D
    tree["budget"] = {"tokens_per_param": 20}
    runs = expand(spec_from_dict(tree))
    assert len({r.tokens for r in runs}) == 2
    assert budget_note(runs).startswith("note: the baselines train on different token budgets D (100k 2")
    assert "the report's effective sizes need the same D for every size" in budget_note(runs)


def test_whole_budget_repetition_is_a_repeated_fraction_of_one(tmp_path):
    tree = sweep_tree(tmp_path)
    tree["grid"] = {"sizes": ["100k"], "repeated_fraction": [1.0], "repeat_count": [4], "placement": ["even"]}
    runs = expand(spec_from_dict(tree))
    assert [r.name for r in runs] == ["100k_f0_s0", "100k_f1_E4_even_s0"]
    assert runs[1].config.data.repeated_fraction == 1.0


def has_init_from() -> bool:
    import dataclasses

    from fasttrain.config import TrainConfig

    return "init_from" in {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("finetune, message", [
    ({"budget": {"tokens": 1e5}}, "finetune: no data to fine-tune on; give finetune.data.path"),
    ({"data": {"seq_len": 64}, "budget": {"tokens": 1e5}}, "finetune: no data to fine-tune on"),
    ({"data": {"path": "x"}}, r"finetune.budget: missing"),
    ({"data": {"path": "x"}, "budget": {"epochs": 1}}, "finetune.budget: give exactly one of"),
    ({"data": {"path": "x"}, "budget": {"steps": 5}, "model": {}}, "finetune.model: unknown key"),
    ([1, 2], "finetune: expected a mapping"),
])
def test_bad_finetune_stage_is_a_one_line_error(tmp_path, finetune, message, capsys):
    with pytest.raises(SweepError, match=message):
        spec_from_dict(sweep_tree(tmp_path, finetune=finetune))
    if message.startswith("finetune: no data"):
        from fasttrain.sweep.cli import main as sweep_main

        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep_tree(tmp_path, finetune=finetune)))
        assert sweep_main(["sweep", str(path), "--dry-run", "--no-measure"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: finetune: no data to fine-tune on") and err.count("\n") == 1


@pytest.mark.skipif(not has_init_from(), reason="needs train.init_from in the run config")
def test_finetune_stage_adds_a_run_per_run_that_starts_from_it(tmp_path):
    tree = sweep_tree(tmp_path, finetune={"data": {"path": str(tmp_path / "other")}, "budget": {"steps": 30},
                                          "optim": {"lr": 2e-4, "warmup_steps": 3}})
    tree["grid"] = {"sizes": ["100k", "340k"], "repeated_fraction": [0.1], "repeat_count": [4]}
    runs = expand(spec_from_dict(tree))
    pretrain, finetune = runs[:4], runs[4:]
    assert [r.name for r in finetune] == [r.name + "_ft" for r in pretrain]
    for ft, src in zip(finetune, pretrain):
        c = ft.config
        assert (ft.source, ft.stage, src.stage) == (src.name, "finetune", "pretrain")
        assert c.train.init_from == src.run_dir and c.train.out_dir == src.run_dir + "_ft"
        assert c.data.path == str(tmp_path / "other") and c.data.repeated_fraction == 0.0
        assert (c.train.steps, c.optim.lr, c.optim.warmup_steps) == (30, 2e-4, 3)
        assert (c.model.n_layer, c.model.d_model) == (src.config.model.n_layer, src.config.model.d_model)
        assert (ft.repeated_fraction, ft.repeat_count) == (src.repeated_fraction, src.repeat_count)
        assert ft.axes()["source"] == src.name


@pytest.mark.skipif(not has_init_from(), reason="needs train.init_from in the run config")
def test_demo_finetune_sweep_file_matches_the_demo_with_its_finetune_stage(tmp_path, monkeypatch):
    from fasttrain.sweep.demo import demo_spec

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)  # the file's paths are relative: demo/data, demo/data_finetune
    from_file = expand(load_sweep(os.path.join(root, "configs", "demo_finetune_sweep.yaml")))
    from_demo = expand(demo_spec(str(tmp_path / "demo"), 1, finetune=True))
    assert [r.name for r in from_file] == [r.name for r in from_demo] and len(from_file) == 30
    for a, b in zip(from_file, from_demo):
        assert a.config.to_dict() == b.config.to_dict(), a.name


def test_slurm_settings_are_validated(tmp_path):
    def slurm(settings, **changes):
        return spec_from_dict(sweep_tree(tmp_path, executor={"slurm": settings}, **changes))

    spec = slurm({"partition": "gpu", "time": "12:00:00", "sbatch": {"exclusive": True}})
    assert (spec.slurm.partition, spec.slurm.time, spec.slurm.sbatch, spec.slurm.retries) == (
        "gpu", "12:00:00", {"exclusive": True}, 2)
    assert spec_from_dict(spec.to_dict()).slurm == spec.slurm  # saved as sweep.yaml and read back
    assert spec_from_dict(sweep_tree(tmp_path)).slurm is None and slurm(None).slurm.nodes == 1
    # the GPUs asked of Slurm say how many processes a run has, unless num_gpus says so itself
    assert slurm({"gpus_per_run": 8, "nodes": 2}).num_gpus == 16 and slurm({"gpus_per_run": 1}).num_gpus == 1
    assert slurm({"nodes": 2}, num_gpus=16).slurm.gpus_per_run is None
    for settings, changes, message in [
        ({"partion": "gpu"}, {}, "executor.slurm: unknown key 'partion' (valid keys: partition, gpus_per_run"),
        ({"gpus_per_run": 4}, {"num_gpus": 2}, "executor.slurm.gpus_per_run 4: a run has num_gpus 2 process(es)"),
        ({"nodes": 3}, {"num_gpus": 8}, "executor.slurm.nodes 3: num_gpus 8 (the processes of a run) must be a "
                                        "multiple of the nodes"),
        ({"retries": -1}, {}, "executor.slurm.retries: -1 must be at least 0"),
        ({"cpus_per_gpu": "many"}, {}, "executor.slurm.cpus_per_gpu: expected a number"),
        ({"sbatch": ["--exclusive"]}, {}, "executor.slurm.sbatch: expected a mapping"),
        ({"time": True}, {}, "executor.slurm.time: expected minutes or D-HH:MM:SS"),
    ]:
        with pytest.raises(SweepError, match=re.escape(message)):
            slurm(settings, **changes)
    with pytest.raises(SweepError, match=re.escape("executor: expected {slurm: {...}}")):
        spec_from_dict(sweep_tree(tmp_path, executor={"pbs": {}}))
