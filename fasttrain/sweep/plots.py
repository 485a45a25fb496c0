"""The report's PNG plots of a SweepReport (fasttrain.sweep.analysis), drawn with matplotlib (imported on first
use, Agg backend). `draw_plots` writes every plot a sweep's runs support and says why each other one is not drawn.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np

from fasttrain.sweep.analysis import (EFFECTIVE_METRICS, PAPER_EDGES, RunRecord, SweepReport, copy_label,
                                      finite_number, fmt_params, match_baselines, mean_and_stderr)
from fasttrain.sweep.grid import format_number

PLOTS = {
    "loss_vs_repeats.png": "Test loss vs repeat count E per model size (dashed: the size's f = 0 baseline)",
    "effective_size_vs_repeats.png": "Effective-size fraction N_eff / N vs E: test loss beside copying",
    "loss_vs_params.png": "Test loss vs non-embedding parameters: baselines with the fit, repeated runs",
    "poor_performance_band.png": "Poor-performance band (damage >= half its maximum) vs model size",
    "effective_size_vs_fraction.png": "Worst-E effective-size fraction vs repeated fraction f",
    "training_curves.png": "Test loss and repeated-subset loss over training, per size and E",
    "loss_curves.png": "Training loss curves per size (black: baseline)",
    "loss_vs_epochs.png": "Whole-dataset repetition: test loss vs epochs at a fixed token budget",
    "finetune_effective_size.png": "Effective-size fraction before and after fine-tuning",
    "prefix_matching_heads.png": "Per-head scores of a repeated run beside its baseline",
}

# Evaluation metrics plotted against E: (key in the eval results, axis label, file, title)
EVAL_PLOTS = (
    ("repeated_loss", "loss on the repeated subset (nats/token)", "repeated_loss_vs_repeats.png",
     "Memorization: loss on the repeated subset"),
    ("copy_loss", "copying loss, copies 2..C (nats/token)", "copying_vs_repeats.png",
     "Copying: loss on a repeated passage"),
    ("induction_score_max", "max prefix-matching score", "induction_vs_repeats.png",
     "Induction heads: prefix-matching score"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _size_colors(report: SweepReport) -> dict:
    plt = _pyplot()
    sizes = sorted({r.params for r in report.runs})
    cmap = plt.get_cmap("viridis")
    return {n: cmap(0.1 + 0.8 * i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}


def _groups(report: SweepReport, stage: str = "pretrain") -> list:
    """(f, placement) combinations of the repeated runs, each plotted in its own panel."""
    return sorted({(r.repeated_fraction, r.placement) for r in report.stage_runs(stage) if not r.is_baseline})


def _panels(plt, n: int, columns: int = 3, width: float = 6, height: float = 4.5):
    cols = min(n, columns)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _cell_values(report: SweepReport, stage: str, params: int, f: float, placement: str,
                 value: Callable, stderr: Optional[Callable]) -> list:
    """(E, mean over seeds, its standard error) of one size's repeated runs."""
    cells: dict = {}
    for r in report.stage_runs(stage):
        if r.is_baseline or r.params != params or r.repeated_fraction != f or r.placement != placement:
            continue
        v = value(r)
        if v is not None and math.isfinite(v):
            cells.setdefault(r.repeat_count, []).append((v, stderr(r) if stderr else None))
    out = []
    for E, pairs in sorted(cells.items()):
        mean, se = mean_and_stderr([v for v, _ in pairs], [s for _, s in pairs])
        out.append((E, mean, se))
    return out


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers (0.5, 2, 300), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):  # minor ticks labelled only on a narrow axis, where majors are few
        lo, hi = ax.get_ylim()
        return f"{v:g}" if lo > 0 and hi / lo < 30 else ""
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _legend(ax, **style) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**style)


def _errorbar(ax, xs, ys, ses, fmt: str = "", **style):
    """Points with error bars of one standard error (a plain line where no error is known)."""
    err = [s if s is not None else 0.0 for s in ses]
    if any(err):
        ax.errorbar(xs, ys, yerr=err, fmt=fmt, capsize=3, **style)
    else:
        ax.plot(xs, ys, *([fmt] if fmt else []), **style)


def _log_errorbar(ax, xs, ys, ses, fmt: str = "", **style):
    """Error bars of y +- se drawn on a log axis (the lower end kept above zero)."""
    lo = [min(s, 0.999 * y) if s is not None else 0.0 for y, s in zip(ys, ses)]
    hi = [s if s is not None else 0.0 for s in ses]
    if any(hi):
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=fmt, capsize=3, **style)
    else:
        ax.plot(xs, ys, *([fmt] if fmt else []), **style)


def _repeat_axis(plt, ax, counts, label="repeat count E"):
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(e) for e in counts])  # label the E values that were run
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _save(plt, fig, path: str, drawn: bool = True) -> bool:
    """Lay the figure out, write it to path when something was drawn, close it; returns whether it was written."""
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_vs_repeats(report: SweepReport, value, ylabel: str, title: str, path: str, stderr=None,
                     baseline_value=None, reference: Optional[float] = None, logy: bool = False,
                     flagged=None, stage: str = "pretrain") -> bool:
    """One panel per (f, placement): value vs E, a line per size with error bars; `flagged` runs get open
    markers; dashed: the size's baseline."""
    plt = _pyplot()
    groups = _groups(report, stage)
    if not groups:
        return False
    colors = _size_colors(report)
    labels = {r.params: r.size for r in report.runs}
    fig, axes = _panels(plt, len(groups))
    drawn = False
    runs = report.stage_runs(stage)
    for ax, (f, placement) in zip(axes, groups):
        for n in sorted({r.params for r in runs if not r.is_baseline}):
            points = _cell_values(report, stage, n, f, placement, value, stderr)
            if not points:
                continue
            xs, ys, ses = zip(*points)
            (_log_errorbar if logy else _errorbar)(ax, xs, ys, ses, "o-", color=colors[n], label=labels[n])
            drawn = True
            if flagged is not None:
                marked = [(r.repeat_count, value(r)) for r in runs if not r.is_baseline and r.params == n
                          and r.repeated_fraction == f and r.placement == placement and flagged(r)
                          and value(r) is not None and math.isfinite(value(r))]
                if marked:
                    mx, my = zip(*marked)
                    ax.plot(mx, my, "o", color=colors[n], markerfacecolor="white", zorder=3)
            if baseline_value is not None:
                base = [baseline_value(b) for b in runs if b.is_baseline and b.params == n]
                base = [b for b in base if b is not None]
                if base:
                    ax.axhline(float(np.mean(base)), color=colors[n], linestyle="--", linewidth=1)
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle=":", linewidth=1)
        counts = sorted({r.repeat_count for r in runs if not r.is_baseline and r.repeated_fraction == f
                         and r.placement == placement})
        _repeat_axis(plt, ax, counts)
        if logy:
            _log_y(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\nf = {format_number(f)}, {placement}" + (" (dashed: f = 0 baseline)" if baseline_value else ""),
                     fontsize=10)
        _legend(ax, title="size", fontsize=8)
    return _save(plt, fig, path, drawn)


def _plot_effective_sizes(report: SweepReport, path: str) -> bool:
    """N_eff / N vs E, test loss beside copying (one row per (f, placement)), error bars of 1 standard error."""
    plt = _pyplot()
    groups = _groups(report)
    metrics = [m for m in EFFECTIVE_METRICS if ("pretrain", m) in report.fits]
    if not groups or not metrics:
        return False
    colors = _size_colors(report)
    labels = {r.params: r.size for r in report.runs}
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(6 * len(metrics), 4.5 * len(groups)), squeeze=False)
    drawn = False
    copy = copy_label(report)
    for row, (f, placement) in enumerate(groups):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for n in sorted({r.params for r in report.repeated}):
                points = _cell_values(report, "pretrain", n, f, placement, lambda r, m=metric: r.fraction(m),
                                      lambda r, m=metric: r.fraction_stderr(m))
                if not points:
                    continue
                xs, ys, ses = zip(*points)
                _log_errorbar(ax, xs, ys, ses, marker="o", linestyle="-", color=colors[n], label=labels[n])
                drawn = True
                flagged = [(r.repeat_count, r.fraction(metric)) for r in report.repeated if r.params == n
                           and r.repeated_fraction == f and r.placement == placement and metric in r.effective
                           and r.effective[metric].status == "extrapolated"]
                if flagged:
                    fx, fy = zip(*flagged)
                    ax.plot(fx, fy, "o", color=colors[n], markerfacecolor="white", zorder=3)
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
            counts = sorted({r.repeat_count for r in report.repeated if r.repeated_fraction == f and r.placement == placement})
            _repeat_axis(plt, ax, counts)
            _log_y(ax)
            ax.set_ylabel("effective size N_eff / N")
            name = "test loss" if metric == "test" else copy
            ax.set_title(f"Effective size on {name}\nf = {format_number(f)}, {placement} "
                         "(open: extrapolated; dotted: 1 = unharmed)", fontsize=10)
            _legend(ax, title="size", fontsize=8)
    return _save(plt, fig, path, drawn)


def _plot_loss_vs_params(report: SweepReport, path: str) -> bool:
    plt = _pyplot()
    if not report.baselines and not report.repeated:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    base = report.baselines
    if base:
        _errorbar(ax, [r.params for r in base], [r.test_loss for r in base], [r.test_loss_stderr for r in base],
                  "ko", label="f = 0 baselines", zorder=3)
    fit = report.fit
    all_params = [r.params for r in report.runs]
    if fit is not None:
        grid = np.geomspace(min(all_params) / 1.5, max(all_params) * 1.5, 200)
        budgets = [fit.tokens] if fit.kind == "L(N)" else sorted({r.tokens for r in base})
        for i, D in enumerate(budgets):
            label = f"fit: {fit.kind} = {fit.formula()}" if i == 0 else None
            if fit.kind != "L(N)":
                label = (label + "\n" if label else "") + f"at D = {fmt_params(D)}"
            ax.plot(grid, fit.loss(grid, D), "k-", linewidth=1, alpha=1.0 if i == 0 else 0.5, label=label)
        if fit.kind == "L(N)" and fit.bootstrap and fit.interval is not None:
            curves = np.array([E + A * grid ** (-a) for E, A, a in fit.bootstrap])
            lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
            ax.fill_between(grid, lo, hi, color="gray", alpha=0.25, label="95% bootstrap band")
    if report.repeated:
        counts = [r.repeat_count for r in report.repeated]
        sc = ax.scatter([r.params for r in report.repeated], [r.test_loss for r in report.repeated], c=np.log10(counts),
                        cmap="plasma", marker="^", s=36, label="repeated runs", zorder=4)
        bar = fig.colorbar(sc, ax=ax)
        bar.set_label("log10 repeat count E")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("test loss (nats/token)")
    ax.set_title("Test loss vs model size")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7)
    return _save(plt, fig, path)


def _plot_band(report: SweepReport, path: str) -> bool:
    """Band vs N per (f, placement): a bar from the left to the right edge at each size (arrows: open
    edges), the edges' fits E = k N^a, the band predicted at an untrained size, the paper's edges."""
    plt = _pyplot()
    keys = [k for k, bands in sorted(report.bands.items()) if bands]
    if not keys:
        return False
    fig, axes = _panels(plt, len(keys), columns=2, width=7, height=5)
    for ax, key in zip(axes, keys):
        bands = report.bands[key]
        counts = sorted({p.repeat_count for p in report.stage_points("pretrain")
                         if (p.repeated_fraction, p.placement) == key})
        lo_E, hi_E = counts[0], counts[-1]
        sizes = sorted(bands)
        for n in sizes:
            b = bands[n]
            if b.significant is False:  # the damage is within its noise: no band to draw
                ax.plot([n], [b.peak], "x", color="gray")
                continue
            left, right = b.left or lo_E, b.right or hi_E
            ax.plot([n, n], [left, right], color="tab:red", linewidth=6, alpha=0.35, solid_capstyle="butt")
            ax.plot([n], [b.peak], "kx")
            for side, edge, se in (("left", b.left, b.left_log_stderr), ("right", b.right, b.right_log_stderr)):
                if edge is None:
                    ax.annotate("", xy=(n, lo_E / 1.6 if side == "left" else hi_E * 1.6),
                                xytext=(n, lo_E if side == "left" else hi_E),
                                arrowprops=dict(arrowstyle="->", color="tab:red"))
                    continue
                yerr = None if se is None else [[edge - edge * math.exp(-se)], [edge * math.exp(se) - edge]]
                ax.errorbar([n], [edge], yerr=yerr, fmt="o" if side == "left" else "s", color="tab:red", capsize=3)
        span = np.geomspace(min(sizes) / 2, max(max(sizes), report.predict_params or 0) * 2, 50)
        for side, marker in (("left", "--"), ("right", "-")):
            fit = report.edge_fits.get(key + (side,))
            if fit is not None:
                se = f" ± {fit.a_stderr:.2f}" if fit.a_stderr is not None else ""
                ax.plot(span, fit.k * span ** fit.a, marker, color="tab:red", linewidth=1,
                        label=f"{side} edge: E = {fit.k:.3g} N^{fit.a:.2f}{se}")
                if report.predict_params:
                    value, lse = fit.predict(report.predict_params)
                    yerr = None if lse is None else [[value - value * math.exp(-lse)], [value * math.exp(lse) - value]]
                    ax.errorbar([report.predict_params], [value], yerr=yerr, fmt="D", color="tab:blue", capsize=3,
                                label=f"predicted at {report.predict_label}" if side == "left" else None)
            k, a = PAPER_EDGES[side]
            paper = k * span ** a
            if np.any((paper > lo_E / 3) & (paper < hi_E * 3)):  # drawn where it falls inside the plot
                ax.plot(span, paper, marker, color="gray", linewidth=0.8, label=f"paper's {side} edge (f = 0.1)")
        ax.set_xscale("log")
        _log_y(ax)
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("repeat count E")
        ax.set_ylim(lo_E / 3, hi_E * 3)
        ax.set_title(f"Poor-performance band (damage >= half its max)\nf = {format_number(key[0])}, {key[1]} "
                     "(bars: band; x: peak; arrows: open edge)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _legend(ax, fontsize=7)
    return _save(plt, fig, path)


def _plot_fraction_axis(report: SweepReport, path: str) -> bool:
    worst = [p for p in report.worst_points("pretrain") if "test" in p.fraction]
    if len({p.repeated_fraction for p in worst}) < 2:
        return False
    plt = _pyplot()
    colors = _size_colors(report)
    labels = {r.params: r.size for r in report.runs}
    fig, ax = plt.subplots(figsize=(7, 5))
    for n in sorted({p.params for p in worst}):
        pts = sorted((p for p in worst if p.params == n), key=lambda p: p.repeated_fraction)
        _log_errorbar(ax, [p.repeated_fraction for p in pts], [p.fraction["test"][0] for p in pts],
                      [p.fraction["test"][1] for p in pts], marker="o", linestyle="-", color=colors[n], label=labels[n])
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    _log_y(ax)
    ax.set_xlabel("repeated fraction f")
    ax.set_ylabel("effective size N_eff / N at the worst E")
    ax.set_title("Cost of repetition vs f (worst E of each size and f)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, title="size", fontsize=8)
    return _save(plt, fig, path)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` logged points (shorter at the start), so a curve keeps its length."""
    if window <= 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    start = np.maximum(0, idx - window)
    return (sums[idx] - sums[start]) / (idx - start)


def _repeat_colors(report: SweepReport):
    plt = _pyplot()
    counts = [r.repeat_count for r in report.runs if not r.is_baseline] or [2]
    lo, hi = math.log10(min(counts)), math.log10(max(counts))
    cmap = plt.get_cmap("plasma")

    def color(r):
        if r.is_baseline:
            return "black"
        t = 0.5 if hi == lo else (math.log10(r.repeat_count) - lo) / (hi - lo)
        return cmap(0.1 + 0.8 * t)
    return color


def _run_label(r: RunRecord) -> str:
    return f"f = 0 (s{r.seed})" if r.is_baseline else f"f = {format_number(r.repeated_fraction)}, E = {r.repeat_count}"


def _plot_curves(report: SweepReport, path: str) -> bool:
    plt = _pyplot()
    runs = [r for r in report.runs if r.stage == "pretrain" and r.curve]
    sizes = sorted({r.params for r in runs})
    if not sizes:
        return False
    labels = {r.params: r.size for r in report.runs}
    color = _repeat_colors(report)
    fig, axes = _panels(plt, len(sizes))
    for ax, n in zip(axes, sizes):
        for r in [r for r in runs if r.params == n]:
            xs, ys = zip(*r.curve)
            ys = _smooth(np.asarray(ys), max(1, len(ys) // 25))
            style = dict(color=color(r), linewidth=1.6 if r.is_baseline else 1, label=_run_label(r),
                         zorder=3 if r.is_baseline else 2)
            ax.plot(xs, ys, **style)
            split = [(t, rep) for t, rep, _ in r.split_curve if rep is not None]
            if split and not r.is_baseline:
                sx, sy = zip(*split)
                ax.plot(sx, _smooth(np.asarray(sy), max(1, len(sy) // 25)), color=color(r), linewidth=0.8,
                        linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss, smoothed\n(dotted: on the batch's repeated rows)")
        ax.set_title(f"Loss curves, {labels[n]}", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    return _save(plt, fig, path)


def _plot_training_curves(report: SweepReport, path: str) -> tuple[bool, str]:
    """Per size: test loss (top) and repeated-subset loss (bottom) vs training tokens, a line per E, from
    the evaluations during training (train.eval_every) and the per-checkpoint evaluation documents."""
    plt = _pyplot()
    runs = [r for r in report.runs if r.stage == "pretrain" and len(r.eval_curve) >= 2]
    if not runs:
        return False, ("no run holds 2 or more evaluations over training (set train.eval_every, or run "
                       "`fasttrain eval RUN --all` on runs that kept their checkpoints)")
    sizes = sorted({r.params for r in runs})
    has_repeated = any(e.get("repeated_loss") is not None for r in runs for e in r.eval_curve)
    rows = 2 if has_repeated else 1
    labels = {r.params: r.size for r in report.runs}
    color = _repeat_colors(report)
    fractions = sorted({r.repeated_fraction for r in runs if not r.is_baseline})
    dash = {f: ("-", "--", ":", "-.")[i % 4] for i, f in enumerate(fractions)}  # colour: E; line style: f
    fig, axes = plt.subplots(rows, len(sizes), figsize=(6 * len(sizes), 4.2 * rows), squeeze=False)
    for col, n in enumerate(sizes):
        for row, (key, ylabel) in enumerate((("test_loss", "test loss (nats/token)"),
                                             ("repeated_loss", "repeated-subset loss (nats/token)"))[:rows]):
            ax = axes[row][col]
            for r in sorted((r for r in runs if r.params == n), key=lambda r: (not r.is_baseline, r.repeat_count)):
                pts = [(e["tokens"], e[key], finite_number(e.get(key + "_stderr"))) for e in r.eval_curve
                       if finite_number(e.get(key)) is not None]
                if not pts:
                    continue
                xs, ys, ses = zip(*pts)
                _errorbar(ax, xs, ys, ses, marker=".", linestyle=dash.get(r.repeated_fraction, "-"), color=color(r),
                          label=_run_label(r), linewidth=1.6 if r.is_baseline else 1)
            ax.set_xscale("log")
            ax.set_xlabel("training tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{labels[n]}: {ylabel.split(' (')[0]} over training", fontsize=10)
            ax.grid(alpha=0.3)
            _legend(ax, fontsize=7)
    why = "" if has_repeated else ("the evaluations during training hold no repeated-subset loss (a trainer that "
                                   "records it, or `fasttrain eval RUN --all`, adds the second row)")
    return _save(plt, fig, path), why


def _plot_epochs(report: SweepReport, path: str) -> bool:
    """f = 1 runs: test loss vs epochs E at their fixed token budget, the baseline (one epoch) at E = 1."""
    whole = [r for r in report.repeated if r.repeated_fraction == 1.0]
    if not whole:
        return False
    plt = _pyplot()
    colors = _size_colors(report)
    labels = {r.params: r.size for r in report.runs}
    placements = sorted({r.placement for r in whole})
    fig, axes = _panels(plt, len(placements), columns=2, width=7, height=5)
    for ax, placement in zip(axes, placements):
        for n in sorted({r.params for r in whole}):
            points = _cell_values(report, "pretrain", n, 1.0, placement, lambda r: r.test_loss, lambda r: r.test_loss_stderr)
            base = [b for b in report.baselines if b.params == n]
            if base:
                loss, se = mean_and_stderr([b.test_loss for b in base], [b.test_loss_stderr for b in base])
                points = [(1, loss, se)] + points
            xs, ys, ses = zip(*points)
            _errorbar(ax, xs, ys, ses, marker="o", linestyle="-", color=colors[n], label=labels[n])
        counts = sorted({1} | {r.repeat_count for r in whole if r.placement == placement})
        _repeat_axis(plt, ax, counts, "epochs (passes over S / E unique windows; 1 = the f = 0 baseline)")
        ax.set_ylabel("test loss (nats/token)")
        ax.set_title(f"Whole-dataset repetition at a fixed token budget ({placement})", fontsize=10)
        _legend(ax, title="size", fontsize=8)
    return _save(plt, fig, path)


def _plot_finetune(report: SweepReport, path: str) -> bool:
    if ("finetune", "test") not in report.fits or ("pretrain", "test") not in report.fits:
        return False
    plt = _pyplot()
    groups = _groups(report)
    colors = _size_colors(report)
    labels = {r.params: r.size for r in report.runs}
    fig, axes = _panels(plt, len(groups), columns=2, width=7, height=5)
    drawn = False
    for ax, (f, placement) in zip(axes, groups):
        for n in sorted({r.params for r in report.repeated}):
            for stage, style in (("pretrain", ":"), ("finetune", "-")):
                points = _cell_values(report, stage, n, f, placement, lambda r: r.fraction("test"),
                                      lambda r: r.fraction_stderr("test"))
                if points:
                    xs, ys, ses = zip(*points)
                    _log_errorbar(ax, xs, ys, ses, marker="o", linestyle=style, color=colors[n],
                                  label=f"{labels[n]}, {'fine-tuned' if stage == 'finetune' else 'pretrained'}")
                    drawn = True
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        counts = sorted({r.repeat_count for r in report.repeated if r.repeated_fraction == f and r.placement == placement})
        _repeat_axis(plt, ax, counts)
        _log_y(ax)
        ax.set_ylabel("effective size N_eff / N (test loss)")
        ax.set_title(f"Before (dotted) and after (solid) fine-tuning\nf = {format_number(f)}, {placement}", fontsize=10)
        _legend(ax, fontsize=7)
    return _save(plt, fig, path, drawn)


HEAD_SCORES = (("induction_scores", "prefix matching"), ("copying_head_scores", "copying score"),
               ("previous_token_scores", "previous-token score"))


def _head_matrix(r: RunRecord, key: str) -> Optional[np.ndarray]:
    value = (r.eval or {}).get(key)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.size and np.all(np.isfinite(arr)) else None


def _plot_heads(report: SweepReport, path: str) -> tuple[bool, str]:
    """Per-head scores (layer x head) of the largest size's worst-E run beside its baseline."""
    worst = [p for p in report.worst_points("pretrain")]
    candidates = []
    for p in sorted(worst, key=lambda p: (-p.params, -(p.damage or 0))):  # the largest size, most damaged
        for r in p.runs:
            base = [b for b in match_baselines(r, report.baselines) if _head_matrix(b, "induction_scores") is not None]
            if _head_matrix(r, "induction_scores") is not None and base:
                candidates.append((r, base[0]))
    if not candidates:
        return False, ("no repeated run and its baseline both hold per-head prefix-matching scores "
                       "(induction_scores in eval.json: evaluate with the induction metric)")
    run, base = candidates[0]
    keys = [(k, name) for k, name in HEAD_SCORES if _head_matrix(run, k) is not None and _head_matrix(base, k) is not None]
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.2 * len(keys) + 0.6), squeeze=False)
    for row, (key, name) in enumerate(keys):
        a, b = _head_matrix(base, key), _head_matrix(run, key)
        vmin, vmax = (-1.0, 1.0) if key == "copying_head_scores" else (0.0, max(1e-6, float(max(a.max(), b.max()))))
        for col, (r, m) in enumerate(((base, a), (run, b))):
            ax = axes[row][col]
            im = ax.imshow(m, cmap="viridis" if vmin == 0 else "coolwarm", vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(m.shape[1]))
            ax.set_yticks(range(m.shape[0]))
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if vmin == 0 else "black")
            what = "baseline" if r.is_baseline else f"E = {r.repeat_count}, f = {format_number(r.repeated_fraction)}"
            ax.set_title(f"{name}: {r.size} {what}", fontsize=9)
            fig.colorbar(im, ax=ax)
    missing = [name for k, name in HEAD_SCORES if (k, name) not in keys]
    return _save(plt, fig, path), (f"{', '.join(missing)} per head not in the evaluations" if missing else "")


def draw_plots(report: SweepReport, out_dir: str) -> tuple[list, list]:
    """Every plot the sweep's runs support, written into out_dir: ([(file, caption)] drawn, ["file: why not"])."""
    plots, skipped = [], []

    def plot(ok, name: str, caption: str, why_not: str = "") -> None:
        if ok:
            plots.append((name, caption))
        elif why_not:
            skipped.append(f"{name}: {why_not}")

    out = lambda name: os.path.join(out_dir, name)  # noqa: E731
    loss_of, loss_se = (lambda r: r.test_loss), (lambda r: r.test_loss_stderr)
    plot(_plot_vs_repeats(report, loss_of, "test loss (nats/token)", "Test loss vs repeat count",
                          out("loss_vs_repeats.png"), stderr=loss_se, baseline_value=loss_of),
         "loss_vs_repeats.png", PLOTS["loss_vs_repeats.png"], "no repeated run has a test loss yet")
    plot(_plot_effective_sizes(report, out("effective_size_vs_repeats.png")), "effective_size_vs_repeats.png",
         PLOTS["effective_size_vs_repeats.png"] + " (open markers: N_eff outside the baselines' range, extrapolated)",
         f"no effective sizes ({report.fit_error})" if report.fit is None else "")
    plot(_plot_loss_vs_params(report, out("loss_vs_params.png")), "loss_vs_params.png", PLOTS["loss_vs_params.png"])
    plot(_plot_band(report, out("poor_performance_band.png")), "poor_performance_band.png",
         PLOTS["poor_performance_band.png"], "no size has repeated runs at 2 or more E above its baseline"
         if report.repeated else "")
    plot(_plot_fraction_axis(report, out("effective_size_vs_fraction.png")), "effective_size_vs_fraction.png",
         PLOTS["effective_size_vs_fraction.png"],
         "the sweep has one repeated fraction f" if report.repeated and report.fit is not None else "")
    ok, why = _plot_training_curves(report, out("training_curves.png"))
    plot(ok, "training_curves.png", PLOTS["training_curves.png"], why)
    if ok and why:
        skipped.append(f"training_curves.png, second row: {why}")
    plot(_plot_curves(report, out("loss_curves.png")), "loss_curves.png", PLOTS["loss_curves.png"])
    plot(_plot_epochs(report, out("loss_vs_epochs.png")), "loss_vs_epochs.png", PLOTS["loss_vs_epochs.png"])
    plot(_plot_finetune(report, out("finetune_effective_size.png")), "finetune_effective_size.png",
         PLOTS["finetune_effective_size.png"],
         report.fit_errors.get(("finetune", "test"), "") if "finetune" in report.stages else "")
    for key, ylabel, name, title in EVAL_PLOTS:
        if any(r.metric(key) is not None for r in report.repeated):
            metric = lambda r, k=key: r.metric(k)  # noqa: E731
            metric_se = lambda r, k=key: r.metric_stderr(k)  # noqa: E731
            plot(_plot_vs_repeats(report, metric, ylabel, title, out(name), stderr=metric_se,
                                  baseline_value=metric if key != "repeated_loss" else None),
                 name, f"{title} vs E")
    ok, why = _plot_heads(report, out("prefix_matching_heads.png"))
    plot(ok, "prefix_matching_heads.png", PLOTS["prefix_matching_heads.png"], why if report.repeated else "")
    if ok and why:
        skipped.append(f"prefix_matching_heads.png: {why}")
    return plots, skipped
