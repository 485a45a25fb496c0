"""The `fasttrain` command line."""
from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

from fasttrain.config import load_config
from fasttrain.data.cli import register as register_data
from fasttrain.data.corpus import CorpusNotInstalled
from fasttrain.eval.cli import register as register_eval
from fasttrain.ladder import PRESETS
from fasttrain.model import GPT
from fasttrain.sweep.cli import register as register_sweep
from fasttrain.train import REQUEUE_EXIT_CODE, StopRequested, train


def cmd_models(args) -> None:
    """Print the ladder with parameter counts computed from the real module (built on the meta device)."""
    rows = []
    for p in PRESETS.values():
        with torch.device("meta"):
            model = GPT(p.n_layer, p.d_model, p.n_head, args.vocab_size, p.context_length)
        rows.append({
            "preset": p.name, "n_layer": p.n_layer, "d_model": p.d_model, "n_head": p.n_head,
            "head_dim": p.d_model // p.n_head, "context": p.context_length,
            "non_embedding_params": model.num_params(non_embedding=True),
            "total_params": model.num_params(non_embedding=False),
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'preset':>7} {'layers':>6} {'d_model':>7} {'heads':>5} {'head_dim':>8} {'context':>7} "
          f"{'non-embedding':>14} {'total (V=' + str(args.vocab_size) + ')':>16}")
    for r in rows:
        print(f"{r['preset']:>7} {r['n_layer']:>6} {r['d_model']:>7} {r['n_head']:>5} {r['head_dim']:>8} "
              f"{r['context']:>7} {r['non_embedding_params']:>14,} {r['total_params']:>16,}")


def cmd_train(args, overrides) -> None:
    """One config: one run (DeepSpeed under a launcher or with ZeRO); several: same-shape runs as one pack."""
    paths = args.config or [None]
    cfgs = [load_config(path, overrides) for path in paths]
    try:
        summary = train(cfgs[0] if len(cfgs) == 1 else cfgs, resume=args.resume)
    finally:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if torch.distributed.is_initialized():
            # Free what the run left (engine, buffers of finished gloo work) while the process group is
            # alive: gloo state torn down at interpreter exit can abort the process.
            gc.collect()
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fasttrain",
        description="Train families of GPT models on data with exactly controlled repetition.",
    )
    # The deepspeed launcher passes --local_rank before the command; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model (config file plus --section.key value overrides)")
    p.add_argument("--config", action="append",
                   help="YAML or JSON config file, or a run folder; give several to train same-shape runs packed "
                        "into one model on one device")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("models", help="print the model-size ladder with parameter counts")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary for the total count (default 8192)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    register_data(sub)
    register_eval(sub)
    register_sweep(sub)
    return parser


# ConfigError, CheckpointError and the data errors are ValueErrors
USER_ERRORS = (CorpusNotInstalled, ValueError, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, rest)
        else:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            args.func(args)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory: lower train.micro_batch (gradient accumulation keeps the global "
              "batch), pack fewer runs (fewer --config, or a smaller sweep --pack), use a smaller model.preset, "
              "or model.loss=triton", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(f"stopped by {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
