"""`fasttrain prepare --from-indexed`: GPT-NeoX/Megatron files written by another writer (test_indexed's
neox_write, written from the format's description alone) registered in place, trained on, audited; files
that cannot be used are refused with one line."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import yaml
from test_indexed import neox_write

from fasttrain.cli import main
from fasttrain.data import open_dataset
from fasttrain.data.prepare import prepare_dataset

WORDS = "the a of and to in is was river stone light house garden morning winter letter window".split()
CODES = {"uint16": 8, "int32": 4}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 300-token BPE and 120 documents tokenized with it (each ending in <|endoftext|>)."""
    from tokenizers import Tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + f" end{i}." for i in range(120)]
    out = tmp_path_factory.mktemp("tok") / "ds"
    prepare_dataset(out, texts, vocab_size=300, test_fraction=0, progress=False)
    path = str(out / "tokenizer.json")
    tok = Tokenizer.from_file(path)
    eot = tok.token_to_id("<|endoftext|>")
    docs = [tok.encode(t).ids + [eot] for t in texts]
    return path, docs, eot


def write_corpus(prefix, docs, dtype, split_every=3):
    """NeoX files: every split_every-th document stored as two sequences (sentence-split style)."""
    sequences, doc_idx = [], [0]
    for i, doc in enumerate(docs):
        if i % split_every == 0 and len(doc) > 4:
            sequences += [doc[:3], doc[3:]]
        else:
            sequences.append(doc)
        doc_idx.append(len(sequences))
    neox_write(str(prefix), sequences, CODES[dtype], doc_idx=doc_idx)


def register(*args):
    return main(["prepare", *map(str, args), "--quiet"])


def one_error_line(capsys):
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_registered_neox_files_train_and_audit_exactly(tmp_path, tokenizer, capsys, dtype):
    tok_path, docs, eot = tokenizer
    write_corpus(tmp_path / "pile_text_document", docs, dtype)
    before = {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)}
    out = tmp_path / "registered"
    assert register("--from-indexed", tmp_path / "pile_text_document.bin", "--tokenizer", tok_path,
                    "--test-fraction", "0.1", "--out", out) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer.json"]  # nothing copied
    assert {p: os.path.getmtime(tmp_path / p) for p in before} == before  # nothing written beside them
    manifest = json.loads((out / "manifest.json").read_text())
    bin_path, idx_path = str(tmp_path / "pile_text_document.bin"), str(tmp_path / "pile_text_document.idx")
    assert manifest["files"][bin_path]["bytes"] == os.path.getsize(bin_path)
    assert manifest["files"][idx_path]["bytes"] == os.path.getsize(idx_path)
    assert manifest["files"][bin_path]["sha256"] is None and manifest["dtype"] == dtype
    assert manifest["eot_id"] == eot and manifest["vocab_size"] == 300
    assert manifest["prepare"]["max_token_id"] == max(max(d) for d in docs)

    ds = open_dataset(out)
    # The last 12 documents (10% of 120) are held out, cut between documents: a split document stays whole.
    assert ds.train.num_documents == 108 and ds.test.num_documents == 12
    assert ds.train.tokens.tolist() == sum(docs[:108], []) and ds.test.tokens.tolist() == sum(docs[108:], [])
    assert ds.test[0].tolist() == docs[108][:3] and ds.test[1].tolist() == docs[108][3:]  # doc 108: two sequences

    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "context_length": 32},
        "data": {"path": str(out), "seq_len": 16, "repeated_fraction": 0.25, "repeat_count": 4, "seed": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 12, "global_batch": 8, "micro_batch": 8, "out_dir": str(run), "log_every": 4,
                  "eval_tokens": 256, "device": "cpu"},
    }))
    assert main(["train", "--config", str(config)]) == 0
    losses = [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]
    assert len(losses) >= 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    capsys.readouterr()
    assert main(["audit", str(run), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["ok"] and audit["positions"] == 96 and audit["test_split"]["documents"] == 12
    assert main(["show-batch", str(run), "--step", "11", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    flat = ds.train.tokens
    for seq in shown["sequences"]:  # windows are read from the registered .bin
        start = seq["token_offset"]
        assert seq["token_ids"] == flat[start:start + 17].tolist()


def test_separate_test_files_and_hashing(tmp_path, tokenizer, capsys):
    tok_path, docs, _ = tokenizer
    write_corpus(tmp_path / "train_docs", docs[:100], "uint16")
    write_corpus(tmp_path / "val_docs", docs[100:], "uint16")
    out = tmp_path / "registered"
    assert register("--from-indexed", tmp_path / "train_docs", "--test-from-indexed", tmp_path / "val_docs.idx",
                    "--tokenizer", tok_path, "--hash", "--out", out) == 0
    capsys.readouterr()
    ds = open_dataset(out, verify="full")
    assert ds.train.num_documents == 100 and ds.test.tokens.tolist() == sum(docs[100:], [])
    # The same size with other content: only the hash can tell, and it does.
    raw = bytearray((tmp_path / "val_docs.bin").read_bytes())
    raw[0:2] = bytes([raw[2], raw[3]]) if raw[0:2] != raw[2:4] else bytes([raw[0] ^ 1, raw[1]])
    (tmp_path / "val_docs.bin").write_bytes(bytes(raw))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "100k"}, "data": {"path": str(out), "seq_len": 16},
                                      "train": {"steps": 2, "global_batch": 4}, "optim": {"warmup_steps": 1}}))
    assert main(["audit", str(config)]) == 2
    assert "sha256" in one_error_line(capsys)
    assert register("--from-indexed", tmp_path / "train_docs", "--test-from-indexed", tmp_path / "val_docs",
                    "--test-fraction", "0.1", "--tokenizer", tok_path, "--out", tmp_path / "x") == 2
    assert "either --test-from-indexed or --test-fraction" in one_error_line(capsys)


def test_changed_registered_file_is_refused_before_training(tmp_path, tokenizer, capsys):
    tok_path, docs, _ = tokenizer
    write_corpus(tmp_path / "c", docs, "uint16")
    assert register("--from-indexed", tmp_path / "c", "--tokenizer", tok_path, "--out", tmp_path / "r") == 0
    capsys.readouterr()
    with open(tmp_path / "c.bin", "ab") as f:
        f.write(b"\x00\x00")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "100k"}, "data": {"path": str(tmp_path / "r"), "seq_len": 16},
                                      "train": {"steps": 2, "global_batch": 4, "out_dir": str(tmp_path / "run")},
                                      "optim": {"warmup_steps": 1}}))
    assert main(["train", "--config", str(config)]) == 2
    assert "bytes but the manifest records" in one_error_line(capsys)


@pytest.mark.parametrize("case", ["vocab too large for uint16", "tokenizer too small", "bin shorter than idx",
                                  "idx of another bin", "sequences out of order", "no end-of-text token",
                                  "no tokenizer", "dtypes differ"])
def test_unusable_files_are_refused_with_one_line(tmp_path, tokenizer, capsys, case):
    from tokenizers import Tokenizer, models

    tok_path, docs, _ = tokenizer
    prefix = tmp_path / "c"
    write_corpus(prefix, docs, "uint16")
    extra = []
    if case == "vocab too large for uint16":
        big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}, unk_token="w0"))
        tok_path = str(tmp_path / "big.json")
        big.save(tok_path)
        expected = "has 70,001 tokens but"
    elif case == "tokenizer too small":
        small = Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)} | {"<|endoftext|>": 99}, unk_token="w0"))
        tok_path = str(tmp_path / "small.json")
        small.save(tok_path)
        expected = f"holds token id {max(max(d) for d in docs)} but {tok_path} has only 100 tokens"
    elif case == "bin shorter than idx":
        raw = (tmp_path / "c.bin").read_bytes()
        (tmp_path / "c.bin").write_bytes(raw[:-10])
        expected = "the .bin is truncated or does not belong to this .idx"
    elif case == "idx of another bin":
        write_corpus(tmp_path / "other", docs[:50], "uint16")
        shutil.copy(tmp_path / "other.idx", tmp_path / "c.idx")
        expected = "does not belong to this .idx"
    elif case == "sequences out of order":
        sizes = [len(d) for d in docs]
        neox_write(str(prefix), [docs[1], docs[0]] + docs[2:], 8)  # then swap the first two pointers
        raw = bytearray((tmp_path / "c.idx").read_bytes())
        pointers = 34 + 4 * len(docs)
        raw[pointers:pointers + 16] = raw[pointers + 8:pointers + 16] + raw[pointers:pointers + 8]
        (tmp_path / "c.idx").write_bytes(bytes(raw))
        assert sizes[0] != sizes[1]
        expected = "the sequences do not tile the .bin back to back"
    elif case == "no end-of-text token":
        plain = Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0"))
        tok_path = str(tmp_path / "plain.json")
        plain.save(tok_path)
        expected = "has no end-of-text token"
    elif case == "no tokenizer":
        tok_path = None
        expected = "--from-indexed needs --tokenizer FILE"
    else:
        write_corpus(tmp_path / "t", docs[:10], "int32")
        extra = ["--test-from-indexed", tmp_path / "t"]
        expected = "the train and test files must have the same token type"
    args = ["--from-indexed", prefix, "--out", tmp_path / "r", *extra] + (["--tokenizer", tok_path] if tok_path else [])
    assert register(*args) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "r").exists()
