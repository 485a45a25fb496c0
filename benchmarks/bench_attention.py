"""Attention benchmark: our Triton kernel against SDPA's backends and flash-attn.

    python -m benchmarks.bench_attention            # full grid (GPU)
    python -m benchmarks.bench_attention --quick    # a few shapes
    python -m benchmarks.bench_attention --seqs 2048,8192 --head-dims 64,128 --causal-only

Shapes follow FlashAttention's benchmarks: 16k tokens per batch (batch = 16384 / seq) and hidden size
2048 (heads = 2048 / head_dim), bf16. FLOPs: forward 4*B*H*T*T*D (half of it when causal), backward
2.5x forward (matmuls only). Our kernel runs as the trainer runs it (atomic dQ, TMA loads on Hopper) and,
as fasttrain-triton-separate-dq, with the atomics-free dQ pass (seven matmuls) for comparison;
--no-tma-variant adds it without TMA loads. fwdbwd_mfu: fwd+bwd FLOP/s over the GPU's datasheet dense
bf16 peak; vs_cudnn: SDPA cuDNN's fwd+bwd time over ours (>= 1: ours is as fast or faster). On a CPU it
runs one tiny shape through the interpreter to show it works.
"""
import argparse
import contextlib
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import torch.nn.functional as F  # noqa: E402

from benchmarks.common import print_table, time_ms, write_results  # noqa: E402
from fasttrain.device import measured_matmul_flops, mfu_fields, peak_flops  # noqa: E402
from fasttrain.kernels.flash_attention import flash_attention  # noqa: E402

fa = importlib.import_module("fasttrain.kernels.flash_attention")


def sdpa_provider(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def flash_attn_provider():
    from flash_attn import flash_attn_func  # optional, (batch, seq, heads, head_dim) layout

    def run(q, k, v, causal):
        return flash_attn_func(q, k, v, causal=causal)

    return run


@contextlib.contextmanager
def kernel_settings(dq_mode="atomic", tma="auto"):
    """Our kernel's dQ mode and TMA setting while a provider is measured."""
    saved = fa.dq_mode, fa.tma
    fa.dq_mode, fa.tma = dq_mode, tma
    try:
        yield
    finally:
        fa.dq_mode, fa.tma = saved


def ours(**settings):
    def run(q, k, v, causal):
        return flash_attention(q, k, v, causal=causal)

    run.settings = settings
    return run


def providers(no_tma_variant=False):
    found = {"fasttrain-triton": ours(), "fasttrain-triton-separate-dq": ours(dq_mode="separate")}
    if no_tma_variant:
        found["fasttrain-triton-no-tma"] = ours(tma="off")
    if not torch.cuda.is_available():
        found["sdpa-math"] = sdpa_provider("MATH")
        return found
    for name, backend in [("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                          ("sdpa-cudnn", "CUDNN_ATTENTION")]:
        try:
            found[name] = sdpa_provider(backend)
        except (ImportError, AttributeError) as e:
            print(f"skipping {name}: {e}")
    try:
        found["flash-attn"] = flash_attn_provider()
    except ImportError:
        print("skipping flash-attn: not installed")
    return found


def attention_flops(batch, heads, seq, head_dim, causal):
    fwd = 4 * batch * heads * seq * seq * head_dim
    return fwd / 2 if causal else fwd


def bench_one(name, fn, batch, heads, seq, head_dim, causal, dtype, device, warmup, iters):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, seq, heads, head_dim) if name == "flash-attn" else (batch, heads, seq, head_dim)
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    out = fn(q, k, v, causal)

    def forward():
        fn(q, k, v, causal)

    def backward():
        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)

    fwd_ms = time_ms(forward, warmup, iters)
    bwd_ms = time_ms(backward, warmup, iters)
    fwdbwd_ms = time_ms(forward_backward, warmup, iters)
    flops = attention_flops(batch, heads, seq, head_dim, causal)
    mfu = mfu_fields(3.5 * flops / (fwdbwd_ms / 1e3), peak_flops(q.device),
                     measured_matmul_flops(q.device) if q.is_cuda else None)
    return dict(provider=name, head_dim=head_dim, seq=seq, batch=batch, heads=heads, causal=causal,
                dtype=str(dtype).replace("torch.", ""),
                fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwdbwd_ms=fwdbwd_ms,
                fwd_tflops=flops / fwd_ms * 1e-9, bwd_tflops=2.5 * flops / bwd_ms * 1e-9,
                fwdbwd_tflops=3.5 * flops / fwdbwd_ms * 1e-9, **{f"fwdbwd_{k}": v for k, v in mfu.items()})


def shapes(args):
    if not torch.cuda.is_available():
        return [(64, 32, True)]  # (seq, head_dim, causal), run at batch 1, 2 heads
    if args.seqs or args.head_dims:
        seqs = args.seqs or [512, 1024, 2048, 4096, 8192, 16384]
        return [(s, d, True) for d in (args.head_dims or [64, 128]) for s in seqs]
    if args.quick:
        seqs, extra_full = [1024, 4096, 16384], [(4096, 128, False)]
    else:
        seqs, extra_full = [512, 1024, 2048, 4096, 8192, 16384], [(2048, 128, False), (8192, 128, False),
                                                                  (4096, 64, False)]
    return [(s, d, True) for d in (64, 128) for s in seqs] + ([] if args.causal_only else extra_full)


def add_vs_cudnn(rows):
    """vs_cudnn on our rows: SDPA cuDNN's fwd+bwd time over ours at the same shape (>= 1: at least as fast)."""
    cudnn = {(r["head_dim"], r["seq"], r["causal"]): r["fwdbwd_ms"] for r in rows if r["provider"] == "sdpa-cudnn"}
    for r in rows:
        key = (r["head_dim"], r["seq"], r["causal"])
        if r["provider"].startswith("fasttrain") and key in cudnn:
            r["vs_cudnn"] = cudnn[key] / r["fwdbwd_ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced grid of shapes")
    parser.add_argument("--seqs", type=lambda t: [int(x) for x in t.split(",")], help="sequence lengths (causal)")
    parser.add_argument("--head-dims", type=lambda t: [int(x) for x in t.split(",")], help="head dims (causal)")
    parser.add_argument("--causal-only", action="store_true", help="leave out the non-causal shapes")
    parser.add_argument("--no-tma-variant", action="store_true", help="also our kernel without TMA loads")
    parser.add_argument("--providers", type=lambda t: t.split(","), help="only these providers (names as printed)")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    warmup, iters = (5, 20) if on_gpu else (1, 2)
    rows = []
    for seq, head_dim, causal in shapes(args):
        batch, heads = (max(args.tokens // seq, 1), args.hidden // head_dim) if on_gpu else (1, 2)
        for name, fn in providers(args.no_tma_variant).items():
            if args.providers and name not in args.providers:
                continue
            try:
                with kernel_settings(**getattr(fn, "settings", {})):
                    rows.append(bench_one(name, fn, batch, heads, seq, head_dim, causal, dtype, device, warmup, iters))
            except (RuntimeError, ValueError) as e:  # a backend that does not take this shape or GPU
                print(f"{name} seq={seq} d={head_dim} causal={causal}: unavailable ({str(e).splitlines()[0][:120]})")
            if on_gpu:
                torch.cuda.empty_cache()
        add_vs_cudnn(rows)
        write_results("attention", rows, extra={"tokens": args.tokens, "hidden": args.hidden})  # a kill keeps rows
    print_table(rows, ["provider", "head_dim", "seq", "batch", "heads", "causal", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                       "fwd_tflops", "bwd_tflops", "fwdbwd_tflops", "fwdbwd_mfu", "fwdbwd_mfu_vs_matmul", "vs_cudnn"])
    print("wrote", write_results("attention", rows, extra={"tokens": args.tokens, "hidden": args.hidden}))


if __name__ == "__main__":
    main()
