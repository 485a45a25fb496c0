"""Held-out test loss, in nats per token and bits per byte.

Definition (fixed):
- Windows: the test split (documents never trained on) is cut into consecutive windows of seq_len + 1
  tokens, exactly as training cuts the train split (windows cross document boundaries). The evaluation
  reads n = min(available, max(1, max_tokens // seq_len)) windows spread evenly over the whole split
  (first and last included), so the sample is deterministic and covers every part of the split.
- Loss: mean next-token cross-entropy in nats over every predicted token of those windows (seq_len per
  window), at every context length from 1 to seq_len, as in training.
- Bits per byte: the summed loss in bits divided by the UTF-8 bytes of the predicted tokens (a byte-level
  BPE token stands for exactly len(token) bytes; end-of-text counts 0 bytes but its loss counts). It
  compares models with different tokenizers.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fasttrain.eval.common import count_windows, evenly_spaced, read_windows, token_byte_lengths, token_losses


def windows_loss(model, dataset, split: str, window_ids, seq_len: int, batch_size: int, device=None,
                 byte_lengths: np.ndarray | None = None) -> dict:
    """Mean loss (nats/token), bits per byte and token count over the given windows of a split."""
    windows = read_windows(dataset, split, window_ids, seq_len)
    losses = token_losses(model, windows, batch_size, device)
    return loss_record(float(losses.double().sum()), int(losses.numel()), predicted_bytes(dataset, windows, byte_lengths))


def predicted_bytes(dataset, windows: np.ndarray, byte_lengths: np.ndarray | None = None) -> int:
    """UTF-8 bytes of the predicted tokens (windows[:, 1:]) of windows (n, T + 1)."""
    if byte_lengths is None:
        byte_lengths = token_byte_lengths(dataset.tokenizer, dataset.vocab_size)
    return int(byte_lengths[np.clip(windows[:, 1:], 0, len(byte_lengths) - 1)].sum())


def loss_record(total_nats: float, tokens: int, n_bytes: int) -> dict:
    return {"loss": total_nats / max(tokens, 1), "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
            "tokens": tokens}


def heldout_window_ids(dataset, seq_len: int, max_tokens: int) -> np.ndarray:
    """The test windows that heldout_loss reads (see the module docstring)."""
    available = count_windows(dataset, "test", seq_len)  # a dataset without a test split raises here
    if available == 0:
        raise ValueError(f"the test split holds fewer than {seq_len + 1} tokens, too few for one window of "
                         f"seq_len {seq_len}: prepare the dataset with a larger test fraction")
    return evenly_spaced(available, max(1, max_tokens // seq_len))


def heldout_record(result: dict) -> dict:
    return {"test_loss": result["loss"], "test_bits_per_byte": result["bits_per_byte"], "test_tokens": result["tokens"]}


@torch.no_grad()
def heldout_loss(model, dataset, seq_len: int, max_tokens: int, batch_size: int, device) -> dict:
    """Test loss over about max_tokens predicted tokens of the held-out split (see the module docstring)."""
    ids = heldout_window_ids(dataset, seq_len, max_tokens)
    return heldout_record(windows_loss(model, dataset, "test", ids, seq_len, batch_size, device))
