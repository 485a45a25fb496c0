"""Typed run configuration: dataclasses loaded from YAML/JSON, dotted CLI overrides, validated once.

A config file mirrors the dataclasses below:

    model: {preset: 3m, attention: torch}
    data: {path: data/default, repeated_fraction: 0.1, repeat_count: 100}
    optim: {lr: 1.0e-3}
    train: {steps: 2000, global_batch: 32}

Every problem (unknown key, wrong type, impossible value) is a ConfigError whose message names the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what to change."""


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # a name from `fasttrain models`; explicit fields below override it
    n_layer: Optional[int] = None
    d_model: Optional[int] = None
    n_head: Optional[int] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None  # None: taken from the dataset's tokenizer
    dropout: float = 0.0
    attention: str = "torch"  # torch (SDPA) | triton (fasttrain.kernels) | flash (flash-attn)
    loss: str = "torch"  # torch (matmul + F.cross_entropy) | triton (fused linear cross-entropy)
    init_std: float = 0.02


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `fasttrain prepare`
    seq_len: Optional[int] = None  # None: the model's context length
    repeated_fraction: float = 0.0  # f: fraction of training tokens drawn from the repeated subset
    repeat_count: int = 1  # E: how many times each repeated sequence is seen
    placement: str = "uniform"  # uniform: repeats spread at random | even: pass k in the k-th 1/E of training
    seed: int = 1234  # data order seed (independent of the model init seed)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine)
    schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 32  # sequences per optimizer step, over all ranks
    micro_batch: Optional[int] = None  # sequences per forward pass per rank; None: global_batch / world
    seed: int = 0  # model init seed
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    # torch.compile mode: default | reduce-overhead (CUDA graphs: for small, launch-bound models) |
    # max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    out_dir: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    checkpoint_log_spaced: bool = False  # also keep checkpoints at steps 1, 2, 4, 8, ... (as Pythia)
    keep_checkpoints: bool = False  # keep every checkpoint written (else only the latest)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_tokens: int = 65536  # held-out tokens per evaluation
    tensorboard: bool = False


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write the resolved config (atomically) so a run folder says exactly what ran."""
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--optim.lr', '3e-4', '--train.steps=10'] -> [('optim.lr', '3e-4'), ('train.steps', '10')]."""
    pairs, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: overrides look like --section.key value")
        a = a[2:]
        if "=" in a:
            key, value = a.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{a} has no value")
            key, value = a, args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"override --{key}: use --section.key (e.g. --optim.lr 3e-4)")
        pairs.append((key, value))
    return pairs


def read_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        tree = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    return tree or {}


def config_from_dict(tree: dict, overrides: list[tuple[str, str]] = ()) -> Config:
    tree = json.loads(json.dumps(tree))  # deep copy
    for key, value in overrides:
        _set_dotted(tree, key, yaml.safe_load(value) if isinstance(value, str) else value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: list[str] | list[tuple[str, str]] = ()) -> Config:
    """Load a YAML/JSON config file (or a run folder holding config.yaml), apply overrides, validate."""
    tree = {}
    if path:
        if os.path.isdir(path):
            path = os.path.join(path, "config.yaml")
        tree = read_config_file(path)
    pairs = parse_overrides(list(overrides)) if overrides and isinstance(list(overrides)[0], str) else list(overrides)
    return config_from_dict(tree, pairs)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Checks that need no data or hardware. Resolves the model preset into explicit sizes."""
    from fasttrain.ladder import resolve_model

    resolve_model(cfg.model)  # fills n_layer/d_model/n_head/context_length from the preset
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check(m.attention in ("torch", "triton", "flash"), f"model.attention: '{m.attention}' is not one of torch, triton, flash")
    _check(m.loss in ("torch", "triton"), f"model.loss: '{m.loss}' is not one of torch, triton")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout: {m.dropout} must be in [0, 1)")
    _check(m.vocab_size is None or m.vocab_size >= 2, f"model.vocab_size: {m.vocab_size} must be at least 2")
    if d.seq_len is not None:
        _check(1 <= d.seq_len <= m.context_length,
               f"data.seq_len: {d.seq_len} must be between 1 and model.context_length ({m.context_length})")
    _check(0.0 <= d.repeated_fraction <= 1.0, f"data.repeated_fraction: {d.repeated_fraction} must be in [0, 1]")
    _check(d.repeat_count >= 1, f"data.repeat_count: {d.repeat_count} must be at least 1")
    _check(d.repeated_fraction == 0.0 or d.repeat_count >= 2,
           "data.repeat_count: must be at least 2 when data.repeated_fraction > 0 (1 repeat is unique data)")
    _check(d.placement in ("uniform", "even"), f"data.placement: '{d.placement}' is not one of uniform, even")
    _check(o.lr > 0, f"optim.lr: {o.lr} must be positive")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: {o.min_lr_ratio} must be in [0, 1]")
    _check(o.schedule in ("cosine", "constant"), f"optim.schedule: '{o.schedule}' is not one of cosine, constant")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps: {o.warmup_steps} must be >= 0")
    _check(o.warmup_steps < t.steps, f"optim.warmup_steps: {o.warmup_steps} must be shorter than train.steps ({t.steps})")
    _check(o.weight_decay >= 0, f"optim.weight_decay: {o.weight_decay} must be >= 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2: must be in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip: {o.grad_clip} must be >= 0 (0 disables)")
    _check(t.steps >= 1, f"train.steps: {t.steps} must be at least 1")
    _check(t.global_batch >= 1, f"train.global_batch: {t.global_batch} must be at least 1")
    if t.micro_batch is not None:
        _check(t.micro_batch >= 1, f"train.micro_batch: {t.micro_batch} must be at least 1")
        _check(t.global_batch % t.micro_batch == 0,
               f"train.micro_batch: {t.micro_batch} must divide train.global_batch ({t.global_batch})")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device: '{t.device}' is not one of auto, cpu, cuda")
    _check(t.precision in ("auto", "bf16", "fp32"), f"train.precision: '{t.precision}' is not one of auto, bf16, fp32")
    _check(t.compile_mode in COMPILE_MODES,
           f"train.compile_mode: '{t.compile_mode}' is not one of {', '.join(COMPILE_MODES)}")
    for k in ("log_every", "checkpoint_every", "eval_every", "eval_tokens"):
        _check(getattr(t, k) >= 0, f"train.{k}: {getattr(t, k)} must be >= 0")
    _check(t.log_every >= 1, f"train.log_every: {t.log_every} must be at least 1")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")
    # Under ZeRO-3 the module holds empty placeholders for its partitioned weights, which Dynamo traces.
    _check(not (t.compile and cfg.deepspeed.zero_stage == 3),
           "train.compile: not supported with deepspeed.zero_stage 3 (its partitioned weights cannot be traced); "
           "set train.compile false or use ZeRO stage 1 or 2")


def seq_len(cfg: Config) -> int:
    return cfg.data.seq_len or cfg.model.context_length
