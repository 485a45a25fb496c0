"""The scaling law of the unrepeated baselines, and the effective size of every repeated run.

    L(N) = E_irr + A * N^(-alpha)            N: non-embedding parameters, L: test loss (nats/token)

Fit: for a fixed alpha the model is linear in (E_irr, A), so it is solved exactly by least squares; the
residual sum of squares is then minimised over alpha alone (a dense grid, then golden-section refinement).
E_irr is kept >= 0 (a loss is never negative) and A > 0. N is divided by its geometric mean inside the
fit so the linear problem stays well conditioned from 1e5 to 1e9 parameters.

Uncertainty: standard errors from the Jacobian at the optimum (residual variance times (J^T J)^-1), and
percentile intervals from a bootstrap over baseline runs (resampled with replacement; resamples with fewer
distinct sizes than parameters are dropped). Both need more runs than parameters: with three sizes and one
seed the fit passes through every point and its uncertainty is not determined, which the fit says.

Effective size of a run with test loss L: the N of an unrepeated model with the same loss,
    N_eff = ((L - E_irr) / A)^(-1/alpha),
with status "ok", "extrapolated" (outside the baselines' range of N), or "below_irreducible" (L <= E_irr:
better than any model the fit describes, N_eff infinite).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

GOLDEN = (math.sqrt(5) - 1) / 2


class FitError(ValueError):
    """The baselines do not determine a scaling law (too few sizes, or loss not falling with size)."""


@dataclass
class ScalingFit:
    irreducible: float  # E_irr
    coefficient: float  # A (in units where N is a raw parameter count)
    exponent: float  # alpha
    n_points: int
    n_sizes: int
    params_min: float
    params_max: float
    rmse: float
    fixed_irreducible: bool = False
    stderr: Optional[dict] = None  # {"irreducible", "coefficient", "exponent"}
    interval: Optional[dict] = None  # bootstrap 95% percentile intervals, same keys
    bootstrap: list = field(default_factory=list)  # (E_irr, A, alpha) of each bootstrap fit
    note: str = ""

    @property
    def n_parameters(self) -> int:
        return 2 if self.fixed_irreducible else 3

    def loss(self, params) -> np.ndarray:
        return self.irreducible + self.coefficient * np.asarray(params, dtype=np.float64) ** (-self.exponent)

    def to_dict(self) -> dict:
        return {"irreducible": self.irreducible, "coefficient": self.coefficient, "exponent": self.exponent,
                "n_points": self.n_points, "n_sizes": self.n_sizes, "params_min": self.params_min,
                "params_max": self.params_max, "rmse": self.rmse, "fixed_irreducible": self.fixed_irreducible,
                "stderr": self.stderr, "interval": self.interval, "bootstrap_samples": len(self.bootstrap),
                "note": self.note}


def _solve_linear(x_alpha: np.ndarray, losses: np.ndarray, fixed: Optional[float]):
    """(E, A', sse) for fixed alpha, where x_alpha = n^-alpha (one row per alpha, or a single row);
    E >= 0 and A' > 0 enforced (sse = inf where no A' > 0 fits)."""
    x = np.atleast_2d(x_alpha)
    if fixed is None:
        xm, lm = x.mean(axis=1, keepdims=True), losses.mean()
        xc = x - xm
        A = (xc @ (losses - lm)) / np.maximum((xc * xc).sum(axis=1), 1e-300)
        E = lm - A * xm[:, 0]
        on_bound = E < 0  # the constrained optimum lies on E = 0
        A = np.where(on_bound, (x @ losses) / (x * x).sum(axis=1), A)
        E = np.where(on_bound, 0.0, E)
    else:
        E = np.full(x.shape[0], float(fixed))
        A = (x @ (losses - fixed)) / (x * x).sum(axis=1)
    resid = losses[None, :] - E[:, None] - A[:, None] * x
    sse = np.where(A > 0, (resid * resid).sum(axis=1), np.inf)
    if np.ndim(x_alpha) == 1:
        return float(E[0]), float(A[0]), float(sse[0])
    return E, A, sse


def _fit_normalized(n: np.ndarray, losses: np.ndarray, fixed: Optional[float]):
    """Best (E, A', alpha, sse) for L = E + A' n^-alpha with n normalised to geometric mean 1."""
    log_n = np.log(n)
    alphas = np.geomspace(1e-3, 4.0, 400)
    sse = _solve_linear(np.exp(-alphas[:, None] * log_n[None, :]), losses, fixed)[2]
    if not np.isfinite(sse).any():
        raise FitError("the baseline losses do not fall with model size: there is no scaling law to fit "
                       "(train longer, or check the baselines' learning rates)")
    i = int(np.argmin(sse))
    lo, hi = alphas[max(i - 1, 0)], alphas[min(i + 1, len(alphas) - 1)]
    f = lambda a: _solve_linear(np.exp(-a * log_n), losses, fixed)[2]  # noqa: E731
    c, d = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - GOLDEN * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + GOLDEN * (hi - lo)
            fd = f(d)
    alpha = (lo + hi) / 2
    alpha = float(min([(f(alpha), alpha), (float(sse[i]), float(alphas[i]))])[1])
    E, A, s = _solve_linear(np.exp(-alpha * log_n), losses, fixed)
    return E, A, alpha, s


def _fit_raw(params: np.ndarray, losses: np.ndarray, fixed: Optional[float]):
    ref = float(np.exp(np.mean(np.log(params))))
    E, A_norm, alpha, sse = _fit_normalized(params / ref, losses, fixed)
    return E, float(A_norm * ref**alpha), alpha, sse, ref, A_norm


def fit_scaling_law(params, losses, fixed_irreducible: Optional[float] = None, bootstrap: int = 300,
                    seed: int = 0) -> ScalingFit:
    """Fit L(N) = E_irr + A N^-alpha to (N, L) points; E_irr fixed when fixed_irreducible is given."""
    N = np.asarray(params, dtype=np.float64).reshape(-1)
    L = np.asarray(losses, dtype=np.float64).reshape(-1)
    if N.shape != L.shape:
        raise FitError(f"{N.size} parameter counts but {L.size} losses")
    keep = np.isfinite(N) & np.isfinite(L) & (N > 0)
    N, L = N[keep], L[keep]
    n_params = 2 if fixed_irreducible is not None else 3
    sizes = np.unique(N)
    if sizes.size < 2 or (fixed_irreducible is None and sizes.size < 3):
        raise FitError(f"the fit needs baselines of at least {n_params} different sizes, got {sizes.size}")
    E, A, alpha, sse, ref, A_norm = _fit_raw(N, L, fixed_irreducible)
    fit = ScalingFit(irreducible=E, coefficient=A, exponent=alpha, n_points=int(N.size), n_sizes=int(sizes.size),
                     params_min=float(N.min()), params_max=float(N.max()), rmse=math.sqrt(sse / N.size),
                     fixed_irreducible=fixed_irreducible is not None)
    dof = N.size - n_params
    notes = []
    if fixed_irreducible is None and E == 0.0:
        notes.append("E_irr is at its bound 0: the baselines do not show the loss flattening")
    if dof <= 0:
        notes.append(f"{N.size} baseline points for {n_params} parameters: the uncertainty of the fit is not "
                     "determined (add sizes or seeds)")
    fit.note = "; ".join(notes)
    if dof <= 0:
        return fit
    fit.stderr = _jacobian_stderr(N / ref, L, E, A_norm, alpha, sse / dof, ref, fixed_irreducible is not None)
    if bootstrap:
        fit.bootstrap, fit.interval = _bootstrap(N, L, fixed_irreducible, bootstrap, seed, n_params)
    return fit


def _jacobian_stderr(n, L, E, A_norm, alpha, s2, ref, fixed) -> Optional[dict]:
    x = n ** (-alpha)
    cols = [x, -A_norm * x * np.log(n)]  # d/dA', d/dalpha
    if not fixed:
        cols = [np.ones_like(x)] + cols
    J = np.stack(cols, axis=1)
    try:
        cov = s2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        return None
    if fixed:
        cov = np.pad(cov, ((1, 0), (1, 0)))
    # A = A' ref^alpha: delta method for its error
    grad_A = np.array([0.0, ref**alpha, A_norm * ref**alpha * math.log(ref)])
    var = [cov[0, 0], float(grad_A @ cov @ grad_A), cov[2, 2]]
    if min(var) < 0:
        return None
    return {"irreducible": math.sqrt(var[0]), "coefficient": math.sqrt(var[1]), "exponent": math.sqrt(var[2])}


def _bootstrap(N, L, fixed, samples, seed, n_params):
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(samples):
        idx = rng.integers(0, N.size, N.size)
        if np.unique(N[idx]).size < n_params:
            continue
        try:
            E, A, alpha, sse, _, _ = _fit_raw(N[idx], L[idx], fixed)
        except FitError:
            continue
        if math.isfinite(sse):
            fits.append((E, A, alpha))
    if len(fits) < max(20, samples // 5):
        return fits, None
    arr = np.array(fits)
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    keys = ("irreducible", "coefficient", "exponent")
    return fits, {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(keys)}


# ---- effective size ----------------------------------------------------------------------------------
@dataclass
class EffectiveSize:
    params: float  # N_eff (inf when the loss is at or below E_irr)
    status: str  # ok | extrapolated | below_irreducible
    interval: Optional[tuple] = None  # bootstrap 95% interval of N_eff

    def fraction_of(self, params: float) -> float:
        return self.params / params


def params_for_loss(loss: float, irreducible: float, coefficient: float, exponent: float) -> float:
    """N with E_irr + A N^-alpha = loss; inf when loss <= E_irr."""
    gap = loss - irreducible
    if gap <= 0:
        return math.inf
    return math.exp(-(math.log(gap) - math.log(coefficient)) / exponent)


def effective_size(fit: ScalingFit, loss: float) -> EffectiveSize:
    n_eff = params_for_loss(loss, fit.irreducible, fit.coefficient, fit.exponent)
    if math.isinf(n_eff):
        status = "below_irreducible"
    elif n_eff < fit.params_min * (1 - 1e-9) or n_eff > fit.params_max * (1 + 1e-9):
        status = "extrapolated"
    else:
        status = "ok"
    interval = None
    if fit.bootstrap and fit.interval is not None:
        values = np.array([params_for_loss(loss, *b) for b in fit.bootstrap])
        lo, hi = np.percentile(values, [2.5, 97.5], method="nearest")  # inf entries sort last, as they should
        interval = (float(lo), float(hi))
    return EffectiveSize(params=n_eff, status=status, interval=interval)
