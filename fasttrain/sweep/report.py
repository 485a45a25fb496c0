"""`fasttrain report SWEEP_DIR`: the scaling-law fit, effective sizes, plots and a report page.

Reads only what a sweep left on disk (manifest.json and each run folder's config.yaml, final.json,
metrics.jsonl and eval.json), so it runs again at any time without training anything. Writes into
SWEEP_DIR/report/ (or --out):
    report.md                   the page: fit, summary, plots, a table of every run
    report.json                 the same numbers for scripts
    loss_vs_repeats.png         test loss vs repeat count E per model size (the double descent)
    effective_size_vs_repeats.png  N_eff / N vs E
    loss_vs_params.png          test loss vs N: baselines with the fit, repeated runs
    loss_curves.png             training loss vs tokens for every run
    repeated_loss_vs_repeats.png, copying_vs_repeats.png, induction_vs_repeats.png
                                when the runs were evaluated (`evaluate: true` or `fasttrain eval`)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import yaml

from fasttrain.checkpoint.files import read_json, write_json_atomic
from fasttrain.ladder import PRESETS, non_embedding_params
from fasttrain.sweep.fit import FitError, ScalingFit, effective_size, fit_scaling_law
from fasttrain.sweep.grid import SweepError, format_number
from fasttrain.sweep.manifest import MANIFEST
from fasttrain.train.metrics import read_metrics

# Optional evaluation metrics plotted against E: (key in eval results, axis label, file, title)
EVAL_PLOTS = (
    ("repeated_loss", "loss on the repeated subset (nats/token)", "repeated_loss_vs_repeats.png",
     "Memorization: loss on the repeated subset"),
    ("copy_text_second_loss", "loss on the 2nd copy of a passage (nats/token)", "copying_vs_repeats.png",
     "Copying: loss on a repeated passage"),
    ("induction_score_max", "max prefix-matching score", "induction_vs_repeats.png",
     "Induction heads: prefix-matching score"),
)


@dataclass
class RunRecord:
    name: str
    run_dir: str
    size: str
    params: int
    repeated_fraction: float
    repeat_count: int
    placement: str
    seed: int
    steps: int
    tokens: int
    state: str
    final: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    wall_s: Optional[float] = None
    curve: list = field(default_factory=list)  # (tokens, training loss)
    test_curve: list = field(default_factory=list)  # (tokens, test loss) of evaluations during training
    # filled by the analysis
    baseline_loss: Optional[float] = None
    effective_params: Optional[float] = None
    effective_status: str = ""
    effective_interval: Optional[tuple] = None

    @property
    def is_baseline(self) -> bool:
        return self.repeated_fraction == 0

    @property
    def test_loss(self) -> Optional[float]:
        for source in (self.final, self.eval):
            if source and source.get("test_loss") is not None:
                return float(source["test_loss"])
        return None

    @property
    def effective_fraction(self) -> Optional[float]:
        if self.effective_params is None:
            return None
        return self.effective_params / self.params

    def metric(self, key: str) -> Optional[float]:
        value = (self.eval or {}).get(key, (self.final or {}).get(key))
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _size_label(preset: Optional[str], params: int) -> str:
    if preset:
        return preset
    for unit, scale in (("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{unit}"
    return str(params)


def _read_curves(run_dir: str, tokens_per_step: int) -> tuple[list, list]:
    train, test = [], []
    for rec in read_metrics(run_dir):
        tokens = rec.get("tokens", rec.get("step", 0) * tokens_per_step)
        if "loss" in rec:
            train.append((tokens, rec["loss"]))
        elif "test_loss" in rec:
            test.append((tokens, rec["test_loss"]))
    return train, test


def load_run(run_dir: str, entry: Optional[dict] = None) -> Optional[RunRecord]:
    """A run folder -> RunRecord (None when it holds no config.yaml)."""
    entry = entry or {}
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    model, data, train = cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})
    preset = model.get("preset")
    n_layer = model.get("n_layer") or (PRESETS[preset].n_layer if preset in PRESETS else None)
    d_model = model.get("d_model") or (PRESETS[preset].d_model if preset in PRESETS else None)
    if not n_layer or not d_model:
        raise SweepError(f"{path}: no model.n_layer/d_model or known preset: not a run config")
    params = non_embedding_params(n_layer, d_model)
    T = data.get("seq_len") or model.get("context_length") or (PRESETS[preset].context_length if preset in PRESETS else 0)
    steps, batch = int(train.get("steps", 0)), int(train.get("global_batch", 0))
    final = read_json(os.path.join(run_dir, "final.json")) or {}
    evaluation = (read_json(os.path.join(run_dir, "eval.json")) or {}).get("results") or entry.get("eval") or {}
    curve, test_curve = _read_curves(run_dir, batch * T)
    f = float(data.get("repeated_fraction", 0.0))
    state = entry.get("state") or ("done" if final else "pending")
    return RunRecord(
        name=os.path.basename(os.path.normpath(run_dir)), run_dir=run_dir, size=_size_label(preset, params),
        params=params, repeated_fraction=f, repeat_count=int(data.get("repeat_count", 1)) if f else 1,
        placement=str(data.get("placement", "uniform")), seed=int(train.get("seed", 0)), steps=steps,
        tokens=steps * batch * T, state=state, final=final, eval=evaluation, wall_s=entry.get("wall_s"),
        curve=curve, test_curve=test_curve,
    )


def load_sweep_runs(sweep_dir: str) -> list[RunRecord]:
    """Every run of a stored sweep: those the manifest lists (in its order), then any other run folder."""
    if not os.path.isdir(sweep_dir):
        raise SweepError(f"{sweep_dir}: no such sweep folder")
    manifest = read_json(os.path.join(sweep_dir, MANIFEST)) or {}
    entries = manifest.get("runs", {})
    runs_dir = os.path.join(sweep_dir, "runs")
    names = list(manifest.get("order", [])) + sorted(entries)
    if os.path.isdir(runs_dir):
        names += sorted(os.listdir(runs_dir))
    records, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        record = load_run(os.path.join(runs_dir, name), entries.get(name))
        if record is not None:
            records.append(record)
    if not records:
        raise SweepError(f"{sweep_dir}: holds no runs (expected {runs_dir}/NAME/config.yaml); run `fasttrain sweep` first")
    return records


# ---- analysis ----------------------------------------------------------------------------------------
@dataclass
class SweepReport:
    sweep_dir: str
    runs: list
    fit: Optional[ScalingFit]
    fit_error: str = ""

    @property
    def baselines(self) -> list:
        return [r for r in self.runs if r.is_baseline and r.test_loss is not None]

    @property
    def repeated(self) -> list:
        return [r for r in self.runs if not r.is_baseline and r.test_loss is not None]

    def baseline_by_size(self) -> dict:
        out = {}
        for r in self.baselines:
            out.setdefault(r.params, []).append(r.test_loss)
        return {n: float(np.mean(v)) for n, v in sorted(out.items())}

    def summary_lines(self) -> list[str]:
        """Plain statements of what the sweep shows (used by the report page and the demo)."""
        lines = []
        by_size = self.baseline_by_size()
        labels = {r.params: r.size for r in self.runs}
        if by_size:
            losses = list(by_size.values())
            improving = all(b < a for a, b in zip(losses, losses[1:]))
            lines.append("Baselines (f = 0) test loss by size: "
                         + ", ".join(f"{labels[n]} {l:.4f}" for n, l in by_size.items())
                         + (" - improving with size" if improving and len(losses) > 1 else
                            " - NOT improving with size at every step" if len(losses) > 1 else ""))
        rep = [r for r in self.repeated if r.baseline_loss is not None]
        if rep:
            above = [r for r in rep if r.test_loss > r.baseline_loss]
            lines.append(f"Repeated runs with test loss above their baseline: {len(above)} of {len(rep)}")
            for size in sorted({r.params for r in rep}):
                group = [r for r in rep if r.params == size]
                worst = max(group, key=lambda r: r.test_loss - r.baseline_loss)
                text = (f"  {labels[size]}: worst E = {worst.repeat_count} (f = {format_number(worst.repeated_fraction)}), "
                        f"test loss {worst.test_loss:.4f} vs baseline {worst.baseline_loss:.4f} "
                        f"(+{worst.test_loss - worst.baseline_loss:.4f})")
                if worst.effective_fraction is not None and math.isfinite(worst.effective_fraction):
                    text += f", worth {worst.effective_fraction:.2f}x its size"
                    if worst.effective_status != "ok":
                        text += f" ({worst.effective_status})"
                lines.append(text)
        return lines


def analyze(sweep_dir: str, bootstrap: int = 300, fixed_irreducible: Optional[float] = None) -> SweepReport:
    runs = load_sweep_runs(sweep_dir)
    report = SweepReport(sweep_dir=sweep_dir, runs=runs, fit=None)
    base = report.baselines
    try:
        report.fit = fit_scaling_law([r.params for r in base], [r.test_loss for r in base],
                                     fixed_irreducible=fixed_irreducible, bootstrap=bootstrap)
    except FitError as e:
        report.fit_error = str(e)
    for r in report.repeated:
        same = [b.test_loss for b in base if b.params == r.params and b.seed == r.seed] or \
               [b.test_loss for b in base if b.params == r.params]
        r.baseline_loss = float(np.mean(same)) if same else None
    if report.fit is not None:
        for r in report.runs:
            if r.test_loss is None:
                continue
            eff = effective_size(report.fit, r.test_loss)
            r.effective_params, r.effective_status, r.effective_interval = eff.params, eff.status, eff.interval
    return report


# ---- plots -------------------------------------------------------------------------------------------
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


def _groups(report: SweepReport) -> list:
    """(f, placement) combinations of the repeated runs, each plotted in its own panel."""
    return sorted({(r.repeated_fraction, r.placement) for r in report.repeated})


def _panels(plt, n: int, columns: int = 3):
    cols = min(n, columns)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _mean_by(records, key, value):
    out = {}
    for r in records:
        v = value(r)
        if v is not None and math.isfinite(v):
            out.setdefault(key(r), []).append(v)
    return sorted((k, float(np.mean(v))) for k, v in out.items())


def _plot_vs_repeats(report: SweepReport, value, ylabel: str, title: str, path: str, baseline_value=None,
                     reference: Optional[float] = None, logy: bool = False, flagged=None) -> bool:
    """One panel per (f, placement): value vs E, a line per size; `flagged` runs get open markers."""
    plt = _pyplot()
    groups = _groups(report)
    if not groups:
        return False
    colors = _size_colors(report)
    labels = {r.params: r.size for r in report.runs}
    fig, axes = _panels(plt, len(groups))
    drawn = False
    for ax, (f, placement) in zip(axes, groups):
        for n in sorted({r.params for r in report.repeated}):
            group = [r for r in report.repeated if r.params == n and r.repeated_fraction == f and r.placement == placement]
            points = _mean_by(group, lambda r: r.repeat_count, value)
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", color=colors[n], label=labels[n])
            drawn = True
            if flagged is not None:
                marked = _mean_by([r for r in group if flagged(r)], lambda r: r.repeat_count, value)
                if marked:
                    mx, my = zip(*marked)
                    ax.plot(mx, my, "o", color=colors[n], markerfacecolor="white", zorder=3)
            if baseline_value is not None:
                base = [baseline_value(b) for b in report.baselines if b.params == n]
                base = [b for b in base if b is not None]
                if base:
                    ax.axhline(float(np.mean(base)), color=colors[n], linestyle="--", linewidth=1)
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        counts = sorted({r.repeat_count for r in report.repeated if r.repeated_fraction == f and r.placement == placement})
        ax.set_xticks(counts, [str(e) for e in counts])  # label the E values that were run
        ax.xaxis.set_minor_locator(plt.NullLocator())
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("repeat count E")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\nf = {format_number(f)}, {placement}" + (" (dashed: f = 0 baseline)" if baseline_value else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(title="size", fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_loss_vs_params(report: SweepReport, path: str) -> bool:
    plt = _pyplot()
    if not report.baselines and not report.repeated:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    if report.baselines:
        ax.plot([r.params for r in report.baselines], [r.test_loss for r in report.baselines], "ko", label="f = 0 baselines",
                zorder=3)
    fit = report.fit
    all_params = [r.params for r in report.runs]
    if fit is not None:
        grid = np.geomspace(min(all_params) / 1.5, max(all_params) * 1.5, 200)
        ax.plot(grid, fit.loss(grid), "k-", linewidth=1,
                label=f"fit: {fit.irreducible:.3f} + {fit.coefficient:.3g} N^-{fit.exponent:.3f}")
        if fit.bootstrap and fit.interval is not None:
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` logged points (shorter at the start), so a curve keeps its length."""
    if window <= 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    start = np.maximum(0, idx - window)
    return (sums[idx] - sums[start]) / (idx - start)


def _plot_curves(report: SweepReport, path: str) -> bool:
    plt = _pyplot()
    sizes = sorted({r.params for r in report.runs if r.curve})
    if not sizes:
        return False
    labels = {r.params: r.size for r in report.runs}
    counts = [r.repeat_count for r in report.runs if not r.is_baseline] or [2]
    lo, hi = math.log10(min(counts)), math.log10(max(counts))
    cmap = plt.get_cmap("plasma")
    fig, axes = _panels(plt, len(sizes))
    for ax, n in zip(axes, sizes):
        for r in [r for r in report.runs if r.params == n and r.curve]:
            xs, ys = zip(*r.curve)
            ys = _smooth(np.asarray(ys), max(1, len(ys) // 25))
            if r.is_baseline:
                style = dict(color="black", linewidth=1.6, label=f"f = 0 (s{r.seed})", zorder=3)
            else:
                t = 0.5 if hi == lo else (math.log10(r.repeat_count) - lo) / (hi - lo)
                style = dict(color=cmap(0.1 + 0.8 * t), linewidth=1,
                             label=f"f = {format_number(r.repeated_fraction)}, E = {r.repeat_count}")
            ax.plot(xs, ys, **style)
            if r.test_curve:
                tx, ty = zip(*r.test_curve)
                ax.plot(tx, ty, "o", color=style["color"], markersize=3)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss, smoothed (dots: test loss)")
        ax.set_title(f"Loss curves, {labels[n]}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- page --------------------------------------------------------------------------------------------
def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def _fmt_params(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fit_lines(report: SweepReport) -> list[str]:
    fit = report.fit
    if fit is None:
        return [f"No scaling-law fit: {report.fit_error}", ""]
    lines = [f"L(N) = E_irr + A * N^(-alpha), fitted to {fit.n_points} baseline runs of {fit.n_sizes} sizes "
             f"(N = {_fmt_params(fit.params_min)} to {_fmt_params(fit.params_max)} non-embedding parameters), "
             f"rms residual {fit.rmse:.4f} nats:", "",
             "| parameter | value | std. error (Jacobian) | 95% bootstrap interval |", "|---|---|---|---|"]
    for key, label, value in (("irreducible", "E_irr", fit.irreducible), ("coefficient", "A", fit.coefficient),
                              ("exponent", "alpha", fit.exponent)):
        se = fit.stderr.get(key) if fit.stderr else None
        ci = fit.interval.get(key) if fit.interval else None
        fixed = key == "irreducible" and fit.fixed_irreducible
        lines.append(f"| {label} | {value:.4g}{' (fixed)' if fixed else ''} | {f'{se:.3g}' if se is not None else '-'} | "
                     f"{f'[{ci[0]:.4g}, {ci[1]:.4g}]' if ci else '-'} |")
    if fit.note:
        lines += ["", f"Note: {fit.note}."]
    lines += ["", "Effective size N_eff: the N of an unrepeated model with the same test loss, "
              "((L - E_irr) / A)^(-1/alpha). *extrapolated*: outside the baselines' range of N; "
              "*below_irreducible*: L <= E_irr, no finite N_eff.", ""]
    return lines


def _table(report: SweepReport) -> list[str]:
    extras = [(key, short) for key, short in (("repeated_loss", "repeated-subset loss"),
                                              ("copy_text_second_loss", "copy 2nd loss"),
                                              ("induction_score_max", "induction"), ("icl_score", "ICL score"))
              if any(r.metric(key) is not None for r in report.runs)]
    head = ["run", "size", "N", "f", "E", "placement", "seed", "state", "tokens", "test loss", "baseline", "delta",
            "N_eff", "N_eff/N (95% CI)", "status"] + [short for _, short in extras] + ["time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.runs:
        loss = r.test_loss
        delta = loss - r.baseline_loss if (loss is not None and r.baseline_loss is not None) else None
        frac = r.effective_fraction
        frac_text = "-" if frac is None else ("inf" if math.isinf(frac) else f"{frac:.3f}")
        if r.effective_interval and frac is not None and math.isfinite(frac):
            lo, hi = (v / r.params for v in r.effective_interval)
            frac_text += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
        row = [r.name, r.size, f"{r.params:,}", format_number(r.repeated_fraction),
               str(r.repeat_count) if not r.is_baseline else "-", r.placement if not r.is_baseline else "-",
               str(r.seed), r.state, _fmt_params(r.tokens), _fmt(loss),
               _fmt(r.baseline_loss) if not r.is_baseline else "-",
               (f"{delta:+.4f}" if delta is not None else "-"), _fmt_params(r.effective_params), frac_text,
               r.effective_status or "-"]
        row += [_fmt(r.metric(key)) for key, _ in extras]
        row.append(f"{r.wall_s:.0f} s" if r.wall_s else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(sweep_dir: str, out_dir: Optional[str] = None, bootstrap: int = 300,
                 fixed_irreducible: Optional[float] = None) -> tuple[SweepReport, str]:
    """Analyze a stored sweep and write the page, the plots and report.json; returns (report, page path)."""
    sweep_dir = os.path.abspath(sweep_dir)
    report = analyze(sweep_dir, bootstrap=bootstrap, fixed_irreducible=fixed_irreducible)
    out_dir = os.path.abspath(out_dir or os.path.join(sweep_dir, "report"))
    os.makedirs(out_dir, exist_ok=True)
    plots = []

    def plot(ok: bool, name: str, caption: str) -> None:
        if ok:
            plots.append((name, caption))

    loss_of = lambda r: r.test_loss  # noqa: E731
    plot(_plot_vs_repeats(report, loss_of, "test loss (nats/token)", "Test loss vs repeat count",
                          os.path.join(out_dir, "loss_vs_repeats.png"), baseline_value=loss_of),
         "loss_vs_repeats.png", "Test loss vs repeat count E per model size (dashed: the size's f = 0 baseline)")
    if report.fit is not None:
        frac = lambda r: r.effective_fraction  # noqa: E731
        plot(_plot_vs_repeats(report, frac, "effective size N_eff / N", "Effective size vs repeat count",
                              os.path.join(out_dir, "effective_size_vs_repeats.png"), reference=1.0,
                              flagged=lambda r: r.effective_status == "extrapolated"),
             "effective_size_vs_repeats.png", "Effective-size fraction N_eff / N vs E (dotted: 1 = as good as "
             "unrepeated; open markers: N_eff outside the baselines' range of N, extrapolated)")
    plot(_plot_loss_vs_params(report, os.path.join(out_dir, "loss_vs_params.png")), "loss_vs_params.png",
         "Test loss vs non-embedding parameters: baselines with the fit, repeated runs coloured by E")
    plot(_plot_curves(report, os.path.join(out_dir, "loss_curves.png")), "loss_curves.png",
         "Training loss curves per size (black: baseline)")
    for key, ylabel, name, title in EVAL_PLOTS:
        if any(r.metric(key) is not None for r in report.repeated):
            metric = lambda r, k=key: r.metric(k)  # noqa: E731
            plot(_plot_vs_repeats(report, metric, ylabel, title, os.path.join(out_dir, name),
                                  baseline_value=metric if key != "repeated_loss" else None),
                 name, f"{title} vs E")

    done = sum(1 for r in report.runs if r.state == "done")
    lines = [f"# Repeated-data sweep: {os.path.basename(sweep_dir)}", "",
             f"{len(report.runs)} runs ({done} done) in `{sweep_dir}`. Test loss in nats/token on held-out data "
             "that contains no repeated text; N counts non-embedding parameters.", "", "## Summary", ""]
    lines += [f"- {s.strip()}" if not s.startswith("  ") else f"    - {s.strip()}" for s in report.summary_lines()]
    lines += ["", "## Scaling law of the baselines", ""] + _fit_lines(report)
    lines += ["## Plots", ""]
    for name, caption in plots:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    lines += ["## Runs", ""] + _table(report) + [""]
    page = os.path.join(out_dir, "report.md")
    tmp = page + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, page)
    write_json_atomic(os.path.join(out_dir, "report.json"), report_dict(report, [p for p, _ in plots]))
    return report, page


def report_dict(report: SweepReport, plots: list) -> dict:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        return x

    runs = []
    for r in report.runs:
        runs.append({
            "name": r.name, "size": r.size, "params": r.params, "repeated_fraction": r.repeated_fraction,
            "repeat_count": r.repeat_count, "placement": r.placement, "seed": r.seed, "state": r.state,
            "steps": r.steps, "tokens": r.tokens, "test_loss": r.test_loss, "baseline_loss": r.baseline_loss,
            "effective_params": clean(r.effective_params), "effective_fraction": clean(r.effective_fraction),
            "effective_status": r.effective_status or None,
            "effective_interval": [clean(v) for v in r.effective_interval] if r.effective_interval else None,
            "eval": r.eval or None,
        })
    return {"sweep_dir": report.sweep_dir, "fit": report.fit.to_dict() if report.fit else None,
            "fit_error": report.fit_error or None, "summary": report.summary_lines(), "plots": plots, "runs": runs}
