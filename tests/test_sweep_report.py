"""The report is built from what a sweep left on disk: fake run folders, no model, no training."""
import json
import math
import os

import pytest
import yaml

from fasttrain.ladder import PRESETS, non_embedding_params
from fasttrain.sweep.cli import main as sweep_main
from fasttrain.sweep.report import analyze, write_report

# a made-up law for the baselines: L = 2 + 60 N^-0.25
E_IRR, A, ALPHA = 2.0, 60.0, 0.25
SIZES = ["100k", "340k", "900k", "1.5m"]
REPEATS = [2, 16, 128]


def law(n):
    return E_IRR + A * n ** (-ALPHA)


def write_run(sweep_dir, size, f, E, seed, loss, evaluated=True, steps=100, stderr=None, results=None,
              placement="uniform", init_from=None, name=None, curve_evals=()):
    """A finished run folder as a sweep leaves it (config.yaml, metrics.jsonl, final.json, eval.json)."""
    name = name or (f"{size}_f0_s{seed}" if f == 0 else f"{size}_f{f:g}_E{E}_{placement}_s{seed}")
    run_dir = os.path.join(sweep_dir, "runs", name)
    os.makedirs(run_dir)
    p = PRESETS[size]
    cfg = {"model": {"preset": size, "n_layer": p.n_layer, "d_model": p.d_model, "n_head": p.n_head,
                     "context_length": 128},
           "data": {"path": "/nowhere", "seq_len": 128, "repeated_fraction": f, "repeat_count": E,
                    "placement": placement, "seed": 1234 + seed},
           "train": {"steps": steps, "global_batch": 16, "seed": seed, "out_dir": run_dir, "init_from": init_from}}
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step in range(10, steps + 1, 10):
            fh.write(json.dumps({"step": step, "tokens": step * 16 * 128, "loss": loss + 3.0 / step, "lr": 1e-3,
                                 "grad_norm": 1.0, "tokens_per_s": 1e4}) + "\n")
        for step, values in curve_evals:
            fh.write(json.dumps({"step": step, "tokens": step * 16 * 128, **values}) + "\n")
        fh.write(json.dumps({"step": steps, "test_loss": loss, "test_bits_per_byte": loss / 2}) + "\n")
    with open(os.path.join(run_dir, "final.json"), "w") as fh:
        json.dump({"step": steps, "test_loss": loss, **({"test_loss_stderr": stderr} if stderr else {})}, fh)
    if evaluated:
        results = {"test_loss": loss, "copy_text_second_loss": 1.0 + 0.1 * math.log(E),
                   "induction_score_max": 0.5 - 0.05 * math.log(E), **(results or {})}
        if f > 0:
            results.setdefault("repeated_loss", 3.0 / E)
        with open(os.path.join(run_dir, "eval.json"), "w") as fh:
            json.dump({"results": results}, fh)
    return name


def write_manifest(sweep_dir, order):
    manifest = {"runs": {name: {"state": "done", "wall_s": 12.5} for name in order}, "order": order}
    with open(os.path.join(sweep_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)


def params_of(size):
    return non_embedding_params(PRESETS[size].n_layer, PRESETS[size].d_model)


@pytest.fixture
def stored_sweep(tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    names, order = {}, []
    for size in SIZES:
        n = non_embedding_params(PRESETS[size].n_layer, PRESETS[size].d_model)
        for seed in (0, 1):
            order.append(write_run(sweep_dir, size, 0.0, 1, seed, law(n) + (0.002 if seed else -0.002)))
        for E in REPEATS:
            # repeated runs lose what a model 0.5x (E = 16) or 0.8x their size would have
            worth = {2: 0.8, 16: 0.5, 128: 0.8}[E]
            name = write_run(sweep_dir, size, 0.1, E, 0, law(worth * n))
            names[name] = worth
            order.append(name)
    write_manifest(sweep_dir, order)
    return sweep_dir, order, names


def test_effective_sizes_from_a_stored_sweep(stored_sweep):
    sweep_dir, order, worth = stored_sweep
    report = analyze(sweep_dir, bootstrap=100)
    assert [r.name for r in report.runs] == order
    assert report.fit.exponent == pytest.approx(ALPHA, rel=0.1)
    for r in report.repeated:
        assert r.effective_fraction == pytest.approx(worth[r.name], rel=0.1), r.name
        assert r.baseline_loss is not None and r.test_loss > r.baseline_loss
        lo, hi = r.effective_interval
        assert lo <= r.effective_params <= hi
    # the smallest size's repeated runs are worth less than the smallest baseline: outside the fit's range
    assert {r.effective_status for r in report.repeated if r.size == "100k"} == {"extrapolated"}
    assert {r.effective_status for r in report.repeated if r.size == "1.5m"} == {"ok"}
    lines = report.summary_lines()
    assert "improving with size" in lines[0] and "(205k tokens each)" in lines[0]
    assert lines[1].startswith("Effective size on test loss: L(N) = 2 + 60 * N^-0.25, fitted to 8 baselines of 4 "
                               "sizes trained on 205k tokens each")
    # the copying loss of these baselines does not fall with size: no copying effective size, and why
    assert lines[2].startswith("No effective size on copying loss: the baseline losses do not fall with model size")
    assert lines[3] == ("Repeated runs with test loss above their baseline: 12 of 12 (no standard errors recorded: "
                        "differences are not tested)")
    assert "worst E = 16" in lines[4] and "worth 0.50x" in lines[4]


def test_report_page_plots_and_json_without_training(stored_sweep, capsys):
    sweep_dir, order, _ = stored_sweep
    assert sweep_main(["report", sweep_dir, "--bootstrap", "50"]) == 0
    out_dir = os.path.join(sweep_dir, "report")
    for png in ("loss_vs_repeats.png", "effective_size_vs_repeats.png", "loss_vs_params.png", "loss_curves.png",
                "repeated_loss_vs_repeats.png", "copying_vs_repeats.png", "induction_vs_repeats.png"):
        path = os.path.join(out_dir, png)
        assert os.path.getsize(path) > 5000, png
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(os.path.join(out_dir, "report.md")).read()
    table = page[page.index("## Runs"):]
    for name in order:
        assert f"| {name} |" in table
    assert table.count("\n| ") == len(order) + 1  # header + one row per run
    for png in ("loss_vs_repeats.png", "copying_vs_repeats.png"):
        assert f"]({png})" in page
    doc = json.load(open(os.path.join(out_dir, "report.json")))
    assert len(doc["runs"]) == len(order) and doc["fit"]["n_sizes"] == 4
    printed = capsys.readouterr().out
    assert "Effective size on test loss: L(N) =" in printed and "report written to" in printed


def test_report_of_a_partial_sweep_and_of_an_empty_folder(tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    write_run(sweep_dir, "100k", 0.0, 1, 0, 5.0, evaluated=False)
    write_run(sweep_dir, "340k", 0.0, 1, 0, 4.8, evaluated=False)
    pending = os.path.join(sweep_dir, "runs", "340k_f0.1_E8_uniform_s0")
    os.makedirs(pending)
    with open(os.path.join(pending, "config.yaml"), "w") as fh:
        yaml.safe_dump({"model": {"preset": "340k"}, "data": {"repeated_fraction": 0.1, "repeat_count": 8},
                        "train": {"steps": 10, "global_batch": 4}}, fh)
    report, page = write_report(sweep_dir, bootstrap=0)
    assert report.fit is None and "at least 3 different sizes" in report.fit_error
    text = open(page).read()
    assert ("No effective size on test loss: the fit needs baselines of at least 3 different sizes, got 2" in text
            and "| 340k_f0.1_E8_uniform_s0 |" in text and "pending" in text)
    assert os.path.exists(os.path.join(sweep_dir, "report", "loss_curves.png"))
    os.makedirs(tmp_path / "empty")
    assert sweep_main(["report", str(tmp_path / "empty")]) == 2


# ---- fixed data, bands, noise, and the new plots --------------------------------------------------------
def test_planted_band_edges_are_recovered_and_predicted(tmp_path):
    """Damage planted as a bump in log E whose half-maximum edges follow E = k N^a: the report finds the
    band of every size, fits both edges across sizes and predicts the band of the next size up."""
    sweep_dir, order = str(tmp_path / "sweep"), []
    sizes = ["340k", "900k", "1.5m", "3m"]
    left, right = (lambda n: 200 * n ** -0.2), (lambda n: 5e4 * n ** -0.3)
    counts = [2 ** k for k in range(1, 15)]
    for size in sizes:
        n = params_of(size)
        order.append(write_run(sweep_dir, size, 0.0, 1, 0, law(n), stderr=0.002, evaluated=False))
        centre, width = math.sqrt(left(n) * right(n)), math.log(right(n) / left(n)) / (2 * 1.1774)
        for E in counts:
            damage = 0.2 * math.exp(-0.5 * (math.log(E / centre) / width) ** 2)
            order.append(write_run(sweep_dir, size, 0.1, E, 0, law(n) + damage, stderr=0.002, evaluated=False))
    write_manifest(sweep_dir, order)
    report = analyze(sweep_dir, bootstrap=0)
    bands = report.bands[(0.1, "uniform")]
    for size in sizes:
        n = params_of(size)
        assert bands[n].left == pytest.approx(left(n), rel=0.08) and bands[n].right == pytest.approx(right(n), rel=0.08)
        assert bands[n].left_log_stderr is not None and bands[n].max_damage_stderr == pytest.approx(0.002 * math.sqrt(2))
    for side, (k, a) in (("left", (200, -0.2)), ("right", (5e4, -0.3))):
        fit = report.edge_fits[(0.1, "uniform", side)]
        assert fit.a == pytest.approx(a, abs=0.03) and fit.a_stderr is not None, side
        value, _ = fit.predict(report.predict_params)
        assert value == pytest.approx(k * report.predict_params ** a, rel=0.15), side
    assert report.predict_label == "6m"  # the next preset above the largest size run
    lines = report.summary_lines()
    band_line = next(line for line in lines if line.startswith("Poor-performance band (f = 0.1"))
    assert "340k E 15.7 to 1.11e+03 (peak 128)" in band_line and "3m E 9.89 to 570 (peak 64)" in band_line
    assert any("predicted at 6m (not trained): E" in line for line in lines)


def test_baselines_of_different_token_budgets_get_no_confounded_effective_size(tmp_path, capsys):
    """Per-size budgets (D grows with N): no L(N, D) can be fitted and no N_eff is printed, with the reason
    in one line; baselines at 3 sizes x 3 budgets: L(N, D) with planted parameters, N_eff at each run's D."""
    confounded, order = str(tmp_path / "confounded"), []
    for size in ("100k", "340k", "900k"):
        n = params_of(size)
        steps = max(10, round(20 * n / (16 * 128)))  # 20 tokens per parameter
        order.append(write_run(confounded, size, 0.0, 1, 0, law(n), steps=steps, evaluated=False))
        order.append(write_run(confounded, size, 0.5, 16, 0, law(0.5 * n), steps=steps, evaluated=False))
    write_manifest(confounded, order)
    assert sweep_main(["report", confounded, "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    reason = next(line for line in printed.splitlines() if line.startswith("No effective size on test loss: "))
    assert "differ in training tokens D" in reason and "vary together" in reason and "add baselines" in reason
    doc = json.load(open(os.path.join(confounded, "report", "report.json")))
    assert all(run["effective_params"] is None for run in doc["runs"])
    assert doc["fit"] is None and "vary together" in doc["fit_error"]

    fitted, order = str(tmp_path / "fitted"), []
    worth = {16: 0.5, 128: 0.7}
    for size in ("100k", "340k", "900k"):
        n = params_of(size)
        for steps in (100, 400, 1600):
            D = steps * 16 * 128
            order.append(write_run(fitted, size, 0.0, 1, 0, planted(n, D), steps=steps, evaluated=False,
                                   name=f"{size}_f0_s0_D{steps}"))
            if steps != 400:
                for E, w in worth.items():
                    order.append(write_run(fitted, size, 0.5, E, 0, planted(w * n, D), steps=steps, evaluated=False,
                                           name=f"{size}_f0.5_E{E}_uniform_s0_D{steps}"))
    write_manifest(fitted, order)
    report = analyze(fitted, bootstrap=0)
    fit = report.fit
    assert fit.kind == "L(N, D)" and (fit.n_sizes, fit.n_budgets) == (3, 3)
    assert fit.exponent == pytest.approx(0.3, rel=0.02) and fit.data_exponent == pytest.approx(0.25, rel=0.02)
    for r in report.repeated:
        assert r.effective_fraction == pytest.approx(worth[r.repeat_count], rel=0.02), r.name
        assert r.baseline_loss == pytest.approx(planted(r.params, r.tokens))  # the baseline at the run's own D


def planted(n, D):
    return 2.0 + 60.0 * n ** -0.3 + 300.0 * D ** -0.25


def test_differences_within_two_standard_errors_are_not_ranked(tmp_path):
    sweep_dir, order = str(tmp_path / "sweep"), []
    for size in ("100k", "340k", "900k"):
        n = params_of(size)
        order.append(write_run(sweep_dir, size, 0.0, 1, 0, law(n), stderr=0.01, evaluated=False))
        order.append(write_run(sweep_dir, size, 0.1, 4, 0, law(n) + 0.005, stderr=0.01, evaluated=False))
        # the damage of 900k at E = 64 is beyond its errors, that of the smaller sizes is not
        extra = 0.1 if size == "900k" else 0.01
        order.append(write_run(sweep_dir, size, 0.1, 64, 0, law(n) + extra, stderr=0.01, evaluated=False))
    write_manifest(sweep_dir, order)
    report, page = write_report(sweep_dir, bootstrap=0)
    lines = report.summary_lines()
    assert "(1 above and 0 below by more than 2 standard errors; 5 within)" in lines[2]
    assert any(line.startswith("  100k, f = 0.1: no E differs from the baseline by more than 2 standard errors "
                               "(largest: E = 64, +0.0100 ± 0.0141)") for line in lines)
    assert any(line.startswith("  900k, f = 0.1: worst E = 64, test loss +0.1000 ± 0.0141 over the baseline")
               for line in lines)
    band = next(line for line in lines if line.startswith("Poor-performance band"))
    assert "100k none (largest damage within 2 standard errors)" in band and "900k E 14.9 to open (peak 64)" in band
    text = open(page).read()
    assert text.count("(within 2 SE)") == 5
    assert "| 900k | 0.1 | uniform | 64 | +0.1000 ± 0.0141 | yes |" in text


def test_every_new_plot_from_a_stored_sweep(tmp_path):
    """Copying at C = 11, evaluations over training (logged and per checkpoint), per-head scores, several f,
    whole-dataset repetition (f = 1) and a fine-tune stage: each gets its plot and its summary line."""
    sweep_dir, order = str(tmp_path / "sweep"), []
    copy_law = lambda n: 0.5 + 40 * n ** -0.3  # noqa: E731
    heads = lambda scale: [[0.1 * scale, 0.6 * scale], [0.2 * scale, 0.9 * scale]]  # noqa: E731
    cells = [(0.0, 1, 1.0)] + [(f, E, w) for f in (0.1, 0.5) for E, w in ((4, 0.8), (32, 0.4), (256, 0.9))] \
        + [(1.0, 4, 0.7)]
    for size in ("100k", "340k", "900k"):
        n = params_of(size)
        for f, E, w in cells:
            w = w ** (4 * f) if f else 1.0  # larger f costs more
            results = {"copy_text_loss": copy_law(w ** 2 * n), "copy_text_loss_stderr": 0.01, "copy_copies": 11,
                       "induction_scores": heads(w), "copying_head_scores": heads(-w),
                       "repeated_loss_stderr": 0.02}
            evals = [(s, {"test_loss": law(n) + 1 / s, "test_loss_stderr": 0.01, "repeated_loss": 4 / s,
                          "repeated_loss_stderr": 0.02}) for s in (25, 50, 75)] if f else \
                [(s, {"test_loss": law(n) + 1 / s, "test_loss_stderr": 0.01}) for s in (25, 50, 75)]
            name = write_run(sweep_dir, size, f, E, 0, law(w * n), stderr=0.004, results=results, curve_evals=evals)
            order.append(name)
            if (f, E) in ((0.0, 1), (0.5, 32)):  # fine-tunes of the baseline and of the worst cell
                order.append(write_run(sweep_dir, size, 0.0, 1, 0, law(math.sqrt(w) * n) - 0.3, stderr=0.004,
                                       evaluated=False, name=name + "_ft",
                                       init_from=os.path.join(sweep_dir, "runs", name)))
        # a per-checkpoint evaluation document (`fasttrain eval --all`) of the baseline
        checkpoints = os.path.join(sweep_dir, "runs", f"{size}_f0_s0", "checkpoints")
        os.makedirs(checkpoints)
        with open(os.path.join(checkpoints, "eval_step_0000050.json"), "w") as fh:
            json.dump({"step": 50, "tokens_seen": 50 * 16 * 128, "results": {"test_loss": law(n) + 0.02}}, fh)
    write_manifest(sweep_dir, order)
    report, page = write_report(sweep_dir, bootstrap=0)
    out = os.path.dirname(page)
    for png in ("effective_size_vs_repeats.png", "poor_performance_band.png", "effective_size_vs_fraction.png",
                "training_curves.png", "loss_vs_epochs.png", "finetune_effective_size.png",
                "prefix_matching_heads.png", "copying_vs_repeats.png"):
        assert os.path.getsize(os.path.join(out, png)) > 5000, png
    text = open(page).read()
    assert "training_curves.png, second row" not in text and "previous-token score per head not in" in text
    base = next(r for r in report.runs if r.name == "340k_f0_s0")
    assert [e["test_loss"] for e in base.eval_curve] == pytest.approx(
        [law(base.params) + 1 / 25, law(base.params) + 0.02, law(base.params) + 1 / 75, law(base.params)])
    # the fine-tunes are grouped under their source's f and E and compared with the fine-tuned baseline
    ft = next(r for r in report.runs if r.name == "340k_f0.5_E32_uniform_s0_ft")
    assert (ft.stage, ft.source, ft.repeated_fraction, ft.repeat_count) == ("finetune", "340k_f0.5_E32_uniform_s0", 0.5, 32)
    assert ft.effective_fraction == pytest.approx(math.sqrt(0.4 ** 2), rel=0.05)
    lines = report.summary_lines()
    worst = next(line for line in lines if line.startswith("  340k, f = 0.5:"))
    assert "worst E = 32" in worst and "0.16x" in worst and "0.03x ± 0.00 on copying (C = 11)" in worst
    assert "Worst-E effective size by repeated fraction f (test loss):" in lines
    assert any(line.startswith("  after fine-tuning, 340k at E = 32 (f = 0.5)") and "worth 0.40x" in line
               and "(pretrained: 0.16x" in line for line in lines)
    # f = 1 runs have their own plot and stay out of the band of f < 1
    assert (1.0, "uniform") not in report.bands


def test_real_tiny_sweep_through_the_command_line(tmp_path, dataset_dir, capsys):
    """Train a tiny grid for real (3 sizes at one token budget, evaluated during training), then report."""
    tree = {
        "out_dir": str(tmp_path / "sweep"),
        "base": {"model": {"context_length": 64}, "data": {"path": dataset_dir, "seq_len": 64},
                 "optim": {"lr": 3e-3, "warmup_steps": 3},
                 "train": {"global_batch": 4, "log_every": 5, "eval_every": 10, "eval_tokens": 512, "device": "cpu"}},
        "grid": {"sizes": ["100k", "340k", "900k"], "repeated_fraction": [0.5], "repeat_count": [2, 8]},
        "budget": {"tokens": 30 * 4 * 64},
        "pack": 3,  # each size's three runs in one process: start-up paid three times, not nine
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert sweep_main(["sweep", str(path), "--jobs", "2", "--quiet"]) == 0
    assert sweep_main(["report", str(tmp_path / "sweep"), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "report written to" in printed
    doc = json.load(open(tmp_path / "sweep" / "report" / "report.json"))
    assert len(doc["runs"]) == 9 and {run["tokens"] for run in doc["runs"]} == {30 * 4 * 64}
    assert doc["summary"][0].startswith("Baselines (f = 0) test loss by size (7.68k tokens each): 100k ")
    # one budget: either L(N) at that D, or one line saying why there is no effective size
    assert (doc["fit"] or {}).get("tokens") == 30 * 4 * 64 or doc["summary"][1].startswith("No effective size on test")
    assert "training_curves.png" in doc["plots"] and "loss_vs_repeats.png" in doc["plots"]
    runs = {r.name: r for r in analyze(str(tmp_path / "sweep"), bootstrap=0).runs}
    assert [e["step"] for e in runs["340k_f0_s0"].eval_curve] == [10, 20, 30]
    assert all(r.baseline_loss is not None for r in runs.values() if not r.is_baseline)


def _has_init_from() -> bool:
    import dataclasses

    from fasttrain.config import TrainConfig

    return "init_from" in {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.skipif(not _has_init_from(), reason="needs train.init_from in the run config")
def test_real_finetune_stage_runs_after_its_sources(tmp_path, dataset_dir):
    tree = {
        "out_dir": str(tmp_path / "sweep"),
        "base": {"model": {"context_length": 32}, "data": {"path": dataset_dir, "seq_len": 32},
                 "optim": {"lr": 3e-3, "warmup_steps": 2},
                 "train": {"global_batch": 4, "log_every": 5, "eval_tokens": 256, "device": "cpu"}},
        "grid": {"sizes": ["100k"], "repeated_fraction": [0.5], "repeat_count": [4]},
        "budget": {"steps": 20},
        "pack": 2,
        "finetune": {"data": {"path": dataset_dir, "seed": 99}, "budget": {"steps": 10},
                     "optim": {"warmup_steps": 1}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert sweep_main(["sweep", str(path), "--quiet"]) == 0
    entries = json.load(open(tmp_path / "sweep" / "manifest.json"))["runs"]
    runs_dir = tmp_path / "sweep" / "runs"
    for source in ("100k_f0_s0", "100k_f0.5_E4_uniform_s0"):
        ft = entries[source + "_ft"]
        assert ft["state"] == "done" and ft["started"] >= entries[source]["finished"]
        assert ft["pack"] == ["100k_f0_s0_ft", "100k_f0.5_E4_uniform_s0_ft"]  # packed like any runs
        # it starts from its source's weights, not from a fresh init: its first logged loss is far lower
        first = [json.loads(open(runs_dir / name / "metrics.jsonl").readline())["loss"] for name in (source, source + "_ft")]
        assert first[1] < first[0] - 0.5
    report = analyze(str(tmp_path / "sweep"), bootstrap=0)
    ft = next(r for r in report.runs if r.name == "100k_f0.5_E4_uniform_s0_ft")
    assert (ft.stage, ft.source, ft.repeat_count, ft.tokens) == ("finetune", "100k_f0.5_E4_uniform_s0", 4, 10 * 4 * 32)
    assert ft.baseline_loss == next(r.test_loss for r in report.runs if r.name == "100k_f0_s0_ft")
