import math

import numpy as np
import pytest

from fasttrain.sweep.fit import FitError, effective_size, fit_scaling_law, params_for_loss


def test_fit_recovers_known_law_from_noisy_losses():
    rng = np.random.default_rng(0)
    E_irr, A, alpha = 1.8, 350.0, 0.32
    N = np.repeat(np.geomspace(1e5, 8e8, 10), 2)  # two seeds per size
    L = E_irr + A * N ** (-alpha)
    noisy = L + 0.004 * rng.standard_normal(N.size)
    fit = fit_scaling_law(N, noisy, bootstrap=200)
    assert fit.irreducible == pytest.approx(E_irr, abs=0.03)
    assert fit.exponent == pytest.approx(alpha, rel=0.03)
    assert fit.coefficient == pytest.approx(A, rel=0.15)
    assert fit.loss(N) == pytest.approx(L, abs=0.01)
    # the uncertainties are finite, positive, and the bootstrap intervals cover the truth
    assert all(v > 0 and math.isfinite(v) for v in fit.stderr.values())
    for key, truth in (("irreducible", E_irr), ("exponent", alpha), ("coefficient", A)):
        lo, hi = fit.interval[key]
        assert lo <= truth <= hi, (key, lo, hi, truth)
    assert fit.n_points == 20 and fit.n_sizes == 10 and fit.note == ""


def test_exact_fit_with_as_many_points_as_parameters_says_uncertainty_is_undetermined():
    N = np.array([1e5, 3.4e5, 9e5])
    L = 2.0 + 100 * N ** -0.3
    fit = fit_scaling_law(N, L)
    assert fit.irreducible == pytest.approx(2.0, abs=1e-6)
    assert fit.exponent == pytest.approx(0.3, rel=1e-5)
    assert fit.stderr is None and fit.interval is None
    assert "not determined" in fit.note and "bound" not in fit.note


def test_fixed_irreducible_fits_two_parameters():
    N = np.geomspace(1e5, 1e8, 4)
    L = 1.5 + 60 * N ** -0.25
    fit = fit_scaling_law(N, L, fixed_irreducible=1.5)
    assert fit.irreducible == 1.5 and fit.fixed_irreducible
    assert fit.exponent == pytest.approx(0.25, rel=1e-5)
    assert fit.coefficient == pytest.approx(60, rel=1e-4)


def test_fit_refuses_losses_that_do_not_fall_with_size_and_too_few_sizes():
    with pytest.raises(FitError, match="do not fall"):
        fit_scaling_law([1e5, 1e6, 1e7], [3.0, 3.2, 3.5])
    with pytest.raises(FitError, match="at least 3 different sizes"):
        fit_scaling_law([1e5, 1e5, 1e6], [3.0, 3.1, 2.5])


def test_effective_size_inverts_the_law():
    N = np.geomspace(1e6, 1e9, 6)
    fit = fit_scaling_law(N, 1.7 + 400 * N ** -0.35, bootstrap=0)
    # a run whose loss is exactly that of a 4e8 baseline is worth 4e8 parameters
    eff = effective_size(fit, 1.7 + 400 * 4e8 ** -0.35)
    assert eff.status == "ok"
    assert eff.params == pytest.approx(4e8, rel=1e-4)
    assert eff.fraction_of(8e8) == pytest.approx(0.5, rel=1e-4)  # "800M degraded to a 400M-equivalent"
    # closed form by hand
    assert params_for_loss(2.0, 1.0, 10.0, 0.5) == pytest.approx(100.0)


def test_effective_size_outside_the_fit_is_flagged():
    N = np.geomspace(1e6, 1e8, 5)
    fit = fit_scaling_law(N, 2.0 + 100 * N ** -0.3, bootstrap=0)
    below = effective_size(fit, 1.9)
    assert below.status == "below_irreducible" and math.isinf(below.params)
    worse_than_smallest = effective_size(fit, 2.0 + 100 * 1e5 ** -0.3)
    assert worse_than_smallest.status == "extrapolated"
    assert worse_than_smallest.params == pytest.approx(1e5, rel=1e-3)
    better_than_largest = effective_size(fit, 2.0 + 100 * 1e9 ** -0.3)
    assert better_than_largest.status == "extrapolated" and better_than_largest.params > 1e8


def test_effective_size_interval_from_bootstrap_contains_the_estimate():
    rng = np.random.default_rng(1)
    N = np.repeat(np.geomspace(1e5, 1e8, 6), 3)
    L = 2.0 + 80 * N ** -0.3 + 0.003 * rng.standard_normal(N.size)
    fit = fit_scaling_law(N, L, bootstrap=200)
    eff = effective_size(fit, 2.0 + 80 * 3e6 ** -0.3)
    lo, hi = eff.interval
    assert lo <= eff.params <= hi
    assert lo < 3e6 < hi


# ---- L(N, D), the choice of law, bands and edges -------------------------------------------------------
from fasttrain.sweep.fit import (data_design_problem, fit_baselines, fit_data_scaling_law, fit_edges,  # noqa: E402
                                 poor_performance_band)

# Hoffmann et al.'s law with planted parameters
PLANTED = dict(irreducible=1.69, coefficient=406.4, exponent=0.34, data_coefficient=410.7, data_exponent=0.28)


def planted_loss(N, D):
    p = PLANTED
    return p["irreducible"] + p["coefficient"] * N ** -p["exponent"] + p["data_coefficient"] * D ** -p["data_exponent"]


def test_data_law_recovers_planted_parameters_within_their_errors():
    rng = np.random.default_rng(3)
    N, D = (g.reshape(-1) for g in np.meshgrid(np.geomspace(1e6, 1e9, 4), np.geomspace(2e8, 2e10, 4)))
    noisy = planted_loss(N, D) + 0.002 * rng.standard_normal(N.size)
    fit = fit_data_scaling_law(N, D, noisy, bootstrap=0)
    assert fit.kind == "L(N, D)" and (fit.n_sizes, fit.n_budgets, fit.n_points) == (4, 4, 16)
    for key, truth in PLANTED.items():
        se = fit.stderr[key]
        assert 0 < se < abs(truth), key
        assert abs(getattr(fit, key) - truth) < 3 * se, (key, getattr(fit, key), truth, se)
    assert fit.loss(N, D) == pytest.approx(planted_loss(N, D), abs=0.005)
    # effective size at the run's own D: a loss a 3e7 model reaches on 1e9 tokens is worth 3e7 there
    eff = effective_size(fit, float(planted_loss(3e7, 1e9)), tokens=1e9, loss_stderr=0.01)
    assert eff.params == pytest.approx(3e7, rel=0.05) and eff.status == "ok"
    gap = planted_loss(3e7, 1e9) - fit.floor(1e9)
    assert eff.log_stderr == pytest.approx(0.01 / (fit.exponent * gap), rel=1e-6)  # no bootstrap: the loss's own
    # the same loss at fewer tokens is worth more parameters (the data term is larger there)
    assert effective_size(fit, float(planted_loss(3e7, 1e9)), tokens=4e8).params > 3e7


def test_the_law_follows_the_design_of_the_baselines():
    N3 = np.array([1e5, 3.4e5, 9e5])
    # one D for every baseline (within 1%): L(N) at that D
    fit = fit_baselines(N3, [6e5, 6e5, 6.03e5], 2.0 + 100 * N3 ** -0.3)
    assert fit.kind == "L(N)" and fit.tokens == pytest.approx(6.01e5)
    assert fit.applies_to(6e5) == "" and "trained on 1.2e+06 tokens" in fit.applies_to(1.2e6)
    # D proportional to N (tokens_per_param): refused, saying which runs to add
    with pytest.raises(FitError, match=r"no budget has baselines of 3 sizes.*vary together.*add baselines"):
        fit_baselines(N3, 20 * N3, 2.0 + 100 * N3 ** -0.3)
    assert "vary together" in data_design_problem(N3, 20 * N3)
    assert "3 distinct D" in data_design_problem([1e5, 3e5, 1e6, 1e5], [1e6, 1e6, 1e6, 2e6])
    assert "5 parameters" in data_design_problem([1e5, 3e5, 1e6, 1e5], [1e6, 2e6, 4e6, 4e6])
    # 3 sizes at one D plus a baseline at another: L(N) on the 3, the other left out and said so
    N4, D4 = np.array([1e5, 3e5, 1e6, 1e5]), np.array([1e6, 1e6, 1e6, 3e6])
    fit = fit_baselines(N4, D4, 2.0 + 100 * N4 ** -0.3 + 0.1 * (D4 > 2e6))
    assert fit.kind == "L(N)" and fit.tokens == 1e6 and fit.n_points == 3
    assert "1 baseline(s) at other budgets left out" in fit.note
    # enough sizes and budgets, not collinear: L(N, D)
    N, D = (g.reshape(-1) for g in np.meshgrid([1e6, 1e7, 1e8], [1e8, 1e9, 1e10]))
    assert fit_baselines(N, D, planted_loss(N, D), bootstrap=0).kind == "L(N, D)"


def test_exact_fit_takes_its_errors_from_the_losses_standard_errors():
    N = np.array([1e5, 3.4e5, 9e5])
    L = 2.0 + 100 * N ** -0.3
    fit = fit_scaling_law(N, L, loss_stderr=[0.01, 0.01, 0.01], bootstrap=40)
    assert fit.stderr is not None and fit.interval is not None and "evaluation standard errors" in fit.uncertainty
    assert "not determined" not in fit.note
    wider = fit_scaling_law(N, L, loss_stderr=[0.03, 0.03, 0.03], bootstrap=0)
    assert wider.stderr["exponent"] == pytest.approx(3 * fit.stderr["exponent"], rel=1e-6)  # linear in the noise
    eff = effective_size(fit, float(2.0 + 100 * 5e5 ** -0.3), loss_stderr=0.005)
    lo, hi = eff.interval
    assert lo < 5e5 < hi and eff.log_stderr > 0


def test_band_edges_are_interpolated_in_log_E():
    E = np.array([2, 4, 8, 16, 32, 64, 128, 256, 512])
    # damage: a bump in log E centred on 32, half its maximum at 32 e^(+-1.1774 w)
    width = 1.2
    damage = 0.3 * np.exp(-0.5 * (np.log(E / 32) / width) ** 2)
    band = poor_performance_band(E, damage, [0.005] * E.size)
    assert band.peak == 32 and band.max_damage == pytest.approx(0.3)
    half = 1.1774 * width
    assert band.left == pytest.approx(32 * math.exp(-half), rel=0.06)
    assert band.right == pytest.approx(32 * math.exp(half), rel=0.06)
    assert 0 < band.left_log_stderr < 0.2 and 0 < band.right_log_stderr < 0.2
    # the damage still above half at the last E: that edge is open; no damage: no band
    open_right = poor_performance_band(E[:6], damage[:6] + np.linspace(0, 0.2, 6))
    assert open_right.right is None and open_right.left is not None
    assert poor_performance_band(E, -damage) is None


def test_edge_fit_recovers_a_planted_power_law():
    rng = np.random.default_rng(0)
    N = np.geomspace(1e6, 1e9, 6)
    edges = 5.1e7 * N ** -0.5 * np.exp(0.05 * rng.standard_normal(N.size))
    fit = fit_edges(N, edges, [0.05] * N.size)
    assert abs(fit.a + 0.5) < 3 * fit.a_stderr
    assert abs(math.log(fit.k / 5.1e7)) < 3 * fit.k_log_stderr
    value, log_se = fit.predict(3e9)
    assert value == pytest.approx(5.1e7 * 3e9 ** -0.5, rel=3 * log_se)
    two = fit_edges(N[:2], edges[:2])
    assert two.cov is None and "not determined" in two.note
    with pytest.raises(FitError, match="2 or more sizes"):
        fit_edges(N[:1], edges[:1])
