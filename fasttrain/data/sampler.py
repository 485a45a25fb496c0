"""The training stream: the repetition schedule applied to the train split's windows, batch by batch.

Global batch `step` is positions [step * B, (step + 1) * B) of the schedule. With W data-parallel ranks,
rank r reads the contiguous slice [r * B/W, (r + 1) * B/W) of it, so every sequence is read by exactly
one rank and the global order is the same for any W, micro-batch size or gradient accumulation (a rank
splits its slice into micro-batches in order). Nothing depends on earlier steps: resuming at step K
reads exactly what an uninterrupted run would have read at step K.
"""
import queue
import threading

import numpy as np
import torch

from fasttrain.config import ConfigError

from .dataset import num_windows, open_dataset, read_windows
from .schedule import RepetitionSchedule


class TrainingStream:
    """Batches of token windows (inputs = w[:, :-1], targets = w[:, 1:]) in the schedule's exact order.

    Args:
        dataset: a PreparedDataset (its train split is used) or an IndexedDataset.
        seq_len: model context; windows hold seq_len + 1 tokens.
        num_sequences: S = steps * global_batch.
        repeated_fraction, repeat_count, placement, seed: see RepetitionSchedule.
        pin_memory: pin the returned tensors (default: when CUDA is available).
    """

    def __init__(
        self,
        dataset,
        seq_len,
        num_sequences,
        repeated_fraction=0.0,
        repeat_count=1,
        placement="uniform",
        seed=0,
        pin_memory=None,
    ):
        self.dataset = dataset
        self.split = dataset.train if hasattr(dataset, "train") else dataset
        self.seq_len = int(seq_len)
        self.schedule = RepetitionSchedule(
            num_windows(self.split, self.seq_len),
            num_sequences,
            repeated_fraction,
            repeat_count,
            placement=placement,
            seed=seed,
            tokens_per_window=self.seq_len + 1,
        )
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.lookup_block = 1 << 15  # sequences whose windows iter_batches looks up in one go

    @classmethod
    def from_config(cls, dataset, cfg, pin_memory=None):
        """The stream a run config describes: cfg.data.*, over cfg.train.steps global batches."""
        return cls(
            dataset,
            seq_len=cfg.data.seq_len,
            num_sequences=cfg.train.steps * cfg.train.global_batch,
            repeated_fraction=cfg.data.repeated_fraction,
            repeat_count=cfg.data.repeat_count,
            placement=cfg.data.placement,
            seed=cfg.data.seed,
            pin_memory=pin_memory,
        )

    @property
    def num_sequences(self):
        return self.schedule.num_sequences

    def num_steps(self, global_batch):
        return self.num_sequences // global_batch

    def global_batch_positions(self, step, global_batch):
        """Schedule positions of global batch `step`: step * B ... step * B + B - 1."""
        step, global_batch = int(step), int(global_batch)
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if step < 0 or (step + 1) * global_batch > self.num_sequences:
            raise IndexError(
                f"step {step} is outside the schedule: {self.num_sequences} sequences make "
                f"{self.num_sequences // global_batch} steps of global batch {global_batch}"
            )
        return np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)

    def rank_positions(self, step, global_batch, rank=0, world_size=1):
        """The slice of global batch `step` that `rank` of `world_size` reads."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the {world_size} data-parallel ranks; "
                "choose a global batch that is a multiple of the number of processes"
            )
        per_rank = global_batch // world_size
        return self.global_batch_positions(step, global_batch)[rank * per_rank : (rank + 1) * per_rank]

    def read_positions(self, positions):
        """Token windows at schedule positions, as a torch.int64 tensor (n, seq_len + 1)."""
        window_ids = self.schedule.window_ids(positions)
        return self.read_windows(window_ids)

    def read_windows(self, window_ids):
        """Windows of the train split by id (e.g. the repeated subset for evaluation), torch.int64."""
        out = torch.empty((len(window_ids), self.seq_len + 1), dtype=torch.int64, pin_memory=self.pin_memory)
        read_windows(self.split, window_ids, self.seq_len, out=out.numpy())
        return out

    def batch(self, step, global_batch, rank=0, world_size=1):
        """This rank's share of global batch `step`: torch.int64 (global_batch // world_size, seq_len + 1)."""
        return self.read_positions(self.rank_positions(step, global_batch, rank, world_size))

    def iter_batches(self, start_step, num_steps, global_batch, rank=0, world_size=1, prefetch=2,
                     with_repeated=False):
        """Yield the batches of steps start_step .. start_step + num_steps - 1, exactly as batch() returns
        them, in that order; with_repeated: (batch, is_repeated), the second a numpy bool per sequence
        (from the same schedule lookup, at no extra cost).

        The schedule is evaluated for many steps at a time (lookup_block sequences), which makes this
        cheaper per batch than batch(). prefetch >= 1 reads ahead in a background thread, holding at most
        `prefetch` batches; prefetch=0 reads each batch when it is asked for. Closing the generator (or
        breaking out of the loop) stops the thread.
        """
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if num_steps > 0:  # errors now, not at the first next()
            self.rank_positions(start_step, global_batch, rank, world_size)
            self.global_batch_positions(start_step + num_steps - 1, global_batch)
        steps = range(start_step, start_step + num_steps)
        if prefetch < 1:
            return self._read_steps(steps, global_batch, rank, world_size, with_repeated)
        return self._prefetching(steps, global_batch, rank, world_size, prefetch, with_repeated)

    def _read_steps(self, steps, global_batch, rank, world_size, with_repeated=False):
        """Batches of consecutive steps. The schedule is evaluated for many steps at once (about
        lookup_block sequences): the same pure function, with its fixed numpy cost paid once per block."""
        per_rank = global_batch // world_size
        steps_per_block = max(1, self.lookup_block // per_rank)
        offsets = rank * per_rank + np.arange(per_rank, dtype=np.int64)
        for first in range(steps.start, steps.stop, steps_per_block):
            count = min(steps_per_block, steps.stop - first)
            positions = (first + np.arange(count, dtype=np.int64))[:, None] * global_batch + offsets[None, :]
            window_ids, repeated, _ = self.schedule.lookup(positions.reshape(-1), with_pass=False)
            window_ids, repeated = window_ids.reshape(count, per_rank), repeated.reshape(count, per_rank)
            for k in range(count):
                batch = self.read_windows(window_ids[k])
                yield (batch, repeated[k]) if with_repeated else batch

    def _prefetching(self, steps, global_batch, rank, world_size, prefetch, with_repeated):
        return read_ahead(self._read_steps(steps, global_batch, rank, world_size, with_repeated), len(steps),
                          prefetch)

    def describe_batch(self, step, global_batch):
        """Which windows make up global batch `step`: dict of numpy arrays (one entry per sequence)."""
        positions = self.global_batch_positions(step, global_batch)
        window_ids, repeated, passes = self.schedule.lookup(positions)
        return {
            "step": int(step),
            "positions": positions,
            "window_ids": window_ids,
            "is_repeated": repeated,
            "pass_index": passes,
        }

    def __repr__(self):
        return f"TrainingStream(seq_len={self.seq_len}, {self.schedule!r})"


def read_ahead(items, count, prefetch):
    """Yield the first `count` items of the iterator `items`, produced in a background thread that holds at
    most `prefetch` of them ahead. An exception in the thread is raised here; closing the generator (or
    breaking out of the loop) stops the thread."""
    slots = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            slots.put(e)

    worker = threading.Thread(target=produce, name="fasttrain-prefetch", daemon=True)
    worker.start()
    try:
        for _ in range(count):
            item = slots.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)


def iter_stacked_batches(streams, start_step, num_steps, global_batch, rank=0, world_size=1, prefetch=0,
                         pin_memory=False):
    """The batches of several streams (the runs of a pack, or one run) step by step: (tokens, repeated) with
    tokens (len(streams), global_batch // world_size, seq_len + 1) int64, stream k's batch() of the step in
    tokens[k], and repeated the list of each stream's per-sequence numpy bools.

    prefetch >= 1: every stream is read, and the step stacked, in one background thread holding at most
    `prefetch` steps ahead, so that on a GPU reading K streams overlaps the device's work instead of
    standing between two steps; prefetch=0 reads each step when it is asked for. pin_memory: stack into
    page-locked memory, from which a copy to a GPU is asynchronous."""
    readers = [stream.iter_batches(start_step, num_steps, global_batch, rank=rank, world_size=world_size,
                                   prefetch=0, with_repeated=True) for stream in streams]

    def steps():
        for read in zip(*readers):
            tokens = torch.empty((len(read), *read[0][0].shape), dtype=torch.int64, pin_memory=pin_memory)
            torch.stack([batch for batch, _ in read], out=tokens)
            yield tokens, [repeated for _, repeated in read]

    if prefetch < 1:
        return steps()
    return read_ahead(steps(), num_steps, prefetch)


def open_training_stream(cfg, verify=True, pin_memory=None):
    """(dataset, stream) for a run config: opens (and verifies) cfg.data.path, builds the schedule."""
    if not cfg.data.path:
        raise ConfigError("data.path: not set (prepare a dataset with `fasttrain prepare` and point data.path to it)")
    dataset = open_dataset(cfg.data.path, verify=verify)
    return dataset, TrainingStream.from_config(dataset, cfg, pin_memory=pin_memory)
