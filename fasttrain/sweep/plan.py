"""`fasttrain sweep --dry-run`: the plan of a sweep, with an estimated time per run.

Training speed (tokens/s) for each model shape comes from, in order of preference:
    1. runs of this sweep that already logged steps (median tokens_per_s of their metrics.jsonl),
    2. SWEEP_DIR/throughput.json, a table kept from earlier measurements and runs on the same device,
    3. a measurement now: a few timed optimizer steps of that shape with random tokens on this machine.
Each row says which one it used. Time = tokens / (tokens/s); on a CPU with --jobs N runs share the device, so
the wall-clock total is at best the sum divided by N. On GPUs the plan places each job (a run or a pack) on its
GPU(s) as the runner will (fasttrain/sweep/placement.py) and gives the wall time of that placement; on Slurm
it gives each job's resources, and the wall time is the queue's to decide.

With packs (pack: K or --pack K) a pack's runs train at once, so a pack takes one run's time at the speed each
run gets inside the pack (what a packed run logs as its tokens/s). Packed speeds are kept in the table under
the shape and pack size; where none is known yet, one run's speed is used, which assumes a pack of K trains K
times as many tokens per second as one run: right while the device has room, optimistic once it is busy.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch

from fasttrain.checkpoint.files import read_json, write_json_atomic
from fasttrain.data import RepetitionSchedule, ScheduleError, num_windows, open_dataset
from fasttrain.device import autocast_dtype, resolve_device
from fasttrain.optim import make_optimizer
from fasttrain.sweep.cluster import gpus_per_node
from fasttrain.sweep.fit import data_design_problem, token_groups
from fasttrain.sweep.grid import RunSpec, SweepSpec, expand
from fasttrain.sweep.manifest import MANIFEST, now_iso
from fasttrain.sweep.placement import gpus_per_job, jobs_at_once, simulate, visible_gpus
from fasttrain.sweep.runner import last_logged_step, plan_jobs, resolve_pack
from fasttrain.train.engine import build_model, train_step
from fasttrain.train.metrics import read_metrics

THROUGHPUT = "throughput.json"
MEASURE_WARMUP_STEPS = 2
MEASURE_STEPS = 3
MAX_MEASURED_STEP_FLOPS_CPU = 2e11  # larger shapes take minutes per step on a CPU: not timed there


def device_name(device: str = "auto") -> str:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def shape_key(run: RunSpec, vocab_size: int, device: str, pack: int = 1) -> str:
    """The throughput table's key; pack > 1: the speed each run gets in a pack of that many."""
    m, t = run.config.model, run.config.train
    micro = t.micro_batch
    return (f"{device}|L{m.n_layer}-d{m.d_model}-h{m.n_head}|T{run.config.data.seq_len}|mb{micro}|V{vocab_size}|"
            f"{m.attention}-{m.loss}|{t.precision}" + (f"|pack{pack}" if pack > 1 else ""))


def dataset_vocab(run: RunSpec) -> Optional[int]:
    if run.config.model.vocab_size:
        return run.config.model.vocab_size
    manifest = read_json(os.path.join(run.config.data.path, "manifest.json")) if run.config.data.path else None
    return int(manifest["vocab_size"]) if manifest and "vocab_size" in manifest else None


def logged_throughput(run_dir: str) -> Optional[float]:
    """Median tokens/s of a run's logged steps (its first record, with start-up costs, left out)."""
    rates = [float(r["tokens_per_s"]) for r in read_metrics(run_dir) if "tokens_per_s" in r]
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


def measure_throughput(run: RunSpec, vocab_size: int, device: str = "auto") -> float:
    """Tokens/s of full optimizer steps (forward, backward, AdamW) of this run's shape on random tokens."""
    cfg = run.config
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, dev)
    T = cfg.data.seq_len
    model = build_model(cfg, vocab_size).to(dev)
    optimizer = make_optimizer(model, cfg, dev)
    batch = torch.randint(0, vocab_size, (cfg.train.global_batch, T + 1), device=dev)

    def step():  # the trainer's own step
        train_step(model, optimizer, batch, cfg.train.micro_batch, cfg.optim.lr, cfg.optim.grad_clip, amp)

    for _ in range(MEASURE_WARMUP_STEPS):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(MEASURE_STEPS):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return MEASURE_STEPS * cfg.train.global_batch * T / elapsed


def step_flops(run: RunSpec, vocab_size: int) -> float:
    m = run.config.model
    T = run.config.data.seq_len
    per_token = 6.0 * (run.params + vocab_size * m.d_model) + 6.0 * m.n_layer * T * m.d_model
    return per_token * run.config.train.global_batch * T


def data_check(run: RunSpec) -> str:
    """'ok' when the prepared dataset holds enough windows for the run's schedule, else why not."""
    path = run.config.data.path
    if not path:
        return "no data.path"
    if not os.path.exists(os.path.join(path, "manifest.json")):
        return "dataset not prepared yet"
    try:
        dataset = open_dataset(path, verify=False)
        T = run.config.data.seq_len
        RepetitionSchedule(num_windows(dataset.train, T), run.config.train.steps * run.config.train.global_batch,
                           run.config.data.repeated_fraction, run.config.data.repeat_count,
                           placement=run.config.data.placement, seed=run.config.data.seed, tokens_per_window=T + 1)
    except (ScheduleError, ValueError) as e:
        return f"too small: {e}"
    return "ok"


def plan(spec: SweepSpec, out_dir: Optional[str] = None, measure: bool = True, pack: Optional[int] = None,
         jobs: Optional[int] = None) -> dict:
    """Every run with N, D, FLOPs, tokens/s (and its source), estimated seconds, its pack, state and data
    check, and where its job runs. pack: runs trained together (default: the sweep file's `pack`); jobs: --jobs."""
    pack, pack_note = resolve_pack(spec, pack)
    at_most = jobs
    runs = expand(spec, out_dir)
    sweep_dir = os.path.abspath(out_dir or spec.out_dir)
    manifest = read_json(os.path.join(sweep_dir, MANIFEST)) or {"runs": {}}
    entries = manifest["runs"]
    jobs = plan_jobs([r for r in runs if entries.get(r.name, {}).get("state") != "done"], entries, pack)
    job_of = {run.name: (number, len(job)) for number, job in enumerate(jobs, 1) for run in job}
    table_path = os.path.join(sweep_dir, THROUGHPUT)
    table = read_json(table_path) or {}
    device = device_name(spec.base.get("train", {}).get("device", "auto"))
    rows, measured_now, data_checks, logged_any = [], {}, {}, False
    for run in runs:
        vocab = dataset_vocab(run)
        entry = entries.get(run.name, {})
        job, pack_size = job_of.get(run.name, (None, 1))
        key, packed_key = shape_key(run, vocab or 0, device), shape_key(run, vocab or 0, device, pack_size)
        rate, source = None, None
        logged = logged_throughput(run.run_dir)
        if logged:  # each run's own share when it trained in a pack
            rate, source, logged_any = logged, "logged by this run", True
            trained_in = len(entry.get("pack") or [run.name])
            table[shape_key(run, vocab or 0, device, trained_in)] = {
                "tokens_per_s": rate, "source": f"run {run.name}", "measured": _now()}
        elif packed_key in table:
            rate, source = table[packed_key]["tokens_per_s"], f"table ({table[packed_key]['source']})"
        elif key in table:
            rate, source = table[key]["tokens_per_s"], f"table ({table[key]['source']})"
        elif not measure:
            source = "not measured (--no-measure)"
        elif vocab is None:
            source = "not measured (vocabulary unknown: prepare the dataset or set model.vocab_size)"
        elif device == "cpu" and step_flops(run, vocab) > MAX_MEASURED_STEP_FLOPS_CPU:
            source = "not measured (too large to time on this CPU; run the dry-run on the target GPU)"
        else:
            if key not in measured_now:
                measured_now[key] = measure_throughput(run, vocab)
                table[key] = {"tokens_per_s": measured_now[key],
                              "source": f"{MEASURE_STEPS} timed steps on {device}", "measured": _now()}
            rate, source = measured_now[key], f"measured now ({MEASURE_STEPS} timed steps)"
        data_key = (run.config.data.path, run.config.data.seq_len, run.tokens, run.repeated_fraction, run.repeat_count)
        if data_key not in data_checks:
            data_checks[data_key] = data_check(run)
        done_steps = 0 if entry.get("state") == "done" else _logged_step(run.run_dir)
        remaining = run.tokens * (1 - min(done_steps, run.config.train.steps) / run.config.train.steps)
        if entry.get("state") == "done":
            remaining = 0
        rows.append({
            "name": run.name, "size": run.size, "params": run.params, "tokens": run.tokens,
            "steps": run.config.train.steps, "flops": run.flops, "tokens_per_s": rate, "throughput_source": source,
            "estimated_s": run.tokens / rate if rate else None,
            "remaining_s": remaining / rate if rate else None,
            "pack": job, "state": entry.get("state", "pending"), "data": data_checks[data_key],
        })
    if measured_now or logged_any:
        os.makedirs(sweep_dir, exist_ok=True)  # the table is kept for the next plan, even before any run
        write_json_atomic(table_path, table)
    return {"sweep_dir": sweep_dir, "device": device, "runs": rows, "deepspeed": spec.uses_deepspeed,
            "num_gpus": spec.num_gpus, "evaluate": spec.evaluate, "pack": pack, "pack_note": pack_note,
            "packs": [[r.name for r in job] for job in jobs], "placement": placement(spec, runs, rows, jobs, at_most),
            "budget_note": budget_note(runs)}


def placement(spec: SweepSpec, runs: list[RunSpec], rows: list[dict], jobs: list[list[RunSpec]],
              at_most: Optional[int]) -> dict:
    """Where the jobs left run: on Slurm, each job's resources; here on GPUs, each job's devices, start and
    end as the runner will place them (rows get a "devices" entry), and the wall time when every job has an
    estimate; on a CPU, nothing ({"gpus": []})."""
    if spec.slurm is not None:
        return {"slurm": {"partition": spec.slurm.partition, "nodes": spec.slurm.nodes,
                          "tasks_per_node": spec.num_gpus // spec.slurm.nodes,
                          "gpus_per_node": gpus_per_node(spec, runs), "jobs": len(jobs)}}
    gpus = visible_gpus(runs[0].config.train.device)
    if not gpus:
        return {"gpus": []}
    at_once, note = jobs_at_once(spec, gpus, at_most)
    need = gpus_per_job(spec)
    remaining = {r["name"]: r["remaining_s"] for r in rows}
    durations = [None if any(remaining[r.name] is None for r in job) else max(remaining[r.name] for r in job)
                 for job in jobs]
    placed, wall = simulate([d if d is not None else 1.0 for d in durations],  # unknown: placed in turn
                            [sum(r.flops for r in job) for job in jobs], at_once, gpus, need)
    devices = {run.name: ",".join(p["devices"]) for job, p in zip(jobs, placed) for run in job}
    for row in rows:
        row["devices"] = devices.get(row["name"])
    return {"gpus": gpus, "at_once": at_once, "need": need, "note": note, "jobs": placed,
            "wall_s": None if None in durations else wall}


def budget_note(runs: list[RunSpec]) -> str:
    """A warning when the baselines train on different token budgets D: an effective size then needs an
    L(N, D) fit, which per-size budgets (D growing with N) cannot give."""
    base = [r for r in runs if r.is_baseline and not r.source]
    if len(token_groups([r.tokens for r in base])) <= 1:
        return ""
    budgets = ", ".join(f"{r.size} {_fmt_count(r.tokens)}" for r in base)
    problem = data_design_problem([r.params for r in base], [r.tokens for r in base])
    return (f"note: the baselines train on different token budgets D ({budgets}); the report's effective sizes "
            "need the same D for every size, or an L(N, D) fit" + (f", which these cannot give: {problem}" if problem
                                                                   else ", which these determine"))


def _logged_step(run_dir: str) -> int:
    return last_logged_step(run_dir)


def _now() -> str:
    return now_iso()


def _fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_plan(doc: dict, jobs: Optional[int] = None) -> str:
    rows, packed = doc["runs"], doc["pack"] > 1
    place = doc.get("placement") or {"gpus": []}
    gpus = place.get("gpus")
    head = (f"{'run':<32} {'N (non-emb)':>11} {'tokens D':>9} {'steps':>7} {'FLOPs 6ND':>9} {'tok/s':>8} "
            f"{'est. time':>9}{' pack' if packed else ''}{'     GPU' if gpus else ''} {'state':>11}  data")
    title = f"sweep {doc['sweep_dir']}: {len(rows)} runs on {doc['device']}"
    if doc["deepspeed"]:
        title += f" via deepspeed --num_gpus {doc['num_gpus']}"
    if packed:
        title += f", {_plural(len(doc['packs']), 'pack')} of up to {doc['pack']} runs left"
    lines = ([doc["pack_note"]] if doc["pack_note"] else []) + ([place["note"]] if place.get("note") else [])
    lines += [doc["budget_note"]] if doc.get("budget_note") else []
    lines += [title, head]
    for r in rows:
        rate = _fmt_count(r["tokens_per_s"]) if r["tokens_per_s"] else "?"
        pack = f" {r['pack'] or '-':>4}" if packed else ""
        devices = f" {r.get('devices') or '-':>7}" if gpus else ""
        lines.append(f"{r['name']:<32} {_fmt_count(r['params']):>11} {_fmt_count(r['tokens']):>9} {r['steps']:>7} "
                     f"{_fmt_count(r['flops']):>9} {rate:>8} {_fmt_time(r['estimated_s']):>9}{pack}{devices} "
                     f"{r['state']:>11}  {r['data']}")
    sources = sorted({r["throughput_source"] for r in rows})
    lines.append("throughput: " + "; ".join(sources))
    if packed:
        lines.append("packs: a pack takes its slowest run's time at the tok/s each run gets in the pack; where no "
                     "packed speed is known\n       (logged by a packed run, or stored), one run's tok/s is used: a "
                     "pack of K is assumed to train K times as fast as one run (optimistic once the device is busy)")
    # a job (a pack, or one run) takes as long as its slowest run
    by_job: dict = {}
    for r in rows:
        if r["pack"] is not None:
            by_job.setdefault(r["pack"], []).append(r["remaining_s"])
    known = [max(times) for times in by_job.values() if None not in times]
    unknown = len(by_job) - len(known)
    unit = "pack" if packed else "run"
    if not known and unknown:
        lines.append(f"estimated training time: unknown ({_plural(unknown, unit)} without a throughput)")
    else:
        total = sum(known)
        msg = f"estimated training time left: {_fmt_time(total)} {unit} after {unit}"
        if not gpus and "slurm" not in place and (jobs or 1) > 1:
            msg += f", about {_fmt_time(total / jobs)} with --jobs {jobs} if the device is not saturated"
        if unknown:
            msg += f" (+ {_plural(unknown, unit)} without an estimate)"
        if doc["evaluate"]:
            msg += "; plus an evaluation after each " + ("pack (one process for its runs)" if packed else "run")
        lines.append(msg)
    if gpus:
        each = f"{place['need']} GPUs" if place["need"] > 1 else "one GPU"
        wall = _fmt_time(place["wall_s"]) if place["wall_s"] is not None else "unknown"
        lines.append(f"placed on {_plural(len(gpus), 'GPU')} ({','.join(gpus)}), {place['at_once']} at once, {each} "
                     f"each: estimated wall time {wall}")
    elif "slurm" in place and place["slurm"]["jobs"]:
        s = place["slurm"]
        where = f"partition {s['partition']}" if s["partition"] else "the default partition"
        longest = f" ({_fmt_time(max(known))})" if known else ""
        lines.append(f"on Slurm ({where}): {_plural(s['jobs'], 'job')}, each {_plural(s['nodes'], 'node')} x "
                     f"{s['tasks_per_node']} process(es) with {s['gpus_per_node']} GPU(s) per node; wall time: at "
                     f"least the longest job{longest} once all have started, as the queue decides")
    return "\n".join(lines)
