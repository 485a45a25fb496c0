"""Sampler throughput: tokens/s that TrainingStream delivers per process, against a plain sequential read.

A synthetic train split of random uint16 tokens is written with IndexedDatasetWriter into a temporary
folder. For each (seq_len, global batch) the benchmark times
    sequential   contiguous slices of the mapped .bin, converted into an int64 tensor (pinned with CUDA):
                 the raw rate of reading the same file in order;
    batch        TrainingStream.batch(step, B): schedule lookup + a row gather of the windows (f=0.1, E=100);
    stream       TrainingStream.iter_batches(..., prefetch=0): consecutive steps, lookups done in blocks;
    prefetch     TrainingStream.iter_batches(..., prefetch=2): the same through the background thread.
    step_cost_*  extra time per step of a loop doing ~1 ms of pure-Python work (as a training loop
                 launching kernels does) when it reads each batch itself / through the thread.
It also times building a schedule for 100B tokens of 2048-token sequences (S = 48.8M) and looking up a
batch in it, with the memory that takes.

    python -m benchmarks.bench_sampler                    # 200M tokens with CUDA, 8M on a CPU
    python -m benchmarks.bench_sampler --tokens 50000000 --seq-lens 2048 --batches 64,512
"""
import argparse
import gc
import os
import resource
import shutil
import tempfile
import time
import tracemalloc

import numpy as np
import torch

from benchmarks.common import print_table, write_results
from fasttrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from fasttrain.data.sampler import TrainingStream
from fasttrain.data.schedule import RepetitionSchedule


def build_split(folder, num_tokens, seed=0):
    """Random uint16 tokens in documents of 100-4000 tokens."""
    rng = np.random.default_rng(seed)
    prefix = os.path.join(folder, "train")
    written = 0
    t0 = time.perf_counter()
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        while written < num_tokens:
            block = rng.integers(0, 65535, size=min(1 << 24, num_tokens - written), dtype=np.uint16)
            cuts = np.cumsum(rng.integers(100, 4000, size=block.size // 100 + 1))
            for doc in np.split(block, cuts[cuts < block.size]):
                writer.add_document(doc)
            written += block.size
    return IndexedDataset(prefix), time.perf_counter() - t0


def timed(fn, steps, min_seconds=0.3):
    """Seconds per call of fn(step) over consecutive steps (at least `steps` calls or min_seconds)."""
    fn(0)  # warm up: page faults, allocator
    t0 = time.perf_counter()
    n = 0
    while n < steps or time.perf_counter() - t0 < min_seconds:
        fn(1 + n % steps)
        n += 1
    return (time.perf_counter() - t0) / n


def busy_python(iterations=20_000):
    """About a millisecond of pure-Python work, holding the GIL like a training loop launching kernels."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def time_stream(stream, num_steps, global_batch, steps, prefetch, work=None, min_seconds=0.3):
    """Seconds per batch taken from iter_batches(prefetch=...), with optional consumer work per batch."""
    it = stream.iter_batches(0, num_steps, global_batch, prefetch=prefetch)
    next(it)
    t0 = time.perf_counter()
    k = 0
    while (k < steps or time.perf_counter() - t0 < min_seconds) and k + 2 < num_steps:
        next(it)
        if work is not None:
            work()
        k += 1
    elapsed = (time.perf_counter() - t0) / max(k, 1)
    it.close()
    return elapsed


def sequential_reader(split, seq_len, global_batch, pin):
    tokens = split.tokens
    width = seq_len + 1
    per_batch = global_batch * width
    max_batches = split.num_tokens // per_batch

    def read(step):
        start = (step % max_batches) * per_batch
        out = torch.empty((global_batch, width), dtype=torch.int64, pin_memory=pin)
        out.numpy().reshape(-1)[:] = tokens[start : start + per_batch]
        return out

    return read


def bench_throughput(split, seq_lens, batches, steps):
    pin = torch.cuda.is_available()
    rows = []
    for seq_len in seq_lens:
        width = seq_len + 1
        available = split.num_tokens // width
        for global_batch in batches:
            num_steps = int(available * 0.95) // global_batch  # f=0.1, E=100 needs ~0.9 S distinct windows
            if num_steps < 4:
                continue
            stream = TrainingStream(split, seq_len, num_steps * global_batch, 0.1, 100, "uniform", seed=0)
            n = min(steps, num_steps - 2)
            tokens_per_batch = global_batch * width
            seq_s = timed(sequential_reader(split, seq_len, global_batch, pin), n)
            batch_s = timed(lambda step: stream.batch(step, global_batch), n)

            stream_s = time_stream(stream, num_steps, global_batch, n, prefetch=0)
            prefetch_s = time_stream(stream, num_steps, global_batch, n, prefetch=2)
            # A training loop's own Python work (kernel launches) competes with a prefetch thread for the
            # GIL: the time a step loses to data loading, read in the loop and read by the thread.
            busy_s = timed(lambda step: busy_python(), n)
            cost_stream_s = time_stream(stream, num_steps, global_batch, n, 0, work=busy_python) - busy_s
            cost_prefetch_s = time_stream(stream, num_steps, global_batch, n, 2, work=busy_python) - busy_s
            for case, secs in (("sequential", seq_s), ("batch", batch_s), ("stream", stream_s),
                               ("prefetch", prefetch_s), ("step_cost_stream", cost_stream_s),
                               ("step_cost_prefetch", cost_prefetch_s)):
                row = {"case": case, "seq_len": seq_len, "global_batch": global_batch, "ms_per_batch": secs * 1e3,
                       "pinned": pin}
                if not case.startswith("step_cost"):  # those are differences of times, not read rates
                    row.update(tokens_per_s=tokens_per_batch / secs, vs_sequential=seq_s / secs)
                rows.append(row)
    return rows


def bench_big_schedule(total_tokens=100_000_000_000, seq_len=2048, global_batch=512):
    S = total_tokens // seq_len
    available = int(S * 1.2)
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    schedule = RepetitionSchedule(available, S, 0.1, 100, "uniform", seed=0, tokens_per_window=seq_len + 1)
    build_s = time.perf_counter() - t0
    step = S // global_batch // 2
    positions = np.arange(step * global_batch, (step + 1) * global_batch)
    lookups = []
    for _ in range(20):
        t0 = time.perf_counter()
        schedule.window_ids(positions)
        lookups.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    schedule.lookup(positions)  # with chronological pass indices (O(E) per repeated sequence)
    full_lookup_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "case": "schedule_100B", "num_sequences": S, "seq_len": seq_len, "n_repeated": schedule.n_rep,
        "build_ms": build_s * 1e3, "lookup_batch_ms": float(np.median(lookups)) * 1e3,
        "lookup_with_pass_ms": full_lookup_s * 1e3, "global_batch": global_batch,
        "peak_python_mb": peak / 2**20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000_000 if torch.cuda.is_available() else 8_000_000)
    parser.add_argument("--seq-lens", default="2048,512")
    parser.add_argument("--batches", default="64,256,512")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per case (at least 0.3 s)")
    parser.add_argument("--dir", default=None, help="where to write the synthetic split (default: a temp dir)")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="bench-sampler-", dir=args.dir)
    try:
        split, write_s = build_split(folder, args.tokens)
        print(f"synthetic split: {split.num_tokens:,} uint16 tokens, written in {write_s:.1f}s "
              f"({split.num_tokens / write_s / 1e6:.0f}M tokens/s)")
        rows = bench_throughput(
            split, [int(x) for x in args.seq_lens.split(",")], [int(x) for x in args.batches.split(",")], args.steps
        )
        del split
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(rows, ["case", "seq_len", "global_batch", "ms_per_batch", "tokens_per_s", "vs_sequential", "pinned"])
    big = bench_big_schedule()
    print()
    print_table([big], ["case", "num_sequences", "n_repeated", "build_ms", "lookup_batch_ms", "lookup_with_pass_ms",
                        "peak_python_mb"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = write_results("sampler", rows + [big], extra={"synthetic_tokens": args.tokens, "max_rss_mb": rss})
    print(f"\nmax RSS {rss:.0f} MB; results: {path}")


if __name__ == "__main__":
    main()
