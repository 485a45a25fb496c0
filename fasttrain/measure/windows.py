"""Reading a model's data for measurement: window sampling, per-token losses, token byte lengths, special tokens.

Every evaluation reads its data deterministically (evenly spaced windows or a seeded generator), so two
evaluations of the same checkpoint on the same dataset agree exactly on a CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from fasttrain.data.dataset import num_windows
from fasttrain.data.dataset import read_windows as read_split_windows


def evenly_spaced(total: int, n: int) -> np.ndarray:
    """n distinct indices spread evenly over [0, total), first and last included: a deterministic sample
    that covers the whole range (the start of a split may be one source or document, the end another)."""
    n = min(int(n), int(total))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    return np.floor(np.arange(n, dtype=np.float64) * (total - 1) / (n - 1) + 0.5).astype(np.int64)


def split_of(dataset, name: str):
    """The IndexedDataset of a split; a dataset without it raises its own clear error."""
    return getattr(dataset, name)


def count_windows(dataset, split: str, seq_len: int) -> int:
    return num_windows(split_of(dataset, split), seq_len)


def read_windows(dataset, split: str, window_ids, seq_len: int) -> np.ndarray:
    """Windows of seq_len + 1 tokens (the model reads w[:-1] and predicts w[1:]), as int64."""
    ids = np.asarray(window_ids, dtype=np.int64)
    out = np.empty((ids.size, seq_len + 1), dtype=np.int64)
    return read_split_windows(split_of(dataset, split), ids, seq_len, out=out)


def window_documents(dataset, split: str, window_ids, seq_len: int) -> np.ndarray:
    """The document of each window (of seq_len + 1 tokens): the one holding its middle token. A document is
    the run of sequences between two doc_idx entries (one sequence per document in the files we write).
    Binary searches in the index: nothing proportional to the split's size is read."""
    s = split_of(dataset, split)
    middle = np.asarray(window_ids, dtype=np.int64) * (seq_len + 1) + seq_len // 2
    sequence = np.searchsorted(s.pointers, middle * s.dtype.itemsize, side="right") - 1
    doc_idx = s.doc_idx
    if len(doc_idx) >= 2 and int(doc_idx[-1]) == len(s.sizes):
        return np.searchsorted(doc_idx, sequence, side="right") - 1
    return sequence


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_losses(model, windows: np.ndarray | torch.Tensor, batch_size: int, device=None) -> torch.Tensor:
    """Next-token losses (nats) of windows (n, T + 1): a float32 CPU tensor (n, T) whose column t is the
    loss of predicting windows[:, t + 1] from windows[:, :t + 1]."""
    device = device or model_device(model)
    windows = torch.as_tensor(windows, dtype=torch.int64)
    model.eval()
    out = []
    for start in range(0, windows.shape[0], max(1, batch_size)):
        chunk = windows[start:start + batch_size].to(device)
        out.append(model(chunk[:, :-1], chunk[:, 1:], reduction="none").float().cpu())
    if not out:
        return torch.zeros(0, max(windows.shape[1] - 1, 0))
    return torch.cat(out)


def special_token_ids(dataset) -> set[int]:
    """The end-of-text token and every special token the tokenizer declares."""
    ids = {int(dataset.eot_id)}
    decoder = dataset.tokenizer.get_added_tokens_decoder()
    ids.update(int(i) for i, tok in decoder.items() if getattr(tok, "special", True))
    return ids


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes of text that each token id stands for; special tokens (end-of-text) count 0 bytes.

    For a byte-level BPE every character of a token's string is one byte, so the sum over the tokens of a
    text is exactly its UTF-8 length, with no error where a window cuts a multi-byte character. Other
    tokenizers fall back to the length of each token decoded alone."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special = {int(i) for i, tok in tokenizer.get_added_tokens_decoder().items() if getattr(tok, "special", True)}
    byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
    for i in range(min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))):
        if i in special:
            continue
        if byte_level:
            token = tokenizer.id_to_token(i)
            lengths[i] = len(token) if token is not None else 0
        else:
            lengths[i] = len(tokenizer.decode([i], skip_special_tokens=True).encode("utf-8"))
    return lengths
