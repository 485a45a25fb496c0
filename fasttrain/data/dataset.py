"""A prepared dataset folder: open it, check it against its manifest, and cut its splits into windows.

Folder layout (written by `fasttrain prepare`):
    manifest.json      format, dtype, vocab size, EOT id, per-split token/document counts, sha256 of each file
    tokenizer.json     the byte-level BPE (Hugging Face `tokenizers` format)
    train.bin/.idx     GPT-NeoX/Megatron MMapIndexedDataset, one sequence per document, each ending in EOT
    test.bin/.idx      the held-out documents (absent when prepared with test_fraction = 0)

A dataset registered with `fasttrain prepare --from-indexed` (external.py) has no token files of its own:
its manifest names existing .bin/.idx files by absolute path, and each split is a range of their
documents (`prefix`, `document_range`). The tokenizer.json is copied into the folder.

Verification (`open_dataset(path, verify=True)`): every file must exist with the byte size the manifest
records and the .idx files must agree with their .bin files (header, file sizes, document counts, token
counts); that is always checked and costs nothing. Then each file's sha256 is compared with the manifest,
for every file whose manifest entry has one (registered external files have one only when registered with
--hash). Hashing reads every byte once (about 1 GB/s), so a successful check is remembered in
`.verified.json` beside the files, keyed on each file's (size, modification time): later opens of an
unchanged folder skip the hashing. `verify="full"` ignores that record; `verify=False` keeps only the size
and structure checks.

Training windows: a split's .bin is one flat token array (documents back to back, each ending in EOT).
Window j is tokens [j * (seq_len + 1), (j + 1) * (seq_len + 1)): consecutive and non-overlapping, crossing
document boundaries; the model reads w[:-1] and predicts w[1:].
"""
import hashlib
import json
import os

import numpy as np
import torch
from tokenizers import Tokenizer

from .indexed import IndexedDataset, IndexedDatasetError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
VERIFIED_RECORD = ".verified.json"
FORMAT_NAME = "megatron-mmap-indexed"
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset folder that is missing, incomplete or does not match its manifest."""


class MissingSplitError(DatasetError):
    """The dataset has no (or an empty) split that was asked for."""


def file_sha256(path, block=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _rebuild_hint():
    return "re-run `fasttrain prepare` to rebuild the dataset"


class PreparedDataset:
    """An opened dataset folder. `.train` / `.test` are IndexedDatasets; `.tokenizer` loads on first use."""

    def __init__(self, path, manifest):
        self.path = os.fspath(path)
        self.manifest = manifest
        self.vocab_size = int(manifest["vocab_size"])
        self.eot_id = int(manifest["eot_id"])
        self.dtype = np.dtype(manifest["dtype"])
        self._splits = {}
        self._tokenizer = None

    def _split(self, name):
        info = self.manifest["splits"].get(name)
        if info is None or info["documents"] == 0:
            why = "no" if info is None else "an empty"
            hint = (
                "re-run `fasttrain prepare` with --test-fraction > 0 (or more documents) to get held-out data"
                if name == "test"
                else _rebuild_hint()
            )
            raise MissingSplitError(f"{self.path}: the dataset has {why} '{name}' split; {hint}")
        if name not in self._splits:
            self._splits[name] = open_split(self.path, name, info)
        return self._splits[name]

    @property
    def train(self):
        return self._split("train")

    @property
    def test(self):
        return self._split("test")

    @property
    def has_test(self):
        info = self.manifest["splits"].get("test")
        return bool(info and info["documents"] > 0)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(os.path.join(self.path, TOKENIZER))
        return self._tokenizer

    def decode(self, token_ids):
        """Token ids -> text (EOT shown as <|endoftext|>)."""
        return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=False)

    def __repr__(self):
        counts = {k: v["tokens"] for k, v in self.manifest["splits"].items()}
        return f"PreparedDataset({self.path!r}, vocab_size={self.vocab_size}, tokens={counts})"


def _load_manifest(path):
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such dataset folder; create it with `fasttrain prepare --out {path}`")
    if not os.path.exists(manifest_path):
        raise DatasetError(f"{manifest_path}: missing, so this is not a prepared dataset; {_rebuild_hint()}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{manifest_path}: unreadable ({e}); {_rebuild_hint()}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    for key in ("dtype", "vocab_size", "eot_id", "splits", "files"):
        if key not in manifest:
            raise DatasetError(f"{manifest_path}: has no '{key}' entry; {_rebuild_hint()}")
    return manifest


def open_split(path, name, info):
    """A split's IndexedDataset: the folder's own <name>.bin/.idx, or a document range of registered files."""
    if "prefix" not in info:
        return IndexedDataset(os.path.join(path, name))
    start, stop = info["document_range"]
    whole = IndexedDataset(info["prefix"])
    if stop > whole.num_documents:
        raise IndexedDatasetError(
            f"{whole.idx_path}: {whole.num_documents} documents, but the manifest's '{name}' split needs "
            f"documents {start} to {stop}"
        )
    return whole.document_range(start, stop)


def _read_verified_record(path):
    try:
        with open(os.path.join(path, VERIFIED_RECORD)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _write_verified_record(path, record):
    target = os.path.join(path, VERIFIED_RECORD)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, target)
    except OSError:  # a read-only dataset folder: hash again next time
        if os.path.exists(tmp):
            os.remove(tmp)


def open_dataset(path, verify=True):
    """Open a prepared dataset folder, refusing one whose files do not match its manifest.

    verify: True (sizes + structure always; sha256 unless an unchanged folder was verified before),
    "full" (sha256 of every file now), False (sizes + structure only).
    """
    path = os.fspath(path)
    manifest = _load_manifest(path)
    files = manifest["files"]
    stats = {}
    for name, info in files.items():
        file_path = os.path.join(path, name)
        if not os.path.exists(file_path):
            raise DatasetError(f"{file_path}: missing; {_rebuild_hint()}")
        st = os.stat(file_path)
        if st.st_size != info["bytes"]:
            raise DatasetError(
                f"{file_path}: {st.st_size} bytes but the manifest records {info['bytes']}; the file is "
                f"truncated, edited or from another dataset; {_rebuild_hint()}"
            )
        stats[name] = [st.st_size, st.st_mtime_ns]

    dataset = PreparedDataset(path, manifest)
    for split, info in manifest["splits"].items():
        try:
            ds = open_split(path, split, info)
        except IndexedDatasetError as e:
            raise DatasetError(f"{e}; {_rebuild_hint()}") from None
        if ds.dtype != dataset.dtype or ds.num_tokens != info["tokens"] or ds.num_documents != info["documents"]:
            raise DatasetError(
                f"{ds.idx_path}: holds {ds.num_documents} documents / {ds.num_tokens} {ds.dtype} tokens but the "
                f"manifest records {info['documents']} / {info['tokens']} {dataset.dtype}; {_rebuild_hint()}"
            )
        dataset._splits[split] = ds

    if verify:
        record = {} if verify == "full" else _read_verified_record(path)
        changed = False
        for name, info in files.items():
            entry = record.get(name)
            if info.get("sha256") is None or (entry and entry[:2] == stats[name] and entry[2] == info["sha256"]):
                continue
            digest = file_sha256(os.path.join(path, name))
            if digest != info["sha256"]:
                raise DatasetError(
                    f"{os.path.join(path, name)}: sha256 {digest[:12]}... does not match the manifest's "
                    f"{info['sha256'][:12]}...; the file was changed or mixed up; {_rebuild_hint()}"
                )
            record[name] = stats[name] + [digest]
            changed = True
        if changed:
            _write_verified_record(path, {k: record[k] for k in files if k in record})
    return dataset


# ---- windows ----------------------------------------------------------------------------------------
def num_windows(split, seq_len):
    """Consecutive, non-overlapping windows of seq_len + 1 tokens in a split (the tail is dropped)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return split.num_tokens // (seq_len + 1)


def read_windows(split, window_ids, seq_len, out=None):
    """Windows -> array (n, seq_len + 1); row k holds tokens [w_k * (seq_len+1), (w_k + 1) * (seq_len+1)).

    `out` may be a preallocated (n, seq_len + 1) array of any integer dtype (e.g. the numpy view of a pinned
    torch.int64 tensor); the tokens are converted into it.
    """
    window_ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
    width = seq_len + 1
    available = split.num_tokens // width
    if window_ids.size and (window_ids.min() < 0 or window_ids.max() >= available):
        raise IndexError(f"window ids must lie in [0, {available}) for seq_len {seq_len}")
    if out is None:
        out = np.empty((window_ids.size, width), dtype=split.dtype)
    elif out.shape != (window_ids.size, width):
        raise ValueError(f"out has shape {out.shape}, expected {(window_ids.size, width)}")
    # Windows are aligned on multiples of seq_len + 1, so the flat token array viewed as (available,
    # seq_len + 1) has one window per row: a batch is one row gather (in C), then one conversion into `out`.
    rows = split.tokens[: available * width].reshape(available, width)
    out[...] = rows[window_ids]
    return out


def iter_windows(split, seq_len, batch_size, window_ids=None, limit=None):
    """Yield torch.int64 tensors (<= batch_size, seq_len + 1) of windows, for evaluation.

    window_ids defaults to every window of the split in order; limit keeps the first `limit` of them.
    """
    if window_ids is None:
        window_ids = np.arange(num_windows(split, seq_len), dtype=np.int64)
    window_ids = np.asarray(window_ids, dtype=np.int64)
    if limit is not None:
        window_ids = window_ids[:limit]
    for start in range(0, window_ids.size, batch_size):
        ids = window_ids[start : start + batch_size]
        out = torch.empty((ids.size, seq_len + 1), dtype=torch.int64)
        read_windows(split, ids, seq_len, out=out.numpy())
        yield out
