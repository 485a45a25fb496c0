"""Held-out test loss, in nats per token and bits per byte."""
from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def heldout_loss(model, dataset, seq_len: int, max_tokens: int, batch_size: int, device) -> dict:
    """Mean next-token loss over the first max_tokens tokens of the test split (a fixed, deterministic set
    of seq_len windows, never trained on). Bits per byte divide the summed loss by the UTF-8 bytes of the
    predicted tokens, so tokenizers of different vocabularies compare."""
    n_windows = min(dataset.num_windows("test", seq_len), max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise ValueError(f"the test split holds fewer than {seq_len + 1} tokens: prepare with a larger test fraction")
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        ids = np.arange(start, min(start + batch_size, n_windows))
        windows = torch.from_numpy(dataset.read_windows("test", ids, seq_len).astype(np.int64)).to(device)
        losses = model(windows[:, :-1], windows[:, 1:], reduction="none").float()
        total_nats += losses.sum().item()
        total_tokens += losses.numel()
        total_bytes += sum(len(dataset.tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in windows.cpu())
    return {
        "test_loss": total_nats / total_tokens,
        "test_bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1),
        "test_tokens": total_tokens,
    }
