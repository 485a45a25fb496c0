"""Evaluate a model or a checkpoint: every metric of the repeated-data paper in one JSON document.

    model, cfg = load_model("runs/demo")                 # fasttrain.checkpoint: newest checkpoint of a run
    results = evaluate(model, dataset, cfg, step=1000)   # flat dict of numbers, see below
    doc, path = evaluate_checkpoint("runs/demo")         # writes checkpoints/eval_step_0001000.json

Metrics (names for `metrics=` / `--metrics`), each defined in its module's docstring:
    test       held-out loss, nats/token and bits/byte (fasttrain.measure.loss)
    repeated   loss on the repeated subset, and how often it was seen (fasttrain.measure.loss)
    seen       loss on unique training windows already trained on (fasttrain.measure.loss)
    copying    loss on copies 2..C of a passage placed C times (default 11), text and random
               (fasttrain.eval.copying)
    induction  prefix-matching score of every head (fasttrain.measure.prefix_matching)
    heads      copying score and previous-token score of every head (fasttrain.eval.heads)
    icl        in-context-learning score, loss at token 500 minus at token 50 (fasttrain.eval.icl)

Every mean that runs compare carries its standard error (*_stderr), taken over independent units (windows,
passages, contexts, sequences), never over correlated tokens (fasttrain.measure.stats).

Budget: `tokens` (default train.eval_tokens) is about the number of tokens each metric reads: the predicted
tokens of test, repeated and seen (tokens // seq_len windows); copying passages of each kind
(tokens // (1 + C L), at least 4); icl contexts (tokens // (late + early), at least 16); induction
sequences (tokens // 101, at least 10); heads reads the test windows for the previous-token score and 10
prefix-matching sequences for the copying score. Losses run under the run's precision (bf16 autocast on a
GPU by default); attention patterns (induction, heads) are computed in fp32. Copying, icl, induction and
heads use the trained context, seq_len (data.seq_len, default model.context_length): later positions were
never trained. With the default metric list a metric that does not apply (no repeated data, nothing
trained yet, a context too short for the 101 tokens of an induction sequence) is skipped and its reason
recorded under "skipped"; a metric requested by name that cannot run is an error.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from fasttrain.checkpoint.files import write_json_atomic
from fasttrain.checkpoint.model import load_checkpoint
from fasttrain.config import Config
from fasttrain.data.dataset import open_dataset
from fasttrain.device import autocast, autocast_dtype, resolve_device
from fasttrain.eval.copying import PAPER_COPIES, check_copies, copying_scores
from fasttrain.eval.heads import copying_head_scores, previous_token_scores
from fasttrain.eval.icl import icl_score
from fasttrain.measure.loss import (heldout_loss, heldout_window_ids, repeated_subset_loss, seen_unique_loss,
                                    training_schedule)
from fasttrain.measure.prefix_matching import induction_scores
from fasttrain.measure.windows import read_windows, token_byte_lengths
from fasttrain.model import GPT

ALL_METRICS = ("test", "repeated", "seen", "copying", "induction", "heads", "icl")


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
             copy_length: int | None = None, icl_positions: tuple[int, int] | None = None,
             copies: int = PAPER_COPIES) -> dict:
    """Evaluate `model` (trained with `cfg` on `dataset`) after `step` steps (default: the whole run).
    copies: how many times the copying passage is placed in one context (the paper's 11 by default).

    Returns a flat dict: test_*, repeated_*, seen_unique_*, copy_*, induction_*, copying_head_scores,
    previous_token_scores, icl_* (see each module), eval_seconds, and "skipped" ({metric: reason}) when a
    default metric did not apply. Leaves the model in eval mode."""
    names, explicit = parse_metrics(metrics)
    copies = check_copies(copies)
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
                    out.update(copying_scores(model, dataset, T, copy_length, copies=copies, seed=seed,
                                              batch_size=batch_size, device=device, tokens=tokens))
                elif name == "icl":
                    out.update(icl_score(model, dataset, T, icl_positions, batch_size=batch_size, device=device,
                                         tokens=tokens))
            if name in ("induction", "heads"):  # fp32 attention patterns
                if T < 101:
                    raise _Skip(f"the trained context ({T} tokens) is shorter than the 101 tokens of a "
                                "prefix-matching sequence")
            if name == "induction":
                out.update(induction_scores(model, dataset, seed=seed, device=device, tokens=tokens,
                                            batch_size=batch_size))
            elif name == "heads":
                copying = copying_head_scores(model, dataset, seed=seed)
                windows = read_windows(dataset, "test", heldout_window_ids(dataset, T, tokens), T)[:, :-1]
                previous = previous_token_scores(model, windows, batch_size, device)
                out["copying_head_scores"] = [[float(s) for s in row] for row in copying]
                out["previous_token_scores"] = [[float(s) for s in row] for row in previous]
                out["previous_token_windows"] = int(len(windows))
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
                        out: str | None = None, device=None, config=None, write: bool = True,
                        copies: int = PAPER_COPIES) -> tuple[dict, str]:
    """Load a checkpoint (file or run folder), evaluate it, write the JSON document; returns (doc, path)."""
    check_copies(copies)  # a bad option fails before the checkpoint is loaded
    device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
    loaded = load_checkpoint(path, device, config)
    cfg, model = loaded.config, loaded.model
    dataset_path = dataset_path or cfg.data.path
    if not dataset_path:
        raise ValueError(f"{loaded.path}: its config names no dataset (data.path): pass --dataset")
    dataset = open_dataset(dataset_path)
    step = loaded.step if loaded.step is not None else cfg.train.steps
    results = evaluate(model, dataset, cfg, metrics=metrics, tokens=tokens, step=step, device=device, copies=copies)
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
                 "tokens": int(tokens if tokens is not None else cfg.train.eval_tokens), "copies": int(copies),
                 "device": str(device), "precision": cfg.train.precision},
        "results": results,
    }
    out_path = out or default_output_path(loaded.path)
    if write:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        write_json_atomic(out_path, doc)
    return doc, out_path


def with_error(value: float, stderr: float | None, digits: int = 4, sign: bool = False) -> str:
    """'1.2345 +- 0.0123' (the error left out when it could not be estimated)."""
    text = f"{value:{'+' if sign else ''}.{digits}f}"
    return text + (f" +- {stderr:.{digits}f}" if stderr is not None else "")


def best_head(scores) -> str:
    """'max 0.912 (layer 1 head 0); per layer: 0.105 0.912' for a (layers, heads) array."""
    scores = np.asarray(scores, dtype=np.float64)
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    per_layer = " ".join(f"{s:.3f}" for s in scores.max(axis=1))
    return f"max {scores.max():.3f} (layer {layer} head {head}); per layer: {per_layer}"


def format_table(doc: dict) -> str:
    """A readable summary of one evaluation document: every mean with its standard error (+-)."""
    r = doc["results"]
    lines = [f"{doc['checkpoint']}", f"  step {doc['step']:,} ({doc['tokens_seen']:,} tokens seen); "
             f"{doc['model']['non_embedding_params']:,} non-embedding parameters; "
             f"f = {doc['data']['repeated_fraction']}, E = {doc['data']['repeat_count']}"]

    def row(name, text):
        lines.append(f"  {name:<30} {text}")

    if "test_loss" in r:
        row("test loss", f"{with_error(r['test_loss'], r.get('test_loss_stderr'))} nats/token  "
                         f"{r['test_bits_per_byte']:.4f} bits/byte  ({r['test_tokens']:,} tokens)")
    if "repeated_loss" in r:
        row("repeated-subset loss", f"{with_error(r['repeated_loss'], r.get('repeated_loss_stderr'))} nats/token  "
                                    f"({r['repeated_tokens']:,} tokens; each seen {r['repeated_times_seen']:.1f} of "
                                    f"{doc['data']['repeat_count']} times)")
    if "seen_unique_loss" in r:
        row("seen unique loss", f"{with_error(r['seen_unique_loss'], r.get('seen_unique_loss_stderr'))} nats/token  "
                                f"({r['seen_unique_tokens']:,} tokens)")
    if "copy_text_first_loss" in r:
        C, L = r["copy_copies"], r["copy_length"]
        for kind, n in (("text", r["copy_sequences"]),
                        ("random", r.get("copy_random_sequences", r["copy_sequences"]))):
            mean = r.get(f"copy_{kind}_loss", r[f"copy_{kind}_second_loss"])
            row(f"copying, {kind} (C={C}, L={L})",
                f"copies 2-{C} {with_error(mean, r.get(f'copy_{kind}_loss_stderr'))} nats/token  "
                f"(1st {r[f'copy_{kind}_first_loss']:.4f}, 2nd {r[f'copy_{kind}_second_loss']:.4f}; {n} passages)")
    if "induction_scores" in r:
        layer, head = r["induction_best_head"]
        per_layer = " ".join(f"{s:.3f}" for s in r["induction_score_per_layer"])
        n = f"; {r['induction_sequences']} sequences" if "induction_sequences" in r else ""
        best = with_error(r["induction_score_max"], r.get("induction_score_max_stderr"))
        row("induction (prefix matching)", f"max {best} (layer {layer} head {head}{n}); per layer: {per_layer}")
    if "copying_head_scores" in r:
        row("copying score (per head)", best_head(r["copying_head_scores"]))
        row("previous-token score", best_head(r["previous_token_scores"]))
    if "icl_score" in r:
        early, late = r["icl_positions"]
        row("in-context learning", f"{with_error(r['icl_score'], r.get('icl_score_stderr'), sign=True)} nats "
                                   f"(loss at token {late} - token {early}, {r['icl_sequences']} contexts)")
    for name, why in r.get("skipped", {}).items():
        row(f"{name}: skipped", why)
    row("evaluation time", f"{r['eval_seconds']:.1f} s")
    return "\n".join(lines)
