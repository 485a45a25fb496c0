"""Training throughput across the model ladder, and packed training of small models against one at a time.

    python -m benchmarks.bench_throughput                                # GPU: ladder + packed, the defaults below
    python -m benchmarks.bench_throughput --presets 800m --attention cudnn --loss triton --compile on \
        --micro-batch max --profile --skip-packed                        # the large end: MFU, and where time goes
    python -m benchmarks.bench_throughput --presets all --compile off --skip-packed   # every ladder size
    python -m benchmarks.bench_throughput --skip-ladder --packed-presets 1.5m --packed-k 16,64
    python -m benchmarks.bench_throughput --tiny                         # CPU smoke test (the default without a GPU)

What is timed: one optimizer step on random tokens (data loading is bench_sampler's, and the reader part
below): forward and backward of every micro-batch, gradient clipping, AdamW and zero_grad, under bf16
autocast on a GPU (fp32 on a CPU). The micro-batch starts at the whole batch (or --micro-batch) and halves
until the step fits in memory; --micro-batch max first estimates the largest that fits from two eager steps.
  fasttrain  fasttrain.model.GPT with each attention x loss backend, the trainer's AdamW (make_optimizer:
             fused on a GPU) and clipping; eager, and torch.compile(model) as train.compile does.
  plain      the GPT a user would write, defined below with the same shapes (nn.Linear, SDPA,
             F.cross_entropy on materialized logits, fused AdamW); eager and compiled.
  packed     K runs as one PackedGPT step, as the packed trainer takes it (flat gradients, per-model foreach
             clipping; the batch copied from pinned memory); cuda_graph=on: the whole step captured as one
             CUDA graph and replayed (train.cuda_graph: capturable fused AdamW, tensor learning rate).
FLOPs per token (GPT.flops_per_token): 6 * N + 6 * n_layer * seq_len * d_model, where N = non-embedding
parameters + the tied output head (V * d) and the second term is QK^T and AV over the causal half, forward
and backward. mfu = achieved FLOP/s / the GPU's datasheet dense bf16 peak (fasttrain.device.peak_flops, as
llm.c, Megatron-LM and PaLM report it); mfu_vs_matmul = the same over the bf16 matmul rate measured on it.
peak_mem_mb: the most memory allocated during a step, weights and optimizer state included.
ops_per_step: what one step launches (GPU kernels; on a CPU, top-level aten operators).
Packed rows give the pack's total tokens/s and its speedup over training the same runs one at a time, i.e.
over a single run's step of the same batch: plain eager, plain compiled, and fasttrain with the same backends.
--profile adds, for each ladder row, a torch.profiler summary of two steps: GPU time by kind of kernel
(matmul, attention, loss, optimizer, elementwise/normalization, copies) and the GPU's idle share.
Rows accumulate in benchmarks/results/throughput-<device>.json: a later invocation replaces the rows it
measures again and keeps the others (--fresh starts the file over).
"""
import argparse
import importlib.util
import json
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    device_slug,
    peak_memory_mb,
    print_table,
    time_ms,
    write_results,
)
from fasttrain.config import COMPILE_MODES as TRAIN_COMPILE_MODES, config_from_dict  # noqa: E402
from fasttrain.ladder import PRESETS  # noqa: E402
from fasttrain.model import GPT  # noqa: E402
from fasttrain.device import compiled, measured_matmul_flops, mfu_fields, peak_flops  # noqa: E402
from fasttrain.optim import make_optimizer  # noqa: E402
from fasttrain.model import resolve_attention  # noqa: E402
from fasttrain.train.engine import GraphedStep, build_model, train_step  # noqa: E402
from fasttrain.train.packed import FlatGradients, PackedGPT  # noqa: E402

COMPILE_MODES = ("off",) + TRAIN_COMPILE_MODES
ROW_KEY = ("part", "preset", "impl", "attention", "loss", "compile", "cuda_graph", "K", "batch", "seq_len",
           "vocab_size")


# ---- the baseline a user would write ------------------------------------------------------------------
class PlainBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, n_layer, d, n_head, vocab_size, context_length):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, d), nn.Embedding(context_length, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def plain_optimizer(model, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")


# ---- building each kind of step ---------------------------------------------------------------------------
def run_config(preset, attention, loss, batch, micro, seq_len, vocab):
    """The run config whose model, optimizer and batch a step uses (compilation is the step's own)."""
    return config_from_dict({
        "model": {"preset": preset, "attention": attention, "loss": loss, "vocab_size": vocab},
        "data": {"seq_len": seq_len},
        "optim": {"warmup_steps": 0},
        "train": {"steps": 100, "global_batch": batch, "micro_batch": micro},
    })


def single_step(impl, preset, attention, loss, batch, micro, seq_len, vocab, mode, device, amp):
    """A function taking one optimizer step of one run (fasttrain's GPT or the plain one)."""
    cfg = run_config(preset, attention if impl == "fasttrain" else "torch", loss, batch, micro, seq_len, vocab)
    if impl == "fasttrain":
        model = build_model(cfg, vocab).to(device)
        resolve_attention(model, micro, seq_len, amp or torch.float32)
        optimizer = make_optimizer(model, cfg, device)
    else:
        p = PRESETS[preset]
        model = PlainGPT(p.n_layer, p.d_model, p.n_head, vocab, p.context_length).to(device)
        optimizer = plain_optimizer(model, device)
    step_model = compiled(model, mode)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)

    def step():  # the trainer's own step; the plain GPT goes through it too (AdamW, clipping, accumulation)
        train_step(model, optimizer, tokens, micro, cfg.optim.lr, cfg.optim.grad_clip, amp, step_model,
                   per_sequence=impl == "fasttrain")

    return step


def packed_step(preset, attention, loss, K, batch, micro, seq_len, vocab, mode, device, amp, cuda_graph=False):
    """A function taking one optimizer step of K packed runs, as PackedEngine.step takes it: from a batch in
    pinned host memory, with flat gradients and per-model clipping, captured as a CUDA graph if asked."""
    cfg = run_config(preset, attention, loss, batch, micro, seq_len, vocab)
    model = build_model(cfg, vocab)  # every slot starts from the same weights: the timing does not care
    packed = PackedGPT.from_models([model] * K, device=device)
    del model
    resolve_attention(packed, K * micro, seq_len, amp or torch.float32)
    optimizer = make_optimizer(packed, cfg, device, model_dims=1, capturable=cuda_graph)
    step_model = compiled(packed, mode)
    grads = FlatGradients(packed.parameters())
    tokens = torch.randint(0, vocab, (K, batch, seq_len + 1)).pin_memory() if device.type == "cuda" else \
        torch.randint(0, vocab, (K, batch, seq_len + 1))

    def run_step(on_device, lr=None):
        return train_step(packed, optimizer, on_device, micro, lr, cfg.optim.grad_clip, amp, step_model, grads.clip,
                          zero_grad=grads.zero_, autocast_cache=not cuda_graph)

    if cuda_graph:
        graphed = GraphedStep(run_step, optimizer, device)
        return lambda: graphed(tokens, cfg.optim.lr)
    return lambda: run_step(tokens.to(device, non_blocking=True), cfg.optim.lr)


def flops_per_token(preset, vocab, seq_len):
    p = PRESETS[preset]
    with torch.device("meta"):
        return GPT(p.n_layer, p.d_model, p.n_head, vocab, p.context_length).flops_per_token(seq_len)


def non_embedding_params(preset, vocab):
    p = PRESETS[preset]
    with torch.device("meta"):
        return GPT(p.n_layer, p.d_model, p.n_head, vocab, p.context_length).num_params()


def free_memory():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ops_per_step(step) -> int:
    """What one step launches: GPU kernels (and copies) on a GPU; top-level aten operators on a CPU, where
    each would be at least one launch. A packed step should cost about as many as one run's step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


# Kernel names -> what they compute, for the profile summary (first match wins; the rest is elementwise and
# normalization work: layer norms, GELU, residual adds, casts, inductor's fused kernels).
KERNEL_KINDS = [
    ("attention", ("attn", "fmha", "flash", "sdpa", "cudnn")),
    ("loss", ("cross_entropy",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "splitk", "Kernel2")),
    ("copies", ("memcpy", "memset", "copy")),
]


def kernel_kind(name: str) -> str:
    lower = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k.lower() in lower for k in keys):
            return kind
    return "elementwise/norm"


def profile_summary(step, steps: int = 2) -> dict:
    """Where a step's time goes: GPU time by kind of kernel (ms per step), the GPU's idle share of the step,
    and the kernels that take the most time (torch.profiler over `steps` steps)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels = {}
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if device_us > 0:
            kernels[e.key] = (device_us / 1e3 / steps, e.count // steps)
    by_kind = {}
    for name, (ms, _) in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {"profiled_step_ms": wall_ms, "gpu_busy_ms": busy, "gpu_idle_share": max(0.0, 1 - busy / wall_ms),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:100], "ms": ms, "calls": calls} for n, (ms, calls) in top]}


def largest_micro_batch(make_step, batch: int) -> int:
    """The largest power-of-two micro-batch dividing `batch` that should fit in the GPU's memory: peak memory
    of eager steps at micro-batches 1 and 2 extrapolated linearly (compiled steps need no more than eager)."""
    peaks = []
    for micro in (1, 2):
        step = make_step(micro, "off")
        step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.memory_allocated() / 2**20 + peak_memory_mb(step))
        step = None
        free_memory()
    per_sequence = max(peaks[1] - peaks[0], 1.0)
    states = peaks[0] - per_sequence
    total = torch.cuda.mem_get_info()[1] / 2**20
    fits = int((0.9 * total - states) // per_sequence)
    micro = 1
    while micro * 2 <= min(fits, batch) and batch % (micro * 2) == 0:
        micro *= 2
    print(f"  micro-batch max: {micro} (states {states / 1024:.1f} GiB + {per_sequence / 1024:.2f} GiB per sequence, "
          f"{total / 1024:.0f} GiB on the GPU)", flush=True)
    return micro


def measure(make_step, micro, tokens_per_step, flops_per_step, peaks, args, profile=False):
    """Time a step built by make_step(micro), halving the micro-batch on out-of-memory. Returns row fields."""
    while True:
        torch._dynamo.reset()  # a fresh compile per configuration, never the recompile limit's eager fallback
        try:
            step = make_step(micro)
            t0 = time.perf_counter()
            step()  # the first step pays for compilation and autotuning
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = time_ms(step, args.warmup, args.iters)
            ops = ops_per_step(step)
            base = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
            mem = base + peak_memory_mb(step)
            summary = profile_summary(step) if profile and torch.cuda.is_available() else None
            break
        except torch.cuda.OutOfMemoryError:
            pass  # memory is freed below, once the exception no longer holds the failed step's frames
        step = None
        free_memory()
        if micro == 1:
            raise RuntimeError("out of memory even at micro-batch 1")
        micro //= 2
        print(f"  out of memory: micro-batch {micro}")
    step = None
    free_memory()
    achieved = flops_per_step / (ms / 1e3)
    row = {"micro_batch": micro, "step_ms": ms, "tokens_per_s": tokens_per_step / (ms / 1e3),
           "tflops": achieved / 1e12, **mfu_fields(achieved, *peaks),
           "peak_mem_mb": mem, "first_step_s": first_s, "ops_per_step": ops}
    if summary:
        row["profile"] = summary
    return row


def bench_row(part, preset, impl, attention, loss, mode, K, batch, seq_len, args, device, amp, peaks,
              cuda_graph=False):
    """Measure one configuration; a backend that cannot run here gets an error field instead of numbers."""
    V = args.vocab_size
    fpt = flops_per_token(preset, V, seq_len)
    row = {"part": part, "preset": preset, "impl": impl, "attention": attention, "loss": loss, "compile": mode,
           "cuda_graph": cuda_graph, "K": K, "batch": batch, "seq_len": seq_len, "vocab_size": V,
           "params": non_embedding_params(preset, V), "flops_per_token": fpt}
    label = " ".join(f"{k}={row[k]}" for k in ("part", "preset", "impl", "attention", "loss", "compile", "cuda_graph",
                                                "K"))
    print(label, flush=True)

    def make_step(micro, step_mode=None):
        step_mode = step_mode or mode
        if impl == "packed":
            return packed_step(preset, attention, loss, K, batch, micro, seq_len, V, step_mode, device, amp, cuda_graph)
        return single_step(impl, preset, attention, loss, batch, micro, seq_len, V, step_mode, device, amp)

    try:
        first_micro = (args.micro_batch if part == "ladder" else None) or batch
        if first_micro == "max":
            first_micro = largest_micro_batch(make_step, batch) if device.type == "cuda" else batch
        profile = args.profile and part == "ladder"
        row.update(measure(make_step, int(first_micro), K * batch * seq_len, K * fpt * batch * seq_len, peaks, args,
                           profile))
    except Exception as e:  # noqa: BLE001 (one failing backend must not cost the rest of the run)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  failed: {row['error']}")
    free_memory()
    return row


# ---- the two parts ----------------------------------------------------------------------------------------
def ladder_rows(args, device, amp, peaks, emit):
    combos = [(a, l) for a in args.attention for l in args.loss]
    for preset in args.presets:
        for mode in args.compile:
            if not args.skip_plain:
                emit(bench_row("ladder", preset, "plain", "sdpa", "torch", mode, 1, args.batch, args.seq_len,
                               args, device, amp, peaks))
            for attention, loss in combos:
                emit(bench_row("ladder", preset, "fasttrain", attention, loss, mode, 1, args.batch, args.seq_len,
                               args, device, amp, peaks))


def packed_rows(args, device, amp, peaks, emit):
    B, T = args.packed_batch, args.packed_seq_len
    for preset in args.packed_presets:
        for mode in args.packed_compile:
            emit(bench_row("packed", preset, "plain", "sdpa", "torch", mode, 1, B, T, args, device, amp, peaks))
        for mode in args.packed_compile:
            for attention, loss in args.packed_combos:
                emit(bench_row("packed", preset, "fasttrain", attention, loss, mode, 1, B, T, args, device, amp, peaks))
                for graph in args.packed_cuda_graph:
                    for K in args.packed_k:
                        emit(bench_row("packed", preset, "packed", attention, loss, mode, K, B, T, args, device, amp,
                                       peaks, cuda_graph=graph))


def add_speedups(rows):
    """Speedups between rows of the same shapes (this invocation's or an earlier one's). Ladder: over the
    plain step in the same compile mode. Packed: the pack's total tokens/s over the same runs trained one at
    a time, i.e. over one run's tokens/s: plain eager, plain compiled, fasttrain single (same backends)."""
    rate = {}
    for r in rows:
        if r.get("tokens_per_s") and r["K"] == 1:
            rate[(r["part"], r["preset"], r["batch"], r["seq_len"], r["vocab_size"], r["impl"], r["attention"],
                  r["loss"], r["compile"])] = r["tokens_per_s"]
    for r in rows:
        if not r.get("tokens_per_s"):
            continue
        shape = (r["part"], r["preset"], r["batch"], r["seq_len"], r["vocab_size"])
        if r["part"] == "ladder" and r["impl"] == "fasttrain":
            baselines = {"plain": ("plain", "sdpa", "torch", r["compile"])}
        elif r["impl"] == "packed":
            baselines = {"plain_eager": ("plain", "sdpa", "torch", "off"),
                         "plain_compiled": ("plain", "sdpa", "torch", "default"),
                         "fasttrain_single": ("fasttrain", r["attention"], r["loss"], r["compile"])}
        else:
            continue
        for name, key in baselines.items():
            if shape + key in rate:
                r[f"speedup_vs_{name}"] = r["tokens_per_s"] / rate[shape + key]


# ---- command line -------------------------------------------------------------------------------------------
def csv(kind=str):
    return lambda text: [kind(x) for x in text.split(",") if x]


def combos(text):
    out = []
    for pair in text.split(","):
        attention, _, loss = pair.partition("/")
        out.append((attention, loss or "torch"))
    return out


def parse_args(argv):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=not on_gpu,
                   help="tiny shapes, eager only: a smoke test that runs on a CPU in under a minute")
    p.add_argument("--presets", type=csv(), help="ladder presets, or all (default 1.5m,13m,85m,300m,800m; tiny: 100k)")
    p.add_argument("--attention", type=csv(), help="attention backends (default torch,triton and flash if installed)")
    p.add_argument("--loss", type=csv(), default=["torch", "triton"], help="loss backends")
    p.add_argument("--compile", type=csv(), help=f"compile modes among {','.join(COMPILE_MODES)}; on = default "
                                                 "(default off,on; tiny: off)")
    p.add_argument("--batch", type=int, help="sequences per optimizer step (default 32; tiny 2)")
    p.add_argument("--micro-batch", type=lambda t: t if t == "max" else int(t),
                   help="first micro-batch to try (default: the whole batch); max: the largest estimated to fit")
    p.add_argument("--profile", action="store_true", help="a torch.profiler summary of each ladder row (GPU)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048, the presets' context; tiny 32)")
    p.add_argument("--vocab-size", type=int, help="vocabulary (default 8192; tiny 256)")
    p.add_argument("--packed-presets", type=csv(), help="small presets to pack (default 1.5m,3m,6m: the 1M-10M range; tiny 100k)")
    p.add_argument("--packed-k", type=csv(int), help="models per pack (default 16,64; tiny 4)")
    p.add_argument("--packed-batch", type=int, help="sequences per step of each packed run (default 16; tiny 2)")
    p.add_argument("--packed-seq-len", type=int, help="tokens per sequence of the packed runs (default 128; tiny 32)")
    p.add_argument("--packed-combos", type=combos, default=[("auto", "triton"), ("auto", "torch")],
                   help="attention/loss backends of the packed and single fasttrain rows (default "
                        "auto/triton,auto/torch)")
    p.add_argument("--packed-compile", type=csv(), help="compile modes for the packed part (default off,on; tiny off)")
    p.add_argument("--packed-cuda-graph", type=csv(), help="packed steps eager (off) and/or captured as a CUDA graph "
                                                           "(on) (default off,on on a GPU; off on a CPU)")
    p.add_argument("--skip-ladder", action="store_true")
    p.add_argument("--skip-packed", action="store_true")
    p.add_argument("--skip-plain", action="store_true", help="leave out the ladder's plain-PyTorch rows")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (default 3; tiny 0)")
    p.add_argument("--iters", type=int, help="timed steps, median reported (default 10; tiny 2)")
    p.add_argument("--fresh", action="store_true", help="drop the rows of earlier invocations from the result file")
    args = p.parse_args(argv)

    tiny = args.tiny
    flash = importlib.util.find_spec("flash_attn") is not None and on_gpu
    defaults = {
        "presets": ["100k"] if tiny else ["1.5m", "13m", "85m", "300m", "800m"],
        "attention": ["torch", "triton"] + (["cudnn"] if on_gpu else []) + (["flash"] if flash else []),
        "compile": ["off"] if tiny else ["off", "on"],
        "batch": 2 if tiny else 32,
        "seq_len": 32 if tiny else 2048,
        "vocab_size": 256 if tiny else 8192,
        "packed_presets": ["100k"] if tiny else ["1.5m", "3m", "6m"],
        "packed_k": [4] if tiny else [16, 64],
        "packed_batch": 2 if tiny else 16,
        "packed_seq_len": 32 if tiny else 128,
        "packed_compile": ["off"] if tiny else ["off", "on"],
        "packed_cuda_graph": ["off", "on"] if on_gpu else ["off"],
        "warmup": 0 if tiny else 3,
        "iters": 2 if tiny else 10,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile = ["default" if m == "on" else m for m in args.compile]
    args.packed_compile = ["default" if m == "on" else m for m in args.packed_compile]
    args.packed_cuda_graph = [m in ("on", "true", "1") for m in args.packed_cuda_graph]
    if any(args.packed_cuda_graph) and not on_gpu:
        p.error("--packed-cuda-graph on: needs a CUDA GPU")
    for name in ("presets", "packed_presets"):
        if getattr(args, name) == ["all"]:  # the whole ladder
            setattr(args, name, list(PRESETS))
        unknown = [x for x in getattr(args, name) if x not in PRESETS]
        if unknown:
            p.error(f"--{name.replace('_', '-')}: unknown preset {unknown[0]} (choose from {', '.join(PRESETS)})")
    for mode in args.compile + args.packed_compile:
        if mode not in COMPILE_MODES:
            p.error(f"--compile: unknown mode {mode} (choose from on, {', '.join(COMPILE_MODES)})")
    return args


def load_earlier_rows(fresh):
    path = os.path.join(RESULTS_DIR, f"throughput-{device_slug()}.json")
    if fresh or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("rows", [])


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: more threads only spin, and on a shared CPU they stall
    amp = torch.bfloat16 if device.type == "cuda" else None
    peaks = (peak_flops(device), measured_matmul_flops(device) if device.type == "cuda" else None)
    extra = {"peak_bf16_flops_datasheet": peaks[0], "peak_bf16_flops_measured": peaks[1],
             "precision": "bf16 autocast" if amp else "fp32",
             "flops_per_token": "6 * (non-embedding params + vocab * d_model) + 6 * n_layer * seq_len * d_model"}
    if peaks[1]:
        print(f"bf16 peak: datasheet {peaks[0] / 1e12 if peaks[0] else float('nan'):.0f} TFLOP/s, "
              f"measured matmul {peaks[1] / 1e12:.0f} TFLOP/s")
    earlier = load_earlier_rows(args.fresh)
    rows = []

    def emit(row):
        rows.append(row)
        keys = {tuple(r.get(k) for k in ROW_KEY) for r in rows}
        kept = [r for r in earlier if tuple(r.get(k) for k in ROW_KEY) not in keys]
        add_speedups(kept + rows)
        write_results("throughput", kept + rows, extra=extra)  # after every row: a killed run keeps its results

    if not args.skip_ladder:
        ladder_rows(args, device, amp, peaks, emit)
    if not args.skip_packed:
        packed_rows(args, device, amp, peaks, emit)

    columns = ["part", "preset", "impl", "attention", "loss", "compile", "cuda_graph", "K", "batch", "micro_batch",
               "seq_len",
               "step_ms", "tokens_per_s", "tflops", "mfu", "mfu_vs_matmul", "peak_mem_mb", "first_step_s", "ops_per_step"]
    for part, speedups in (("ladder", ["speedup_vs_plain"]),
                           ("packed", ["speedup_vs_plain_eager", "speedup_vs_plain_compiled",
                                       "speedup_vs_fasttrain_single"])):
        if any(r["part"] == part for r in rows):
            print_table([r for r in rows if r["part"] == part], columns + speedups)
            print()
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {r['preset']} {r['impl']} {r['attention']}/{r['loss']} compile={r['compile']} K={r['K']}: "
              f"{r['error']}")
    path = os.path.join(RESULTS_DIR, f"throughput-{device_slug()}.json")
    print("wrote", path if rows else "nothing")


if __name__ == "__main__":
    main()
