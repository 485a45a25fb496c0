"""Sweeps over model size x repeated fraction x repeat count, and their analysis.

    spec = load_sweep("sweep.yaml"); run_sweep(spec)     # `fasttrain sweep sweep.yaml`
    report, page = write_report("sweeps/repeat")          # `fasttrain report sweeps/repeat`
    fit = fit_baselines(params, tokens, losses); effective_size(fit, loss, tokens)   # L(N) or L(N, D)
"""
from fasttrain.sweep.analysis import analyze, load_sweep_runs
from fasttrain.sweep.fit import (DataScalingFit, EffectiveSize, FitError, ScalingFit, effective_size, fit_baselines,
                                 fit_data_scaling_law, fit_scaling_law, params_for_loss)
from fasttrain.sweep.grid import RunSpec, SweepError, SweepSpec, expand, load_sweep, run_name, spec_from_dict
from fasttrain.sweep.manifest import Manifest
from fasttrain.sweep.runner import run_sweep, train_command
from fasttrain.sweep.report import write_report

__all__ = [
    "DataScalingFit", "EffectiveSize", "FitError", "Manifest", "RunSpec", "ScalingFit", "SweepError", "SweepSpec",
    "analyze", "effective_size", "expand", "fit_baselines", "fit_data_scaling_law", "fit_scaling_law", "load_sweep",
    "load_sweep_runs", "params_for_loss",
    "run_name", "run_sweep", "spec_from_dict", "train_command", "write_report",
]
