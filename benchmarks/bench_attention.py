"""Attention benchmark: our Triton kernel against SDPA's backends and flash-attn.

    python -m benchmarks.bench_attention            # full grid (GPU)
    python -m benchmarks.bench_attention --quick    # a few shapes

Shapes follow FlashAttention's benchmarks: 16k tokens per batch (batch = 16384 / seq) and hidden size
2048 (heads = 2048 / head_dim), bf16. FLOPs: forward 4*B*H*T*T*D (half of it when causal), backward
2.5x forward (matmuls only). On a CPU it runs one tiny shape through the interpreter to show it works.
"""
import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import torch.nn.functional as F  # noqa: E402

from benchmarks.common import print_table, time_ms, write_results  # noqa: E402
from fasttrain.kernels.flash_attention import flash_attention  # noqa: E402


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


def providers():
    found = {"fasttrain-triton": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)}
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
    return dict(provider=name, head_dim=head_dim, seq=seq, batch=batch, heads=heads, causal=causal,
                dtype=str(dtype).replace("torch.", ""),
                fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwdbwd_ms=fwdbwd_ms,
                fwd_tflops=flops / fwd_ms * 1e-9, bwd_tflops=2.5 * flops / bwd_ms * 1e-9,
                fwdbwd_tflops=3.5 * flops / fwdbwd_ms * 1e-9)


def shapes(quick):
    if not torch.cuda.is_available():
        return [(64, 32, True)]  # (seq, head_dim, causal), run at batch 1, 2 heads
    if quick:
        seqs, extra_full = [1024, 4096, 16384], [(4096, 128, False)]
    else:
        seqs, extra_full = [512, 1024, 2048, 4096, 8192, 16384], [(2048, 128, False), (8192, 128, False),
                                                                  (4096, 64, False)]
    return [(s, d, True) for d in (64, 128) for s in seqs] + extra_full


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced grid of shapes")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    warmup, iters = (5, 20) if on_gpu else (1, 2)
    rows = []
    for seq, head_dim, causal in shapes(args.quick):
        batch, heads = (max(args.tokens // seq, 1), args.hidden // head_dim) if on_gpu else (1, 2)
        for name, fn in providers().items():
            try:
                rows.append(bench_one(name, fn, batch, heads, seq, head_dim, causal, dtype, device, warmup, iters))
            except (RuntimeError, ValueError) as e:  # a backend that does not take this shape or GPU
                print(f"{name} seq={seq} d={head_dim} causal={causal}: unavailable ({str(e).splitlines()[0][:120]})")
            if on_gpu:
                torch.cuda.empty_cache()
    print_table(rows, ["provider", "head_dim", "seq", "batch", "heads", "causal", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                       "fwd_tflops", "bwd_tflops", "fwdbwd_tflops"])
    print("wrote", write_results("attention", rows, extra={"tokens": args.tokens, "hidden": args.hidden}))


if __name__ == "__main__":
    main()
