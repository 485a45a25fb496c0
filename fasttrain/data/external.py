"""`fasttrain prepare --from-indexed`: an existing tokenized corpus (GPT-NeoX / Megatron .bin + .idx, e.g.
the Pile as Pythia trained on it) registered as a dataset folder without copying its token files.

The folder holds manifest.json and a copy of the tokenizer.json; the manifest names the .bin/.idx files by
absolute path and makes each split a range of their documents:
- with a second pair of files (`test_prefix`), that pair is the test split;
- else the last `test_fraction` of the documents (at least one) are the test split, the rest the train
  split: the cut falls between documents, and a document of several sequences stays whole.

What registration checks, once: the .idx header and its size, the .bin size against the index, that the
sequences tile the .bin back to back and doc_idx covers them in order; that the tokenizer's vocabulary fits
the file's token type (uint16 holds 65,536 ids); that it has an end-of-text token (its id becomes the
dataset's eot_id); and, by reading every token once, that no id is negative or beyond the tokenizer. The
manifest records each file's size (checked at every open, with the index structure) and, with
hash_files=True, its sha256 (then verified like a prepared dataset's files; the read that finds the largest
id computes it, so it costs little more). Nothing is written beside the registered files.
"""
import json
import os
import shutil
import sys

import numpy as np
from tokenizers import Tokenizer

from .dataset import FORMAT_NAME, MANIFEST, TOKENIZER, file_sha256
from .indexed import IndexedDataset, scan_tokens
from .prepare import move_into_place

# Tried in this order; the first one the tokenizer knows ends every document.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def register_indexed_dataset(out_dir, prefix, tokenizer_file, test_prefix=None, test_fraction=0.01,
                             hash_files=False, overwrite=False, progress=True):
    """Write a dataset folder that uses the .bin/.idx files at `prefix` (and `test_prefix`) in place; returns
    its manifest. Raises ValueError (one line, saying what to change) for files that cannot be used."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if test_prefix is None and not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} not found")
    try:
        tokenizer = Tokenizer.from_file(os.fspath(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{tokenizer_file} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = max(vocab.values()) + 1
    eot_token = next((t for t in END_OF_TEXT_TOKENS if t in vocab), None)
    if eot_token is None:
        raise ValueError(f"{tokenizer_file} has no end-of-text token (looked for {', '.join(END_OF_TEXT_TOKENS)}); "
                         "give the tokenizer the corpus was tokenized with")

    prefixes = {"train": _prefix(prefix)}
    if test_prefix is not None:
        prefixes["test"] = _prefix(test_prefix)
    whole = {split: _open_checked(p) for split, p in prefixes.items()}
    dtype = whole["train"].dtype
    for split, ds in whole.items():
        if ds.dtype != dtype:
            raise ValueError(f"{ds.idx_path} holds {ds.dtype} tokens but {whole['train'].idx_path} holds {dtype}; "
                             "the train and test files must have the same token type")
        if ds.num_documents == 0:
            raise ValueError(f"{ds.idx_path} holds no documents")
    if dtype.kind == "u" and vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"{tokenizer_file} has {vocab_size:,} tokens but {whole['train'].bin_path} holds {dtype} ids "
                         f"(at most {np.iinfo(dtype).max + 1:,}): the tokenizer does not belong to these files")

    files = {}
    max_token_id = -1
    for split, ds in whole.items():
        low, high, bin_sha256 = scan_tokens(ds.bin_path, ds.dtype, with_sha256=hash_files, progress=progress)
        if low is not None and low < 0:
            raise ValueError(f"{ds.bin_path} holds the negative token id {low}; it is not a token file")
        if high is not None and high >= vocab_size:
            raise ValueError(f"{ds.bin_path} holds token id {high:,} but {tokenizer_file} has only {vocab_size:,} "
                             f"tokens (ids 0 to {vocab_size - 1:,}); give the tokenizer these files were made with")
        max_token_id = max(max_token_id, -1 if high is None else high)
        files[ds.bin_path] = {"bytes": os.path.getsize(ds.bin_path), "sha256": bin_sha256, "external": True}
        files[ds.idx_path] = {"bytes": os.path.getsize(ds.idx_path),
                              "sha256": file_sha256(ds.idx_path) if hash_files else None, "external": True}

    splits = {}
    if test_prefix is not None:
        for split, ds in whole.items():
            splits[split] = _split_entry(ds, 0, ds.num_documents)
    else:
        ds = whole["train"]
        n_test = max(1, round(test_fraction * ds.num_documents)) if test_fraction > 0 else 0
        if n_test >= ds.num_documents:
            raise ValueError(f"{ds.idx_path} holds {ds.num_documents} documents: too few to hold out "
                             f"{test_fraction:g} of them and train on the rest")
        splits["train"] = _split_entry(ds, 0, ds.num_documents - n_test)
        if n_test:
            splits["test"] = _split_entry(ds, ds.num_documents - n_test, ds.num_documents)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        tokenizer.save(os.path.join(tmp_dir, TOKENIZER))
        tokenizer_path = os.path.join(tmp_dir, TOKENIZER)
        files[TOKENIZER] = {"bytes": os.path.getsize(tokenizer_path), "sha256": file_sha256(tokenizer_path)}
        manifest = {
            "format": FORMAT_NAME,
            "format_description": "GPT-NeoX/Megatron MMapIndexedDataset (.bin + .idx, version 1), registered in "
            "place: each split is a range of documents of the files named in 'files'",
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eot_id": int(vocab[eot_token]),
            "eot_token": eot_token,
            "splits": splits,
            "files": files,
            "prepare": {
                "from_indexed": prefixes["train"],
                "test_from_indexed": prefixes.get("test"),
                "test_fraction": None if test_prefix is not None else test_fraction,
                "tokenizer_file": os.path.basename(tokenizer_file),
                "max_token_id": max_token_id,
                "hashed": bool(hash_files),
                "checked": "index structure and file sizes at every open; token ids against the tokenizer once, "
                           "at registration" + ("; sha256 of every file" if hash_files else ""),
            },
        }
        with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        move_into_place(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    per_split = ", ".join(f"{name}: {info['documents']:,} documents / {info['tokens']:,} tokens"
                          for name, info in splits.items())
    print(f"registered {prefixes['train']} in place ({dtype.name}, largest token id {max_token_id:,}; {per_split})",
          file=sys.stderr)
    return manifest


def _prefix(path):
    """A prefix given with or without its .bin / .idx ending, made absolute."""
    path = os.fspath(path)
    for ending in (".bin", ".idx"):
        if path.endswith(ending):
            path = path[: -len(ending)]
    return os.path.abspath(path)


def _open_checked(prefix):
    ds = IndexedDataset(prefix)  # header, .idx size, .bin size against the index
    ds.check_contiguous()  # every sequence where the next one should start; doc_idx in order
    return ds


def _split_entry(ds, start, stop):
    view = ds.document_range(start, stop)
    return {"documents": view.num_documents, "tokens": view.num_tokens, "prefix": ds.prefix,
            "document_range": [start, stop], "files": [ds.bin_path, ds.idx_path]}
