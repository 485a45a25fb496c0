"""Evaluate a model or a checkpoint: every metric of the repeated-data paper in one JSON document.

    model, cfg = load_model("runs/demo")                 # newest checkpoint of a run folder (or a .pt file)
    results = evaluate(model, dataset, cfg, step=1000)   # flat dict of numbers, see below
    doc, path = evaluate_checkpoint("runs/demo")         # writes checkpoints/eval_step_0001000.json

Metrics (names for `metrics=` / `--metrics`), each defined in its module's docstring:
    test       held-out loss, nats/token and bits/byte (fasttrain.eval.loss)
    repeated   loss on the repeated subset, and how often it was seen (fasttrain.eval.memorization)
    seen       loss on unique training windows already trained on (fasttrain.eval.memorization)
    copying    loss on the 2nd occurrence of a passage against the 1st, text and random (fasttrain.eval.copying)
    induction  prefix-matching score of every head (fasttrain.eval.induction)
    icl        in-context-learning score, loss at token 500 minus at token 50 (fasttrain.eval.induction)

Budgets: `tokens` (default train.eval_tokens) is the number of predicted tokens for each of test,
repeated and seen; it also sets the number of icl contexts (tokens // 500, at least 16) and of copying
passages (tokens // (2 L), between 4 and 16); induction always uses 10 sequences. Losses run under the
run's precision (bf16 autocast on a GPU by default); attention patterns for induction are computed in
fp32. Copying, icl and induction use the trained context, seq_len (data.seq_len, default
model.context_length): later positions were never trained. With the default metric list a metric that
does not apply (no repeated data, nothing trained yet, a context too short for the 101 tokens of an
induction sequence) is skipped and its reason recorded under "skipped"; a metric requested by name that
cannot run is an error.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

from fasttrain.config import Config, ConfigError, config_from_dict, load_config, seq_len
from fasttrain.model import GPT
from fasttrain.train.metrics import write_json_atomic

ALL_METRICS = ("test", "repeated", "seen", "copying", "induction", "icl")
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed / DDP wrappers, torch.compile


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match the config it is loaded with."""


# ---- loading ---------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    model: GPT
    config: Config
    step: int | None
    path: str


def resolve_checkpoint(path: str) -> list[str]:
    """A .pt file -> [it]; a run folder (or its checkpoints/ folder) -> its checkpoints, newest first."""
    from fasttrain.train.checkpoint import list_checkpoints

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")
    if not os.path.isdir(path):
        return [path]
    found = list_checkpoints(path) or list_checkpoints(os.path.dirname(os.path.abspath(path)))
    if not found:
        raise FileNotFoundError(f"{path}: holds no checkpoints (expected {os.path.join(path, 'checkpoints')}"
                                "/step_*.pt); train it first or pass a .pt file")
    return [p for _, p in reversed(found)]


def read_checkpoint(path: str) -> dict:
    """The checkpoint's contents, on the CPU; a raw state dict (e.g. a DeepSpeed fp32 export) is wrapped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "the file is truncated or is not a PyTorch checkpoint") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a fasttrain checkpoint (a dict with 'model')")
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {"model": ckpt}
        else:
            raise CheckpointError(f"{path}: has no 'model' entry (keys: {', '.join(map(str, list(ckpt)[:8]))}); "
                                  "not a fasttrain checkpoint")
    state = {}
    for key, value in ckpt["model"].items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    ckpt["model"] = state
    return ckpt


def _run_config_for(path: str) -> dict | None:
    """config.yaml of the run folder a checkpoint file lives in (run/checkpoints/step_*.pt)."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        return None
    import yaml

    with open(config_path) as f:
        return yaml.safe_load(f)


_SHAPE_KEYS = ("n_layer", "d_model", "n_head", "context_length", "vocab_size")


def _describe(cfg: Config, vocab_size: int) -> str:
    m = cfg.model
    return (f"n_layer={m.n_layer}, d_model={m.d_model}, n_head={m.n_head}, context_length={m.context_length}, "
            f"vocab_size={vocab_size}")


def load_checkpoint(path: str, device="cpu", config: Config | str | None = None) -> LoadedCheckpoint:
    """Load a checkpoint (.pt file, or a run folder -> its newest readable checkpoint) into a GPT.

    The config comes from `config` (a Config, a YAML/JSON file or a run folder) when given, else from the
    checkpoint, else from the run folder's config.yaml. The model is built with the reference torch
    attention (the same function as the other backends) and the configured loss on a GPU (torch on a CPU),
    and put in eval mode on `device`."""
    candidates = resolve_checkpoint(path)
    ckpt, chosen, errors = None, None, []
    for candidate in candidates:
        try:
            ckpt, chosen = read_checkpoint(candidate), candidate
            break
        except CheckpointError as e:
            if len(candidates) == 1:
                raise
            errors.append(str(e))
            print(f"warning: skipping unreadable checkpoint {candidate}", file=sys.stderr)
    if ckpt is None:
        raise CheckpointError(f"{path}: no readable checkpoint ({errors[0]})")

    saved_tree = ckpt.get("config") or _run_config_for(chosen)
    if config is not None:
        cfg = config if isinstance(config, Config) else load_config(config)
    elif saved_tree is not None:
        try:
            cfg = config_from_dict(saved_tree)
        except ConfigError as e:
            raise CheckpointError(f"{chosen}: its saved config is not valid here ({e})") from None
    else:
        raise CheckpointError(f"{chosen}: holds no config and no config.yaml lies in its run folder; pass the "
                              "run's config (--config)")

    state = ckpt["model"]
    wte = state.get("wte.weight")
    vocab = cfg.model.vocab_size or ckpt.get("vocab_size") or (wte.shape[0] if wte is not None else None)
    if config is not None and saved_tree is not None:  # n_head changes no shape: compare the configs themselves
        try:
            saved = config_from_dict(saved_tree)
        except ConfigError as e:
            raise CheckpointError(f"{chosen}: its saved config is not valid here ({e})") from None
        for key in _SHAPE_KEYS[:-1]:
            mine, theirs = getattr(cfg.model, key), getattr(saved.model, key)
            if mine != theirs:
                raise CheckpointError(f"{chosen} was trained with model.{key}={theirs}, the config given has "
                                      f"model.{key}={mine}: load it with the config it was trained with")
    # SDPA attention everywhere (flash-attn may be absent); the fused loss only on a GPU, where it saves
    # the logits' memory (under the CPU interpreter it would be slow).
    on_gpu = torch.device(device).type == "cuda"
    model_cfg = dataclasses.replace(cfg.model, attention="torch", loss=cfg.model.loss if on_gpu else "torch",
                                    dropout=0.0)
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = GPT.from_config(model_cfg, vocab)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{chosen} does not match the config ({_describe(cfg, vocab)}): {k} has shape "
                              f"{tuple(state[k].shape)} in the checkpoint but {tuple(expected[k].shape)} in the model; "
                              "load it with the config it was trained with")
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unknown entry {unexpected[0]}"
        raise CheckpointError(f"{chosen} {what} ({len(missing)} missing, {len(unexpected)} unknown): not a "
                              f"checkpoint of this model ({_describe(cfg, vocab)})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # bf16 exports too
    model.load_state_dict(state, assign=True)
    model.to(device).eval()
    step = ckpt.get("step")
    return LoadedCheckpoint(model=model, config=cfg, step=int(step) if step is not None else None, path=chosen)


def load_model(path: str, device="cpu") -> tuple[GPT, Config]:
    """(model in eval mode, its Config) from a checkpoint .pt file or a run folder (its newest checkpoint)."""
    loaded = load_checkpoint(path, device)
    return loaded.model, loaded.config


# ---- evaluating ------------------------------------------------------------------------------------
def parse_metrics(metrics) -> tuple[list[str], bool]:
    """(metric names, whether they were asked for explicitly) from None, a list or 'test,copying'."""
    if metrics is None:
        return list(ALL_METRICS), False
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    names = [m for m in names if m]
    bad = [m for m in names if m not in ALL_METRICS]
    if bad or not names:
        what = f"unknown metric {bad[0]!r}" if bad else "no metric named"
        raise ValueError(f"{what}: choose from {', '.join(ALL_METRICS)}")
    return [m for m in ALL_METRICS if m in names], True


class _Skip(Exception):
    pass


def evaluate(model: GPT, dataset, cfg: Config, metrics=None, tokens: int | None = None, step: int | None = None,
             batch_size: int | None = None, device=None, precision: str | None = None, seed: int = 0,
             copy_length: int | None = None, icl_positions: tuple[int, int] | None = None) -> dict:
    """Evaluate `model` (trained with `cfg` on `dataset`) after `step` steps (default: the whole run).

    Returns a flat dict: test_*, repeated_*, seen_unique_*, copy_*, induction_*, icl_* (see each module),
    eval_seconds, and "skipped" ({metric: reason}) when a default metric did not apply. Leaves the model
    in eval mode."""
    from fasttrain.eval.common import token_byte_lengths
    from fasttrain.eval.copying import copying_scores, max_copy_length
    from fasttrain.eval.induction import icl_score, induction_scores
    from fasttrain.eval.loss import heldout_loss
    from fasttrain.eval.memorization import repeated_subset_loss, seen_unique_loss, training_schedule
    from fasttrain.train.device import autocast, autocast_dtype

    names, explicit = parse_metrics(metrics)
    t0 = time.time()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = autocast_dtype(precision or cfg.train.precision, device)
    T = seq_len(cfg)
    tokens = int(tokens if tokens is not None else cfg.train.eval_tokens)
    if tokens < 1:
        raise ValueError(f"evaluation token budget {tokens}: must be at least 1")
    batch_size = int(batch_size or cfg.train.micro_batch or cfg.train.global_batch)
    step = cfg.train.steps if step is None else int(step)
    trained = step * cfg.train.global_batch
    if dataset.vocab_size > model.vocab_size:
        raise ValueError(f"the dataset's vocabulary ({dataset.vocab_size}) is larger than the model's "
                         f"({model.vocab_size}): evaluate on the dataset the model was trained on")
    byte_lengths = token_byte_lengths(dataset.tokenizer, dataset.vocab_size)
    schedule = None
    out, skipped = {}, {}
    model.eval()
    for name in names:
        try:
            if name in ("repeated", "seen") and schedule is None:
                schedule = training_schedule(dataset, cfg)
            with autocast(device, amp):
                if name == "test":
                    out.update(heldout_loss(model, dataset, T, tokens, batch_size, device))
                elif name == "repeated":
                    result = repeated_subset_loss(model, dataset, schedule, T, tokens, batch_size, device,
                                                  trained, byte_lengths)
                    if not result:
                        raise _Skip("the run has no repeated data (data.repeated_fraction = 0)")
                    out.update(result)
                elif name == "seen":
                    result = seen_unique_loss(model, dataset, schedule, T, trained, tokens, batch_size, device,
                                              byte_lengths)
                    if not result:
                        raise _Skip(f"nothing trained yet at step {step}")
                    out.update(result)
                elif name == "copying":
                    L = copy_length or max_copy_length(T)
                    n_copy = max(4, min(16, tokens // (2 * L)))
                    out.update(copying_scores(model, dataset, T, copy_length, n_copy,
                                              batch_size=batch_size, seed=seed, device=device))
                elif name == "icl":
                    n_icl = max(16, tokens // 500)
                    out.update(icl_score(model, dataset, T, icl_positions, n_icl, batch_size, device))
            if name == "induction":  # fp32 attention patterns
                if T < 101:
                    raise _Skip(f"the trained context ({T} tokens) is shorter than the 101 tokens of a "
                                "prefix-matching sequence")
                out.update(induction_scores(model, dataset, seed=seed, device=device))
        except _Skip as why:
            if explicit:
                raise ValueError(f"metric {name!r} cannot run: {why}") from None
            skipped[name] = str(why)
    out["eval_seconds"] = time.time() - t0
    if skipped:
        out["skipped"] = skipped
    return out


# ---- checkpoints -> documents ----------------------------------------------------------------------
def default_output_path(checkpoint_path: str) -> str:
    """checkpoints/step_0000100.pt -> checkpoints/eval_step_0000100.json (next to the checkpoint)."""
    folder, name = os.path.split(os.path.abspath(checkpoint_path))
    return os.path.join(folder, f"eval_{os.path.splitext(name)[0]}.json")


def evaluate_checkpoint(path: str, dataset_path: str | None = None, metrics=None, tokens: int | None = None,
                        out: str | None = None, device=None, config=None, write: bool = True) -> tuple[dict, str]:
    """Load a checkpoint (file or run folder), evaluate it, write the JSON document; returns (doc, path)."""
    from fasttrain.data.dataset import open_dataset
    from fasttrain.train.device import resolve_device

    device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
    loaded = load_checkpoint(path, device, config)
    cfg, model = loaded.config, loaded.model
    dataset_path = dataset_path or cfg.data.path
    if not dataset_path:
        raise ValueError(f"{loaded.path}: its config names no dataset (data.path): pass --dataset")
    dataset = open_dataset(dataset_path)
    step = loaded.step if loaded.step is not None else cfg.train.steps
    results = evaluate(model, dataset, cfg, metrics=metrics, tokens=tokens, step=step, device=device)
    T = seq_len(cfg)
    doc = {
        "checkpoint": os.path.abspath(loaded.path),
        "step": step,
        "tokens_seen": step * cfg.train.global_batch * T,
        "dataset": os.path.abspath(dataset_path),
        "model": {
            "preset": cfg.model.preset, "n_layer": model.n_layer, "d_model": model.d_model,
            "n_head": model.n_head, "context_length": model.context_length, "vocab_size": model.vocab_size,
            "non_embedding_params": model.num_params(non_embedding=True),
            "total_params": model.num_params(non_embedding=False),
        },
        "data": {"seq_len": T, "repeated_fraction": cfg.data.repeated_fraction,
                 "repeat_count": cfg.data.repeat_count, "placement": cfg.data.placement, "seed": cfg.data.seed,
                 "global_batch": cfg.train.global_batch, "steps": cfg.train.steps},
        "eval": {"metrics": parse_metrics(metrics)[0],
                 "tokens": int(tokens if tokens is not None else cfg.train.eval_tokens),
                 "device": str(device), "precision": cfg.train.precision},
        "results": results,
    }
    out_path = out or default_output_path(loaded.path)
    if write:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        write_json_atomic(out_path, doc)
    return doc, out_path


def format_table(doc: dict) -> str:
    """A readable summary of one evaluation document."""
    r = doc["results"]
    lines = [f"{doc['checkpoint']}", f"  step {doc['step']:,} ({doc['tokens_seen']:,} tokens seen); "
             f"{doc['model']['non_embedding_params']:,} non-embedding parameters; "
             f"f = {doc['data']['repeated_fraction']}, E = {doc['data']['repeat_count']}"]

    def row(name, text):
        lines.append(f"  {name:<30} {text}")

    if "test_loss" in r:
        row("test loss", f"{r['test_loss']:.4f} nats/token  {r['test_bits_per_byte']:.4f} bits/byte  "
                         f"({r['test_tokens']:,} tokens)")
    if "repeated_loss" in r:
        row("repeated-subset loss", f"{r['repeated_loss']:.4f} nats/token  ({r['repeated_tokens']:,} tokens; "
                                    f"each seen {r['repeated_times_seen']:.1f} of {doc['data']['repeat_count']} times)")
    if "seen_unique_loss" in r:
        row("seen unique loss", f"{r['seen_unique_loss']:.4f} nats/token  ({r['seen_unique_tokens']:,} tokens)")
    if "copy_text_first_loss" in r:
        L = r["copy_length"]
        row(f"copying, text (L={L})", f"1st {r['copy_text_first_loss']:.4f}  2nd {r['copy_text_second_loss']:.4f} "
                                      "nats/token")
        row(f"copying, random (L={L})", f"1st {r['copy_random_first_loss']:.4f}  "
                                        f"2nd {r['copy_random_second_loss']:.4f} nats/token")
    if "induction_scores" in r:
        layer, head = r["induction_best_head"]
        per_layer = " ".join(f"{s:.3f}" for s in r["induction_score_per_layer"])
        row("induction (prefix matching)", f"max {r['induction_score_max']:.3f} (layer {layer} head {head}); "
                                           f"per layer: {per_layer}")
    if "icl_score" in r:
        early, late = r["icl_positions"]
        err = f" +- {r['icl_score_stderr']:.3f}" if r.get("icl_score_stderr") is not None else ""
        row("in-context learning", f"{r['icl_score']:+.4f}{err} nats (loss at token {late} - token {early}, "
                                   f"{r['icl_sequences']} contexts)")
    for name, why in r.get("skipped", {}).items():
        row(f"{name}: skipped", why)
    row("evaluation time", f"{r['eval_seconds']:.1f} s")
    return "\n".join(lines)
