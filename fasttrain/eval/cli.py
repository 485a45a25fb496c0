"""`fasttrain eval` and `fasttrain export`, registered on the main parser by register(subparsers)."""
from __future__ import annotations

import os

import torch

from fasttrain.checkpoint.deepspeed import export_consolidated
from fasttrain.checkpoint.files import resolve_checkpoint
from fasttrain.eval.copying import PAPER_COPIES, check_copies
from fasttrain.eval.export import export_checkpoint
from fasttrain.eval.run import ALL_METRICS, evaluate_checkpoint, format_table, parse_metrics


def cmd_eval(args) -> None:
    parse_metrics(args.metrics)  # a typo fails before any model is loaded
    check_copies(args.copies)
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens {args.tokens}: the evaluation token budget must be at least 1")
    # Several runs in one process: the interpreter, CUDA context and tuned kernels are paid for once.
    several = len(args.checkpoint) > 1
    if args.json and several and "{run}" not in args.json:
        raise ValueError(f"--json {args.json}: with several checkpoints, write a path with {{run}} in it "
                         "(e.g. '{run}/eval.json'), or leave --json out")
    jobs = []  # (checkpoint path, output path or None for the default)
    for source in args.checkpoint:
        out = args.json.replace("{run}", source.rstrip("/")) if args.json else None
        if args.all:
            if not os.path.isdir(source):
                raise ValueError(f"--all evaluates every checkpoint of a run folder; {source} is not a folder")
            for path in reversed(resolve_checkpoint(source)):  # oldest first
                name = "eval_" + os.path.splitext(os.path.basename(path))[0] + ".json"
                jobs.append((path, os.path.join(out, name) if out else None))
        else:
            jobs.append((source, out))
    for i, (path, out) in enumerate(jobs):
        doc, written = evaluate_checkpoint(path, dataset_path=args.dataset, metrics=args.metrics, tokens=args.tokens,
                                           out=out, device=args.device, config=args.config, copies=args.copies)
        if i:
            print()
        print(format_table(doc))
        print(f"  written to {written}")


def cmd_export(args) -> None:
    if bool(args.hf) == bool(args.pt):
        raise ValueError("export: give one of --hf OUT_DIR (a Hugging Face model) or --pt OUT.pt (a DeepSpeed "
                         "checkpoint as one plain checkpoint file)")
    if args.pt:
        out = export_consolidated(args.checkpoint, args.pt, args.dtype, False if args.no_optimizer else None)
        print(f"wrote {out} (a plain checkpoint: fasttrain eval, export and load_model read it)")
        return
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = export_checkpoint(args.checkpoint, args.hf, dataset_path=args.dataset, config=args.config, dtype=dtype)
    print(f"wrote a Hugging Face model and tokenizer to {out} (load with AutoModelForCausalLM.from_pretrained)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: test loss, memorization, copying, induction heads",
        description="Evaluate checkpoints (.pt files, or run folders: their newest checkpoint) and write one "
                    "JSON document per checkpoint (default: eval_step_NNNNNNN.json next to it).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", nargs="+",
                   help="one or more; several are evaluated in one process, one after the other")
    p.add_argument("--dataset", help="prepared dataset folder (default: the run's data.path)")
    p.add_argument("--tokens", type=int,
                   help="tokens each metric reads, which sets how many windows, passages, contexts and sequences "
                        "it averages (default: the run's train.eval_tokens)")
    p.add_argument("--copies", type=int, default=PAPER_COPIES,
                   help=f"copying: times the passage is placed in one context, at least 2 (default {PAPER_COPIES}, "
                        "the paper's); the passage is (seq_len - 1) // copies tokens")
    p.add_argument("--json", metavar="OUT",
                   help="where to write the JSON document (a folder with --all); with several checkpoints a path "
                        "containing {run}, replaced by each argument (e.g. '{run}/eval.json')")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    p.add_argument("--all", action="store_true", help="evaluate every checkpoint of the run folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--config", help="config to load the checkpoint with (default: the one saved with it)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "export", help="export a checkpoint to a Hugging Face model folder (needs transformers), or a DeepSpeed "
                       "checkpoint to one plain checkpoint file",
        description="--hf: write config.json, model.safetensors and the tokenizer so that "
                    "AutoModelForCausalLM/AutoTokenizer.from_pretrained(OUT_DIR) load offline. --pt: write a "
                    "DeepSpeed checkpoint (a run folder, its ds_checkpoints folder or one step_XXXXXXX folder) as "
                    "one plain checkpoint file (fp32 with the optimizer state, so the plain trainer resumes from it).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN")
    p.add_argument("--hf", metavar="OUT_DIR", help="Hugging Face output folder")
    p.add_argument("--pt", metavar="OUT.pt", help="plain checkpoint file from a DeepSpeed checkpoint")
    p.add_argument("--no-optimizer", action="store_true", help="--pt: weights only (fp32 exports include the optimizer)")
    p.add_argument("--dataset", help="dataset folder whose tokenizer to export (default: the run's data.path)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight precision (default fp32)")
    p.add_argument("--config", help="config to load the checkpoint with (default: the one saved with it)")
    p.set_defaults(func=cmd_export)
