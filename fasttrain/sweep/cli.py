"""`fasttrain sweep`, `fasttrain report` and `fasttrain demo`, registered by register(subparsers)."""
from __future__ import annotations

import argparse
import os
import sys

from fasttrain.config import ConfigError
from fasttrain.data.corpus import CorpusNotInstalled
from fasttrain.sweep.demo import run_demo
from fasttrain.sweep.grid import SweepError, load_sweep, slurm_settings_from_dict
from fasttrain.sweep.plan import format_plan, plan
from fasttrain.sweep.report import write_report
from fasttrain.sweep.runner import run_sweep
from fasttrain.sweep.slurm import cancel, format_status, run_slurm_sweep, sweep_status


def cmd_sweep(args) -> None:
    spec = load_sweep(args.sweep)
    if args.slurm and spec.slurm is None:
        spec.slurm = slurm_settings_from_dict({}, spec.num_gpus)
    if args.status or args.cancel:
        sweep_dir = args.out or spec.out_dir
        if args.cancel:
            cancelled = cancel(spec, args.out)
            print(f"cancelled {len(cancelled)} Slurm job(s){': ' + ' '.join(cancelled) if cancelled else ''}; "
                  "their runs resume from their newest checkpoint when the sweep is submitted again")
        runs, statuses, entries = sweep_status(spec, args.out)
        print(format_status(runs, statuses, entries, os.path.abspath(sweep_dir)))
        return
    if args.dry_run:
        print(format_plan(plan(spec, args.out, measure=not args.no_measure, pack=args.pack, jobs=args.jobs),
                          jobs=args.jobs))
        return
    if spec.slurm is None and (args.wait or args.retry_failed):
        raise SweepError(f"--{'wait' if args.wait else 'retry-failed'}: only for sweeps on Slurm (--slurm, or "
                         "executor.slurm in the sweep file); a sweep run here always retries its failed runs")
    if spec.slurm is not None:
        try:
            result = run_slurm_sweep(spec, args.out, pack=args.pack, wait=args.wait, retry_failed=args.retry_failed,
                                     progress=not args.quiet)
        except KeyboardInterrupt:
            sys.exit(130)
        print(f"{len(result.done)} of {len(result.runs)} runs done, {len(result.queued)} queued or running on "
              f"Slurm in {result.sweep_dir}; follow with: fasttrain sweep {args.sweep} --status")
        if result.failed:
            raise SweepError(f"{len(result.failed)} run(s) failed on Slurm and are out of retries: "
                             f"{', '.join(result.failed)} (--status says why; see their train.log or eval.log); "
                             "fix the cause and re-run with --retry-failed")
        return
    try:
        result = run_sweep(spec, args.out, jobs=args.jobs, progress=not args.quiet, pack=args.pack)
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"{len(result.runs) - len(result.failed)} of {len(result.runs)} runs done in {result.sweep_dir}; "
          f"analyze with: fasttrain report {result.sweep_dir}")
    if result.failed:
        raise SweepError(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)} (see their train.log "
                         "or eval.log); fix the cause and re-run the same command to retry them")


def cmd_report(args) -> None:
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: must be 0 (none) or more resamples")
    report, page = write_report(args.sweep_dir, args.out, bootstrap=args.bootstrap,
                                fixed_irreducible=args.fixed_irreducible, predict_size=args.predict_size)
    for line in report.summary_lines():
        print(line)
    print(f"report written to {page}")


def cmd_demo(args) -> None:
    try:
        run_demo(out_dir=args.out, scale=args.scale, jobs=args.jobs, max_bytes=args.max_bytes, pack=args.pack,
                 finetune=args.finetune)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a grid of models (sizes x repeated fraction x repeat count x seeds), resumably",
        description="Expand a sweep file into runs (f = 0 baselines added automatically) and train every run "
                    "not finished yet, each in its own subprocess (or up to K same-shape runs per subprocess "
                    "with --pack K) on its own GPU(s), or as Slurm jobs with --slurm; re-run the same command "
                    "after a crash or a kill to continue.",
    )
    p.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file: base config, grid axes, token budget, out_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (N, tokens, FLOPs, estimated time) without training")
    p.add_argument("--jobs", type=int, default=None,
                   help="at most this many runs (or packs) at once, each on its own GPU or GPU set (default: as "
                        "many as the GPUs hold; 1 on a CPU)")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="train up to K same-shape runs together as one stacked model in one process, so that "
                        "small models fill a GPU (overrides the sweep file's pack; default 1)")
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: the sweep file's out_dir)")
    p.add_argument("--no-measure", action="store_true",
                   help="with --dry-run: do not time steps to estimate throughput")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--slurm", action="store_true",
                   help="submit each run (or pack) as a Slurm job (settings: executor.slurm in the sweep file); "
                        "re-run to reconcile with Slurm and resubmit what failed or was lost")
    p.add_argument("--wait", action="store_true",
                   help="with Slurm: follow the jobs until every run is done or out of retries")
    p.add_argument("--status", action="store_true", help="print every run's state (reconciled with Slurm)")
    p.add_argument("--cancel", action="store_true", help="cancel the sweep's Slurm jobs")
    p.add_argument("--retry-failed", action="store_true",
                   help="with Slurm: submit runs that are out of retries again (after fixing the cause)")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser(
        "report", help="fit the scaling law, compute effective sizes, write plots and a report page",
        description="Analyze a sweep folder (no training): fit the f = 0 baselines' loss at fixed data "
                    "(L(N) = E_irr + A N^-alpha at one token budget, L(N, D) = E + A N^-alpha + B D^-beta over "
                    "several), give every repeated run its effective size on test loss and copying, find the "
                    "poor-performance band, write PNG plots and report.md.",
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: SWEEP_DIR/report)")
    p.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples for uncertainties (default 300)")
    p.add_argument("--fixed-irreducible", type=float, default=None, metavar="E_IRR",
                   help="fix E_irr instead of fitting it (for sweeps with too few sizes; L(N) only)")
    p.add_argument("--predict-size", metavar="SIZE", default=None,
                   help="untrained size to predict the poor-performance band at: a preset or a parameter count "
                        "(default: the next preset above the largest size run)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "demo", help="prepare the default corpus, run a small repeated-data sweep and write its report",
        description="The whole experiment in one command: about 20 minutes on 2 CPU cores at --scale 1. "
                    "Re-run the same command to continue an interrupted demo.",
    )
    p.add_argument("--out", metavar="DIR", default="demo", help="folder for the dataset, runs and report (default: demo)")
    p.add_argument("--scale", type=int, default=1,
                   help="1: tiny models for a CPU; 2, 3, ...: larger models and more tokens for a GPU")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes at once (default: one per core up to 4 on a CPU, one per GPU)")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="runs trained together as one model (default: 1 on a CPU; on a GPU, each size's runs)")
    p.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=None,
                   help="also fine-tune every run on unseen text and report the effective size after it "
                        "(default: as the scale chooses)")
    p.add_argument("--max-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)


def main(argv=None) -> int:
    """`python -m fasttrain.sweep` runs these three commands on their own."""
    parser = argparse.ArgumentParser(prog="python -m fasttrain.sweep")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CorpusNotInstalled, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
