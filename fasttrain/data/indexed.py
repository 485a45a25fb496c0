"""GPT-NeoX / Megatron "MMapIndexedDataset" token files (.bin + .idx), as used for Pythia.

Layout (little-endian):
    .bin  the token arrays of all sequences back to back, no header.
    .idx  magic b"MMIDIDX\\x00\\x00" (9 bytes), u64 version (= 1), u8 dtype code, u64 N (sequences),
          u64 M (doc_idx length), int32 sizes[N], int64 pointers[N] (byte offsets into .bin),
          int64 doc_idx[M] (starts with 0, then one entry per document end).

Files written here hold one sequence per document (doc_idx = 0..N), like GPT-NeoX's preprocess_data.py,
so existing tooling reads them; files written by that tooling are read here.
"""
import copy
import hashlib
import os
import struct
import sys

import numpy as np
from tqdm import tqdm

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, N, M

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, truncated or not in the expected format."""


def token_dtype_for_vocab(vocab_size):
    """The smallest dtype GPT-NeoX uses for a vocabulary: uint16 when every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _paths(prefix):
    prefix = os.fspath(prefix)
    return prefix + ".bin", prefix + ".idx"


def read_index_header(idx_path):
    """Parse and check the fixed-size header of an .idx file: returns (dtype, N, M)."""
    try:
        file_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise IndexedDatasetError(f"{idx_path}: file not found") from None
    if header[: len(MAGIC)] != MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: not a GPT-NeoX/Megatron MMapIndexedDataset index (bad magic {header[:9]!r})"
        )
    if len(header) < HEADER_BYTES:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({len(header)} of {HEADER_BYTES} bytes)")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
    (code,) = struct.unpack("<B", header[17:18])
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: dtype code {code} is not an integer token type (known: 1-5, 8)")
    num_sequences, doc_idx_len = struct.unpack("<QQ", header[18:34])
    expected = HEADER_BYTES + 12 * num_sequences + 8 * doc_idx_len
    if file_size != expected:
        raise IndexedDatasetError(
            f"{idx_path}: {file_size} bytes but its header ({num_sequences} sequences, {doc_idx_len} doc_idx "
            f"entries) needs {expected}; the file is truncated or corrupt"
        )
    return DTYPE_CODES[code], num_sequences, doc_idx_len


class IndexedDataset:
    """Read-only, memory-mapped view of a .bin/.idx pair.

    `ds[i]` is the token array of sequence i (a view into the mapped .bin), `ds.tokens` the whole .bin as
    one flat token array (sequences are contiguous, so the training stream can cut windows across them).
    `ds.document_range(a, b)` is documents a..b-1 as a dataset of their own, a view: nothing is copied.
    """

    def __init__(self, prefix):
        self.prefix = os.fspath(prefix)
        # Where this dataset starts in its files: non-zero in a document_range view.
        self.token_offset = 0
        self.first_sequence = 0
        self.first_document = 0
        self.bin_path, self.idx_path = _paths(self.prefix)
        self.dtype, n, m = read_index_header(self.idx_path)
        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r") if n + m else None
        offset = HEADER_BYTES
        self.sizes = self._array(np.int32, n, offset)
        offset += 4 * n
        self.pointers = self._array(np.int64, n, offset)
        offset += 8 * n
        self.doc_idx = self._array(np.int64, m, offset)

        if not os.path.exists(self.bin_path):
            raise IndexedDatasetError(f"{self.bin_path}: file not found (its index {self.idx_path} exists)")
        bin_size = os.path.getsize(self.bin_path)
        if bin_size % self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{self.bin_path}: {bin_size} bytes is not a whole number of {self.dtype} tokens; truncated?"
            )
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if end != bin_size:
            raise IndexedDatasetError(
                f"{self.bin_path}: {bin_size} bytes but the index says its last sequence ends at byte {end}; "
                "the .bin is truncated or does not belong to this .idx"
            )
        self.num_tokens = bin_size // self.dtype.itemsize
        # A plain ndarray over the mapping: slicing an np.memmap costs several times more per call.
        # (np.memmap cannot map an empty file.)
        self.tokens = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r").view(np.ndarray)
            if bin_size
            else np.zeros(0, dtype=self.dtype)
        )

    def _array(self, dtype, count, offset):
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.frombuffer(self._idx, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        n = len(self.sizes)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        start = int(self.pointers[i]) // self.dtype.itemsize - self.token_offset
        return self.tokens[start : start + int(self.sizes[i])]

    @property
    def num_documents(self):
        return max(len(self.doc_idx) - 1, 0)

    def document_range(self, start, stop):
        """Documents start..stop-1 (by doc_idx, so a document of several sequences stays whole) as an
        IndexedDataset over the same mapped files: .tokens, .sizes, .pointers and .doc_idx are views (the
        pointers and doc_idx keep their values in the whole file). Needs contiguous sequences
        (check_contiguous)."""
        if not 0 <= start <= stop <= self.num_documents:
            raise IndexError(f"documents [{start}, {stop}) outside the {self.num_documents} documents of {self.prefix}")
        first_seq = int(self.doc_idx[start]) - self.first_sequence  # doc_idx holds sequence numbers of the file
        end_seq = int(self.doc_idx[stop]) - self.first_sequence
        t0, t1 = self._token_index(first_seq), self._token_index(end_seq)
        view = copy.copy(self)
        view.sizes = self.sizes[first_seq:end_seq]
        view.pointers = self.pointers[first_seq:end_seq]
        view.doc_idx = self.doc_idx[start : stop + 1]
        view.tokens = self.tokens[t0 - self.token_offset : t1 - self.token_offset]
        view.num_tokens = t1 - t0
        view.token_offset = t0
        view.first_sequence = self.first_sequence + first_seq
        view.first_document = self.first_document + start
        return view

    def _token_index(self, sequence):
        """Position in the .bin, in tokens, where this dataset's sequence starts (its end for len(self))."""
        if sequence < len(self.sizes):
            return int(self.pointers[sequence]) // self.dtype.itemsize
        return self.token_offset + self.num_tokens

    def check_contiguous(self, chunk=1 << 22):
        """Raise unless the sequences tile the .bin back to back (pointers == cumulative sizes) and doc_idx
        covers them in order (a whole file, not a document_range view)."""
        n = len(self.sizes)
        expected_next = 0
        for start in range(0, n, chunk):
            sizes = self.sizes[start : start + chunk].astype(np.int64) * self.dtype.itemsize
            pointers = self.pointers[start : start + chunk]
            expected = expected_next + np.concatenate(([0], np.cumsum(sizes[:-1])))
            bad = np.flatnonzero(pointers != expected)
            if bad.size:
                i = start + int(bad[0])
                raise IndexedDatasetError(
                    f"{self.idx_path}: sequence {i} starts at byte {int(self.pointers[i])}, expected "
                    f"{int(expected[bad[0]])}: the sequences do not tile the .bin back to back"
                )
            expected_next = int(expected[-1] + sizes[-1])
        doc_idx = self.doc_idx
        if len(doc_idx) and (doc_idx[0] != 0 or doc_idx[-1] != n):
            raise IndexedDatasetError(
                f"{self.idx_path}: doc_idx runs from {int(doc_idx[0])} to {int(doc_idx[-1])}, but documents must "
                f"cover the {n} sequences from 0 to {n}"
            )
        for start in range(0, len(doc_idx), chunk):
            if np.any(np.diff(doc_idx[max(start - 1, 0) : start + chunk]) < 0):
                raise IndexedDatasetError(f"{self.idx_path}: doc_idx is not in increasing order")

    def __repr__(self):
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"


def scan_tokens(bin_path, dtype, with_sha256=False, chunk_bytes=1 << 26, progress=False):
    """One sequential read of a .bin: (smallest id, largest id, sha256 hex digest or None). Memory: one chunk."""
    dtype = np.dtype(dtype).newbyteorder("<")
    chunk_bytes -= chunk_bytes % dtype.itemsize
    total = os.path.getsize(bin_path)
    low, high = None, None
    sha256 = hashlib.sha256() if with_sha256 else None
    bar = None
    if progress:

        bar = tqdm(total=total, desc="reading " + os.path.basename(bin_path), unit="B", unit_scale=True,
                   file=sys.stderr, mininterval=1.0)
    with open(bin_path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            if sha256 is not None:
                sha256.update(chunk)
            tokens = np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize)
            if tokens.size:
                low = int(tokens.min()) if low is None else min(low, int(tokens.min()))
                high = int(tokens.max()) if high is None else max(high, int(tokens.max()))
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return low, high, (sha256.hexdigest() if sha256 is not None else None)


class _HashingWriter:
    """A binary file opened for writing whose sha256 is computed on the way."""

    def __init__(self, path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data):
        data = memoryview(data).cast("B")
        self.sha256.update(data)
        self.file.write(data)
        self.bytes += len(data)

    def close(self):
        self.file.close()


class IndexedDatasetWriter:
    """Stream documents into a .bin/.idx pair in constant memory.

    Tokens go straight to `<prefix>.bin.tmp`, sizes to a scratch file; `finalize()` (or leaving the `with`
    block without an error) writes the .idx and renames both into place, so an interrupted write leaves no
    file under the final names. After finalize, `.checksums` holds the sha256 of both files.

        with IndexedDatasetWriter("data/train", np.uint16) as w:
            for doc in docs:
                w.add_document(doc)
    """

    def __init__(self, prefix, dtype):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no GPT-NeoX dtype code; use uint16 or int32")
        self.bin_path, self.idx_path = _paths(self.prefix)
        self._bin_tmp = self.bin_path + ".tmp"
        self._idx_tmp = self.idx_path + ".tmp"
        self._sizes_tmp = self.prefix + ".sizes.tmp"
        self._bin = _HashingWriter(self._bin_tmp)
        self._sizes = open(self._sizes_tmp, "wb")
        self._info = np.iinfo(self.dtype)
        self.num_sequences = 0
        self.num_tokens = 0
        self.checksums = None
        self._done = False

    def add_document(self, tokens):
        """Append one document (one sequence) of token ids."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"a document must be a 1-D array of token ids, got shape {tokens.shape}")
        if tokens.size and tokens.dtype != self.dtype:
            if tokens.min() < self._info.min or tokens.max() > self._info.max:
                raise ValueError(f"token ids outside the range of {self.dtype}")
        if tokens.size >= 2**31:
            raise ValueError("a single document of 2^31 tokens or more does not fit the int32 sizes of the format")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")))
        self._sizes.write(struct.pack("<i", tokens.size))
        self.num_sequences += 1
        self.num_tokens += tokens.size

    def finalize(self, chunk=1 << 20):
        if self._done:
            return self.checksums
        self._bin.close()
        self._sizes.close()
        n = self.num_sequences
        idx = _HashingWriter(self._idx_tmp)
        try:
            idx.write(MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
            sizes = np.memmap(self._sizes_tmp, dtype="<i4", mode="r") if n else np.zeros(0, "<i4")
            for start in range(0, n, chunk):
                idx.write(np.ascontiguousarray(sizes[start : start + chunk]))
            next_pointer = 0
            for start in range(0, n, chunk):
                nbytes = sizes[start : start + chunk].astype("<i8") * self.dtype.itemsize
                ends = np.cumsum(nbytes) + next_pointer
                idx.write((ends - nbytes).astype("<i8"))
                next_pointer = int(ends[-1])
            for start in range(0, n + 1, chunk):
                idx.write(np.arange(start, min(start + chunk, n + 1), dtype="<i8"))
            del sizes
        finally:
            idx.close()
        os.replace(self._idx_tmp, self.idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.remove(self._sizes_tmp)
        self.checksums = {"bin": self._bin.sha256.hexdigest(), "idx": idx.sha256.hexdigest()}
        self._done = True
        return self.checksums

    def abort(self):
        """Close and delete everything written so far."""
        self._bin.close()
        self._sizes.close()
        for path in (self._bin_tmp, self._idx_tmp, self._sizes_tmp):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False
