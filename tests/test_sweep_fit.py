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
