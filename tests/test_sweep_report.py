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


def write_run(sweep_dir, size, f, E, seed, loss, evaluated=True):
    name = f"{size}_f0_s{seed}" if f == 0 else f"{size}_f{f:g}_E{E}_uniform_s{seed}"
    run_dir = os.path.join(sweep_dir, "runs", name)
    os.makedirs(run_dir)
    p = PRESETS[size]
    cfg = {"model": {"preset": size, "n_layer": p.n_layer, "d_model": p.d_model, "n_head": p.n_head,
                     "context_length": 128},
           "data": {"path": "/nowhere", "seq_len": 128, "repeated_fraction": f, "repeat_count": E,
                    "placement": "uniform", "seed": 1234 + seed},
           "train": {"steps": 100, "global_batch": 16, "seed": seed, "out_dir": run_dir}}
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step in range(10, 101, 10):
            fh.write(json.dumps({"step": step, "tokens": step * 16 * 128, "loss": loss + 3.0 / step, "lr": 1e-3,
                                 "grad_norm": 1.0, "tokens_per_s": 1e4}) + "\n")
        fh.write(json.dumps({"step": 100, "test_loss": loss, "test_bits_per_byte": loss / 2}) + "\n")
    with open(os.path.join(run_dir, "final.json"), "w") as fh:
        json.dump({"step": 100, "test_loss": loss}, fh)
    if evaluated:
        results = {"test_loss": loss, "copy_text_second_loss": 1.0 + 0.1 * math.log(E),
                   "induction_score_max": 0.5 - 0.05 * math.log(E)}
        if f > 0:
            results["repeated_loss"] = 3.0 / E
        with open(os.path.join(run_dir, "eval.json"), "w") as fh:
            json.dump({"results": results}, fh)
    return name


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
    manifest = {"runs": {name: {"state": "done", "wall_s": 12.5} for name in order}, "order": order}
    with open(os.path.join(sweep_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
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
    assert "improving with size" in lines[0]
    assert lines[1] == "Repeated runs with test loss above their baseline: 12 of 12"
    assert "worst E = 16" in lines[2] and "worth 0.50x" in lines[2]


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
    assert "fit: L(N) =" in printed and "report written to" in printed


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
    assert "No scaling-law fit" in text and "| 340k_f0.1_E8_uniform_s0 |" in text and "pending" in text
    assert os.path.exists(os.path.join(sweep_dir, "report", "loss_curves.png"))
    os.makedirs(tmp_path / "empty")
    assert sweep_main(["report", str(tmp_path / "empty")]) == 2
