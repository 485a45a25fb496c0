"""ZeRO memory and speed per ladder preset: the ZeRO paper's bytes per parameter next to what a rank holds.

    python -m benchmarks.bench_zero                 # GPU: every preset x ZeRO stage 0-3 on the visible GPUs
    python -m benchmarks.bench_zero --presets 85m,800m --micro-batch 2
    python -m benchmarks.bench_zero --cpu           # formula table + one tiny step per stage (smoke test)

Mixed-precision Adam keeps 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master weights, m, v) bytes
per parameter. ZeRO partitions the 12 over N ranks at stage 1, also the gradients at stage 2, and the
weights too at stage 3 (Rajbhandari et al. 2020):

    stage 0: 16    stage 1: 4 + 12/N    stage 2: 2 + 14/N    stage 3: 16/N

Each stage runs in its own process (torchrun with one rank per GPU when there are several), through the
same DeepSpeed setup as `fasttrain train` (generated config, our AdamW), on random tokens at the preset's
context length. Reported per rank: model states after a step (allocated memory) and the peak, tokens/s
(all ranks) and MFU; then, per stage, the largest preset that trained on one GPU.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import print_table, write_results
from fasttrain.ladder import PRESETS, embedding_params, non_embedding_params

STAGES = (0, 1, 2, 3)


def bytes_per_param(stage: int, n: int) -> float:
    return {0: 16.0, 1: 4 + 12 / n, 2: 2 + 14 / n, 3: 16 / n}[stage]


def total_params(preset, vocab_size: int) -> int:
    p = PRESETS[preset]
    return non_embedding_params(p.n_layer, p.d_model) + embedding_params(p.d_model, vocab_size, p.context_length)


def formula_rows(presets, n: int, vocab_size: int) -> list[dict]:
    rows = []
    for name in presets:
        params = total_params(name, vocab_size)
        row = {"preset": name, "params": params, "N": n}
        for stage in STAGES:
            row[f"z{stage}_gib"] = bytes_per_param(stage, n) * params / 2**30
        rows.append(row)
    return rows


# ---- one stage, every preset (runs inside each rank) ----------------------------------------------
def measure(preset: str, stage: int, micro: int, seq_len: int | None, steps: int, warmup: int, vocab_size: int,
            device, world: int) -> dict:
    import deepspeed

    from fasttrain.config import config_from_dict
    from fasttrain.device import autocast_dtype, peak_flops
    from fasttrain.optim import make_optimizer
    from fasttrain.train.distributed import deepspeed_config
    from fasttrain.train.engine import build_model

    cfg = config_from_dict({
        "model": {"preset": preset, "vocab_size": vocab_size},
        "data": {"seq_len": seq_len},
        "train": {"global_batch": micro * world, "micro_batch": micro},
        "deepspeed": {"zero_stage": stage},
    })
    T = cfg.data.seq_len or cfg.model.context_length
    bf16 = autocast_dtype(cfg.train.precision, device) is not None
    row = {"preset": preset, "stage": stage, "world_size": world, "micro_batch": micro, "seq_len": T, "bf16": bf16}
    model = build_model(cfg, vocab_size)
    row["params"] = model.num_params(non_embedding=False)
    row["formula_bytes_per_param"] = bytes_per_param(stage, world)
    row["formula_gib"] = row["formula_bytes_per_param"] * row["params"] / 2**30
    flops_per_token = model.flops_per_token(T)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = optimizer = None
    try:
        optimizer = make_optimizer(model, cfg, device)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world, bf16))
        tokens = torch.randint(0, vocab_size, (micro, T + 1), device=device)

        def step():
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / max(steps, 1)
        row["step_ms"] = seconds * 1e3
        row["tokens_per_s"] = micro * world * T / seconds
        peak = peak_flops(device)
        if peak:
            row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * world)
        if cuda:
            row["states_gib"] = torch.cuda.memory_allocated() / 2**30  # weights, gradients, optimizer
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["oom"] = False
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    finally:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del engine, optimizer, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def worker(args) -> None:
    """One ZeRO stage over the presets, smallest first; rank 0 appends rows (JSON lines) to args.out."""
    from fasttrain.train.distributed import init_distributed

    if args.cpu:  # one CPU process: DeepSpeed's shared-memory all-reduce is idle; skip its 45 s C++ build
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    device = init_distributed("cpu" if args.cpu else "auto")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for preset in args.presets.split(","):
        row = measure(preset, args.stage, args.micro_batch, args.seq_len, args.steps, args.warmup, args.vocab_size,
                      device, world)
        if rank == 0:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if row["oom"]:
            break  # larger presets would not fit either


def run_stage(args, stage: int, gpus: int, out: str) -> None:
    cmd = ["-m", "benchmarks.bench_zero", "--worker", "--stage", str(stage), "--out", out, "--presets", args.presets,
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab-size", str(args.vocab_size)] + (["--seq-len", str(args.seq_len)] if args.seq_len else [])
    if args.cpu:
        cmd.append("--cpu")
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)] + cmd
    else:
        cmd = [sys.executable] + cmd
    env = dict(os.environ)
    if args.cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    subprocess.run(cmd, env=env, check=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=None, help="comma-separated ladder presets (default: all; CPU: 100k)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass per rank")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's context length")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--cpu", action="store_true", help="formula table and one tiny step per stage on the CPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cpu = args.cpu or not torch.cuda.is_available()
    if args.cpu and args.presets is None:
        args.presets, args.seq_len, args.steps, args.warmup = "100k", args.seq_len or 64, 1, 0
    args.presets = args.presets or ",".join(PRESETS)
    if args.worker:
        worker(args)
        return

    gpus = 1 if args.cpu else torch.cuda.device_count()
    print(f"ZeRO model-state memory per rank from the formula (GiB), N={gpus}, vocab {args.vocab_size}:")
    table = formula_rows(list(PRESETS), gpus, args.vocab_size)
    print_table(table, ["preset", "params", "N"] + [f"z{s}_gib" for s in STAGES])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            out = os.path.join(tmp, f"stage{stage}.jsonl")
            run_stage(args, stage, gpus, out)
            if os.path.exists(out):
                with open(out) as f:
                    rows += [json.loads(line) for line in f if line.strip()]
    print("\nmeasured (per rank; tokens/s over all ranks):")
    print_table(rows, ["preset", "stage", "world_size", "params", "formula_gib", "states_gib", "peak_gib",
                       "tokens_per_s", "mfu", "oom"])

    largest = {}
    if gpus == 1 and not args.cpu:
        for stage in STAGES:
            fits = [r for r in rows if r["stage"] == stage and not r["oom"]]
            if fits:
                best = max(fits, key=lambda r: r["params"])
                largest[f"stage{stage}"] = {"preset": best["preset"], "params": best["params"],
                                            "peak_gib": best.get("peak_gib"), "mfu": best.get("mfu"),
                                            "tested_up_to": args.presets.split(",")[-1]}
        print("\nlargest preset trained on one GPU per stage:", json.dumps(largest, indent=1))
    extra = {"micro_batch": args.micro_batch, "vocab_size": args.vocab_size, "gpus": gpus,
             "formula": [dict(r) for r in table], "largest_on_one_gpu": largest}
    print("wrote", write_results("zero", rows, extra=extra))


if __name__ == "__main__":
    main()
