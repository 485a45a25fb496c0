"""`fasttrain report SWEEP_DIR`: the page and report.json of a stored sweep.

`write_report` analyzes the sweep (fasttrain.sweep.analysis), draws its plots (fasttrain.sweep.plots) and
writes into SWEEP_DIR/report/ (or --out) report.md (the summary, the fitted laws, the worst E per size, the
poor-performance band, the plots and a row per run), report.json (`report_dict`) and the PNG plots.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from fasttrain.checkpoint.files import write_json_atomic
from fasttrain.sweep.analysis import (EFFECTIVE_METRICS, PAPER_EDGES, SIGNIFICANT, SweepReport, analyze, copy_label,
                                      fit_sentence, fmt_fraction, fmt_params, fmt_pm, fmt_value, is_significant)
from fasttrain.sweep.grid import format_number
from fasttrain.sweep.plots import draw_plots

PARAMETER_LABELS = {"irreducible": "E_irr", "coefficient": "A", "exponent": "alpha", "data_coefficient": "B",
                    "data_exponent": "beta"}


def _fit_table(report: SweepReport, stage: str, metric: str) -> list[str]:
    fit = report.fits.get((stage, metric))
    if fit is None:
        return [fit_sentence(report, stage, metric) + ".", ""]
    lines = [fit_sentence(report, stage, metric).split(" (")[0] + f"; rms residual {fit.rmse:.4f} nats.", "",
             "| parameter | value | std. error (Jacobian) | 95% bootstrap interval |", "|---|---|---|---|"]
    keys = ("irreducible", "coefficient", "exponent") + (("data_coefficient", "data_exponent") if fit.kind != "L(N)" else ())
    for key in keys:
        value = getattr(fit, key)
        se = fit.stderr.get(key) if fit.stderr else None
        ci = fit.interval.get(key) if fit.interval else None
        fixed = key == "irreducible" and fit.fixed_irreducible
        lines.append(f"| {PARAMETER_LABELS[key]} | {value:.4g}{' (fixed)' if fixed else ''} | "
                     f"{f'{se:.3g}' if se is not None else '-'} | {f'[{ci[0]:.4g}, {ci[1]:.4g}]' if ci else '-'} |")
    if fit.uncertainty:
        lines += ["", f"Uncertainty from {fit.uncertainty}."]
    if fit.note:
        lines += ["", f"Note: {fit.note}."]
    return lines + [""]


def _worst_table(report: SweepReport) -> list[str]:
    worst = report.worst_points("pretrain")
    if not worst:
        return []
    after = {(p.params, p.repeated_fraction, p.placement, p.repeat_count): p for p in report.stage_points("finetune")}
    has_ft = any(k in after for k in ((p.params, p.repeated_fraction, p.placement, p.repeat_count) for p in worst))
    head = ["size", "f", "placement", "worst E", "damage (test loss)", "beyond 2 SE", "N_eff/N test loss",
            f"N_eff/N {copy_label(report)}"] + (["N_eff/N after fine-tuning"] if has_ft else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in worst:
        sig = {True: "yes", False: "no (not ranked)", None: "error unknown"}[p.significant]
        row = [p.size, format_number(p.repeated_fraction), p.placement, str(p.repeat_count),
               fmt_pm(p.damage, p.damage_stderr, sign=True), sig,
               fmt_fraction(*p.fraction["test"]) if "test" in p.fraction else "-",
               fmt_fraction(*p.fraction["copy"]) if "copy" in p.fraction else "-"]
        if has_ft:
            q = after.get((p.params, p.repeated_fraction, p.placement, p.repeat_count))
            row.append(fmt_fraction(*q.fraction["test"]) if q and "test" in q.fraction else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _band_table(report: SweepReport) -> list[str]:
    rows = [(key, n, b) for key, bands in sorted(report.bands.items()) for n, b in sorted(bands.items())]
    if not rows:
        return ["No band: no size has repeated runs at 2 or more E with damage above its baseline.", ""]
    labels = {r.params: r.size for r in report.runs}

    def edge(x, se):
        if x is None:
            return "open"
        return f"{x:.3g}" + (f" (x/÷ {math.exp(se):.2f})" if se is not None else "")

    lines = ["| f | placement | size | N | peak E | max damage | left edge E | right edge E |", "|---|---|---|---|---|---|---|---|"]
    for (f, placement), n, b in rows:
        noise = " (within 2 SE: no band)" if b.significant is False else ""
        lines.append(f"| {format_number(f)} | {placement} | {labels[n]} | {n:,} | {b.peak:g} | "
                     f"{fmt_pm(b.max_damage, b.max_damage_stderr)}{noise} | {edge(b.left, b.left_log_stderr)} | "
                     f"{edge(b.right, b.right_log_stderr)} |")
    lines += ["", "Edges fitted across sizes, E = k N^a (errors: 1 standard error; k's as a factor):", "",
              "| f | placement | edge | k | a | sizes | predicted E at " + (report.predict_label or "-") + " |",
              "|---|---|---|---|---|---|---|"]
    notes = []
    for key in sorted(report.bands):
        for side in ("left", "right"):
            fit = report.edge_fits.get(key + (side,))
            if fit is None:
                lines.append(f"| {format_number(key[0])} | {key[1]} | {side} | - | - | - | "
                             f"{report.edge_fit_errors.get(key + (side,), '')} |")
                continue
            k_se = f" (x/÷ {math.exp(fit.k_log_stderr):.3g})" if fit.k_log_stderr is not None else ""
            a_se = f" ± {fit.a_stderr:.3f}" if fit.a_stderr is not None else ""
            pred = "-"
            if report.predict_params:
                value, lse = fit.predict(report.predict_params)
                pred = f"{value:.3g}" + (f" (x/÷ {math.exp(lse):.2f})" if lse is not None else "")
            lines.append(f"| {format_number(key[0])} | {key[1]} | {side} | {fit.k:.3g}{k_se} | {fit.a:.3f}{a_se} | "
                         f"{fit.n_sizes} | {pred} |")
            if fit.note:
                notes.append(f"{side} edge (f = {format_number(key[0])}, {key[1]}): {fit.note}.")
    if notes:
        lines += [""] + notes
    k_l, a_l = PAPER_EDGES["left"]
    k_r, a_r = PAPER_EDGES["right"]
    lines += ["", f"The paper (f = 0.1, 1.5M-800M parameters): left edge k = {k_l:.2g}, a = {a_l}; right edge "
              f"k = {k_r:.2g}, a = {a_r}.", ""]
    return lines


def _table(report: SweepReport) -> list[str]:
    extras = [(key, short) for key, short in (("repeated_loss", "repeated-subset loss"),
                                              ("copy_loss", "copying loss"),
                                              ("induction_score_max", "induction"), ("icl_score", "ICL score"))
              if any(r.metric(key) is not None for r in report.runs)]
    has_copy = any("copy" in r.effective for r in report.runs)
    head = ["run", "stage", "size", "N", "f", "E", "placement", "seed", "state", "tokens", "test loss", "baseline",
            "delta", "N_eff", "N_eff/N (95% CI)", "status"] + (["N_eff/N copying"] if has_copy else []) \
        + [short for _, short in extras] + ["time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.runs:
        loss = r.test_loss
        delta = loss - r.baseline_loss if (loss is not None and r.baseline_loss is not None) else None
        delta_se = (math.hypot(r.test_loss_stderr, r.baseline_loss_stderr)
                    if delta is not None and r.test_loss_stderr is not None and r.baseline_loss_stderr is not None else None)
        delta_text = fmt_pm(delta, delta_se, sign=True)
        if is_significant(delta, delta_se) is False:
            delta_text += " (within 2 SE)"
        frac = r.effective_fraction
        frac_text = "-" if frac is None else ("inf" if math.isinf(frac) else fmt_fraction(frac, r.fraction_stderr("test")))
        if r.effective_interval and frac is not None and math.isfinite(frac):
            lo, hi = (v / r.params for v in r.effective_interval)
            frac_text += f" [{fmt_value(lo, 3)}, {fmt_value(hi, 3)}]"
        status = r.effective_status or ("no N_eff" if "test" in r.no_effective else "-")
        row = [r.name, r.stage, r.size, f"{r.params:,}", format_number(r.repeated_fraction),
               str(r.repeat_count) if not r.is_baseline else "-", r.placement if not r.is_baseline else "-",
               str(r.seed), r.state, fmt_params(r.tokens), fmt_pm(loss, r.test_loss_stderr),
               fmt_value(r.baseline_loss) if not r.is_baseline else "-", delta_text if not r.is_baseline else "-",
               fmt_params(r.effective_params), frac_text, status]
        if has_copy:
            row.append(fmt_fraction(r.fraction("copy"), r.fraction_stderr("copy")) if "copy" in r.effective else "-")
        row += [fmt_pm(r.metric(key), r.metric_stderr(key)) for key, _ in extras]
        row.append(f"{r.wall_s:.0f} s" if r.wall_s else "-")
        lines.append("| " + " | ".join(row) + " |")
    reasons = sorted({why for r in report.runs for why in r.no_effective.values()})
    if reasons:
        lines += ["", "No effective size where: " + "; ".join(reasons) + "."]
    return lines


def write_report(sweep_dir: str, out_dir: Optional[str] = None, bootstrap: int = 300,
                 fixed_irreducible: Optional[float] = None, predict_size: Optional[str] = None) -> tuple[SweepReport, str]:
    """Analyze a stored sweep and write the page, the plots and report.json; returns (report, page path)."""
    sweep_dir = os.path.abspath(sweep_dir)
    report = analyze(sweep_dir, bootstrap=bootstrap, fixed_irreducible=fixed_irreducible, predict_size=predict_size)
    out_dir = os.path.abspath(out_dir or os.path.join(sweep_dir, "report"))
    os.makedirs(out_dir, exist_ok=True)
    plots, skipped = draw_plots(report, out_dir)

    done = sum(1 for r in report.runs if r.state == "done")
    lines = [f"# Repeated-data sweep: {os.path.basename(sweep_dir)}", "",
             f"{len(report.runs)} runs ({done} done) in `{sweep_dir}`. Test loss in nats/token on held-out data "
             "that contains no repeated text; N counts non-embedding parameters; D is training tokens. "
             f"± is one standard error; differences within {SIGNIFICANT:g} of them are not ranked.", "",
             "## Summary", ""]
    lines += [f"- {s.strip()}" if not s.startswith("  ") else f"    - {s.strip()}" for s in report.summary_lines()]
    lines += ["", "## Effective size", "",
              "N_eff: the N of an unrepeated model trained on the same tokens with the same loss, read off the law "
              "below at the run's own D. *extrapolated*: outside the baselines' range of N (or D); "
              "*below_irreducible*: at or below the law's floor, no finite N_eff.", ""]
    for stage in report.stages:
        for metric in EFFECTIVE_METRICS:
            if stage == "finetune" and metric == "copy" and ("finetune", "copy") not in report.fits:
                continue
            if metric == "copy" and not any(r.copy_loss is not None for r in report.stage_runs(stage)):
                continue
            title = f"{EFFECTIVE_METRICS[metric][0]}" + (", after fine-tuning" if stage == "finetune" else "")
            lines += [f"### {title[0].upper()}{title[1:]}", ""] + _fit_table(report, stage, metric)
    lines += ["## Worst repeat count per size", ""] + _worst_table(report)
    lines += ["## Poor-performance region", "",
              "For each size and f: the range of E where the test-loss damage (loss minus the baseline's) is at "
              "least half its maximum, edges interpolated in log E; *open*: the damage stays above half at the "
              "last E run on that side. Edge errors come from redrawing each damage within its standard error.", ""]
    lines += _band_table(report)
    lines += ["## Plots", ""]
    for name, caption in plots:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if skipped:
        lines += ["Not drawn:", ""] + [f"- {s}" for s in skipped] + [""]
    lines += ["## Runs", ""] + _table(report) + [""]
    page = os.path.join(out_dir, "report.md")
    tmp = page + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, page)
    write_json_atomic(os.path.join(out_dir, "report.json"), report_dict(report, [p for p, _ in plots], skipped))
    return report, page


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def report_dict(report: SweepReport, plots: list, skipped: list = ()) -> dict:
    runs = []
    for r in report.runs:
        effective = {m: {"params": e.params, "fraction": e.params / r.params, "status": e.status,
                         "interval": e.interval, "log_stderr": e.log_stderr, "fraction_stderr": r.fraction_stderr(m)}
                     for m, e in r.effective.items()}
        runs.append({
            "name": r.name, "stage": r.stage, "source": r.source, "size": r.size, "params": r.params,
            "repeated_fraction": r.repeated_fraction, "repeat_count": r.repeat_count, "placement": r.placement,
            "seed": r.seed, "state": r.state, "steps": r.steps, "tokens": r.tokens, "test_loss": r.test_loss,
            "test_loss_stderr": r.test_loss_stderr, "baseline_loss": r.baseline_loss,
            "baseline_loss_stderr": r.baseline_loss_stderr, "copy_loss": r.copy_loss, "copy_copies": r.copy_copies,
            "effective_params": r.effective_params, "effective_fraction": r.effective_fraction,
            "effective_status": r.effective_status or None, "effective_interval": r.effective_interval,
            "effective": effective, "no_effective": r.no_effective or None, "eval": r.eval or None,
        })
    points = [{"stage": p.stage, "params": p.params, "size": p.size, "repeated_fraction": p.repeated_fraction,
               "placement": p.placement, "repeat_count": p.repeat_count, "runs": [r.name for r in p.runs],
               "test_loss": p.loss, "test_loss_stderr": p.loss_stderr, "damage": p.damage,
               "damage_stderr": p.damage_stderr, "significant": p.significant,
               "effective_fraction": {m: {"value": v, "stderr": s} for m, (v, s) in p.fraction.items()}}
              for p in report.points]
    bands = [{"repeated_fraction": f, "placement": pl, "params": n, **b.to_dict()}
             for (f, pl), bands in sorted(report.bands.items()) for n, b in sorted(bands.items())]
    edges = [{"repeated_fraction": k[0], "placement": k[1], "edge": k[2], **e.to_dict(),
              "predicted": e.predict(report.predict_params) if report.predict_params else None}
             for k, e in sorted(report.edge_fits.items())]
    return _clean({
        "sweep_dir": report.sweep_dir, "fit": report.fit.to_dict() if report.fit else None,
        "fit_error": report.fit_error or None,
        "fits": {f"{stage}/{metric}": fit.to_dict() for (stage, metric), fit in report.fits.items()},
        "fit_errors": {f"{stage}/{metric}": why for (stage, metric), why in report.fit_errors.items()},
        "summary": report.summary_lines(), "plots": plots, "not_drawn": list(skipped), "points": points,
        "bands": bands, "edge_fits": edges, "predict_params": report.predict_params, "runs": runs,
    })
