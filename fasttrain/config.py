"""Typed run configuration: dataclasses loaded from YAML/JSON, dotted CLI overrides, validated once.

A config file mirrors the dataclasses below:

    model: {preset: 3m, attention: auto}
    data: {path: data/default, repeated_fraction: 0.1, repeat_count: 100}
    optim: {lr: 1.0e-3}
    train: {steps: 2000, global_batch: 32}

Every problem (unknown key, wrong type, a choice not in its Literal, an impossible value) is a ConfigError
whose message names the key. Validation also resolves the derived defaults once, so that nothing downstream
re-derives them: the model preset into n_layer/d_model/n_head/context_length, data.seq_len (default: the
context length) and train.micro_batch (default: the whole per-process batch, global_batch / world size).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from fasttrain.ladder import PRESETS

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = typing.get_args(CompileMode)
EvalMetric = Literal["test", "repeated", "induction"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what to change."""


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    """A name from `fasttrain models`; the explicit sizes below override it."""
    n_layer: Optional[int] = None
    d_model: Optional[int] = None
    n_head: Optional[int] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    """None: the dataset tokenizer's vocabulary."""
    dropout: float = 0.0
    attention: Literal["auto", "torch", "cudnn", "triton", "flash"] = "auto"
    """auto: the fastest of the others measured on this GPU for the run's shape, once (torch on a CPU);
    torch: PyTorch SDPA, the kernel it picks; cudnn: SDPA restricted to cuDNN's kernel (CUDA only);
    triton: fasttrain.kernels.flash_attention; flash: the flash-attn package."""
    loss: Literal["torch", "triton"] = "torch"
    """torch: matmul + F.cross_entropy; triton: fused linear cross-entropy (the logits never exist)."""
    init_std: float = 0.02


@dataclass
class DataConfig:
    path: str = ""
    """A dataset folder written by `fasttrain prepare`."""
    seq_len: Optional[int] = None
    """Tokens per training sequence; None: the model's context length."""
    repeated_fraction: float = 0.0
    """f: the fraction of training sequences drawn from the repeated subset."""
    repeat_count: int = 1
    """E: how many times each repeated sequence is seen."""
    placement: Literal["uniform", "even"] = "uniform"
    """uniform: repeats spread at random through training; even: pass k in the k-th 1/E of training."""
    seed: int = 1234
    """Data order seed (independent of the model init seed train.seed)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Final lr = lr * min_lr_ratio (cosine schedule)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After linear warmup: cosine decay to lr * min_lr_ratio, or constant."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (optional: `pip install 'fasttrain-repeat[wandb]'`): the records of
    metrics.jsonl at their steps and the resolved config. A resumed run continues the same W&B run."""
    project: str = "fasttrain"
    """The W&B project."""
    entity: Optional[str] = None
    """The W&B user or team; None: the logged-in user's default entity."""
    name: Optional[str] = None
    """The W&B run's display name; None: the run folder's name (a sweep sets the run's name)."""
    group: Optional[str] = None
    """Runs grouped together in W&B; a sweep sets it to its folder's name unless given."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline: written under RUN/wandb/ (or WANDB_DIR) for `wandb sync`; disabled: nothing, no wandb needed."""


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 32
    """Sequences per optimizer step, over all processes."""
    micro_batch: Optional[int] = None
    """Sequences per forward pass per process (gradient accumulation makes up the rest); None: the whole
    per-process batch, global_batch / world size."""
    seed: int = 0
    """Model init seed."""
    init_from: Optional[str] = None
    """A run folder (its newest checkpoint) or a checkpoint file: start from its weights, with a fresh
    optimizer and this config's data (fine-tuning). The shapes must match this model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on a GPU, fp32 on a CPU."""
    compile: bool = False
    """torch.compile the model."""
    compile_mode: CompileMode = "default"
    """reduce-overhead uses CUDA graphs (for small, launch-bound models)."""
    cuda_graph: bool = False
    """Capture the whole optimizer step (every micro-batch's forward and backward, gradient clipping, AdamW)
    as one CUDA graph after two eager steps, and replay it: for small, launch-bound models and packs (GPU
    only; not with DeepSpeed or compile_mode reduce-overhead)."""
    out_dir: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 0
    """0: only at the end."""
    checkpoint_log_spaced: bool = False
    """Also keep checkpoints at steps 1, 2, 4, 8, ... (as Pythia does)."""
    keep_checkpoints: bool = False
    """Keep every checkpoint written (else only the newest, and the log-spaced ones)."""
    eval_every: int = 0
    """Evaluate every this many steps (and at the log-spaced checkpoints); 0: only at the end."""
    eval_tokens: int = 65536
    """Predicted tokens per loss metric of an evaluation."""
    eval_metrics: list[EvalMetric] = field(default_factory=lambda: ["test", "repeated"])
    """What an evaluation during training measures: test (held-out loss), repeated (loss on the repeated
    subset; skipped when nothing is repeated), induction (prefix-matching score per head)."""
    tensorboard: bool = False
    wandb: Optional[WandbConfig] = None
    """Also log to Weights & Biases: {project, entity, name, group, mode}; None: off."""


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    extra: dict = field(default_factory=dict)
    """Merged into the generated DeepSpeed config (keys we generate may not be changed)."""


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


# Keys that may differ between a run folder's config and the one resuming it: where the folder lies now,
# how each process splits its batch (which a resume under another world size changes), which kernels
# compute the same step (a GPU without cuDNN attention, or without CUDA graphs, may continue a run), and
# where the metrics are also sent.
NOT_RUN_IDENTITY = ("train.out_dir", "train.micro_batch", "model.attention", "train.cuda_graph", "train.wandb")


def config_differences(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every value of two config trees (Config.to_dict()) that makes `new` a
    different run than `old`."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if f"{section}.{key}" not in NOT_RUN_IDENTITY and a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    if dataclasses.is_dataclass(tp):  # a section that may be absent (Optional[SomeConfig])
        return _build(tp, value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        kind = type(choices[0])
        coerced = _coerce(value, kind, key) if kind in (int, str) else value
        if coerced not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return coerced
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, key) for v in value]
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
        if node.get(p) is None:  # absent, or an optional section that is off (null)
            node[p] = {}
        node = node[p]
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
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(tree).__name__}")
    return tree or {}


def launch_world_size() -> int:
    """The number of data-parallel processes of this launch (set by torchrun and the deepspeed launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def config_from_dict(tree: dict, overrides: list[tuple[str, str]] = (), world_size: Optional[int] = None) -> Config:
    """Build and validate a Config; world_size (default: this launch's) resolves train.micro_batch."""
    tree = json.loads(json.dumps(tree))  # deep copy
    for key, value in overrides:
        _set_dotted(tree, key, yaml.safe_load(value) if isinstance(value, str) else value)
    cfg = _build(Config, tree, "")
    validate(cfg, launch_world_size() if world_size is None else world_size)
    return cfg


def load_config(path: Optional[str] = None, overrides: list[str] | list[tuple[str, str]] = (),
                world_size: Optional[int] = None) -> Config:
    """Load a YAML/JSON config file (or a run folder holding config.yaml), apply overrides, validate.
    A run folder's train.out_dir is the folder itself, wherever it has been moved or copied to."""
    tree = {}
    if path:
        run_dir = path if os.path.isdir(path) else None
        tree = read_config_file(os.path.join(path, "config.yaml") if run_dir else path)
        if run_dir:
            tree.setdefault("train", {})["out_dir"] = os.path.abspath(run_dir)
    pairs = parse_overrides(list(overrides)) if overrides and isinstance(list(overrides)[0], str) else list(overrides)
    return config_from_dict(tree, pairs, world_size)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def resolve_model(m: ModelConfig) -> None:
    """Fill n_layer/d_model/n_head/context_length from the preset (explicit values win), then check the shape."""
    if m.preset is not None:
        _check(m.preset in PRESETS, f"model.preset: unknown preset '{m.preset}' (choose one of {', '.join(PRESETS)})")
        p = PRESETS[m.preset]
        for key in ("n_layer", "d_model", "n_head", "context_length"):
            if getattr(m, key) is None:
                setattr(m, key, getattr(p, key))
    for key in ("n_layer", "d_model", "n_head", "context_length"):
        value = getattr(m, key)
        _check(value is not None, f"model.{key}: not set (give model.preset or model.{key})")
        _check(value >= 1, f"model.{key}: {value} must be at least 1")
    _check(m.d_model % m.n_head == 0, f"model.d_model: {m.d_model} is not divisible by model.n_head ({m.n_head})")


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(sequences per forward pass per process, gradient accumulation steps) for this world size;
    train.micro_batch None means the whole per-process batch."""
    t = cfg.train
    _check(t.global_batch % world_size == 0,
           f"train.global_batch: {t.global_batch} is not divisible by the {world_size} processes; use a multiple "
           "of the world size")
    per_process = t.global_batch // world_size
    micro = per_process if t.micro_batch is None else t.micro_batch
    _check(micro >= 1, f"train.micro_batch: {micro} must be at least 1")
    _check(per_process % micro == 0,
           f"train.micro_batch: {micro} must divide the {per_process} sequences each of the {world_size} processes "
           f"reads per step (train.global_batch {t.global_batch})")
    return micro, per_process // micro


def validate(cfg: Config, world_size: int = 1) -> None:
    """Checks that need no data or hardware, and the derived defaults (see the module docstring)."""
    resolve_model(cfg.model)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check(0.0 <= m.dropout < 1.0, f"model.dropout: {m.dropout} must be in [0, 1)")
    _check(m.vocab_size is None or m.vocab_size >= 2, f"model.vocab_size: {m.vocab_size} must be at least 2")
    if d.seq_len is None:
        d.seq_len = m.context_length
    _check(1 <= d.seq_len <= m.context_length,
           f"data.seq_len: {d.seq_len} must be between 1 and model.context_length ({m.context_length})")
    _check(0.0 <= d.repeated_fraction <= 1.0, f"data.repeated_fraction: {d.repeated_fraction} must be in [0, 1]")
    _check(d.repeat_count >= 1, f"data.repeat_count: {d.repeat_count} must be at least 1")
    _check(d.repeated_fraction == 0.0 or d.repeat_count >= 2,
           "data.repeat_count: must be at least 2 when data.repeated_fraction > 0 (1 repeat is unique data)")
    _check(o.lr > 0, f"optim.lr: {o.lr} must be positive")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: {o.min_lr_ratio} must be in [0, 1]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps: {o.warmup_steps} must be >= 0")
    _check(o.warmup_steps < t.steps, f"optim.warmup_steps: {o.warmup_steps} must be shorter than train.steps ({t.steps})")
    _check(o.weight_decay >= 0, f"optim.weight_decay: {o.weight_decay} must be >= 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2: must be in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip: {o.grad_clip} must be >= 0 (0 disables)")
    _check(t.steps >= 1, f"train.steps: {t.steps} must be at least 1")
    _check(t.global_batch >= 1, f"train.global_batch: {t.global_batch} must be at least 1")
    t.micro_batch, _ = batch_layout(cfg, world_size)
    _check(t.init_from is None or t.init_from.strip() != "", "train.init_from: empty; give a run folder or checkpoint")
    for k in ("checkpoint_every", "eval_every", "eval_tokens"):
        _check(getattr(t, k) >= 0, f"train.{k}: {getattr(t, k)} must be >= 0")
    _check(t.log_every >= 1, f"train.log_every: {t.log_every} must be at least 1")
    _check(len(set(t.eval_metrics)) == len(t.eval_metrics), f"train.eval_metrics: {t.eval_metrics} repeats a metric")
    # Under ZeRO-3 the module holds empty placeholders for its partitioned weights, which Dynamo traces.
    _check(not (t.cuda_graph and cfg.deepspeed.zero_stage > 0),
           "train.cuda_graph: not supported with DeepSpeed (deepspeed.zero_stage > 0); set it false")
    _check(not (t.cuda_graph and t.compile and t.compile_mode == "reduce-overhead"),
           "train.cuda_graph: the step is captured whole; set train.compile_mode to default, not reduce-overhead "
           "(which captures graphs of its own)")
    _check(not (t.compile and cfg.deepspeed.zero_stage == 3),
           "train.compile: not supported with deepspeed.zero_stage 3 (its partitioned weights cannot be traced); "
           "set train.compile false or use ZeRO stage 1 or 2")
