"""The GPT-NeoX/Megatron MMapIndexedDataset format: ours against an independent byte-level reader/writer."""
import os
import struct

import numpy as np
import pytest

from fasttrain.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter

# Written from the format description alone (not from fasttrain's code): magic, <Q version, <B dtype code,
# <Q N, <Q M, int32 sizes[N], int64 pointers[N], int64 doc_idx[M]; .bin = tokens back to back.
NEOX_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}


def neox_write(prefix, sequences, code, doc_idx=None):
    dtype = np.dtype(NEOX_CODES[code])
    sizes, pointers, offset = [], [], 0
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            raw = np.asarray(seq, dtype=dtype).tobytes()
            f.write(raw)
            sizes.append(len(seq))
            pointers.append(offset)
            offset += len(raw)
    doc_idx = list(range(len(sequences) + 1)) if doc_idx is None else doc_idx
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def neox_read(prefix):
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n, m = struct.unpack_from("<QQ", raw, 18)
    pos = 34
    sizes = struct.unpack_from(f"<{n}i", raw, pos)
    pos += 4 * n
    pointers = struct.unpack_from(f"<{n}q", raw, pos)
    pos += 8 * n
    doc_idx = struct.unpack_from(f"<{m}q", raw, pos)
    assert pos + 8 * m == len(raw)
    dtype = np.dtype(NEOX_CODES[code])
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    seqs = [np.frombuffer(data, dtype=dtype, count=s, offset=p).tolist() for s, p in zip(sizes, pointers)]
    return version, code, seqs, list(doc_idx)


def random_docs(rng, n, high):
    return [rng.integers(0, high, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("code", [8, 4, 1])
def test_reads_independently_written_file(tmp_path, code):
    rng = np.random.default_rng(code)
    high = {8: 65536, 4: 2**31 - 1, 1: 256}[code]
    docs = random_docs(rng, 50, high)
    prefix = str(tmp_path / "neox")
    neox_write(prefix, docs, code)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(NEOX_CODES[code])
    assert len(ds) == 50 and ds.num_documents == 50
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds[-1].tolist() == docs[-1]
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.tokens.tolist() == [t for d in docs for t in d]
    assert ds.sizes.tolist() == [len(d) for d in docs]
    ds.check_contiguous()


def test_reads_multi_sequence_documents(tmp_path):
    # GPT-NeoX files may hold several sequences per document (doc_idx marks where documents end).
    prefix = str(tmp_path / "sent")
    seqs = [[1, 2], [3], [4, 5, 6], [7]]
    neox_write(prefix, seqs, 8, doc_idx=[0, 2, 4])
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 4] and ds.num_documents == 2
    assert ds[2].tolist() == [4, 5, 6]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5)])
def test_written_file_parses_with_independent_reader(tmp_path, dtype, code):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 30, 60000)
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(np.array(doc, dtype=np.int64))
    version, read_code, seqs, doc_idx = neox_read(prefix)
    assert (version, read_code) == (1, code)
    assert seqs == docs
    assert doc_idx == list(range(31))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert set(writer.checksums) == {"bin", "idx"}


def test_round_trip_across_writer_chunks(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 100, 1000)
    prefix = str(tmp_path / "chunks")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for doc in docs:
        writer.add_document(doc)
    writer.finalize(chunk=7)  # index written in many small chunks
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    ds.check_contiguous(chunk=5)
    assert neox_read(prefix)[2] == docs


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetWriter(prefix, np.uint16):
        pass
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.tokens.size == 0


def test_interrupted_writer_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "broken")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_out_of_range_tokens(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
        with pytest.raises(ValueError, match="outside the range"):
            writer.add_document([70000])
        with pytest.raises(ValueError, match="1-D"):
            writer.add_document([[1, 2]])


def _good_pair(tmp_path):
    prefix = str(tmp_path / "good")
    neox_write(prefix, [[1, 2, 3], [4, 5], [6]], 8)
    return prefix


def test_bad_magic_refused(tmp_path):
    prefix = _good_pair(tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"XXXXXXX")
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        IndexedDataset(prefix)


def test_truncated_index_refused(tmp_path):
    prefix = _good_pair(tmp_path)
    os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(prefix)
    os.truncate(prefix + ".idx", 12)
    with pytest.raises(IndexedDatasetError, match="truncated header"):
        IndexedDataset(prefix)


def test_truncated_bin_refused(tmp_path):
    prefix = _good_pair(tmp_path)
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(prefix)
    os.truncate(prefix + ".bin", 3)
    with pytest.raises(IndexedDatasetError, match="whole number"):
        IndexedDataset(prefix)


def test_missing_files_and_bad_header_fields(tmp_path):
    prefix = _good_pair(tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(17)
        f.write(struct.pack("<B", 6))  # a float dtype code: not tokens
    with pytest.raises(IndexedDatasetError, match="dtype code 6"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(9)
        f.write(struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match="version 2"):
        IndexedDataset(prefix)
    prefix = _good_pair(tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(prefix)
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_non_contiguous_pointers_detected(tmp_path):
    prefix = str(tmp_path / "gap")
    neox_write(prefix, [[1, 2], [3, 4], [5]], 8)
    with open(prefix + ".idx", "r+b") as f:  # point sequence 1 at sequence 0's bytes
        f.seek(34 + 3 * 4 + 8)
        f.write(struct.pack("<q", 0))
    ds = IndexedDataset(prefix)  # the header and the end of the last sequence still agree
    assert ds[1].tolist() == [1, 2]
    with pytest.raises(IndexedDatasetError, match="sequence 1 starts at byte 0, expected 4"):
        ds.check_contiguous()
