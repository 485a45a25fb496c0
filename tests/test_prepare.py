"""prepare_dataset and open_dataset: determinism, the held-out split, and refusal of damaged datasets."""
import hashlib
import json
import os
import random

import numpy as np
import pytest

from fasttrain.data import dataset as dataset_module
from fasttrain.data.dataset import DatasetError, MissingSplitError, num_windows, open_dataset, read_windows
from fasttrain.data.prepare import EOT_TOKEN, is_test_document, prepare_dataset

WORDS = ("the a of and to in is was he she it that for on with as his her they at by this had not but from "
         "river stone light house garden morning winter letter window silver quiet story").split()


def make_documents(n=160, seed=0):
    """Small English-like documents, each carrying a unique marker word (docNNNmark)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 40))]
        words.insert(rng.randint(0, len(words)), f"doc{i:03d}mark")
        docs.append(" ".join(words) + ".")
    return docs


def prepare(tmp_path, name="ds", docs=None, **kwargs):
    kwargs.setdefault("vocab_size", 300)
    kwargs.setdefault("test_fraction", 0.2)
    kwargs.setdefault("progress", False)
    out = tmp_path / name
    prepare_dataset(out, make_documents() if docs is None else docs, **kwargs)
    return out


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


DATA_FILES = ["train.bin", "train.idx", "test.bin", "test.idx", "tokenizer.json"]


def test_prepare_writes_a_consistent_dataset(tmp_path):
    docs = make_documents()
    out = prepare(tmp_path, docs=docs)
    assert sorted(os.listdir(out)) == sorted(DATA_FILES + ["manifest.json"])
    ds = open_dataset(out)
    m = ds.manifest
    assert m["format"] == "megatron-mmap-indexed" and m["dtype"] == "uint16"
    assert ds.vocab_size == 300 and ds.tokenizer.get_vocab_size() == 300
    assert ds.eot_id == ds.tokenizer.token_to_id(EOT_TOKEN)
    test_ids = [i for i in range(len(docs)) if is_test_document(i, 0, 0.2)]
    assert m["splits"]["test"]["documents"] == len(test_ids) > 10
    assert m["splits"]["train"]["documents"] == len(docs) - len(test_ids)
    assert m["stats"]["tokens_per_second"] > 0
    for name in DATA_FILES:
        assert m["files"][name]["sha256"] == sha(out / name)
        assert m["files"][name]["bytes"] == os.path.getsize(out / name)
    # Every document decodes back to its text and ends with exactly one EOT, in input order per split.
    train_docs = [d for i, d in enumerate(docs) if i not in set(test_ids)]
    for split, texts in ((ds.train, train_docs), (ds.test, [docs[i] for i in test_ids])):
        assert len(split) == len(texts)
        for k, text in enumerate(texts):
            tokens = split[k]
            assert tokens[-1] == ds.eot_id and ds.eot_id not in tokens[:-1]
            assert ds.tokenizer.decode(tokens[:-1].tolist()) == text


def test_test_split_never_reaches_training_windows(tmp_path):
    docs = make_documents()
    ds = open_dataset(prepare(tmp_path, docs=docs))
    seq_len = 31
    n = num_windows(ds.train, seq_len)
    windows = read_windows(ds.train, np.arange(n), seq_len)
    # The windows are the train split cut in order: every training token comes from train.bin.
    assert np.array_equal(windows.reshape(-1), ds.train.tokens[: n * (seq_len + 1)])
    train_text = ds.decode(ds.train.tokens)
    test_text = ds.decode(ds.test.tokens)
    for i in range(len(docs)):
        marker = f"doc{i:03d}mark"
        held_out = is_test_document(i, 0, 0.2)
        assert (marker in test_text) == held_out
        assert (marker in train_text) == (not held_out)


def test_prepare_is_deterministic_and_accepts_one_shot_iterators(tmp_path):
    a = prepare(tmp_path, "a")
    b = prepare(tmp_path, "b", docs=iter(make_documents()))  # spooled to disk for the second pass
    c = prepare(tmp_path, "c", docs=lambda: iter(make_documents()), batch_docs=7)
    for name in DATA_FILES:
        assert sha(a / name) == sha(b / name) == sha(c / name), name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    d = prepare(tmp_path, "d", seed=1)
    assert sha(a / "test.bin") != sha(d / "test.bin")  # another seed, another split
    # BPE trained on a prefix: a one-shot iterator is replayed from its spool, then read on.
    e = prepare(tmp_path, "e", docs=iter(make_documents()), tokenizer_sample_chars=2000)
    f = prepare(tmp_path, "f", tokenizer_sample_chars=2000)
    for name in DATA_FILES:
        assert sha(e / name) == sha(f / name), name
    assert sha(e / "tokenizer.json") != sha(a / "tokenizer.json")
    assert open_dataset(e).manifest["prepare"]["documents_seen"] == 160


def test_user_tokenizer_reproduces_the_token_files(tmp_path):
    a = prepare(tmp_path, "a")
    b = prepare(tmp_path, "b", tokenizer_file=str(a / "tokenizer.json"), vocab_size=9999)
    for name in ("train.bin", "train.idx", "test.bin"):
        assert sha(a / name) == sha(b / name)
    assert json.load(open(b / "manifest.json"))["prepare"]["tokenizer_file"] == "tokenizer.json"


def test_existing_folder_needs_overwrite(tmp_path):
    out = prepare(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(tmp_path)
    prepare(tmp_path, test_fraction=0.5, overwrite=True)
    assert open_dataset(out).manifest["prepare"]["test_fraction"] == 0.5
    assert os.listdir(tmp_path) == ["ds"]


def test_interrupted_prepare_leaves_nothing(tmp_path):
    def documents():
        yield from make_documents()[:50]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, docs=documents())
    assert os.listdir(tmp_path) == []


def test_no_test_split(tmp_path):
    ds = open_dataset(prepare(tmp_path, test_fraction=0.0))
    assert not ds.has_test and len(ds.train) == 160
    with pytest.raises(MissingSplitError, match="no 'test' split.*--test-fraction"):
        ds.test


def test_empty_test_split_is_reported_where_used(tmp_path):
    ds = open_dataset(prepare(tmp_path, docs=make_documents(3), test_fraction=0.001))
    assert ds.manifest["splits"]["test"]["documents"] == 0
    with pytest.raises(MissingSplitError, match="empty 'test' split"):
        ds.test


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="test_fraction"):
        prepare(tmp_path, test_fraction=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="train split"):
        prepare(tmp_path, docs=["", ""])
    assert os.listdir(tmp_path) == []


# ---- damaged datasets ---------------------------------------------------------------------------------
@pytest.fixture
def prepared(tmp_path):
    return prepare(tmp_path)


def _bump_mtime(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_truncated_file_refused(prepared):
    size = os.path.getsize(prepared / "train.bin")
    os.truncate(prepared / "train.bin", size - 2)
    with pytest.raises(DatasetError, match=r"train\.bin: .* bytes but the manifest records .*fasttrain prepare"):
        open_dataset(prepared, verify=False)


@pytest.mark.parametrize("name", ["train.bin", "test.idx", "tokenizer.json"])
def test_edited_file_refused(prepared, name):
    open_dataset(prepared)  # verified once: remembered
    path = prepared / name
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    _bump_mtime(path)
    with pytest.raises(DatasetError, match=rf"{name}: sha256 .* does not match .*fasttrain prepare"):
        open_dataset(prepared)


def test_full_verify_ignores_the_record(prepared):
    open_dataset(prepared)
    path = prepared / "train.bin"
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[0] ^= 0x01
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time: only a full hash sees it
    open_dataset(prepared)
    with pytest.raises(DatasetError, match="sha256"):
        open_dataset(prepared, verify="full")


def test_verified_record_skips_rehashing(prepared, monkeypatch):
    open_dataset(prepared)
    assert (prepared / ".verified.json").exists()

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(dataset_module, "file_sha256", no_hashing)
    open_dataset(prepared)


def test_mixed_up_files_refused(prepared):
    os.replace(prepared / "train.bin", prepared / "keep.bin")
    os.replace(prepared / "test.bin", prepared / "train.bin")
    os.replace(prepared / "keep.bin", prepared / "test.bin")
    with pytest.raises(DatasetError, match="manifest records"):
        open_dataset(prepared)


def test_missing_pieces_refused(prepared, tmp_path):
    os.remove(prepared / "test.idx")
    with pytest.raises(DatasetError, match=r"test\.idx: missing"):
        open_dataset(prepared)
    os.remove(prepared / "manifest.json")
    with pytest.raises(DatasetError, match="manifest.json: missing"):
        open_dataset(prepared)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        open_dataset(tmp_path / "nowhere")


def test_index_edited_consistently_with_manifest_refused(prepared):
    # A .idx whose size still matches but whose content disagrees with the .bin: refused by structure
    # checks even without hashing.
    path = prepared / "train.idx"
    data = bytearray(open(path, "rb").read())
    data[18:26] = (int.from_bytes(data[18:26], "little") - 1).to_bytes(8, "little")  # N - 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(DatasetError, match="train.idx"):
        open_dataset(prepared, verify=False)
