"""A sweep file and its expansion into runs.

A sweep file holds a base run config (the schema of `fasttrain train --config`), the axes of the grid, a
token budget per size and an output folder:

    out_dir: sweeps/repeat
    base:                               # every run starts from this config
      data: {path: data/default, seq_len: 128}
      optim: {lr: 3.0e-3, warmup_steps: 20}
      train: {global_batch: 16}
    grid:
      sizes: [100k, 340k, 900k]         # model presets (`fasttrain models`)
      repeated_fraction: [0.1]          # f; the f = 0 baseline of every (size, seed) is added automatically
      repeat_count: [2, 8, 32, 128]     # E
      placement: [uniform]              # uniform | even
      seeds: [0]                        # model init seed; the data seed is base data.seed + seed
    budget: {tokens: 2.0e6}             # the same training tokens D for every size (as the paper: 100B each);
                                        # default {tokens_per_param_of_largest: 20}: 20 tokens per parameter
                                        # of the largest size, for every size. Or {steps: 500}, or per size:
                                        # {tokens_per_param: 20} or {tokens: {100k: 1.0e6, 340k: 3.0e6}}, whose
                                        # effective sizes need an L(N, D) fit (see fasttrain.sweep.fit);
                                        # non-embedding parameters, tokens = steps * batch * seq_len
    per_size:                           # optional config overrides for one size
      900k: {optim: {lr: 2.0e-3}}
    num_gpus: 1                         # > 1 (or base deepspeed.zero_stage > 0): runs go through the deepspeed launcher
    evaluate: false                     # true: run `fasttrain eval` after each run (all metrics), or a list
                                        # of metrics, e.g. [test, repeated, copying, induction]
    eval_options: {copies: 11, tokens: 1.0e6}  # optional: `fasttrain eval --copies --tokens` for that evaluation
                                        # (default: 11 copies; tokens = the runs' train.eval_tokens)
    pack: 1                             # > 1: train up to this many same-shape runs together as one stacked
                                        # model in one process (small models on a GPU); ignored with deepspeed
    executor:                           # optional: submit each job (a run, or a pack) to Slurm instead of
      slurm: {partition: gpu, time: "12:00:00"}   # running it here (keys: SlurmSettings below)
    finetune:                           # optional: fine-tune every run (baselines too) after its pretraining
      data: {path: data/other}          # required: a dataset prepared with the same tokenizer
      budget: {tokens: 5.0e5}           # required: tokens or steps of fine-tuning
      optim: {lr: 1.0e-3}               # optional overrides of the pretrained run's optim (and train)

A repeated fraction of 1.0 repeats the whole budget: E passes over S / E windows (with placement even,
epochs in order). A fine-tune run is an ordinary run, `NAME_ft`, whose config starts from the pretrained
run's weights (train.init_from = its folder, a fresh optimizer), trains on finetune.data (unrepeated unless
finetune.data says otherwise), and runs once its source run is done.

Relative paths (out_dir, base data.path) are relative to the current directory, as for `fasttrain train`;
run configs store them absolute. Run names are stable and readable: `340k_f0.1_E8_uniform_s0`, and
`340k_f0_s0` for a baseline, `340k_f0_s0_ft` for its fine-tune. With `train.wandb` in the base config, every
run logs to Weights & Biases under its run name, in the group named after the sweep folder (unless base
train.wandb.group names one).
"""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import yaml

from fasttrain.config import Config, ConfigError, config_from_dict
from fasttrain.eval.run import ALL_METRICS
from fasttrain.ladder import PRESETS, non_embedding_params

SWEEP_KEYS = ("out_dir", "base", "grid", "budget", "per_size", "num_gpus", "evaluate", "eval_options", "pack",
              "executor", "finetune")
EVAL_OPTIONS = {"copies": 2, "tokens": 1}  # options passed to `fasttrain eval`, with their smallest value
GRID_KEYS = ("sizes", "repeated_fraction", "repeat_count", "placement", "seeds")
BUDGET_KEYS = ("tokens_per_param_of_largest", "tokens", "steps", "tokens_per_param")
DEFAULT_BUDGET = {"tokens_per_param_of_largest": 20.0}  # every size trains on the same tokens, as in the paper
FINETUNE_KEYS = ("data", "budget", "optim", "train")
FINETUNE_SUFFIX = "_ft"


class SweepError(ValueError):
    """A sweep file or sweep folder that cannot be used as it is; the message says what to change."""


@dataclass
class SlurmSettings:
    """`executor: {slurm: {...}}` in a sweep file: how each job (a run, or a pack of runs) is submitted to Slurm.
    A job has nodes x (num_gpus / nodes) tasks, one process (one rank) each."""
    partition: Optional[str] = None
    """Slurm partition (sbatch --partition); default: the cluster's default partition."""
    gpus_per_run: Optional[int] = None
    """GPUs of each run on each of its nodes (sbatch --gpus-per-node); default num_gpus / nodes, or 0 when
    base train.device is cpu (CPU-only jobs)."""
    nodes: int = 1
    """Nodes per run; more than one only for runs that train with DeepSpeed (num_gpus counts every node's)."""
    cpus_per_gpu: int = 4
    """CPU cores per process, i.e. per GPU (sbatch --cpus-per-task)."""
    mem: Optional[str] = None
    """Memory per node as sbatch --mem takes it, e.g. 64G; default: the partition's default."""
    time: Optional[Union[int, str]] = None
    """Time limit: minutes, or D-HH:MM:SS as sbatch --time takes it; default: the partition's limit."""
    account: Optional[str] = None
    """sbatch --account."""
    qos: Optional[str] = None
    """sbatch --qos."""
    constraint: Optional[str] = None
    """sbatch --constraint (node features, e.g. a100)."""
    sbatch: dict = field(default_factory=dict)
    """More sbatch options, name -> value (true for a flag), e.g. {exclusive: true, mail-type: END}."""
    retries: int = 2
    """How many times a run whose job failed or was lost is submitted again by a later `fasttrain sweep`."""
    signal_seconds: int = 120
    """SIGUSR1 reaches the trainer this long before the time limit: it checkpoints and the job is requeued."""


def slurm_settings_from_dict(tree: Any, num_gpus: int) -> SlurmSettings:
    """Validate `executor.slurm` (an unknown key or a wrong type names the key)."""
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise SweepError(f"executor.slurm: expected a mapping of Slurm settings, got {tree!r}")
    keys = [f.name for f in fields(SlurmSettings)]
    unknown = sorted(set(tree) - set(keys))
    if unknown:
        raise SweepError(f"executor.slurm: unknown key '{unknown[0]}' (valid keys: {', '.join(keys)}; "
                         "other sbatch options go under executor.slurm.sbatch)")
    values = dict(tree)
    for key in ("gpus_per_run", "nodes", "cpus_per_gpu", "retries", "signal_seconds"):
        if values.get(key) is not None:
            if isinstance(values[key], bool):
                raise SweepError(f"executor.slurm.{key}: expected an integer, got {values[key]!r}")
            values[key] = _number(values[key], f"executor.slurm.{key}", int)
    for key in ("partition", "mem", "account", "qos", "constraint"):
        if values.get(key) is not None and not isinstance(values[key], (str, int)):
            raise SweepError(f"executor.slurm.{key}: expected a string, got {values[key]!r}")
        if values.get(key) is not None:
            values[key] = str(values[key])
    if values.get("time") is not None and (isinstance(values["time"], bool)
                                           or not isinstance(values["time"], (int, str))):
        raise SweepError(f"executor.slurm.time: expected minutes or D-HH:MM:SS, got {values['time']!r}")
    if not isinstance(values.get("sbatch", {}), dict):
        raise SweepError("executor.slurm.sbatch: expected a mapping of sbatch options, e.g. {exclusive: true}")
    settings = SlurmSettings(**values)
    for key, low in (("nodes", 1), ("cpus_per_gpu", 1), ("retries", 0), ("signal_seconds", 0), ("gpus_per_run", 0)):
        value = getattr(settings, key)
        if value is not None and value < low:
            raise SweepError(f"executor.slurm.{key}: {value} must be at least {low}")
    if num_gpus % settings.nodes:
        raise SweepError(f"executor.slurm.nodes {settings.nodes}: num_gpus {num_gpus} (the processes of a run) "
                         "must be a multiple of the nodes")
    per_node = num_gpus // settings.nodes
    if settings.gpus_per_run not in (None, 0, per_node):
        raise SweepError(f"executor.slurm.gpus_per_run {settings.gpus_per_run}: a run has num_gpus {num_gpus} "
                         f"process(es), one GPU each, over {settings.nodes} node(s), so {per_node} per node; set "
                         f"num_gpus: {settings.gpus_per_run * settings.nodes} to give each run more GPUs")
    return settings


@dataclass
class SweepSpec:
    base: dict  # a run-config tree
    sizes: list[str]
    repeated_fractions: list[float]  # f > 0 only; baselines are implied
    repeat_counts: list[int]
    placements: list[str] = field(default_factory=lambda: ["uniform"])
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: dict = field(default_factory=lambda: dict(DEFAULT_BUDGET))
    per_size: dict = field(default_factory=dict)
    out_dir: str = "sweeps/default"
    num_gpus: int = 1
    evaluate: bool | list = False  # True (every metric) or a list of metric names
    eval_options: dict = field(default_factory=dict)  # copies, tokens: passed to `fasttrain eval` as --copies, --tokens
    pack: int = 1  # runs trained together as one stacked model (1: each run in its own process)
    slurm: Optional[SlurmSettings] = None  # executor.slurm: submit the jobs to Slurm instead of running them here
    finetune: Optional[dict] = None  # {data, budget, optim, train}: a fine-tune run after every run

    def to_dict(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "base": self.base,
            "grid": {"sizes": self.sizes, "repeated_fraction": self.repeated_fractions,
                     "repeat_count": self.repeat_counts, "placement": self.placements, "seeds": self.seeds},
            "budget": self.budget,
            "per_size": self.per_size,
            "num_gpus": self.num_gpus,
            "evaluate": self.evaluate,
            "eval_options": self.eval_options,
            "pack": self.pack,
            **({"executor": {"slurm": asdict(self.slurm)}} if self.slurm else {}),
            **({"finetune": self.finetune} if self.finetune else {}),
        }

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)

    @property
    def uses_deepspeed(self) -> bool:
        zero = (self.base.get("deepspeed") or {}).get("zero_stage", 0)
        return self.num_gpus > 1 or int(zero or 0) > 0


@dataclass
class RunSpec:
    """One run of the grid: its name, axis values and resolved config (train.out_dir = its folder).
    A fine-tune run keeps the axis values of the run it starts from (`source`)."""
    name: str
    size: str
    repeated_fraction: float
    repeat_count: int
    placement: str
    seed: int
    config: Config
    params: int  # non-embedding parameters
    source: Optional[str] = None  # fine-tune runs: the name of the pretrained run they start from

    @property
    def stage(self) -> str:
        return "finetune" if self.source else "pretrain"

    @property
    def is_baseline(self) -> bool:
        return self.repeated_fraction == 0.0

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len

    @property
    def tokens(self) -> int:
        """Training tokens D (predicted tokens: steps * global batch * seq_len)."""
        t = self.config.train
        return t.steps * t.global_batch * self.seq_len

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens

    @property
    def run_dir(self) -> str:
        return self.config.train.out_dir

    def axes(self) -> dict:
        axes = {"size": self.size, "params": self.params, "repeated_fraction": self.repeated_fraction,
                "repeat_count": self.repeat_count, "placement": self.placement if not self.is_baseline else None,
                "seed": self.seed, "steps": self.config.train.steps, "tokens": self.tokens, "flops": self.flops}
        if self.source:
            axes.update(stage=self.stage, source=self.source)
        return axes


def format_number(x: float) -> str:
    """0.1 -> '0.1', 100.0 -> '100', 0.03 -> '0.03' (short and stable, for run names)."""
    return f"{x:g}"


def run_name(size: str, f: float, E: int, placement: str, seed: int) -> str:
    if f == 0:
        return f"{size}_f0_s{seed}"
    return f"{size}_f{format_number(f)}_E{E}_{placement}_s{seed}"


def _as_list(value: Any, key: str) -> list:
    if value is None:
        raise SweepError(f"grid.{key}: missing (give a value or a list)")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise SweepError(f"grid.{key}: empty list")
    return items


def _number(value: Any, key: str, kind=float):
    try:
        x = float(value.replace("_", "")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{key}: expected a number, got {value!r}") from None
    if kind is int:
        if not x.is_integer():
            raise SweepError(f"{key}: expected an integer, got {value!r}")
        return int(x)
    return x


def spec_from_dict(tree: dict, source: str = "sweep file") -> SweepSpec:
    if not isinstance(tree, dict):
        raise SweepError(f"{source}: expected a mapping with base, grid and budget")
    unknown = sorted(set(tree) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key '{unknown[0]}' (valid keys: {', '.join(SWEEP_KEYS)})")
    grid = tree.get("grid")
    if not isinstance(grid, dict):
        raise SweepError(f"{source}: 'grid' is missing or not a mapping (sizes, repeated_fraction, repeat_count, ...)")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise SweepError(f"grid.{unknown[0]}: unknown axis (valid axes: {', '.join(GRID_KEYS)})")

    sizes = [str(s) for s in _as_list(grid.get("sizes"), "sizes")]
    for s in sizes:
        if s not in PRESETS:
            raise SweepError(f"grid.sizes: unknown preset '{s}' (choose from {', '.join(PRESETS)})")
    fractions = [_number(f, "grid.repeated_fraction") for f in _as_list(grid.get("repeated_fraction", [0.0]), "repeated_fraction")]
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise SweepError(f"grid.repeated_fraction: {f} must be in [0, 1] (1: the whole budget repeated)")
    repeated = [f for f in fractions if f > 0]
    counts = [_number(e, "grid.repeat_count", int) for e in _as_list(grid.get("repeat_count", [2]), "repeat_count")]
    for e in counts:
        if e < 2:
            raise SweepError(f"grid.repeat_count: {e} must be at least 2 (1 repeat is unique data; "
                             "the f = 0 baselines are added automatically)")
    placements = [str(p) for p in _as_list(grid.get("placement", ["uniform"]), "placement")]
    for p in placements:
        if p not in ("uniform", "even"):
            raise SweepError(f"grid.placement: '{p}' is not one of uniform, even")
    seeds = [_number(s, "grid.seeds", int) for s in _as_list(grid.get("seeds", [0]), "seeds")]

    budget = _check_budget(tree.get("budget") or dict(DEFAULT_BUDGET), "budget")
    per_size = tree.get("per_size") or {}
    if not isinstance(per_size, dict):
        raise SweepError("per_size: expected a mapping from size to config overrides")
    for s in per_size:
        if str(s) not in sizes:
            raise SweepError(f"per_size.{s}: not one of grid.sizes ({', '.join(sizes)})")
    base = tree.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError("base: expected a run config mapping (model, data, optim, train, deepspeed)")
    num_gpus = _number(tree.get("num_gpus", 1), "num_gpus", int)
    if num_gpus < 1:
        raise SweepError(f"num_gpus: {num_gpus} must be at least 1")
    evaluate = tree.get("evaluate", False)
    if isinstance(evaluate, str):
        evaluate = [m.strip() for m in evaluate.split(",") if m.strip()]
    if isinstance(evaluate, list):
        bad = [m for m in evaluate if m not in ALL_METRICS]
        if bad or not evaluate:
            raise SweepError(f"evaluate: {bad[0] if bad else 'empty list'!r} is not a metric "
                             f"(choose from {', '.join(ALL_METRICS)}, or true for all)")
    elif not isinstance(evaluate, bool):
        raise SweepError(f"evaluate: expected true, false or a list of metrics, got {evaluate!r}")
    eval_options = tree.get("eval_options") or {}
    if not isinstance(eval_options, dict):
        raise SweepError(f"eval_options: expected a mapping with {' and/or '.join(EVAL_OPTIONS)}, got {eval_options!r}")
    for key in eval_options:
        if key not in EVAL_OPTIONS:
            raise SweepError(f"eval_options.{key}: unknown option (valid: {', '.join(EVAL_OPTIONS)})")
    eval_options = {key: _number(value, f"eval_options.{key}", int) for key, value in eval_options.items()}
    for key, value in eval_options.items():
        if value < EVAL_OPTIONS[key]:
            raise SweepError(f"eval_options.{key}: {value} must be at least {EVAL_OPTIONS[key]}")
    pack = _number(tree.get("pack", 1), "pack", int) if not isinstance(tree.get("pack"), bool) else 0
    if pack < 1:
        raise SweepError(f"pack: {tree.get('pack')!r} must be an integer of at least 1 "
                         "(1 trains each run in its own process)")
    slurm = None
    executor = tree.get("executor")
    if executor is not None:
        if not isinstance(executor, dict) or set(executor) - {"slurm"}:
            raise SweepError(f"executor: expected {{slurm: {{...}}}} (Slurm settings), got {executor!r}")
        if "slurm" in executor:
            slurm_tree = executor["slurm"] or {}
            if isinstance(slurm_tree, dict) and slurm_tree.get("gpus_per_run") and "num_gpus" not in tree:
                # the GPUs asked of Slurm say how many processes a run has
                num_gpus = _number(slurm_tree["gpus_per_run"], "executor.slurm.gpus_per_run", int) * \
                    _number(slurm_tree.get("nodes", 1), "executor.slurm.nodes", int)
            slurm = slurm_settings_from_dict(slurm_tree, num_gpus)
    finetune = _check_finetune(tree.get("finetune")) if tree.get("finetune") is not None else None
    return SweepSpec(base=base, sizes=_unique(sizes), repeated_fractions=_unique(repeated),
                     repeat_counts=_unique(counts), placements=_unique(placements), seeds=_unique(seeds),
                     budget=budget, per_size={str(k): v for k, v in per_size.items()},
                     out_dir=str(tree.get("out_dir") or "sweeps/default"), num_gpus=num_gpus, evaluate=evaluate,
                     eval_options=eval_options, pack=pack, slurm=slurm, finetune=finetune)


def _check_budget(budget: Any, key: str) -> dict:
    if not isinstance(budget, dict) or len(set(budget) & set(BUDGET_KEYS)) != 1 or set(budget) - set(BUDGET_KEYS):
        raise SweepError(f"{key}: give exactly one of tokens, steps, tokens_per_param_of_largest or "
                         "tokens_per_param (a number, or a mapping from size to number)")
    return budget


def _check_finetune(tree: Any) -> dict:
    """The finetune: stage of a sweep file, checked: data (with a path) and budget required."""
    if not isinstance(tree, dict):
        raise SweepError("finetune: expected a mapping with data, budget and optionally optim and train")
    unknown = sorted(set(tree) - set(FINETUNE_KEYS))
    if unknown:
        raise SweepError(f"finetune.{unknown[0]}: unknown key (valid keys: {', '.join(FINETUNE_KEYS)})")
    data = tree.get("data")
    if not isinstance(data, dict) or not data.get("path"):
        raise SweepError("finetune: no data to fine-tune on; give finetune.data.path, a dataset prepared with "
                         "the pretraining's tokenizer (fasttrain prepare --tokenizer)")
    if tree.get("budget") is None:
        raise SweepError("finetune.budget: missing; give the fine-tuning's tokens or steps, e.g. {tokens: 5.0e5}")
    _check_budget(tree["budget"], "finetune.budget")
    for key in ("optim", "train"):
        if not isinstance(tree.get(key) or {}, dict):
            raise SweepError(f"finetune.{key}: expected a mapping of {key} config overrides")
    return tree


def _unique(items: list) -> list:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def load_sweep(path: str) -> SweepSpec:
    if not os.path.exists(path):
        raise SweepError(f"sweep file not found: {path}")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise SweepError(f"cannot parse sweep file {path}: {str(e).splitlines()[0]}") from None
    return spec_from_dict(tree or {}, source=path)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _per_size_value(budget_value: Any, size: str, key: str) -> float:
    if isinstance(budget_value, dict):
        if size not in budget_value:
            raise SweepError(f"{key}: no value for size {size} (give one for every size in grid.sizes)")
        budget_value = budget_value[size]
    return _number(budget_value, key)


def preset_params(size: str) -> int:
    return non_embedding_params(PRESETS[size].n_layer, PRESETS[size].d_model)


def steps_for_budget(budget: dict, size: str, params: int, tokens_per_step: int, largest_params: int = 0,
                     key_prefix: str = "budget") -> int:
    """train.steps that spend the size's token budget (rounded to whole steps, at least 1).
    largest_params: non-embedding parameters of the sweep's largest size (tokens_per_param_of_largest)."""
    (key,) = set(budget) & set(BUDGET_KEYS)
    value = _per_size_value(budget[key], size, f"{key_prefix}.{key}")
    if value <= 0:
        raise SweepError(f"{key_prefix}.{key}: {value} must be positive")
    if key == "steps":
        return max(1, int(round(value)))
    if key == "tokens_per_param":
        tokens = value * params
    elif key == "tokens_per_param_of_largest":
        tokens = value * (largest_params or params)
    else:
        tokens = value
    return max(1, int(round(tokens / tokens_per_step)))


def expand(spec: SweepSpec, out_dir: Optional[str] = None) -> list[RunSpec]:
    """Every run of the grid (baselines included), ordered by size, seed, then baselines first; then, with
    a finetune stage, one fine-tune run per run in the same order."""
    sweep_dir = os.path.abspath(out_dir or spec.out_dir)
    if spec.finetune:
        _check_finetune(spec.finetune)
    runs = []
    for size, seed in itertools.product(spec.sizes, spec.seeds):
        combos = [(0.0, 1, "uniform")] + list(itertools.product(spec.repeated_fractions, spec.repeat_counts, spec.placements))
        for f, E, placement in combos:
            name = run_name(size, f, E, placement, seed)
            runs.append(_resolve_run(spec, sweep_dir, name, size, f, E, placement, seed))
    if spec.finetune:
        runs += [_resolve_finetune(spec, sweep_dir, run) for run in list(runs)]
    return runs


def _largest_params(spec: SweepSpec) -> int:
    return max(preset_params(s) for s in spec.sizes)


def _resolve_finetune(spec: SweepSpec, sweep_dir: str, source: RunSpec) -> RunSpec:
    """The fine-tune of a pretrained run: its config with finetune.data/optim/train merged in, its weights
    as the start (train.init_from), finetune.budget as its length, unrepeated data by default."""
    ft = spec.finetune
    name = source.name + FINETUNE_SUFFIX
    tree = source.config.to_dict()
    data = _merge({"repeated_fraction": 0.0, "repeat_count": 1, "placement": "uniform"}, ft["data"])
    data["path"] = os.path.abspath(str(data["path"]))
    tree = _merge(tree, {"data": data, "optim": ft.get("optim") or {}, "train": ft.get("train") or {}})
    train_tree = tree["train"]
    train_tree["init_from"] = source.run_dir
    train_tree["out_dir"] = os.path.join(sweep_dir, "runs", name)
    if isinstance(train_tree.get("wandb"), dict):  # W&B: under its own name, in its source run's group
        train_tree["wandb"]["name"] = name
    tokens_per_step = train_tree["global_batch"] * source.config.data.seq_len
    train_tree["steps"] = steps_for_budget(ft["budget"], source.size, source.params, tokens_per_step,
                                           _largest_params(spec), key_prefix="finetune.budget")
    if "checkpoint_every" not in (ft.get("train") or {}):
        train_tree["checkpoint_every"] = max(1, train_tree["steps"] // 10)
    try:
        cfg = config_from_dict(tree, world_size=spec.num_gpus)
    except ConfigError as e:
        raise SweepError(f"run {name}: {e}") from None
    return RunSpec(name=name, size=source.size, repeated_fraction=source.repeated_fraction,
                   repeat_count=source.repeat_count, placement=source.placement, seed=source.seed, config=cfg,
                   params=source.params, source=source.name)


def _resolve_run(spec, sweep_dir, name, size, f, E, placement, seed) -> RunSpec:
    tree = _merge(spec.base, spec.per_size.get(size, {}))
    for section in ("model", "data", "optim", "train"):
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise SweepError(f"base.{section}: expected a mapping")
    tree["model"]["preset"] = size
    data = tree["data"]
    if data.get("path"):
        data["path"] = os.path.abspath(str(data["path"]))
    data_seed = int(data.get("seed", 1234))
    data.update(repeated_fraction=f, repeat_count=E, placement=placement, seed=data_seed + seed)
    train_tree = tree["train"]
    train_tree["seed"] = seed
    train_tree["out_dir"] = os.path.join(sweep_dir, "runs", name)
    if isinstance(train_tree.get("wandb"), dict):  # W&B: the sweep's runs in one group, each under its name
        train_tree["wandb"]["name"] = name
        train_tree["wandb"]["group"] = train_tree["wandb"].get("group") or os.path.basename(sweep_dir)
    try:
        # the world size each run is launched with resolves train.micro_batch per process
        probe = config_from_dict(_merge(tree, {"train": {"steps": 10**9}}), world_size=spec.num_gpus)  # resolves the preset and seq_len
    except ConfigError as e:
        raise SweepError(f"run {name}: {e}") from None
    params = non_embedding_params(probe.model.n_layer, probe.model.d_model)
    tokens_per_step = probe.train.global_batch * probe.data.seq_len
    train_tree["steps"] = steps_for_budget(spec.budget, size, params, tokens_per_step, _largest_params(spec))
    if "checkpoint_every" not in train_tree:  # a killed run resumes from at most a tenth of its steps back
        train_tree["checkpoint_every"] = max(1, train_tree["steps"] // 10)
    try:
        cfg = config_from_dict(tree, world_size=spec.num_gpus)
    except ConfigError as e:
        raise SweepError(f"run {name}: {e}") from None
    return RunSpec(name=name, size=size, repeated_fraction=f, repeat_count=E, placement=placement, seed=seed,
                   config=cfg, params=params)
