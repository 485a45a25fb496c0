"""`fasttrain report SWEEP_DIR`: effective sizes at fixed data, the poor-performance region, plots and a page.

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

Writes into SWEEP_DIR/report/ (or --out) report.md, report.json and the PNG plots listed in PLOTS.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import yaml

from fasttrain.checkpoint.files import read_json, write_json_atomic
from fasttrain.ladder import PRESETS, non_embedding_params
from fasttrain.sweep.fit import (FitError, effective_size, fit_baselines, fit_edges, poor_performance_band,
                                 same_tokens)
from fasttrain.sweep.grid import SweepError, format_number
from fasttrain.sweep.manifest import MANIFEST
from fasttrain.train.metrics import read_metrics

SIGNIFICANT = 2.0  # differences within this many standard errors are not ranked
# The paper's fitted band edges (f = 0.1, N in non-embedding parameters), drawn for reference
PAPER_EDGES = {"left": (4.2e6, -0.56), "right": (5.1e7, -0.50)}

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


def _number(value) -> Optional[float]:
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
        sources = [s for s in (self.final, self.eval) if s and _number(s.get("test_loss")) is not None]
        return next((s for s in sources if _number(s.get("test_loss_stderr")) is not None), sources[0] if sources else {})

    @property
    def test_loss(self) -> Optional[float]:
        return _number(self._loss_source().get("test_loss"))

    @property
    def test_loss_stderr(self) -> Optional[float]:
        return _number(self._loss_source().get("test_loss_stderr"))

    @property
    def copy_copies(self) -> Optional[int]:
        """C of the copying evaluation (2 for an evaluation that reports only the second copy)."""
        if _number(self.eval.get("copy_text_loss")) is not None:
            return int(self.eval.get("copy_copies") or 2)
        return 2 if _number(self.eval.get("copy_text_second_loss")) is not None else None

    @property
    def copy_loss(self) -> Optional[float]:
        """Loss on a held-out passage placed C times, mean over copies 2..C."""
        value = _number(self.eval.get("copy_text_loss"))
        return value if value is not None else _number(self.eval.get("copy_text_second_loss"))

    @property
    def copy_loss_stderr(self) -> Optional[float]:
        return _number(self.eval.get("copy_text_loss_stderr")) if _number(self.eval.get("copy_text_loss")) is not None else None

    def metric(self, key: str) -> Optional[float]:
        if key == "copy_loss":
            return self.copy_loss
        if key == "test_loss":
            return self.test_loss
        value = (self.eval or {}).get(key, (self.final or {}).get(key))
        return _number(value)

    def metric_stderr(self, key: str) -> Optional[float]:
        if key == "copy_loss":
            return self.copy_loss_stderr
        if key == "test_loss":
            return self.test_loss_stderr
        value = (self.eval or {}).get(key + "_stderr", (self.final or {}).get(key + "_stderr"))
        return _number(value)

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
                split.append((tokens, _number(rec.get("loss_repeated")), _number(rec.get("loss_unique"))))
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


def _match_baselines(run: RunRecord, baselines: list) -> list:
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
            matched = _match_baselines(r, all_baselines)
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
def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def _pm(x: Optional[float], se: Optional[float], digits: int = 4, sign: bool = False) -> str:
    """'5.1234 ± 0.0123' (or without the error when it is unknown)."""
    if x is None:
        return "-"
    text = f"{x:+.{digits}f}" if sign else _fmt(x, digits)
    return text + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def _fmt_params(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_fraction(value: Optional[float], se: Optional[float]) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}x" + (f" ± {se:.2f}" if se is not None and math.isfinite(se) else "")


def _fmt_E(x: Optional[float]) -> str:
    return "open" if x is None else f"{x:.3g}"


def _copy_label(report: SweepReport) -> str:
    copies = {r.copy_copies for r in report.runs if r.copy_copies}
    return "copying" + (f" (C = {', '.join(map(str, sorted(copies)))})" if copies else "")


def _group_label(f: float, placement: str, several_placements: bool) -> str:
    return f"f = {format_number(f)}" + (f", {placement}" if several_placements else "")


def _fit_sentence(report: SweepReport, stage: str, metric: str) -> str:
    what = EFFECTIVE_METRICS[metric][0]
    fit = report.fits.get((stage, metric))
    if fit is None:
        return (f"No effective size on {what}{' after fine-tuning' if stage == 'finetune' else ''}: "
                f"{report.fit_errors.get((stage, metric), 'no fit')}")
    if fit.kind == "L(N)":
        where = f"{fit.n_points} baselines of {fit.n_sizes} sizes" + (
            f" trained on {_fmt_params(fit.tokens)} tokens each" if fit.tokens else "")
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
            parts.append(f"{labels[n]} {_pm(loss, se)}" + (
                f" ({'/'.join(_fmt_params(t) for t in sorted({r.tokens for r in group}))} tokens)"
                if len(budgets) > 1 else ""))
        losses = [float(np.mean([r.test_loss for r in g])) for _, g in sorted(by_size.items())]
        improving = all(b < a for a, b in zip(losses, losses[1:]))
        tokens = f" ({_fmt_params(budgets[0])} tokens each)" if len(budgets) == 1 else ""
        lines.append(f"Baselines (f = 0) test loss by size{tokens}: " + ", ".join(parts)
                     + (" - improving with size" if improving and len(losses) > 1 else
                        " - NOT improving with size at every step" if len(losses) > 1 else ""))
    lines.append(_fit_sentence(report, "pretrain", "test"))
    if any(r.copy_loss is not None for r in report.runs):
        lines.append(_fit_sentence(report, "pretrain", "copy"))
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
        lines.append(_fit_sentence(report, "finetune", "test"))
        lines += _finetune_lines(report)
    return lines


def _worst_lines(report: SweepReport, stage: str) -> list[str]:
    lines = []
    several = len({p.placement for p in report.stage_points(stage)}) > 1
    copy = _copy_label(report)
    for p in report.worst_points(stage):
        head = f"  {p.size}, {_group_label(p.repeated_fraction, p.placement, several)}: "
        if p.significant is False:
            lines.append(head + f"no E differs from the baseline by more than {SIGNIFICANT:g} standard errors "
                         f"(largest: E = {p.repeat_count}, {_pm(p.damage, p.damage_stderr, sign=True)})")
            continue
        text = head + f"worst E = {p.repeat_count}, test loss {_pm(p.damage, p.damage_stderr, sign=True)} over the baseline"
        parts = []
        for metric, name in (("test", "test loss"), ("copy", copy)):
            if metric in p.fraction:
                value, se = p.fraction[metric]
                status = {r.effective[metric].status for r in p.runs if metric in r.effective} - {"ok"}
                parts.append(f"{_fmt_fraction(value, se)} on {name}" + (f" ({', '.join(sorted(status))})" if status else ""))
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
                                                    f"{_fmt_fraction(*p.fraction['test'])}" for p in pts))
    return lines


def _finetune_lines(report: SweepReport) -> list[str]:
    """The worst-E cell of each size before fine-tuning, and the same cell after."""
    after = {(p.params, p.repeated_fraction, p.placement, p.repeat_count): p for p in report.stage_points("finetune")}
    lines = []
    for p in report.worst_points("pretrain"):
        q = after.get((p.params, p.repeated_fraction, p.placement, p.repeat_count))
        if q is None:
            continue
        before = _fmt_fraction(*p.fraction["test"]) if "test" in p.fraction else "-"
        now = _fmt_fraction(*q.fraction["test"]) if "test" in q.fraction else "-"
        lines.append(f"  after fine-tuning, {p.size} at E = {p.repeat_count} (f = {format_number(p.repeated_fraction)}): "
                     f"test loss {_pm(q.damage, q.damage_stderr, sign=True)} over the fine-tuned baseline; worth "
                     f"{now} its size (pretrained: {before})")
    return lines


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
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


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
    copy = _copy_label(report)
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
                label = (label + "\n" if label else "") + f"at D = {_fmt_params(D)}"
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
                pts = [(e["tokens"], e[key], _number(e.get(key + "_stderr"))) for e in r.eval_curve
                       if _number(e.get(key)) is not None]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    why = "" if has_repeated else ("the evaluations during training hold no repeated-subset loss (a trainer that "
                                   "records it, or `fasttrain eval RUN --all`, adds the second row)")
    return True, why


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


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
            base = [b for b in _match_baselines(r, report.baselines) if _head_matrix(b, "induction_scores") is not None]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    missing = [name for k, name in HEAD_SCORES if (k, name) not in keys]
    return True, (f"{', '.join(missing)} per head not in the evaluations" if missing else "")


# ---- page --------------------------------------------------------------------------------------------
PARAMETER_LABELS = {"irreducible": "E_irr", "coefficient": "A", "exponent": "alpha", "data_coefficient": "B",
                    "data_exponent": "beta"}


def _fit_table(report: SweepReport, stage: str, metric: str) -> list[str]:
    fit = report.fits.get((stage, metric))
    if fit is None:
        return [_fit_sentence(report, stage, metric) + ".", ""]
    lines = [_fit_sentence(report, stage, metric).split(" (")[0] + f"; rms residual {fit.rmse:.4f} nats.", "",
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
            f"N_eff/N {_copy_label(report)}"] + (["N_eff/N after fine-tuning"] if has_ft else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in worst:
        sig = {True: "yes", False: "no (not ranked)", None: "error unknown"}[p.significant]
        row = [p.size, format_number(p.repeated_fraction), p.placement, str(p.repeat_count),
               _pm(p.damage, p.damage_stderr, sign=True), sig,
               _fmt_fraction(*p.fraction["test"]) if "test" in p.fraction else "-",
               _fmt_fraction(*p.fraction["copy"]) if "copy" in p.fraction else "-"]
        if has_ft:
            q = after.get((p.params, p.repeated_fraction, p.placement, p.repeat_count))
            row.append(_fmt_fraction(*q.fraction["test"]) if q and "test" in q.fraction else "-")
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
                     f"{_pm(b.max_damage, b.max_damage_stderr)}{noise} | {edge(b.left, b.left_log_stderr)} | "
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
        delta_text = _pm(delta, delta_se, sign=True)
        if is_significant(delta, delta_se) is False:
            delta_text += " (within 2 SE)"
        frac = r.effective_fraction
        frac_text = "-" if frac is None else ("inf" if math.isinf(frac) else _fmt_fraction(frac, r.fraction_stderr("test")))
        if r.effective_interval and frac is not None and math.isfinite(frac):
            lo, hi = (v / r.params for v in r.effective_interval)
            frac_text += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
        status = r.effective_status or ("no N_eff" if "test" in r.no_effective else "-")
        row = [r.name, r.stage, r.size, f"{r.params:,}", format_number(r.repeated_fraction),
               str(r.repeat_count) if not r.is_baseline else "-", r.placement if not r.is_baseline else "-",
               str(r.seed), r.state, _fmt_params(r.tokens), _pm(loss, r.test_loss_stderr),
               _fmt(r.baseline_loss) if not r.is_baseline else "-", delta_text if not r.is_baseline else "-",
               _fmt_params(r.effective_params), frac_text, status]
        if has_copy:
            row.append(_fmt_fraction(r.fraction("copy"), r.fraction_stderr("copy")) if "copy" in r.effective else "-")
        row += [_pm(r.metric(key), r.metric_stderr(key)) for key, _ in extras]
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
