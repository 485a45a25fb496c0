"""The data subcommands of `fasttrain`: prepare, audit, show-batch.

`register(subparsers)` adds them to the main parser; each sets `func` (and `takes_overrides` for the two
that read a run config, which then accept the same `--section.key value` overrides as `train`).
"""
import json
import os
import sys

from .prepare import DEFAULT_TOKENIZER_SAMPLE_CHARS
from .sampler import open_training_stream


def register(subparsers):
    p = subparsers.add_parser("prepare", help="tokenize a corpus into a dataset folder (tokenizer, token files, manifest)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--corpus", choices=["default"], default=None,
                        help="the built-in English corpus (the default when --input is not given)")
    source.add_argument("--input", metavar="PATH",
                        help="your text: a folder of .txt files, a .jsonl file with a 'text' field, or a "
                             "text file with one document per line")
    p.add_argument("--out", metavar="DIR", help="dataset folder to create (default: data/default or data/<input name>)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--test-fraction", type=float, default=0.01,
                   help="share of documents held out as the test split (default 0.01)")
    p.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training a BPE")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop reading the input after this many bytes of text")
    p.add_argument("--tokenizer-sample-chars", type=int, default=DEFAULT_TOKENIZER_SAMPLE_CHARS,
                   help="train the BPE on the first this many characters of train documents "
                        f"(default {DEFAULT_TOKENIZER_SAMPLE_CHARS:,}; 0 for all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prepare)

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
    from .corpus import iter_default_corpus, iter_text_documents
    from .prepare import prepare_dataset

    if args.input:
        def documents():
            docs = iter_text_documents(args.input)
            return docs if args.max_bytes is None else _take_bytes(docs, args.max_bytes)

        name = os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]
        source = {"input": os.path.abspath(args.input), "max_bytes": args.max_bytes}
    else:
        def documents():
            return iter_default_corpus(args.max_bytes)

        name = "default"
        source = {"corpus": "default", "max_bytes": args.max_bytes}
    out = args.out or os.path.join("data", name)
    manifest = prepare_dataset(
        out,
        documents,
        vocab_size=args.vocab_size,
        test_fraction=args.test_fraction,
        tokenizer_file=args.tokenizer,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        source=source,
        tokenizer_sample_chars=args.tokenizer_sample_chars or None,
    )
    splits = ", ".join(f"{k}: {v['documents']:,} documents / {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
    print(f"{out}: vocab {manifest['vocab_size']}, {manifest['dtype']}, {splits}")


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


def _load(target, overrides, load_config):
    if load_config is None:
        from fasttrain.config import load_config
    return load_config(config_path(target), list(overrides or []))


def run_audit(args, overrides=(), load_config=None):
    from .audit import audit_schedule, format_audit_table

    cfg = _load(args.target, overrides, load_config)
    _, stream = open_training_stream(cfg, pin_memory=False)
    result = audit_schedule(stream, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_audit_table(result))
    if not result["ok"]:
        raise SystemExit(1)
    return result


def run_show_batch(args, overrides=(), load_config=None):
    from .audit import format_batch_table, show_batch

    cfg = _load(args.target, overrides, load_config)
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
