"""Fused linear cross-entropy: forward+backward time and peak memory against the plain PyTorch path.

    python -m benchmarks.bench_linear_cross_entropy            # full grid (GPU, bf16)
    python -m benchmarks.bench_linear_cross_entropy --quick    # reduced grid
    python -m benchmarks.bench_linear_cross_entropy --tiny     # a few small shapes (default without a GPU)
    python -m benchmarks.bench_linear_cross_entropy --sweep    # tuning: kernel block sizes, chunk sizes, matmul floor

Providers: fasttrain (kernels.linear_cross_entropy), torch (logits = h @ W.T; F.cross_entropy(logits.float(), t)),
torch_compile (the same function under torch.compile) and liger (LigerFusedLinearCrossEntropyLoss, when
liger_kernel is importable). Peak memory is what the step allocates beyond the inputs, gradients included.
tflops counts the three matmuls (6 N d V); mfu is that over the GPU's datasheet dense bf16 peak,
mfu_vs_matmul over a bf16 matmul measured on it. time_vs_compile / mem_vs_compile / time_vs_liger: each
provider's time and memory over torch.compile's and Liger's at the same shape.
"""
import argparse
import gc
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from benchmarks.common import peak_memory_mb, print_table, time_ms, write_results
from fasttrain.device import measured_matmul_flops, mfu_fields, peak_flops
from fasttrain.kernels import cross_entropy as ce_module
from fasttrain.kernels.linear_cross_entropy import _has_fp32_out_matmul, default_chunk_size, linear_cross_entropy

FULL_GRID = [(n, d, v) for v in (32768, 50304) for d in (512, 1024, 2048) for n in (8192, 16384, 32768, 65536)]
QUICK_GRID = [(n, d, v) for v in (32768, 50304) for d, n in ((512, 8192), (1024, 16384), (2048, 32768), (2048, 65536))]
TINY_GRID = [(64, 32, 1000), (256, 64, 3001)]


def plain_torch(hidden, weight, targets):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), targets)


def make_providers(include_compile, chunk_size):
    providers = {
        "fasttrain": lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk_size),
        "torch": plain_torch,
    }
    if include_compile:
        providers["torch_compile"] = torch.compile(plain_torch)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        providers["liger"] = lambda h, w, t: liger(w, h, t)
    except ImportError:
        pass
    return providers


def measure(loss_fn, hidden, weight, targets, warmup, iters):
    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, targets).backward()

    ms = time_ms(step, warmup=warmup, iters=iters)
    hidden.grad = weight.grad = None
    gc.collect()
    mem = peak_memory_mb(step)
    loss = loss_fn(hidden, weight, targets).item()
    hidden.grad = weight.grad = None
    return ms, mem, loss


def sweep(device, dtype, tiny):
    """Tuning numbers: the cross-entropy kernel alone per launch configuration, fasttrain per chunk size,
    and the three matmuls alone (the floor the fused path works against)."""
    rows = []
    n_rows, vocab = (64, 3001) if tiny else (4096, 50304)
    logits = torch.randn(n_rows, vocab, device=device).to(dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=device)
    losses = torch.empty(n_rows, device=device)
    lse = torch.empty_like(losses)
    configs = [(1024, 1), (4096, 1)] if tiny else [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]
    default_config = ce_module._launch_config
    for block_v, num_warps in configs:
        ce_module._launch_config = lambda n_cols, dev, c=(block_v, num_warps): c
        buf = logits.clone()
        ms = time_ms(lambda: ce_module.launch_cross_entropy(buf, targets, -100, 0.0, losses, lse, grad=buf), warmup=2, iters=20)
        gbps = 3 * logits.numel() * logits.element_size() / ms / 1e6  # two reads and one write
        rows.append(dict(what="ce_kernel", BLOCK_V=block_v, warps=num_warps, rows=n_rows, V=vocab, ms=ms, GBps=gbps))
    ce_module._launch_config = default_config
    del logits, buf

    shapes = [(256, 32, 3001)] if tiny else [(16384, 512, 32768), (32768, 2048, 50304), (8192, 1024, 50304)]
    chunks = [64, 128] if tiny else [512, 1024, 2048, 4096, 8192]
    for n, d, v in shapes:
        hidden = torch.randn(n, d, device=device).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, device=device) / d**0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device)
        for chunk in chunks + [None]:
            ms, mem, _ = measure(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk), hidden, weight, targets, 2, 5)
            rows.append(dict(what="chunk", N=n, d=d, V=v, chunk=chunk or f"auto={default_chunk_size(n, v)}", ms=ms, peak_mb=mem))
        with torch.no_grad():
            dlogits = hidden @ weight.t()
            ms = time_ms(lambda: (hidden @ weight.t(), dlogits @ weight, dlogits.t() @ hidden), warmup=2, iters=5)
        rows.append(dict(what="matmul_floor", N=n, d=d, V=v, ms=ms, TFLOPs=6 * n * d * v / ms / 1e9))
        del hidden, weight, dlogits
    print("fp32-output matmul available:", _has_fp32_out_matmul(torch.device(device), dtype))
    print_table(rows, ["what", "BLOCK_V", "warps", "rows", "N", "d", "V", "chunk", "ms", "GBps", "peak_mb", "TFLOPs"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid")
    parser.add_argument("--tiny", action="store_true", help="a few small shapes (default without a GPU)")
    parser.add_argument("--sweep", action="store_true", help="tuning numbers instead of the comparison")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: automatic)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    tiny = args.tiny or not on_gpu
    grid = TINY_GRID if tiny else QUICK_GRID if args.quick else FULL_GRID
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 is not supported by the Triton interpreter
    warmup, iters = (1, args.iters or 2) if tiny else (3, args.iters or 10)
    if args.sweep:
        rows = sweep(device, dtype, tiny)
        print(f"wrote {write_results('linear_cross_entropy_sweep', rows)}")
        return
    providers = make_providers(include_compile=on_gpu and not args.no_compile, chunk_size=args.chunk_size)

    rows = []
    for n, d, v in grid:
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(n, d, device=device, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, device=device, generator=gen) / d**0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device, generator=gen)
        targets[::17] = -100  # some ignored tokens, as with padding
        results = {}
        for name, fn in providers.items():
            try:
                ms, mem, loss = measure(fn, hidden, weight, targets, warmup, iters)
            except torch.cuda.OutOfMemoryError:
                ms = mem = loss = float("nan")
                name_note = "oom"
            else:
                name_note = ""
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            results[name] = (ms, mem)
            rows.append(dict(provider=name, N=n, d=d, V=v, dtype=str(dtype).replace("torch.", ""),
                             chunk=(args.chunk_size or default_chunk_size(n, v)) if name == "fasttrain" else "",
                             ms=ms, peak_mb=mem, loss=loss, note=name_note))
        base_ms, base_mem = results["torch"]
        peaks = (peak_flops(torch.device(device)), measured_matmul_flops(torch.device(device)) if on_gpu else None)
        for row in rows[-len(providers):]:
            row["time_vs_torch"] = row["ms"] / base_ms
            row["mem_vs_torch"] = row["peak_mb"] / base_mem if on_gpu else float("nan")
            if "torch_compile" in results:
                row["time_vs_compile"] = row["ms"] / results["torch_compile"][0]
                row["mem_vs_compile"] = row["peak_mb"] / results["torch_compile"][1]
            if "liger" in results:
                row["time_vs_liger"] = row["ms"] / results["liger"][0]
            row["tflops"] = 6 * n * d * v / row["ms"] / 1e9
            row.update(mfu_fields(row["tflops"] * 1e12, *peaks))
        del hidden, weight, targets
        path = write_results("linear_cross_entropy", rows, extra={"grid": "tiny" if tiny else "quick" if args.quick else "full"})

    print_table(rows, ["provider", "N", "d", "V", "chunk", "ms", "peak_mb", "time_vs_torch", "mem_vs_torch",
                       "time_vs_compile", "mem_vs_compile", "time_vs_liger", "tflops", "mfu", "loss", "note"])
    path = write_results("linear_cross_entropy", rows, extra={"grid": "tiny" if tiny else "quick" if args.quick else "full"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
