import pytest

from fasttrain.config import ConfigError, load_config


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, "model: {preset: 3m}\noptim: {lr: 0.001, warmup_steps: 5}\ntrain: {steps: 50, global_batch: 8}\n")
    cfg = load_config(path, ["--optim.lr", "3e-4", "--train.micro_batch=4", "--data.repeated_fraction", "0.1",
                             "--data.repeat_count", "100"])
    assert cfg.optim.lr == 3e-4 and cfg.train.micro_batch == 4 and cfg.train.steps == 50
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (4, 256, 4)  # resolved from the preset
    assert cfg.data.repeat_count == 100 and cfg.data.repeated_fraction == 0.1


def test_json_and_explicit_fields_override_preset(tmp_path):
    path = write(tmp_path, '{"model": {"preset": "3m", "n_layer": 2}, "train": {"steps": 10}, '
                           '"optim": {"warmup_steps": 1}}', "cfg.json")
    cfg = load_config(path)
    assert cfg.model.n_layer == 2 and cfg.model.d_model == 256


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.preset", "100k", "--train.steps", "20", "--optim.warmup_steps", "2",
                             "--train.out_dir", str(tmp_path)])
    cfg.save(str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path))  # a run folder works as well as a file
    assert again == cfg


@pytest.mark.parametrize("overrides, key", [
    (["--train.stepz", "3"], "train.stepz"),
    (["--optim.lr", "fast"], "optim.lr"),
    (["--train.steps", "2.5"], "train.steps"),
    (["--train.compile", "maybe"], "train.compile"),
    (["--train.compile_mode", "fast"], "train.compile_mode"),
    (["--train.compile", "true", "--deepspeed.zero_stage", "3"], "train.compile"),
    (["--model.n_head", "5"], "model.d_model"),  # 256 not divisible by 5
    (["--optim.warmup_steps", "5000"], "optim.warmup_steps"),
    (["--model.attention", "cuda"], "model.attention"),
    (["--model.preset", "7b"], "model.preset"),
    (["--data.repeated_fraction", "1.5"], "data.repeated_fraction"),
    (["--data.repeated_fraction", "0.1", "--data.repeat_count", "1"], "data.repeat_count"),
    (["--data.placement", "front"], "data.placement"),
    (["--data.seq_len", "4096"], "data.seq_len"),
    (["--train.micro_batch", "5"], "train.micro_batch"),
    (["--deepspeed.zero_stage", "4"], "deepspeed.zero_stage"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--model.preset", "3m", "--train.steps", "100", "--optim.warmup_steps", "10"] + overrides)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write(tmp_path, "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="model.n_layer"):
        load_config(None)  # no preset and no sizes
