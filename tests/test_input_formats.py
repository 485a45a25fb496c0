"""`fasttrain prepare --input` formats: Parquet, gzip and zstd JSON Lines and folders of any mix give the
same tokens as the same text in one .jsonl; damaged or unreadable input is one error line."""
import gzip
import json
import os
import random
import sys

import numpy as np
import pytest

from fasttrain.cli import main
from fasttrain.data import open_dataset
from fasttrain.data.corpus import iter_text_documents
from fasttrain.data.prepare import prepare_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

WORDS = "the a of and to in is was river stone light house garden morning winter letter window café".split()


def documents(n=90):
    rng = random.Random(3)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" end{i}.\nsecond line" for i in range(n)]
    docs[7] = "   "  # blank: skipped by every reader
    return docs


def jsonl_bytes(docs, field="text"):
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def write_parquet(path, docs, field="text", row_group_size=16):
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_zst(path, data, frames=1):
    """zstd data, in several frames as pzstd writes it when frames > 1."""
    step = -(-len(data) // frames)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            f.write(zstandard.ZstdCompressor().compress(data[start:start + step]))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "ds"
    prepare_dataset(out, [d for d in documents() if d.strip()], vocab_size=300, test_fraction=0, progress=False)
    return str(out / "tokenizer.json")


def prepared_tokens(tmp_path, tokenizer_file, source, name, *extra):
    out = tmp_path / name
    assert main(["prepare", "--input", str(source), "--out", str(out), "--tokenizer", tokenizer_file,
                 "--test-fraction", "0.2", "--quiet", *extra]) == 0
    ds = open_dataset(out)
    return ds.train.tokens.tolist(), ds.test.tokens.tolist(), ds.manifest["prepare"]["documents_seen"]


def test_every_format_gives_the_tokens_of_the_same_text_in_jsonl(tmp_path, tokenizer_file):
    docs = documents()
    (tmp_path / "docs.jsonl").write_bytes(jsonl_bytes(docs))
    expected = prepared_tokens(tmp_path, tokenizer_file, tmp_path / "docs.jsonl", "jsonl")
    assert expected[2] == len(docs) - 1 and len(expected[1]) > 0

    write_parquet(tmp_path / "docs.parquet", docs)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wb") as f:
        f.write(jsonl_bytes(docs))
    write_zst(tmp_path / "docs.jsonl.zst", jsonl_bytes(docs), frames=3)
    for name in ("docs.parquet", "docs.jsonl.gz", "docs.jsonl.zst"):
        assert prepared_tokens(tmp_path, tokenizer_file, tmp_path / name, name.replace(".", "_")) == expected, name

    # Another field name, in both row formats.
    write_parquet(tmp_path / "body.parquet", docs, field="body")
    write_zst(tmp_path / "body.jsonl.zst", jsonl_bytes(docs, field="body"))
    for name in ("body.parquet", "body.jsonl.zst"):
        got = prepared_tokens(tmp_path, tokenizer_file, tmp_path / name, name.replace(".", "_"), "--text-field", "body")
        assert got == expected, name

    # A folder mixing every format: files in the order of their relative paths, .txt one document each.
    folder = tmp_path / "mixed"
    (folder / "b").mkdir(parents=True)
    write_parquet(folder / "a.parquet", docs[:20])
    (folder / "b" / "c.txt").write_text(docs[20], encoding="utf-8")
    with gzip.open(folder / "b" / "d.jsonl.gz", "wb") as f:
        f.write(jsonl_bytes(docs[21:50]))
    write_zst(folder / "e.jsonl.zst", jsonl_bytes(docs[50:80]))
    (folder / "f.jsonl").write_bytes(jsonl_bytes(docs[80:]))
    (folder / "notes.md").write_text("not an input file")
    assert list(iter_text_documents(folder)) == [d for d in docs if d.strip()]
    assert prepared_tokens(tmp_path, tokenizer_file, folder, "mixed_out") == expected


def test_compressed_and_parquet_inputs_are_streamed(tmp_path, monkeypatch):
    # Reading stops early without decompressing or decoding the rest: a prefix costs a prefix.
    docs = documents(2000)
    write_zst(tmp_path / "big.jsonl.zst", jsonl_bytes(docs))
    write_parquet(tmp_path / "big.parquet", docs, row_group_size=500)
    groups_read = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        groups_read.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    for name in ("big.jsonl.zst", "big.parquet"):
        it = iter_text_documents(tmp_path / name)
        assert [next(it) for _ in range(3)] == docs[:3]
        it.close()
    assert groups_read == [0]  # of 4 row groups


@pytest.mark.parametrize("case", ["unreadable parquet", "parquet without the field", "parquet field not text",
                                  "jsonl without the field", "truncated zst", "not zst", "truncated gz"])
def test_bad_input_is_one_error_line(tmp_path, capsys, case):
    docs = documents(400)
    data = jsonl_bytes(docs)
    if case == "unreadable parquet":
        write_parquet(tmp_path / "x.parquet", docs)
        raw = (tmp_path / "x.parquet").read_bytes()
        (tmp_path / "x.parquet").write_bytes(raw[: len(raw) // 2])  # cut: no footer
        path, expected = tmp_path / "x.parquet", "is not a readable Parquet file"
    elif case == "parquet without the field":
        write_parquet(tmp_path / "x.parquet", docs, field="content")
        path, expected = tmp_path / "x.parquet", 'has no column "text" (its columns: id, content); name the text'
    elif case == "parquet field not text":
        write_parquet(tmp_path / "x.parquet", docs)
        path, expected = tmp_path / "x.parquet", 'column "id" holds int64, not strings'
    elif case == "jsonl without the field":
        (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(data))
        path, expected = tmp_path / "x.jsonl.gz", 'line 1 needs a JSON object with a string field "body"'
    elif case == "truncated zst":
        write_zst(tmp_path / "x.jsonl.zst", data)
        raw = (tmp_path / "x.jsonl.zst").read_bytes()
        (tmp_path / "x.jsonl.zst").write_bytes(raw[:-20])
        path, expected = tmp_path / "x.jsonl.zst", "is truncated: it ends inside a zstd frame"
    elif case == "not zst":
        (tmp_path / "x.jsonl.zst").write_bytes(data)
        path, expected = tmp_path / "x.jsonl.zst", "is not valid zstd data"
    else:
        (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(data)[:-100])
        path, expected = tmp_path / "x.jsonl.gz", "is truncated"
    field = {"parquet field not text": ["--text-field", "id"], "jsonl without the field": ["--text-field", "body"]}
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(path), "--out", str(out), "--vocab-size", "300", "--quiet",
                 *field.get(case, [])]) == 2
    err = capsys.readouterr().err.splitlines()  # progress lines may come first
    assert err[-1].startswith("error: ") and expected in err[-1] and sum("error" in line for line in err) == 1, err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_missing_optional_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    write_parquet(tmp_path / "x.parquet", documents(10))
    write_zst(tmp_path / "x.jsonl.zst", jsonl_bytes(documents(10)))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    for name, package in (("x.parquet", "pyarrow"), ("x.jsonl.zst", "zstandard")):
        assert main(["prepare", "--input", str(tmp_path / name), "--out", str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"needs the {package} package: pip install 'fasttrain-repeat[formats]'" in err


def test_parquet_and_zst_tokens_match_jsonl_exactly_on_long_documents(tmp_path, tokenizer_file):
    # Documents longer than the readers' chunks (1 MiB zstd blocks, 256-row Parquet batches) stay whole.
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(100, 250_000, size=6)]
    write_zst(tmp_path / "long.jsonl.zst", jsonl_bytes(docs))
    write_parquet(tmp_path / "long.parquet", docs, row_group_size=5)
    assert list(iter_text_documents(tmp_path / "long.jsonl.zst")) == docs
    assert list(iter_text_documents(tmp_path / "long.parquet")) == docs
