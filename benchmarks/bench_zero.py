"""ZeRO memory and speed per ladder preset: the ZeRO paper's bytes per parameter next to what a rank holds.

    python -m benchmarks.bench_zero                 # GPU: every preset x ZeRO stage 0-3 on the visible GPUs
    python -m benchmarks.bench_zero --presets 85m,800m --micro-batch 2
    python -m benchmarks.bench_zero --cpu           # formula table + one tiny step per stage (smoke test)
    python -m benchmarks.bench_zero --presets 800m --stages 0,1,2 --attention cudnn --loss triton --vs-plain

Mixed-precision Adam keeps 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master weights, m, v) bytes
per parameter. ZeRO partitions the 12 over N ranks at stage 1, also the gradients at stage 2, and the
weights too at stage 3 (Rajbhandari et al. 2020):

    stage 0: 16    stage 1: 4 + 12/N    stage 2: 2 + 14/N    stage 3: 16/N

Each stage runs in its own process (torchrun with one rank per GPU when there are several), through the
same DeepSpeed setup as `fasttrain train` (generated config, our AdamW), on random tokens at the preset's
context length. Reported per rank: model states after a step (allocated memory) and the peak, tokens/s
(all ranks), mfu (over the datasheet dense bf16 peak) and mfu_vs_matmul (over a measured bf16 matmul); then,
per stage, the largest preset that trained on one GPU. --vs-plain also times the plain trainer's step
(fasttrain's GPT, fused AdamW, bf16 autocast over fp32 weights) on the same shapes in its own process, and
gives each DeepSpeed row vs_plain, its tokens/s over the plain trainer's. Without deepspeed installed only
the plain rows are measured, and the result file says so.
"""
import argparse
import gc
import importlib.util
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
PLAIN = -1  # the stage number of the plain trainer's rows


def measure(preset: str, stage: int, micro: int, seq_len: int | None, steps: int, warmup: int, vocab_size: int,
            device, world: int, attention: str = "auto", loss: str = "torch", compile: bool = False) -> dict:
    from fasttrain.config import config_from_dict
    from fasttrain.device import autocast_dtype, compiled, measured_matmul_flops, mfu_fields, peak_flops
    from fasttrain.model import resolve_attention
    from fasttrain.optim import make_optimizer
    from fasttrain.train.distributed import deepspeed_config
    from fasttrain.train.engine import build_model, train_step

    cfg = config_from_dict({
        "model": {"preset": preset, "vocab_size": vocab_size, "attention": attention, "loss": loss},
        "data": {"seq_len": seq_len},
        "train": {"global_batch": micro * world, "micro_batch": micro},
        "deepspeed": {"zero_stage": max(stage, 0)},
    })
    T = cfg.data.seq_len or cfg.model.context_length
    amp = autocast_dtype(cfg.train.precision, device)
    bf16 = amp is not None
    row = {"preset": preset, "stage": "plain" if stage == PLAIN else stage, "world_size": world, "micro_batch": micro,
           "seq_len": T, "bf16": bf16, "attention": attention, "loss": loss, "compile": compile}
    model = build_model(cfg, vocab_size)
    row["params"] = model.num_params(non_embedding=False)
    row["formula_bytes_per_param"] = bytes_per_param(max(stage, 0), world)
    row["formula_gib"] = row["formula_bytes_per_param"] * row["params"] / 2**30
    flops_per_token = model.flops_per_token(T)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = optimizer = None
    try:
        tokens = torch.randint(0, vocab_size, (micro, T + 1), device=device)
        if stage == PLAIN:  # the plain trainer's step (SingleEngine.run_step)
            model = model.to(device)
            optimizer = make_optimizer(model, cfg, device)
            resolve_attention(model, micro, T, amp or torch.float32)
            step_model = compiled(model, "default" if compile else None)

            def step():
                train_step(model, optimizer, tokens, micro, cfg.optim.lr, cfg.optim.grad_clip, amp, step_model)
        else:
            import deepspeed

            optimizer = make_optimizer(model, cfg, device)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                              config=deepspeed_config(cfg, world, bf16))
            resolve_attention(engine.module, micro, T, torch.bfloat16 if bf16 else torch.float32)
            if compile:
                engine.compile()

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
        peak, matmul = peak_flops(device), measured_matmul_flops(device) if cuda else None
        row.update(mfu_fields(flops_per_token * row["tokens_per_s"], peak and peak * world, matmul and matmul * world))
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
    if args.stage == PLAIN:  # one process, no DeepSpeed
        device, rank, world = torch.device("cpu" if args.cpu else "cuda"), 0, 1
    else:
        device = init_distributed("cpu" if args.cpu else "auto")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for preset in args.presets.split(","):
        row = measure(preset, args.stage, args.micro_batch, args.seq_len, args.steps, args.warmup, args.vocab_size,
                      device, world, args.attention, args.loss, args.compile)
        if rank == 0:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if row["oom"]:
            break  # larger presets would not fit either


def run_stage(args, stage: int, gpus: int, out: str) -> None:
    cmd = ["-m", "benchmarks.bench_zero", "--worker", "--stage", str(stage), "--out", out, "--presets", args.presets,
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab-size", str(args.vocab_size), "--attention", args.attention, "--loss", args.loss] + \
        (["--seq-len", str(args.seq_len)] if args.seq_len else []) + (["--compile"] if args.compile else [])
    if args.cpu:
        cmd.append("--cpu")
    if gpus > 1 and stage != PLAIN:
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
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to measure")
    parser.add_argument("--attention", default="auto", help="model.attention (default auto)")
    parser.add_argument("--loss", default="torch", help="model.loss (default torch)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (not with stage 3)")
    parser.add_argument("--vs-plain", action="store_true", help="also the plain trainer's step on the same shapes")
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

    stages = [int(x) for x in args.stages.split(",") if x]
    note = None
    if importlib.util.find_spec("deepspeed") is None:
        note = "deepspeed is not installed: the DeepSpeed rows were not measured"
        print(note)
        stages = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ([PLAIN] if args.vs_plain else []) + stages:
            out = os.path.join(tmp, f"stage{stage}.jsonl")
            run_stage(args, stage, gpus, out)
            if os.path.exists(out):
                with open(out) as f:
                    rows += [json.loads(line) for line in f if line.strip()]
    plain = {r["preset"]: r["tokens_per_s"] for r in rows if r["stage"] == "plain" and r.get("tokens_per_s")}
    for r in rows:
        if r["stage"] != "plain" and r.get("tokens_per_s") and r["preset"] in plain:
            r["vs_plain"] = r["tokens_per_s"] / plain[r["preset"]]
    print("\nmeasured (per rank; tokens/s over all ranks):")
    print_table(rows, ["preset", "stage", "world_size", "micro_batch", "params", "formula_gib", "states_gib",
                       "peak_gib", "tokens_per_s", "mfu", "mfu_vs_matmul", "vs_plain", "oom"])

    largest = {}
    if gpus == 1 and not args.cpu:
        for stage in stages:
            fits = [r for r in rows if r["stage"] == stage and not r["oom"]]
            if fits:
                best = max(fits, key=lambda r: r["params"])
                largest[f"stage{stage}"] = {"preset": best["preset"], "params": best["params"],
                                            "peak_gib": best.get("peak_gib"), "mfu": best.get("mfu"),
                                            "tested_up_to": args.presets.split(",")[-1]}
        print("\nlargest preset trained on one GPU per stage:", json.dumps(largest, indent=1))
    extra = {"micro_batch": args.micro_batch, "vocab_size": args.vocab_size, "gpus": gpus,
             "formula": [dict(r) for r in table], "largest_on_one_gpu": largest, **({"note": note} if note else {})}
    print("wrote", write_results("zero", rows, extra=extra))


if __name__ == "__main__":
    main()
