"""`fasttrain prepare`: text documents -> a dataset folder (tokenizer, train/test token files, manifest).

Steps: train a byte-level BPE on the train documents (or load the user's tokenizer.json), then tokenize
every document in batches, append the end-of-text token, and stream it into train.bin/.idx or
test.bin/.idx (GPT-NeoX/Megatron MMapIndexedDataset). A document goes to the test split when a hash of
(seed, document index) falls below test_fraction, so the split does not depend on batch sizes or on
the other documents. Memory stays bounded: documents are read one batch at a time and the token files
are written as they come. Everything is written into a temporary folder that is renamed at the end, so an
interrupted prepare leaves no half-written dataset behind.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .dataset import FORMAT_NAME, MANIFEST, TOKENIZER, file_sha256
from .indexed import IndexedDatasetWriter, token_dtype_for_vocab
from .schedule import derive_key

EOT_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER_SAMPLE_CHARS = 200_000_000
_SPLIT_PURPOSE = 0x5E1F  # keeps the split hash independent of the schedule's streams


def is_test_document(index, seed, test_fraction):
    """Whether document number `index` belongs to the held-out split (a pure function of its inputs)."""
    return derive_key(seed, _SPLIT_PURPOSE, index) < test_fraction * 2.0**64


def _two_passes(documents, spool_path):
    """(first_pass, second_pass): functions returning iterators over the documents, for the BPE training
    pass (which may stop early) and the tokenizing pass (which needs every document).

    A callable is called once per pass; a re-iterable collection is iterated twice. A one-shot iterator
    is read once: the documents the first pass consumed are kept in a spool file on disk (not in memory)
    and the second pass replays them, then continues with the rest of the iterator.
    """
    if callable(documents):
        return documents, documents
    if iter(documents) is not documents:
        return (lambda: iter(documents)), (lambda: iter(documents))

    def first_pass():
        with open(spool_path, "w", encoding="utf-8") as f:
            for doc in documents:
                f.write(json.dumps(doc) + "\n")
                yield doc

    def second_pass():
        if os.path.exists(spool_path):
            with open(spool_path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)
        yield from documents

    return first_pass, second_pass


def _train_tokenizer(texts, vocab_size, progress):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _load_tokenizer(tokenizer_file):
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} not found")
    tokenizer = Tokenizer.from_file(os.fspath(tokenizer_file))
    if tokenizer.token_to_id(EOT_TOKEN) is None:
        print(f"note: {tokenizer_file} has no {EOT_TOKEN} token; adding it as the end-of-text token", file=sys.stderr)
        tokenizer.add_special_tokens([EOT_TOKEN])
    return tokenizer


def _batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_dataset(
    out_dir,
    documents,
    vocab_size=8192,
    test_fraction=0.01,
    tokenizer_file=None,
    seed=0,
    batch_docs=1000,
    overwrite=False,
    progress=True,
    source=None,
    tokenizer_sample_chars=DEFAULT_TOKENIZER_SAMPLE_CHARS,
):
    """Build a dataset folder from text documents; returns its manifest (a dict).

    documents: an iterable of strings, or a callable returning a fresh iterator (called twice when the BPE
        is trained: once to train it, once to tokenize). A one-shot iterator is read once; the documents
        the BPE training reads are kept in a spool file on disk for the second pass.
    vocab_size: BPE vocabulary size including the 256 byte tokens and <|endoftext|> (ignored with
        tokenizer_file).
    test_fraction: share of documents held out as the test split (0 for none).
    tokenizer_file: a Hugging Face tokenizer.json to use instead of training one.
    source: a JSON-serializable description of where the documents came from, recorded in the manifest.
    tokenizer_sample_chars: train the BPE on the first this many characters of train documents (None:
        all). BPE training holds every distinct word in memory, so this bounds its memory on big corpora.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if tokenizer_file is None and vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + <|endoftext|> + 1 merge), got {vocab_size}")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir)
    try:
        manifest = _prepare_into(
            tmp_dir, documents, vocab_size, test_fraction, tokenizer_file, seed, batch_docs, progress, source,
            tokenizer_sample_chars,
        )
        move_into_place(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def move_into_place(tmp_dir, out_dir, overwrite):
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while preparing; pass --overwrite to replace it")
        old = f"{tmp_dir}.old"
        os.rename(out_dir, old)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp_dir, out_dir)


def _prepare_into(
    tmp_dir, documents, vocab_size, test_fraction, tokenizer_file, seed, batch_docs, progress, source,
    tokenizer_sample_chars,
):
    t_start = time.perf_counter()
    spool_path = os.path.join(tmp_dir, "documents.spool")
    if tokenizer_file is None:
        first_pass, next_pass = _two_passes(documents, spool_path)
        first = first_pass()  # created now, so a missing corpus fails before any work

        def train_texts():
            used = 0
            for index, text in enumerate(first):
                if text and not is_test_document(index, seed, test_fraction):
                    yield text
                    used += len(text)
                    if tokenizer_sample_chars is not None and used >= tokenizer_sample_chars:
                        return

        sample = "" if tokenizer_sample_chars is None else f" (at most their first {tokenizer_sample_chars:,} characters)"
        print(f"training a byte-level BPE of {vocab_size} tokens on the train documents{sample}", file=sys.stderr)
        try:
            tokenizer = _train_tokenizer(train_texts(), vocab_size, progress)
        finally:
            if hasattr(first, "close"):
                first.close()  # ends the spool file of a one-shot iterator
    else:  # one pass is enough
        next_pass = documents if callable(documents) else (lambda: iter(documents))
        tokenizer = _load_tokenizer(tokenizer_file)
    tokenizer.save(os.path.join(tmp_dir, TOKENIZER))
    t_tokenizer = time.perf_counter() - t_start

    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    actual_vocab = max(vocab.values()) + 1
    dtype = token_dtype_for_vocab(actual_vocab)

    splits = ["train"] + (["test"] if test_fraction > 0 else [])
    writers = {name: IndexedDatasetWriter(os.path.join(tmp_dir, name), dtype) for name in splits}
    input_bytes = 0
    index = 0
    t_encode = time.perf_counter()
    bar = tqdm(desc="tokenizing", unit=" docs", file=sys.stderr, disable=not progress, mininterval=1.0)
    try:
        for batch in _batches(next_pass(), batch_docs):
            encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
            for text, encoding in zip(batch, encodings):
                doc_index = index
                index += 1
                if not text:
                    continue
                input_bytes += len(text.encode("utf-8"))
                ids = encoding.ids
                tokens = np.empty(len(ids) + 1, dtype=dtype)
                tokens[:-1] = ids
                tokens[-1] = eot_id
                split = "test" if test_fraction > 0 and is_test_document(doc_index, seed, test_fraction) else "train"
                writers[split].add_document(tokens)
            bar.update(len(batch))
            total = sum(w.num_tokens for w in writers.values())
            bar.set_postfix_str(f"{total / 1e6:.1f}M tokens, {total / (time.perf_counter() - t_encode):,.0f} tok/s")
        checksums = {name: w.finalize() for name, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    t_end = time.perf_counter()
    if os.path.exists(spool_path):
        os.remove(spool_path)

    if writers["train"].num_sequences == 0:
        raise ValueError("no non-empty documents reached the train split; check the input")
    if "test" in writers and writers["test"].num_sequences == 0:
        print(
            f"warning: none of the {index} documents fell into the test split (test_fraction={test_fraction}); "
            "evaluation on held-out data will not be possible",
            file=sys.stderr,
        )

    files = {}
    split_info = {}
    for name, writer in writers.items():
        for ext in ("bin", "idx"):
            file_name = f"{name}.{ext}"
            files[file_name] = {
                "bytes": os.path.getsize(os.path.join(tmp_dir, file_name)),
                "sha256": checksums[name][ext],
            }
        split_info[name] = {
            "documents": writer.num_sequences,
            "tokens": writer.num_tokens,
            "files": [f"{name}.bin", f"{name}.idx"],
        }
    tokenizer_path = os.path.join(tmp_dir, TOKENIZER)
    files[TOKENIZER] = {"bytes": os.path.getsize(tokenizer_path), "sha256": file_sha256(tokenizer_path)}

    total_tokens = sum(w.num_tokens for w in writers.values())
    total_documents = sum(w.num_sequences for w in writers.values())
    manifest = {
        "format": FORMAT_NAME,
        "format_description": "GPT-NeoX/Megatron MMapIndexedDataset (.bin + .idx, version 1), one sequence "
        "per document, each document ending with the end-of-text token",
        "dtype": dtype.name,
        "vocab_size": actual_vocab,
        "eot_id": eot_id,
        "eot_token": EOT_TOKEN,
        "splits": split_info,
        "files": files,
        "prepare": {
            "vocab_size": vocab_size if tokenizer_file is None else None,
            "test_fraction": test_fraction,
            "seed": seed,
            "tokenizer_file": os.path.basename(tokenizer_file) if tokenizer_file else None,
            "tokenizer_sample_chars": tokenizer_sample_chars if tokenizer_file is None else None,
            "documents_seen": index,
            "input_bytes": input_bytes,
            "source": source,
        },
        "stats": {
            "seconds": round(t_end - t_start, 3),
            "tokenizer_seconds": round(t_tokenizer, 3),
            "tokenize_seconds": round(t_end - t_encode, 3),
            "tokens_per_second": round(total_tokens / max(t_end - t_encode, 1e-9), 1),
            "tokens_per_second_overall": round(total_tokens / max(t_end - t_start, 1e-9), 1),
            "bytes_per_token": round(input_bytes / max(total_tokens - total_documents, 1), 3),
        },
    }
    with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    per_split = ", ".join(f"{name}: {info['tokens']:,}" for name, info in split_info.items())
    rate = manifest["stats"]["tokens_per_second"]
    print(
        f"prepared {total_tokens:,} tokens ({per_split}) in {t_end - t_start:.1f}s ({rate:,.0f} tokens/s tokenizing)",
        file=sys.stderr,
    )
    return manifest
