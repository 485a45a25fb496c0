"""Memorization against generalization: loss on the repeated subset and on unique windows already seen.

Definitions (fixed):
- The training schedule is rebuilt from the run's config (data.*, train.steps x train.global_batch
  sequences, the same seed), so the evaluation knows exactly which train windows were repeated and which
  positions of the training stream the checkpoint has consumed (step x global_batch sequences).
- Repeated-subset loss: mean next-token loss over n = min(n_repeated, max(1, max_tokens // seq_len))
  repeated windows, spread evenly over the subset's index order (which is itself a random order of the
  subset). `repeated_times_seen` is how many of its repeat_count passes an average sampled window had
  gone through at the checkpoint. When this loss approaches zero the subset is memorized.
- Seen-unique loss: mean loss over n unique (seen once) windows from positions the checkpoint has
  already trained on, chosen evenly spaced over those positions (so early and late ones both count).
  Its gap below the test loss is memorization of data seen once; the test loss itself is the
  generalization reference.
- Both read the train split exactly as training does (windows of seq_len + 1 tokens). Absent (None) when
  the run has no repeated data, or when the checkpoint has trained on nothing yet.
"""
from __future__ import annotations

import math

import numpy as np

from fasttrain.eval.common import evenly_spaced
from fasttrain.eval.loss import windows_loss


def training_schedule(dataset, cfg):
    """The RepetitionSchedule the trainer used for this config and dataset."""
    from fasttrain.data.sampler import TrainingStream

    return TrainingStream.from_config(dataset, cfg, pin_memory=False).schedule


def repeated_subset_loss(model, dataset, schedule, seq_len: int, max_tokens: int, batch_size: int,
                         device=None, trained_sequences: int | None = None,
                         byte_lengths: np.ndarray | None = None) -> dict:
    """Loss on a deterministic sample of the repeated subset; {} when nothing is repeated."""
    if schedule.n_rep == 0:
        return {}
    indices = evenly_spaced(schedule.n_rep, max(1, max_tokens // seq_len))
    window_ids = schedule.repeated_window_ids()[indices]
    result = windows_loss(model, dataset, "train", window_ids, seq_len, batch_size, device, byte_lengths)
    E = schedule.repeat_count
    if trained_sequences is None or trained_sequences >= schedule.num_sequences:
        times_seen = float(E)
    else:  # count, per sampled window, its passes at positions already trained on
        seen = [int((schedule.positions_of_repeated(r) < trained_sequences).sum()) for r in indices.tolist()]
        times_seen = float(np.mean(seen))
    return {
        "repeated_loss": result["loss"],
        "repeated_bits_per_byte": result["bits_per_byte"],
        "repeated_tokens": result["tokens"],
        "repeated_windows_total": int(schedule.n_rep),
        "repeated_times_seen": times_seen,
    }


def seen_unique_positions(schedule, trained_sequences: int, n: int) -> np.ndarray:
    """Up to n positions in [0, trained_sequences) holding unique windows, evenly spread, deterministic."""
    trained = min(int(trained_sequences), schedule.num_sequences)
    if trained <= 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    repeated_ids = schedule.repeated_window_ids()
    unique_share = max(schedule.n_unique / schedule.num_sequences, 1e-6)
    m = min(trained, int(math.ceil(1.5 * n / unique_share)) + 8)
    while True:
        positions = evenly_spaced(trained, m)
        unique = positions[~np.isin(schedule.window_ids(positions), repeated_ids)]
        if unique.size >= n or m == trained:
            break
        m = min(trained, 2 * m)
    return unique[evenly_spaced(unique.size, n)]


def seen_unique_loss(model, dataset, schedule, seq_len: int, trained_sequences: int, max_tokens: int,
                     batch_size: int, device=None, byte_lengths: np.ndarray | None = None) -> dict:
    """Loss on unique windows the checkpoint has trained on; {} before the first step."""
    positions = seen_unique_positions(schedule, trained_sequences, max(1, max_tokens // seq_len))
    if positions.size == 0:
        return {}
    window_ids = schedule.window_ids(positions)
    result = windows_loss(model, dataset, "train", window_ids, seq_len, batch_size, device, byte_lengths)
    return {
        "seen_unique_loss": result["loss"],
        "seen_unique_bits_per_byte": result["bits_per_byte"],
        "seen_unique_tokens": result["tokens"],
    }
