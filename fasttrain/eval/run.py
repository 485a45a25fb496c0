"""Evaluate a model or a checkpoint: every metric of the repeated-data paper in one JSON document.

    model, cfg = load_model("runs/demo")                 # fasttrain.checkpoint: newest checkpoint of a run
    results = evaluate(model, dataset, cfg, step=1000)   # flat dict of numbers, see below
    doc, path = evaluate_checkpoint("runs/demo")         # writes checkpoints/eval_step_0001000.json

Metrics (names for `metrics=` / `--metrics`), each defined in its module's docstring:
    test       held-out loss, nats/token and bits/byte (fasttrain.measure.loss)
    repeated   loss on the repeated subset, and how often it was seen (fasttrain.measure.loss)
    seen       loss on unique training windows already trained on (fasttrain.measure.loss)
    copying    loss on the 2nd occurrence of a passage against the 1st, text and random (fasttrain.eval.copying)
    induction  prefix-matching score of every head (fasttrain.measure.prefix_matching)
    icl        in-context-learning score, loss at token 500 minus at token 50 (fasttrain.eval.icl)

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

import os
import time

import torch

from fasttrain.checkpoint.files import write_json_atomic
from fasttrain.checkpoint.model import load_checkpoint
from fasttrain.config import Config
from fasttrain.data.dataset import open_dataset
from fasttrain.device import autocast, autocast_dtype, resolve_device
from fasttrain.eval.copying import copying_scores, max_copy_length
from fasttrain.eval.icl import icl_score
from fasttrain.measure.loss import heldout_loss, repeated_subset_loss, seen_unique_loss, training_schedule
from fasttrain.measure.prefix_matching import induction_scores
from fasttrain.measure.windows import token_byte_lengths
from fasttrain.model import GPT

ALL_METRICS = ("test", "repeated", "seen", "copying", "induction", "icl")


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
    names, explicit = parse_metrics(metrics)
    t0 = time.time()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = autocast_dtype(precision or cfg.train.precision, device)
    T = cfg.data.seq_len
    tokens = int(tokens if tokens is not None else cfg.train.eval_tokens)
    if tokens < 1:
        raise ValueError(f"evaluation token budget {tokens}: must be at least 1")
    batch_size = int(batch_size or cfg.train.micro_batch)
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
    device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
    loaded = load_checkpoint(path, device, config)
    cfg, model = loaded.config, loaded.model
    dataset_path = dataset_path or cfg.data.path
    if not dataset_path:
        raise ValueError(f"{loaded.path}: its config names no dataset (data.path): pass --dataset")
    dataset = open_dataset(dataset_path)
    step = loaded.step if loaded.step is not None else cfg.train.steps
    results = evaluate(model, dataset, cfg, metrics=metrics, tokens=tokens, step=step, device=device)
    T = cfg.data.seq_len
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
