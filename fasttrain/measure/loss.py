"""Next-token loss over windows of a dataset: the held-out test loss, the loss on the repeated subset and on
unique windows already seen. The trainer logs the first two while it trains; the evaluations report all three.

Held-out test loss (fixed definition):
- Windows: the test split (documents never trained on) is cut into consecutive windows of seq_len + 1
  tokens, exactly as training cuts the train split (windows cross document boundaries). The evaluation
  reads n = min(available, max(1, max_tokens // seq_len)) windows spread evenly over the whole split
  (first and last included), so the sample is deterministic and covers every part of the split.
- Loss: mean next-token cross-entropy in nats over every predicted token of those windows (seq_len per
  window), at every context length from 1 to seq_len, as in training.
- Standard error (test_loss_stderr): of the mean of the per-window losses, windows grouped by the document
  holding their middle token (windows of one document are correlated; fasttrain.measure.stats); None when
  the windows come from a single document. The same holds for repeated_loss_stderr and
  seen_unique_loss_stderr (train-split documents).
- Bits per byte: the summed loss in bits divided by the UTF-8 bytes of the predicted tokens (a byte-level
  BPE token stands for exactly len(token) bytes; end-of-text counts 0 bytes but its loss counts). It
  compares models with different tokenizers.

Repeated-subset and seen-unique losses (fixed definitions):
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
import torch

from fasttrain.data.sampler import TrainingStream
from fasttrain.measure.stats import mean_and_stderr
from fasttrain.measure.windows import (count_windows, evenly_spaced, read_windows, token_byte_lengths, token_losses,
                                       window_documents)


def windows_loss(model, dataset, split: str, window_ids, seq_len: int, batch_size: int, device=None,
                 byte_lengths: np.ndarray | None = None) -> dict:
    """Mean loss (nats/token), its standard error, bits per byte and token count over the given windows of a
    split."""
    windows = read_windows(dataset, split, window_ids, seq_len)
    losses = token_losses(model, windows, batch_size, device).double()
    _, stderr = mean_and_stderr(losses.mean(dim=1).numpy(), window_documents(dataset, split, window_ids, seq_len))
    return loss_record(float(losses.sum()), int(losses.numel()), predicted_bytes(dataset, windows, byte_lengths),
                       stderr)


def predicted_bytes(dataset, windows: np.ndarray, byte_lengths: np.ndarray | None = None) -> int:
    """UTF-8 bytes of the predicted tokens (windows[:, 1:]) of windows (n, T + 1)."""
    if byte_lengths is None:
        byte_lengths = token_byte_lengths(dataset.tokenizer, dataset.vocab_size)
    return int(byte_lengths[np.clip(windows[:, 1:], 0, len(byte_lengths) - 1)].sum())


def loss_record(total_nats: float, tokens: int, n_bytes: int, stderr: float | None = None) -> dict:
    """stderr: of the loss (see the module docstring; None when it cannot be estimated)."""
    return {"loss": total_nats / max(tokens, 1), "stderr": stderr,
            "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1), "tokens": tokens}


def heldout_window_ids(dataset, seq_len: int, max_tokens: int) -> np.ndarray:
    """The test windows that heldout_loss reads (see the module docstring)."""
    available = count_windows(dataset, "test", seq_len)  # a dataset without a test split raises here
    if available == 0:
        raise ValueError(f"the test split holds fewer than {seq_len + 1} tokens, too few for one window of "
                         f"seq_len {seq_len}: prepare the dataset with a larger test fraction")
    return evenly_spaced(available, max(1, max_tokens // seq_len))


def heldout_record(result: dict) -> dict:
    return {"test_loss": result["loss"], "test_loss_stderr": result["stderr"],
            "test_bits_per_byte": result["bits_per_byte"], "test_tokens": result["tokens"]}


@torch.no_grad()
def heldout_loss(model, dataset, seq_len: int, max_tokens: int, batch_size: int, device) -> dict:
    """Test loss over about max_tokens predicted tokens of the held-out split (see the module docstring)."""
    ids = heldout_window_ids(dataset, seq_len, max_tokens)
    return heldout_record(windows_loss(model, dataset, "test", ids, seq_len, batch_size, device))

def training_schedule(dataset, cfg):
    """The RepetitionSchedule the trainer used for this config and dataset."""
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
        "repeated_loss_stderr": result["stderr"],
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
        "seen_unique_loss_stderr": result["stderr"],
        "seen_unique_bits_per_byte": result["bits_per_byte"],
        "seen_unique_tokens": result["tokens"],
    }
