"""What a stored sweep shows: its runs read from disk, the baselines' laws, effective sizes at fixed data, the
poor-performance band, and the summary in words (`analyze(SWEEP_DIR)` -> SweepReport).

Reads only what a sweep left on disk (manifest.json and each run folder's config.yaml, final.json,
metrics.jsonl, eval.json and checkpoints/eval_step_*.json), so it runs again at any time without training
anything. Every definition is in the README's "Sweeps and the report"; in short:

- Baseline = the f = 0 run of the same size, seed, stage and token budget D.
- Effective size N_eff = the N of an unrepeated model trained on the same tokens with the same loss, read
  off `fit_baselines` (fasttrain.sweep.fit): L(N) when every baseline has one D, L(N, D) when the
  baselines' sizes and budgets determine it, else no N_eff (one line says why; never a confounded one).
- Test loss and copying loss (a held-out passage placed C times; the mean over copies 2..C) each get their
  own law and their own N_eff. Fine-tuned runs (`NAME_ft`) are compared with fine-tuned baselines.
- Standard errors: a run's loss carries its evaluation's standard error; several seeds replace it by the
  spread of the seeds; N_eff combines the fit's bootstrap with the run's own error. A difference from the
  baseline within 2 standard errors is reported as such, not ranked.
- Poor-performance band: per size and f, the E where the damage is at least half its maximum.

The plots of a SweepReport are in fasttrain.sweep.plots, its page and report.json in fasttrain.sweep.report.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import yaml

from fasttrain.checkpoint.files import read_json
from fasttrain.ladder import PRESETS, non_embedding_params
from fasttrain.sweep.fit import (FitError, effective_size, fit_baselines, fit_edges, poor_performance_band,
                                 same_tokens)
from fasttrain.sweep.grid import SweepError, format_number
from fasttrain.sweep.manifest import MANIFEST
from fasttrain.train.metrics import read_metrics

SIGNIFICANT = 2.0  # differences within this many standard errors are not ranked
# The paper's fitted band edges (f = 0.1, N in non-embedding parameters), drawn and tabulated for reference
PAPER_EDGES = {"left": (4.2e6, -0.56), "right": (5.1e7, -0.50)}


# ---- run folders -------------------------------------------------------------------------------------
def finite_number(value) -> Optional[float]:
    """A finite int or float as a float; None for anything else (missing, NaN, inf, bool, text)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


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
    eval_curve: list = field(default_factory=list)  # evaluations over training: dicts with "tokens" and results
    split_curve: list = field(default_factory=list)  # (tokens, training loss on repeated rows, on unique rows)
    source: Optional[str] = None  # fine-tune runs: the pretrained run they started from
    # filled by the analysis
    baseline_loss: Optional[float] = None
    baseline_loss_stderr: Optional[float] = None
    effective: dict = field(default_factory=dict)  # "test" / "copy" -> EffectiveSize
    no_effective: dict = field(default_factory=dict)  # "test" / "copy" -> why there is no N_eff

    @property
    def is_baseline(self) -> bool:
        return self.repeated_fraction == 0

    @property
    def stage(self) -> str:
        return "finetune" if self.source else "pretrain"

    def _loss_source(self) -> dict:
        """final.json or eval.json: the one that carries the test loss's standard error, else the first
        with a test loss (both are evaluations of the last checkpoint)."""
        sources = [s for s in (self.final, self.eval) if s and finite_number(s.get("test_loss")) is not None]
        return next((s for s in sources if finite_number(s.get("test_loss_stderr")) is not None),
                    sources[0] if sources else {})

    @property
    def test_loss(self) -> Optional[float]:
        return finite_number(self._loss_source().get("test_loss"))

    @property
    def test_loss_stderr(self) -> Optional[float]:
        return finite_number(self._loss_source().get("test_loss_stderr"))

    @property
    def copy_copies(self) -> Optional[int]:
        """C of the copying evaluation (2 for an evaluation that reports only the second copy)."""
        if finite_number(self.eval.get("copy_text_loss")) is not None:
            return int(self.eval.get("copy_copies") or 2)
        return 2 if finite_number(self.eval.get("copy_text_second_loss")) is not None else None

    @property
    def copy_loss(self) -> Optional[float]:
        """Loss on a held-out passage placed C times, mean over copies 2..C."""
        value = finite_number(self.eval.get("copy_text_loss"))
        return value if value is not None else finite_number(self.eval.get("copy_text_second_loss"))

    @property
    def copy_loss_stderr(self) -> Optional[float]:
        if finite_number(self.eval.get("copy_text_loss")) is None:
            return None
        return finite_number(self.eval.get("copy_text_loss_stderr"))

    def metric(self, key: str) -> Optional[float]:
        if key == "copy_loss":
            return self.copy_loss
        if key == "test_loss":
            return self.test_loss
        value = (self.eval or {}).get(key, (self.final or {}).get(key))
        return finite_number(value)

    def metric_stderr(self, key: str) -> Optional[float]:
        if key == "copy_loss":
            return self.copy_loss_stderr
        if key == "test_loss":
            return self.test_loss_stderr
        value = (self.eval or {}).get(key + "_stderr", (self.final or {}).get(key + "_stderr"))
        return finite_number(value)

    # the test-loss effective size, under the names the report has always used
    @property
    def effective_params(self) -> Optional[float]:
        eff = self.effective.get("test")
        return eff.params if eff else None

    @property
    def effective_status(self) -> str:
        eff = self.effective.get("test")
        return eff.status if eff else ""

    @property
    def effective_interval(self) -> Optional[tuple]:
        eff = self.effective.get("test")
        return eff.interval if eff else None

    @property
    def effective_fraction(self) -> Optional[float]:
        return self.fraction("test")

    def fraction(self, metric: str) -> Optional[float]:
        eff = self.effective.get(metric)
        return None if eff is None else eff.params / self.params

    def fraction_stderr(self, metric: str) -> Optional[float]:
        """Standard error of N_eff / N (from that of ln N_eff)."""
        eff = self.effective.get(metric)
        if eff is None or eff.log_stderr is None or not math.isfinite(eff.params):
            return None
        return eff.params / self.params * eff.log_stderr


def _size_label(preset: Optional[str], params: int) -> str:
    if preset:
        return preset
    for unit, scale in (("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{unit}"
    return str(params)


def _read_curves(run_dir: str, tokens_per_step: int) -> tuple[list, list, list, list]:
    """(training loss, test loss, evaluations, repeated/unique training loss) over tokens from metrics.jsonl."""
    train, test, evals, split = [], [], [], []
    for rec in read_metrics(run_dir):
        tokens = rec.get("tokens", rec.get("step", 0) * tokens_per_step)
        if "loss" in rec:
            train.append((tokens, rec["loss"]))
            if "loss_repeated" in rec or "loss_unique" in rec:
                split.append((tokens, finite_number(rec.get("loss_repeated")), finite_number(rec.get("loss_unique"))))
        elif "test_loss" in rec:
            test.append((tokens, rec["test_loss"]))
            evals.append({**rec, "tokens": tokens})
    return train, test, evals, split


def _read_checkpoint_evals(run_dir: str, tokens_per_step: int) -> list[dict]:
    """Results of `fasttrain eval --all`: checkpoints/eval_step_NNNNNNN.json beside each checkpoint."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "eval_step_*.json"))):
        doc = read_json(path)
        if not doc or not isinstance(doc.get("results"), dict):
            continue
        step = int(doc.get("step") or 0)
        out.append({**doc["results"], "step": step, "tokens": doc.get("tokens_seen", step * tokens_per_step)})
    return out


def _merge_evaluations(logged: list[dict], checkpoints: list[dict]) -> list[dict]:
    """Evaluations over training by step: a checkpoint's evaluation document over the logged line of the
    same step (it holds every metric)."""
    by_step = {int(e.get("step", 0)): e for e in logged}
    for e in checkpoints:
        by_step[int(e["step"])] = {**by_step.get(int(e["step"]), {}), **e}
    return [by_step[s] for s in sorted(by_step)]


def _source_name(init_from: str) -> str:
    """The run folder name a fine-tune started from (init_from: a run folder or a checkpoint in it)."""
    path = os.path.normpath(init_from)
    if path.endswith(".pt"):
        path = os.path.dirname(os.path.dirname(path)) if os.path.basename(os.path.dirname(path)) == "checkpoints" \
            else os.path.dirname(path)
    return os.path.basename(path)


def load_run(run_dir: str, entry: Optional[dict] = None) -> Optional[RunRecord]:
    """A run folder -> RunRecord (None when it holds no config.yaml)."""
    entry = entry or {}
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: cannot parse ({str(e).splitlines()[0]}); restore the run's config.yaml") from None
    if not isinstance(cfg, dict):
        raise SweepError(f"{path}: not a run config (expected a mapping); restore the run's config.yaml")
    model, data, train = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
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
    curve, test_curve, logged, split = _read_curves(run_dir, batch * T)
    f = float(data.get("repeated_fraction", 0.0))
    state = entry.get("state") or ("done" if final else "pending")
    init_from = train.get("init_from")
    return RunRecord(
        name=os.path.basename(os.path.normpath(run_dir)), run_dir=run_dir, size=_size_label(preset, params),
        params=params, repeated_fraction=f, repeat_count=int(data.get("repeat_count", 1)) if f else 1,
        placement=str(data.get("placement", "uniform")), seed=int(train.get("seed", 0)), steps=steps,
        tokens=steps * batch * T, state=state, final=final, eval=evaluation, wall_s=entry.get("wall_s"),
        curve=curve, test_curve=test_curve, split_curve=split,
        eval_curve=_merge_evaluations(logged, _read_checkpoint_evals(run_dir, batch * T)),
        source=_source_name(str(init_from)) if init_from else None,
    )


def load_sweep_runs(sweep_dir: str) -> list[RunRecord]:
    """Every run of a stored sweep: those the manifest lists (in its order), then any other run folder.
    A fine-tune run takes f, E and placement from the run it started from (its own data is unrepeated)."""
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
    by_name = {r.name: r for r in records}
    for r in records:
        src = by_name.get(r.source) if r.source else None
        if src is not None:
            r.repeated_fraction, r.repeat_count, r.placement = src.repeated_fraction, src.repeat_count, src.placement
    return records


# ---- analysis ----------------------------------------------------------------------------------------
# The quantities that get an effective size: (key, what, value, standard error)
EFFECTIVE_METRICS = {
    "test": ("test loss", lambda r: r.test_loss, lambda r: r.test_loss_stderr),
    "copy": ("copying loss", lambda r: r.copy_loss, lambda r: r.copy_loss_stderr),
}


def mean_and_stderr(values: list, stderrs: list) -> tuple[Optional[float], Optional[float]]:
    """Mean of the seeds' values; its standard error from their spread with 2+ seeds, else the one value's
    own (evaluation) standard error."""
    pairs = [(v, s) for v, s in zip(values, stderrs) if v is not None]
    if not pairs:
        return None, None
    vals = np.array([v for v, _ in pairs])
    if len(pairs) >= 2:
        return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(len(pairs)))
    return float(vals[0]), pairs[0][1]


def is_significant(difference: Optional[float], stderr: Optional[float]) -> Optional[bool]:
    """True/False: beyond/within 2 standard errors; None when the error is unknown."""
    if difference is None or stderr is None:
        return None
    return abs(difference) > SIGNIFICANT * stderr


@dataclass
class Point:
    """One (stage, size, f, placement, E) cell of the grid, its seeds averaged."""
    stage: str
    params: int
    size: str
    repeated_fraction: float
    placement: str
    repeat_count: int
    runs: list
    loss: Optional[float]
    loss_stderr: Optional[float]
    damage: Optional[float]  # test loss minus the baseline's
    damage_stderr: Optional[float]
    fraction: dict  # "test"/"copy" -> (N_eff / N, its standard error) averaged over seeds

    @property
    def significant(self) -> Optional[bool]:
        return is_significant(self.damage, self.damage_stderr)


@dataclass
class SweepReport:
    sweep_dir: str
    runs: list
    fit: object = None  # the test-loss law of the pretrained baselines (ScalingFit or DataScalingFit)
    fit_error: str = ""
    fits: dict = field(default_factory=dict)  # (stage, metric) -> law
    fit_errors: dict = field(default_factory=dict)  # (stage, metric) -> why there is none
    points: list = field(default_factory=list)  # Point per grid cell with repeated runs
    bands: dict = field(default_factory=dict)  # (f, placement) -> {params: Band}
    edge_fits: dict = field(default_factory=dict)  # (f, placement, "left"/"right") -> EdgeFit
    edge_fit_errors: dict = field(default_factory=dict)
    predict_params: Optional[int] = None  # the untrained size the band is predicted at
    predict_label: str = ""

    @property
    def baselines(self) -> list:
        return [r for r in self.runs if r.is_baseline and r.test_loss is not None and r.stage == "pretrain"]

    @property
    def repeated(self) -> list:
        return [r for r in self.runs if not r.is_baseline and r.test_loss is not None and r.stage == "pretrain"]

    def stage_runs(self, stage: str) -> list:
        return [r for r in self.runs if r.stage == stage and r.test_loss is not None]

    @property
    def stages(self) -> list:
        return [s for s in ("pretrain", "finetune") if self.stage_runs(s)]

    def baseline_by_size(self, stage: str = "pretrain") -> dict:
        out = {}
        for r in self.stage_runs(stage):
            if r.is_baseline:
                out.setdefault(r.params, []).append(r.test_loss)
        return {n: float(np.mean(v)) for n, v in sorted(out.items())}

    def stage_points(self, stage: str = "pretrain") -> list:
        return [p for p in self.points if p.stage == stage]

    def worst_points(self, stage: str = "pretrain") -> list:
        """Per (size, f, placement): the cell of largest damage."""
        groups: dict = {}
        for p in self.stage_points(stage):
            if p.damage is not None:
                groups.setdefault((p.params, p.repeated_fraction, p.placement), []).append(p)
        return [max(g, key=lambda p: p.damage) for _, g in sorted(groups.items())]

    def summary_lines(self) -> list[str]:
        """Plain statements of what the sweep shows (used by the report page and the demo)."""
        return _summary_lines(self)


def match_baselines(run: RunRecord, baselines: list) -> list:
    """The f = 0 runs a run is compared with: same size, stage and token budget; the same seed when there."""
    same = [b for b in baselines if b.params == run.params and b.stage == run.stage and same_tokens(b.tokens, run.tokens)]
    return [b for b in same if b.seed == run.seed] or same


def _fit_stage(report: SweepReport, stage: str, metric: str, bootstrap: int, fixed_irreducible) -> None:
    what, value, stderr = EFFECTIVE_METRICS[metric]
    base = [r for r in report.stage_runs(stage) if r.is_baseline and value(r) is not None]
    if not base:
        report.fit_errors[(stage, metric)] = f"no {stage} baseline has a {what}" + (
            " (evaluate the runs: `evaluate: true` in the sweep file, or `fasttrain eval`)" if metric == "copy" else "")
        return
    try:
        report.fits[(stage, metric)] = fit_baselines(
            [r.params for r in base], [r.tokens for r in base], [value(r) for r in base],
            loss_stderr=[stderr(r) for r in base], bootstrap=bootstrap,
            fixed_irreducible=fixed_irreducible if metric == "test" else None)
    except FitError as e:
        report.fit_errors[(stage, metric)] = str(e)


def analyze(sweep_dir: str, bootstrap: int = 300, fixed_irreducible: Optional[float] = None,
            predict_size: Optional[str] = None) -> SweepReport:
    runs = load_sweep_runs(sweep_dir)
    report = SweepReport(sweep_dir=sweep_dir, runs=runs)
    for stage in report.stages:
        for metric in EFFECTIVE_METRICS:
            _fit_stage(report, stage, metric, bootstrap, fixed_irreducible)
    report.fit = report.fits.get(("pretrain", "test"))
    report.fit_error = report.fit_errors.get(("pretrain", "test"), "")
    all_baselines = [r for r in runs if r.is_baseline and r.test_loss is not None]
    for r in runs:
        if r.test_loss is None:
            continue
        if not r.is_baseline:
            matched = match_baselines(r, all_baselines)
            r.baseline_loss, r.baseline_loss_stderr = mean_and_stderr([b.test_loss for b in matched],
                                                                       [b.test_loss_stderr for b in matched])
        for metric, (what, value, stderr) in EFFECTIVE_METRICS.items():
            fit = report.fits.get((r.stage, metric))
            if value(r) is None:
                continue
            if fit is None:
                r.no_effective[metric] = report.fit_errors.get((r.stage, metric), "no fit")
                continue
            why = fit.applies_to(r.tokens)
            if why:
                r.no_effective[metric] = why
                continue
            r.effective[metric] = effective_size(fit, value(r), r.tokens, stderr(r))
    report.points = _points(report)
    _bands(report, predict_size)
    return report


def _points(report: SweepReport) -> list:
    cells: dict = {}
    for r in report.runs:
        if not r.is_baseline and r.test_loss is not None:
            cells.setdefault((r.stage, r.params, r.repeated_fraction, r.placement, r.repeat_count), []).append(r)
    points = []
    for (stage, params, f, placement, E), group in sorted(cells.items()):
        loss, loss_se = mean_and_stderr([r.test_loss for r in group], [r.test_loss_stderr for r in group])
        damages = [r.test_loss - r.baseline_loss if r.baseline_loss is not None else None for r in group]
        damage_se = [math.hypot(r.test_loss_stderr, r.baseline_loss_stderr)
                     if r.test_loss_stderr is not None and r.baseline_loss_stderr is not None else None for r in group]
        damage, damage_stderr = mean_and_stderr(damages, damage_se)
        fraction = {}
        for metric in EFFECTIVE_METRICS:
            fr = [r.fraction(metric) for r in group]
            fr = [x if x is not None and math.isfinite(x) else None for x in fr]
            value, se = mean_and_stderr(fr, [r.fraction_stderr(metric) for r in group])
            if value is not None:
                fraction[metric] = (value, se)
        points.append(Point(stage=stage, params=params, size=group[0].size, repeated_fraction=f, placement=placement,
                            repeat_count=E, runs=group, loss=loss, loss_stderr=loss_se, damage=damage,
                            damage_stderr=damage_stderr, fraction=fraction))
    return points


def _next_size(params: int) -> tuple[int, str]:
    """The smallest ladder preset larger than `params` (10x when none is)."""
    for name, p in PRESETS.items():
        n = non_embedding_params(p.n_layer, p.d_model)
        if n > params * 1.05:
            return n, name
    return params * 10, f"{params * 10:.3g}"


def _bands(report: SweepReport, predict_size: Optional[str]) -> None:
    """Bands of the pretrained runs per (f, placement) and size (f < 1), and their edges fitted across sizes."""
    cells: dict = {}
    for p in report.stage_points("pretrain"):
        if p.damage is not None and p.repeated_fraction < 1.0:
            cells.setdefault((p.repeated_fraction, p.placement), {}).setdefault(p.params, []).append(p)
    largest = max((r.params for r in report.runs), default=0)
    if predict_size:
        if predict_size in PRESETS:
            report.predict_params = non_embedding_params(PRESETS[predict_size].n_layer, PRESETS[predict_size].d_model)
            report.predict_label = predict_size
        else:
            try:
                report.predict_params = int(float(predict_size))
            except ValueError:
                raise SweepError(f"--predict-size {predict_size!r}: give a preset ({', '.join(PRESETS)}) or a number "
                                 "of non-embedding parameters") from None
            report.predict_label = f"{report.predict_params:,}"
    elif largest:
        report.predict_params, report.predict_label = _next_size(largest)
    for key, by_size in cells.items():
        bands = {}
        for params, pts in sorted(by_size.items()):
            if len(pts) < 2:
                continue
            band = poor_performance_band([p.repeat_count for p in pts], [p.damage for p in pts],
                                         [p.damage_stderr for p in pts])
            if band is not None:
                bands[params] = band
        report.bands[key] = bands
        for side in ("left", "right"):  # bands whose peak damage is within 2 standard errors are noise
            closed = [(n, getattr(b, side), getattr(b, f"{side}_log_stderr")) for n, b in bands.items()
                      if getattr(b, side) is not None and b.significant is not False]
            try:
                report.edge_fits[key + (side,)] = fit_edges([c[0] for c in closed], [c[1] for c in closed],
                                                            [c[2] for c in closed])
            except FitError as e:
                report.edge_fit_errors[key + (side,)] = (f"the {side} edge is closed at {len(closed)} size(s) "
                                                         f"(the damage falls below half its maximum on that side); "
                                                         f"{e}")


# ---- words -------------------------------------------------------------------------------------------
def fmt_value(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def fmt_pm(x: Optional[float], se: Optional[float], digits: int = 4, sign: bool = False) -> str:
    """'5.1234 ± 0.0123' (or without the error when it is unknown)."""
    if x is None:
        return "-"
    text = f"{x:+.{digits}f}" if sign else fmt_value(x, digits)
    return text + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def fmt_params(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def fmt_fraction(value: Optional[float], se: Optional[float]) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}x" + (f" ± {se:.2f}" if se is not None and math.isfinite(se) else "")


def _fmt_E(x: Optional[float]) -> str:
    return "open" if x is None else f"{x:.3g}"


def copy_label(report: SweepReport) -> str:
    copies = {r.copy_copies for r in report.runs if r.copy_copies}
    return "copying" + (f" (C = {', '.join(map(str, sorted(copies)))})" if copies else "")


def _group_label(f: float, placement: str, several_placements: bool) -> str:
    return f"f = {format_number(f)}" + (f", {placement}" if several_placements else "")


def fit_sentence(report: SweepReport, stage: str, metric: str) -> str:
    what = EFFECTIVE_METRICS[metric][0]
    fit = report.fits.get((stage, metric))
    if fit is None:
        return (f"No effective size on {what}{' after fine-tuning' if stage == 'finetune' else ''}: "
                f"{report.fit_errors.get((stage, metric), 'no fit')}")
    if fit.kind == "L(N)":
        where = f"{fit.n_points} baselines of {fit.n_sizes} sizes" + (
            f" trained on {fmt_params(fit.tokens)} tokens each" if fit.tokens else "")
    else:
        where = f"{fit.n_points} baselines of {fit.n_sizes} sizes and {fit.n_budgets} token budgets"
    what += " after fine-tuning" if stage == "finetune" else ""
    text = f"Effective size on {what}: {fit.kind} = {fit.formula()}, fitted to {where}"
    return text + (f" ({fit.note})" if fit.note else "")


def _summary_lines(report: SweepReport) -> list[str]:
    lines = []
    labels = {r.params: r.size for r in report.runs}
    base = report.baselines
    if base:
        by_size: dict = {}
        for r in base:
            by_size.setdefault(r.params, []).append(r)
        budgets = sorted({r.tokens for r in base})
        parts = []
        for n, group in sorted(by_size.items()):
            loss, se = mean_and_stderr([r.test_loss for r in group], [r.test_loss_stderr for r in group])
            parts.append(f"{labels[n]} {fmt_pm(loss, se)}" + (
                f" ({'/'.join(fmt_params(t) for t in sorted({r.tokens for r in group}))} tokens)"
                if len(budgets) > 1 else ""))
        losses = [float(np.mean([r.test_loss for r in g])) for _, g in sorted(by_size.items())]
        improving = all(b < a for a, b in zip(losses, losses[1:]))
        tokens = f" ({fmt_params(budgets[0])} tokens each)" if len(budgets) == 1 else ""
        lines.append(f"Baselines (f = 0) test loss by size{tokens}: " + ", ".join(parts)
                     + (" - improving with size" if improving and len(losses) > 1 else
                        " - NOT improving with size at every step" if len(losses) > 1 else ""))
    lines.append(fit_sentence(report, "pretrain", "test"))
    if any(r.copy_loss is not None for r in report.runs):
        lines.append(fit_sentence(report, "pretrain", "copy"))
    rep = [r for r in report.repeated if r.baseline_loss is not None]
    if rep:
        above = [r for r in rep if r.test_loss > r.baseline_loss]
        known = [r for r in rep if r.test_loss_stderr is not None and r.baseline_loss_stderr is not None]
        text = f"Repeated runs with test loss above their baseline: {len(above)} of {len(rep)}"
        if known:
            beyond = [r for r in known if is_significant(r.test_loss - r.baseline_loss,
                                                         math.hypot(r.test_loss_stderr, r.baseline_loss_stderr))]
            text += (f" ({sum(1 for r in beyond if r.test_loss > r.baseline_loss)} above and "
                     f"{sum(1 for r in beyond if r.test_loss < r.baseline_loss)} below by more than "
                     f"{SIGNIFICANT:g} standard errors; {len(known) - len(beyond)} within)")
        else:
            text += " (no standard errors recorded: differences are not tested)"
        lines.append(text)
    lines += _worst_lines(report, "pretrain")
    lines += _band_lines(report)
    lines += _fraction_axis_lines(report)
    if "finetune" in report.stages:
        lines.append(fit_sentence(report, "finetune", "test"))
        lines += _finetune_lines(report)
    return lines


def _worst_lines(report: SweepReport, stage: str) -> list[str]:
    lines = []
    several = len({p.placement for p in report.stage_points(stage)}) > 1
    copy = copy_label(report)
    for p in report.worst_points(stage):
        head = f"  {p.size}, {_group_label(p.repeated_fraction, p.placement, several)}: "
        if p.significant is False:
            lines.append(head + f"no E differs from the baseline by more than {SIGNIFICANT:g} standard errors "
                         f"(largest: E = {p.repeat_count}, {fmt_pm(p.damage, p.damage_stderr, sign=True)})")
            continue
        text = head + f"worst E = {p.repeat_count}, test loss {fmt_pm(p.damage, p.damage_stderr, sign=True)} over the baseline"
        parts = []
        for metric, name in (("test", "test loss"), ("copy", copy)):
            if metric in p.fraction:
                value, se = p.fraction[metric]
                status = {r.effective[metric].status for r in p.runs if metric in r.effective} - {"ok"}
                parts.append(f"{fmt_fraction(value, se)} on {name}" + (f" ({', '.join(sorted(status))})" if status else ""))
        if parts:
            text += "; worth " + ", ".join(parts) + " its size"
        lines.append(text)
    return lines


def _band_lines(report: SweepReport) -> list[str]:
    lines = []
    labels = {r.params: r.size for r in report.runs}
    several = len({k[1] for k in report.bands}) > 1
    for key, bands in sorted(report.bands.items()):
        if not bands:
            continue
        group = _group_label(key[0], key[1], several)
        lines.append(f"Poor-performance band ({group}; E where the damage is at least half its maximum): "
                     + ", ".join(f"{labels[n]} E {_fmt_E(b.left)} to {_fmt_E(b.right)} (peak {b.peak:g})"
                                 if b.significant is not False else
                                 f"{labels[n]} none (largest damage within {SIGNIFICANT:g} standard errors)"
                                 for n, b in sorted(bands.items())))
        edges = []
        for side in ("left", "right"):
            fit = report.edge_fits.get(key + (side,))
            if fit is None:
                edges.append(f"{side} edge not fitted ({report.edge_fit_errors.get(key + (side,), '')})")
                continue
            a_se = f" ± {fit.a_stderr:.2f}" if fit.a_stderr is not None else ""
            edges.append(f"{side} edge E = {fit.k:.3g} N^{fit.a:.2f}{a_se}")
        line = "  " + "; ".join(edges)
        if report.predict_params:
            predicted = []
            for side in ("left", "right"):
                fit = report.edge_fits.get(key + (side,))
                if fit is not None:
                    value, se = fit.predict(report.predict_params)
                    predicted.append(f"{value:.3g}" + (f" (x/÷ {math.exp(se):.2f})" if se is not None else ""))
                else:
                    predicted.append("?")
            if any(p != "?" for p in predicted):
                line += f"; predicted at {report.predict_label} (not trained): E {predicted[0]} to {predicted[1]}"
        lines.append(line)
    return lines


def _fraction_axis_lines(report: SweepReport) -> list[str]:
    worst = [p for p in report.worst_points("pretrain") if "test" in p.fraction]
    fractions = sorted({p.repeated_fraction for p in worst})
    if len(fractions) < 2:
        return []
    labels = {r.params: r.size for r in report.runs}
    lines = ["Worst-E effective size by repeated fraction f (test loss):"]
    for n in sorted({p.params for p in worst}):
        pts = sorted((p for p in worst if p.params == n), key=lambda p: p.repeated_fraction)
        lines.append(f"  {labels[n]}: " + ", ".join(f"f = {format_number(p.repeated_fraction)} "
                                                    f"{fmt_fraction(*p.fraction['test'])}" for p in pts))
    return lines


def _finetune_lines(report: SweepReport) -> list[str]:
    """The worst-E cell of each size before fine-tuning, and the same cell after."""
    after = {(p.params, p.repeated_fraction, p.placement, p.repeat_count): p for p in report.stage_points("finetune")}
    lines = []
    for p in report.worst_points("pretrain"):
        q = after.get((p.params, p.repeated_fraction, p.placement, p.repeat_count))
        if q is None:
            continue
        before = fmt_fraction(*p.fraction["test"]) if "test" in p.fraction else "-"
        now = fmt_fraction(*q.fraction["test"]) if "test" in q.fraction else "-"
        lines.append(f"  after fine-tuning, {p.size} at E = {p.repeat_count} (f = {format_number(p.repeated_fraction)}): "
                     f"test loss {fmt_pm(q.damage, q.damage_stderr, sign=True)} over the fine-tuned baseline; worth "
                     f"{now} its size (pretrained: {before})")
    return lines
