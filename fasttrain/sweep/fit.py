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

Without case resampling (as many points as parameters), a parametric bootstrap takes its place when the
baselines' own standard errors are known: each loss is redrawn from a normal distribution of its standard
error and the law refitted, which carries the evaluation's sampling noise (never the seed-to-seed spread)
into the fit.

L(N) holds at one token budget D. When the baselines differ in D, the law of Hoffmann et al. (2022),

    L(N, D) = E + A * N^(-alpha) + B * D^(-beta)            D: training tokens

is fitted instead (`fit_data_scaling_law`), if the baselines determine it: at least 3 distinct N, 3
distinct D, 5 distinct (N, D) points, and (N, D) not all on (or within 2% of) one line in log space (D a
power of N, as with a tokens-per-parameter budget). `fit_baselines` chooses: L(N) when every baseline has the same D
(within 1%), else L(N, D), else L(N) on the token budget with the most sizes (runs at other budgets then
get no effective size), else a FitError that says which runs to add.

Effective size of a run with test loss L: the N of an unrepeated model with the same loss trained on the
same tokens,
    N_eff = ((L - E_irr) / A)^(-1/alpha)                    (L(N), the run at the fit's D)
    N_eff = ((L - E - B D^(-beta)) / A)^(-1/alpha)          (L(N, D), at the run's own D),
with status "ok", "extrapolated" (outside the baselines' range of N, or of D), or "below_irreducible"
(L at or below the law's floor at that D: better than any model the fit describes, N_eff infinite).

Poor-performance region (`poor_performance_band`, `fit_edges`): for one size and f, the range of E where
the damage (test loss minus the baseline's) is at least half its maximum, each edge interpolated linearly
in log E between the two runs that straddle half the maximum; an edge is open when the damage never falls
below half on that side. Edges across sizes are fitted as log E = log k + a log N (weighted least squares).
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
    tokens: Optional[float] = None  # the token budget D of the baselines (None: not known)
    uncertainty: str = ""  # where stderr and interval come from

    kind = "L(N)"

    @property
    def n_parameters(self) -> int:
        return 2 if self.fixed_irreducible else 3

    def loss(self, params, tokens=None) -> np.ndarray:
        return self.irreducible + self.coefficient * np.asarray(params, dtype=np.float64) ** (-self.exponent)

    def applies_to(self, tokens: Optional[float]) -> str:
        """'' when the law describes runs trained on `tokens`, else why not."""
        if self.tokens is None or tokens is None or same_tokens(tokens, self.tokens):
            return ""
        return (f"trained on {tokens:.4g} tokens, but L(N) was fitted to baselines of {self.tokens:.4g} tokens "
                "(an effective size needs baselines trained on the same tokens)")

    def params_for(self, loss: float, tokens=None, parameters: Optional[tuple] = None) -> float:
        E, A, alpha = parameters or (self.irreducible, self.coefficient, self.exponent)
        return params_for_loss(loss, E, A, alpha)

    def floor(self, tokens=None) -> float:
        """The loss no model reaches at this D (E_irr)."""
        return self.irreducible

    def in_range(self, params: float, tokens=None) -> bool:
        return self.params_min * (1 - 1e-9) <= params <= self.params_max * (1 + 1e-9)

    def formula(self) -> str:
        return f"{self.irreducible:.4g} + {self.coefficient:.4g} * N^-{self.exponent:.4g}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "irreducible": self.irreducible, "coefficient": self.coefficient,
                "exponent": self.exponent, "tokens": self.tokens,
                "n_points": self.n_points, "n_sizes": self.n_sizes, "params_min": self.params_min,
                "params_max": self.params_max, "rmse": self.rmse, "fixed_irreducible": self.fixed_irreducible,
                "stderr": self.stderr, "interval": self.interval, "bootstrap_samples": len(self.bootstrap),
                "uncertainty": self.uncertainty, "note": self.note}


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
    for _ in range(40):  # the bracket shrinks to 4e-9 of its width
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


def _known_stderr(loss_stderr, keep, size: int) -> Optional[np.ndarray]:
    """The baselines' standard errors when every one is known and positive, else None."""
    if loss_stderr is None:
        return None
    se = np.asarray([np.nan if v is None else v for v in np.asarray(loss_stderr, dtype=object).reshape(-1)],
                    dtype=np.float64)
    if se.size != keep.size:
        raise FitError(f"{se.size} standard errors for {keep.size} losses")
    se = se[keep]
    return se if se.size == size and np.all(np.isfinite(se) & (se > 0)) else None


def fit_scaling_law(params, losses, fixed_irreducible: Optional[float] = None, bootstrap: int = 300,
                    seed: int = 0, loss_stderr=None, tokens: Optional[float] = None) -> ScalingFit:
    """Fit L(N) = E_irr + A N^-alpha to (N, L) points; E_irr fixed when fixed_irreducible is given.
    loss_stderr: each point's standard error (None where unknown), for errors when there are no more
    points than parameters; tokens: the D the baselines were trained on (recorded, not fitted)."""
    N = np.asarray(params, dtype=np.float64).reshape(-1)
    L = np.asarray(losses, dtype=np.float64).reshape(-1)
    if N.shape != L.shape:
        raise FitError(f"{N.size} parameter counts but {L.size} losses")
    keep = np.isfinite(N) & np.isfinite(L) & (N > 0)
    se = _known_stderr(loss_stderr, keep, int(keep.sum()))
    N, L = N[keep], L[keep]
    n_params = 2 if fixed_irreducible is not None else 3
    sizes = np.unique(N)
    if sizes.size < 2 or (fixed_irreducible is None and sizes.size < 3):
        raise FitError(f"the fit needs baselines of at least {n_params} different sizes, got {sizes.size}")
    E, A, alpha, sse, ref, A_norm = _fit_raw(N, L, fixed_irreducible)
    fit = ScalingFit(irreducible=E, coefficient=A, exponent=alpha, n_points=int(N.size), n_sizes=int(sizes.size),
                     params_min=float(N.min()), params_max=float(N.max()), rmse=math.sqrt(sse / N.size),
                     fixed_irreducible=fixed_irreducible is not None, tokens=tokens)
    dof = N.size - n_params
    notes = []
    if fixed_irreducible is None and E == 0.0:
        notes.append("E_irr is at its bound 0: the baselines do not show the loss flattening")
    if dof <= 0 and se is None:
        notes.append(f"{N.size} baseline points for {n_params} parameters and no standard errors of their "
                     "losses: the uncertainty of the fit is not determined (add sizes or seeds)")
    fit.note = "; ".join(notes)
    fixed = fixed_irreducible is not None
    if dof > 0:
        fit.stderr = _jacobian_stderr(N / ref, L, E, A_norm, alpha, sse / dof, ref, fixed)
        fit.uncertainty = "Jacobian (residual scatter) and a bootstrap over baseline runs"
        if bootstrap:
            fit.bootstrap, fit.interval = _bootstrap(N, L, fixed_irreducible, bootstrap, seed, n_params)
    elif se is not None:  # an exact fit: only the losses' own noise says how well it is determined
        fit.stderr = _jacobian_stderr(N / ref, L, E, A_norm, alpha, 1.0, ref, fixed, weights=1.0 / se**2)
        fit.uncertainty = ("the baselines' evaluation standard errors alone (as many points as parameters; "
                           "seed-to-seed spread not included)")
        if bootstrap:
            fit.bootstrap, fit.interval = _parametric_bootstrap(
                lambda y: _fit_raw(N, y, fixed_irreducible)[:3], L, se, bootstrap, seed)
    return fit


def _parametric_bootstrap(refit, L, se, samples, seed):
    """Refit with every loss redrawn from N(L_i, se_i^2); (parameter tuples, 95% intervals)."""
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(samples):
        try:
            params = refit(L + se * rng.standard_normal(L.size))
        except FitError:
            continue
        if all(math.isfinite(v) for v in params):
            fits.append(tuple(float(v) for v in params))
    return fits, _percentile_intervals(fits, samples)


def _percentile_intervals(fits, samples, keys=("irreducible", "coefficient", "exponent")):
    if len(fits) < max(20, samples // 5):
        return None
    arr = np.array(fits)
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(keys)}


def _jacobian_stderr(n, L, E, A_norm, alpha, s2, ref, fixed, weights=None) -> Optional[dict]:
    x = n ** (-alpha)
    cols = [x, -A_norm * x * np.log(n)]  # d/dA', d/dalpha
    if not fixed:
        cols = [np.ones_like(x)] + cols
    J = np.stack(cols, axis=1)
    W = np.ones_like(x) if weights is None else weights
    try:
        cov = s2 * np.linalg.inv(J.T @ (J * W[:, None]))
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
    return fits, _percentile_intervals(fits, samples)


# ---- L(N, D) -----------------------------------------------------------------------------------------
EXPONENT_RANGE = (0.01, 2.5)  # alpha and beta: Hoffmann et al. found 0.34 and 0.28, Kaplan et al. 0.08-0.1
SAME_TOKENS = 0.01  # token budgets within 1% of each other count as the same D
# (log N, log D) of the baselines closer to a line than this (smallest / largest singular value of the
# centred design): N and D cannot be told apart (rounding to whole steps leaves ~1e-4 off the line)
COLLINEAR = 0.02


def same_tokens(a: float, b: float) -> bool:
    return abs(a - b) <= SAME_TOKENS * max(abs(a), abs(b))


def token_groups(tokens) -> list[list[int]]:
    """Indices of runs grouped by token budget (budgets within 1% of the group's smallest), by budget."""
    D = np.asarray(tokens, dtype=np.float64).reshape(-1)
    groups: list[list[int]] = []
    for i in np.argsort(D, kind="stable"):
        if groups and same_tokens(D[groups[-1][0]], D[i]):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def _budgets(D: np.ndarray) -> np.ndarray:
    """Each run's token budget replaced by its group's mean (so that 1% rounding makes one D)."""
    out = D.copy()
    for group in token_groups(D):
        out[group] = D[group].mean()
    return out


def data_design_problem(params, tokens) -> str:
    """'' when baselines at these (N, D) determine L(N, D) = E + A N^-alpha + B D^-beta, else what is
    missing and which runs to add."""
    N = np.asarray(params, dtype=np.float64).reshape(-1)
    D = _budgets(np.asarray(tokens, dtype=np.float64).reshape(-1))
    sizes, budgets = np.unique(N), np.unique(D)
    points = np.unique(np.stack([N, D], axis=1), axis=0) if N.size else np.zeros((0, 2))
    add = "add baselines of one size at 3 token budgets and of 3 sizes at one budget"
    if sizes.size < 3:
        return f"the baselines have {sizes.size} size(s), L(N, D) needs 3 distinct N ({add})"
    if budgets.size >= 2:
        logs = np.log(points) - np.log(points).mean(axis=0)
        sv = np.linalg.svd(logs, compute_uv=False)
        if sv[-1] <= COLLINEAR * sv[0]:
            return ("N and D vary together on every baseline (D about a fixed power of N, as with tokens_per_param "
                    f"or per-size budgets): their effects cannot be separated ({add})")
    if budgets.size < 3:
        return f"the baselines have {budgets.size} token budget(s), L(N, D) needs 3 distinct D ({add})"
    if points.shape[0] < 5:
        return f"the baselines have {points.shape[0]} distinct (N, D), L(N, D) has 5 parameters ({add})"
    return ""


@dataclass
class DataScalingFit:
    """L(N, D) = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022)."""
    irreducible: float  # E
    coefficient: float  # A
    exponent: float  # alpha
    data_coefficient: float  # B
    data_exponent: float  # beta
    n_points: int
    n_sizes: int
    n_budgets: int
    params_min: float
    params_max: float
    tokens_min: float
    tokens_max: float
    rmse: float
    stderr: Optional[dict] = None  # same keys as to_dict's parameters
    interval: Optional[dict] = None
    bootstrap: list = field(default_factory=list)  # (E, A, alpha, B, beta) of each bootstrap fit
    note: str = ""
    uncertainty: str = ""

    kind = "L(N, D)"
    fixed_irreducible = False
    tokens = None
    KEYS = ("irreducible", "coefficient", "exponent", "data_coefficient", "data_exponent")

    def parameters(self) -> tuple:
        return (self.irreducible, self.coefficient, self.exponent, self.data_coefficient, self.data_exponent)

    def loss(self, params, tokens) -> np.ndarray:
        E, A, alpha, B, beta = self.parameters()
        return (E + A * np.asarray(params, dtype=np.float64) ** (-alpha)
                + B * np.asarray(tokens, dtype=np.float64) ** (-beta))

    def applies_to(self, tokens: Optional[float]) -> str:
        return "" if tokens is not None else "its token budget is unknown"

    def floor(self, tokens: float, parameters: Optional[tuple] = None) -> float:
        """The loss no model reaches when trained on `tokens` (E + B D^-beta)."""
        E, _, _, B, beta = parameters or self.parameters()
        return E + B * float(tokens) ** (-beta)

    def params_for(self, loss: float, tokens: float, parameters: Optional[tuple] = None) -> float:
        E, A, alpha, B, beta = parameters or self.parameters()
        return params_for_loss(loss, E + B * float(tokens) ** (-beta), A, alpha)

    def in_range(self, params: float, tokens: float) -> bool:
        return (self.params_min * (1 - 1e-9) <= params <= self.params_max * (1 + 1e-9)
                and self.tokens_min * (1 - SAME_TOKENS) <= tokens <= self.tokens_max * (1 + SAME_TOKENS))

    def formula(self) -> str:
        return (f"{self.irreducible:.4g} + {self.coefficient:.4g} * N^-{self.exponent:.4g} "
                f"+ {self.data_coefficient:.4g} * D^-{self.data_exponent:.4g}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dict(zip(self.KEYS, self.parameters())), "n_points": self.n_points,
                "n_sizes": self.n_sizes, "n_budgets": self.n_budgets, "params_min": self.params_min,
                "params_max": self.params_max, "tokens_min": self.tokens_min, "tokens_max": self.tokens_max,
                "rmse": self.rmse, "stderr": self.stderr, "interval": self.interval,
                "bootstrap_samples": len(self.bootstrap), "uncertainty": self.uncertainty, "note": self.note}


def _solve_two_terms(x1: np.ndarray, x2: np.ndarray, L: np.ndarray):
    """(E, A', B', sse) per row of x1 = n^-alpha and x2 = d^-beta (each (G, n)); E >= 0, A' and B' > 0
    (sse = inf where no positive A', B' fit)."""
    X = np.stack([np.ones_like(x1), x1, x2], axis=2)  # (G, n, 3)

    def least_squares(X):  # normal equations, batched (the columns are O(1): n and d are normalised)
        XtX = np.einsum("gni,gnj->gij", X, X) + 1e-12 * np.eye(X.shape[2])
        with np.errstate(all="ignore"):
            return np.linalg.solve(XtX, np.einsum("gni,n->gi", X, L)[..., None])[..., 0]

    coef = least_squares(X)
    on_bound = coef[:, 0] < 0  # the constrained optimum lies on E = 0
    if on_bound.any():
        coef[on_bound, 0] = 0.0
        coef[on_bound, 1:] = least_squares(X[on_bound][:, :, 1:])
    resid = L[None, :] - np.einsum("gnk,gk->gn", X, coef)
    sse = np.where((coef[:, 1] > 0) & (coef[:, 2] > 0), (resid * resid).sum(axis=1), np.inf)
    return coef[:, 0], coef[:, 1], coef[:, 2], sse


def _fit_data_normalized(n: np.ndarray, d: np.ndarray, L: np.ndarray):
    """Best (E, A', alpha, B', beta, sse) on normalised n, d: the linear part solved exactly for each
    (alpha, beta) of a log grid over EXPONENT_RANGE, then the grid zoomed around the best pair."""
    log_n, log_d = np.log(n), np.log(d)
    lo, hi = np.log(EXPONENT_RANGE[0]), np.log(EXPONENT_RANGE[1])
    centre, span, points = np.array([(lo + hi) / 2, (lo + hi) / 2]), (hi - lo) / 2, 48
    best = None
    for _ in range(8):
        la = np.clip(np.linspace(centre[0] - span, centre[0] + span, points), lo, hi)
        lb = np.clip(np.linspace(centre[1] - span, centre[1] + span, points), lo, hi)
        A_, B_ = np.meshgrid(np.exp(la), np.exp(lb), indexing="ij")
        alphas, betas = A_.reshape(-1), B_.reshape(-1)
        E, A, B, sse = _solve_two_terms(np.exp(-alphas[:, None] * log_n[None, :]),
                                        np.exp(-betas[:, None] * log_d[None, :]), L)
        i = int(np.argmin(sse))
        if not np.isfinite(sse[i]):
            break
        if best is None or sse[i] <= best[5]:
            best = (float(E[i]), float(A[i]), float(alphas[i]), float(B[i]), float(betas[i]), float(sse[i]))
        centre = np.log([best[2], best[4]])
        span, points = span * 4 / points * 2, 21
    if best is None:
        raise FitError("the baseline losses do not fall with both model size and training tokens: there is "
                       "no L(N, D) to fit (check the baselines' learning rates and budgets)")
    return best


def _fit_data_raw(N, D, L):
    ref_n, ref_d = float(np.exp(np.mean(np.log(N)))), float(np.exp(np.mean(np.log(D))))
    E, An, alpha, Bn, beta, sse = _fit_data_normalized(N / ref_n, D / ref_d, L)
    return (E, An * ref_n**alpha, alpha, Bn * ref_d**beta, beta), sse, (ref_n, ref_d, An, Bn)


def fit_data_scaling_law(params, tokens, losses, bootstrap: int = 300, seed: int = 0,
                         loss_stderr=None) -> DataScalingFit:
    """Fit L(N, D) = E + A N^-alpha + B D^-beta to baselines of several sizes and token budgets."""
    N = np.asarray(params, dtype=np.float64).reshape(-1)
    D = np.asarray(tokens, dtype=np.float64).reshape(-1)
    L = np.asarray(losses, dtype=np.float64).reshape(-1)
    if not N.shape == D.shape == L.shape:
        raise FitError(f"{N.size} parameter counts, {D.size} token counts and {L.size} losses")
    keep = np.isfinite(N) & np.isfinite(D) & np.isfinite(L) & (N > 0) & (D > 0)
    se = _known_stderr(loss_stderr, keep, int(keep.sum()))
    N, D, L = N[keep], _budgets(D[keep]), L[keep]
    problem = data_design_problem(N, D)
    if problem:
        raise FitError(problem)
    (E, A, alpha, B, beta), sse, (ref_n, ref_d, An, Bn) = _fit_data_raw(N, D, L)
    fit = DataScalingFit(irreducible=E, coefficient=A, exponent=alpha, data_coefficient=B, data_exponent=beta,
                         n_points=int(N.size), n_sizes=int(np.unique(N).size), n_budgets=int(np.unique(D).size),
                         params_min=float(N.min()), params_max=float(N.max()), tokens_min=float(D.min()),
                         tokens_max=float(D.max()), rmse=math.sqrt(sse / N.size))
    notes = []
    if E == 0.0:
        notes.append("E is at its bound 0: the baselines do not show the loss flattening")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value <= EXPONENT_RANGE[0] * 1.01 or value >= EXPONENT_RANGE[1] * 0.99:
            notes.append(f"{name} is at the edge of its range {EXPONENT_RANGE}: the baselines do not "
                         "determine it")
    dof = N.size - 5
    if dof <= 0 and se is None:
        notes.append(f"{N.size} baseline points for 5 parameters and no standard errors of their losses: "
                     "the uncertainty of the fit is not determined (add runs or seeds)")
    fit.note = "; ".join(notes)
    n, d = N / ref_n, D / ref_d
    if dof > 0:
        fit.stderr = _data_jacobian_stderr(n, d, fit, An, Bn, sse / dof, ref_n, ref_d, None)
        fit.uncertainty = "Jacobian (residual scatter) and a bootstrap over baseline runs"
        if bootstrap:
            rng = np.random.default_rng(seed)
            fits = []
            for _ in range(bootstrap):
                idx = rng.integers(0, N.size, N.size)
                if data_design_problem(N[idx], D[idx]):
                    continue
                try:
                    p, s2, _ = _fit_data_raw(N[idx], D[idx], L[idx])
                except FitError:
                    continue
                fits.append(p)
            fit.bootstrap, fit.interval = fits, _percentile_intervals(fits, bootstrap, DataScalingFit.KEYS)
    elif se is not None:
        fit.stderr = _data_jacobian_stderr(n, d, fit, An, Bn, 1.0, ref_n, ref_d, 1.0 / se**2)
        fit.uncertainty = ("the baselines' evaluation standard errors alone (as many points as parameters; "
                           "seed-to-seed spread not included)")
        if bootstrap:
            fits, _ = _parametric_bootstrap(lambda y: _fit_data_raw(N, D, y)[0], L, se, bootstrap, seed)
            fit.bootstrap, fit.interval = fits, _percentile_intervals(fits, bootstrap, DataScalingFit.KEYS)
    return fit


def _data_jacobian_stderr(n, d, fit, An, Bn, s2, ref_n, ref_d, weights) -> Optional[dict]:
    alpha, beta = fit.exponent, fit.data_exponent
    xn, xd = n ** (-alpha), d ** (-beta)
    cols = [np.ones_like(xn), xn, -An * xn * np.log(n), xd, -Bn * xd * np.log(d)]
    free = [0, 1, 2, 3, 4] if fit.irreducible > 0 else [1, 2, 3, 4]  # E on its bound is not free
    J = np.stack([cols[i] for i in free], axis=1)
    W = np.ones_like(xn) if weights is None else weights
    try:
        sub = s2 * np.linalg.inv(J.T @ (J * W[:, None]))
    except np.linalg.LinAlgError:
        return None
    cov = np.zeros((5, 5))
    cov[np.ix_(free, free)] = sub
    # A = A' ref_n^alpha and B = B' ref_d^beta: the delta method for their errors
    grad_A = np.zeros(5)
    grad_A[1], grad_A[2] = ref_n**alpha, An * ref_n**alpha * math.log(ref_n)
    grad_B = np.zeros(5)
    grad_B[3], grad_B[4] = ref_d**beta, Bn * ref_d**beta * math.log(ref_d)
    var = [cov[0, 0], float(grad_A @ cov @ grad_A), cov[2, 2], float(grad_B @ cov @ grad_B), cov[4, 4]]
    if min(var) < 0:
        return None
    return {k: math.sqrt(v) for k, v in zip(DataScalingFit.KEYS, var)}


def fit_baselines(params, tokens, losses, loss_stderr=None, bootstrap: int = 300, seed: int = 0,
                  fixed_irreducible: Optional[float] = None):
    """The law that gives effective sizes at fixed data: L(N) when every baseline has the same D, else
    L(N, D) when the baselines determine it, else L(N) on the token budget with the most sizes (its note
    says that runs at other budgets get no effective size); FitError (one line: what is missing) when
    neither can be fitted."""
    N = np.asarray(params, dtype=np.float64).reshape(-1)
    D = np.asarray(tokens, dtype=np.float64).reshape(-1)
    L = np.asarray(losses, dtype=np.float64).reshape(-1)
    se = None if loss_stderr is None else np.asarray(
        [np.nan if v is None else v for v in loss_stderr], dtype=np.float64)
    groups = token_groups(D)
    if len(groups) == 1:
        return fit_scaling_law(N, L, fixed_irreducible, bootstrap, seed, se, tokens=float(D.mean()))
    problem = data_design_problem(N, D)
    if not problem and fixed_irreducible is None:
        return fit_data_scaling_law(N, D, L, bootstrap, seed, se)
    need = 2 if fixed_irreducible is not None else 3
    usable = [g for g in groups if np.unique(N[g]).size >= need]
    if fixed_irreducible is not None and not problem:
        problem = "--fixed-irreducible applies to L(N) only"
    if not usable:
        raise FitError(f"the baselines differ in training tokens D and no budget has baselines of {need} sizes "
                       f"for L(N); for L(N, D): {problem}")
    g = max(usable, key=lambda g: (np.unique(N[g]).size, len(g), D[g].mean()))
    fit = fit_scaling_law(N[g], L[g], fixed_irreducible, bootstrap, seed, None if se is None else se[g],
                          tokens=float(D[g].mean()))
    others = sum(len(x) for x in groups) - len(g)
    why = (f"the baselines differ in D; L(N, D) not fitted ({problem}); L(N) fitted to the {len(g)} baselines "
           f"of {D[g].mean():.4g} tokens, {others} baseline(s) at other budgets left out, and runs at other "
           "budgets get no effective size")
    fit.note = "; ".join(x for x in (why, fit.note) if x)
    return fit


# ---- effective size ----------------------------------------------------------------------------------
@dataclass
class EffectiveSize:
    params: float  # N_eff (inf when the loss is at or below the law's floor)
    status: str  # ok | extrapolated | below_irreducible
    interval: Optional[tuple] = None  # bootstrap 95% interval of N_eff
    log_stderr: Optional[float] = None  # standard error of ln N_eff (fit and the run's own loss)

    def fraction_of(self, params: float) -> float:
        return self.params / params


def params_for_loss(loss: float, irreducible: float, coefficient: float, exponent: float) -> float:
    """N with E_irr + A N^-alpha = loss; inf when loss <= E_irr."""
    gap = loss - irreducible
    if gap <= 0:
        return math.inf
    return math.exp(-(math.log(gap) - math.log(coefficient)) / exponent)


def effective_size(fit, loss: float, tokens: Optional[float] = None,
                   loss_stderr: Optional[float] = None) -> EffectiveSize:
    """N_eff of a run with this test loss trained on `tokens` (needed for an L(N, D) fit). Its error
    combines the fit's bootstrap spread with the run's own loss standard error (delta method), in ln N."""
    n_eff = fit.params_for(loss, tokens)
    if math.isinf(n_eff):
        status = "below_irreducible"
    elif not fit.in_range(n_eff, tokens):
        status = "extrapolated"
    else:
        status = "ok"
    interval, var_fit = None, None
    if fit.bootstrap and fit.interval is not None:
        values = np.array([fit.params_for(loss, tokens, b) for b in fit.bootstrap])
        lo, hi = np.percentile(values, [2.5, 97.5], method="nearest")  # inf entries sort last, as they should
        interval = (float(lo), float(hi))
        p16, p84 = np.percentile(np.log(values), [16, 84], method="nearest")
        if math.isfinite(p84 - p16):
            var_fit = ((p84 - p16) / 2) ** 2  # robust to a few bootstrap laws under which L is unreachable
    log_stderr = None
    if math.isfinite(n_eff):
        gap = loss - fit.floor(tokens)
        var_loss = (loss_stderr / (fit.exponent * gap)) ** 2 if loss_stderr is not None else None
        if var_fit is not None or var_loss is not None:
            log_stderr = math.sqrt((var_fit or 0.0) + (var_loss or 0.0))
    return EffectiveSize(params=n_eff, status=status, interval=interval, log_stderr=log_stderr)


# ---- poor-performance region -------------------------------------------------------------------------
@dataclass
class Band:
    """Where damage(E) >= max / 2 for one size and f: E from `left` to `right` (None: open on that side)."""
    peak: float  # E of the largest damage
    max_damage: float
    max_damage_stderr: Optional[float]
    left: Optional[float]
    right: Optional[float]
    left_log_stderr: Optional[float] = None  # standard error of ln(left edge)
    right_log_stderr: Optional[float] = None

    @property
    def significant(self) -> Optional[bool]:
        """Whether the largest damage is beyond 2 standard errors (None: its error is unknown)."""
        if self.max_damage_stderr is None:
            return None
        return self.max_damage > 2 * self.max_damage_stderr

    def to_dict(self) -> dict:
        return {**self.__dict__, "significant": self.significant}


def _band_edges(E: np.ndarray, damage: np.ndarray):
    """(i_peak, left, right) with the edges interpolated in log E; None where the damage stays >= half."""
    i = int(np.argmax(damage))
    half = damage[i] / 2
    logE = np.log(E)

    def crossing(j_in, j_out):  # damage[j_in] >= half > damage[j_out]
        t = (damage[j_in] - half) / (damage[j_in] - damage[j_out])
        return float(np.exp(logE[j_in] + t * (logE[j_out] - logE[j_in])))

    left = right = None
    for j in range(i, 0, -1):
        if damage[j - 1] < half:
            left = crossing(j, j - 1)
            break
    for j in range(i, E.size - 1):
        if damage[j + 1] < half:
            right = crossing(j, j + 1)
            break
    return i, left, right


def poor_performance_band(repeat_counts, damages, damage_stderr=None, draws: int = 400,
                          seed: int = 0) -> Optional[Band]:
    """The band of one size and f from its damage at each E (None when no E is damaging). Edge errors
    come from redrawing each damage from N(damage, stderr^2) (when the stderrs are known): the standard
    deviation of ln(edge) over the draws where that edge is closed (None when under half of them are)."""
    order = np.argsort(np.asarray(repeat_counts, dtype=np.float64))
    E = np.asarray(repeat_counts, dtype=np.float64)[order]
    dmg = np.asarray(damages, dtype=np.float64)[order]
    if E.size == 0 or not np.all(np.isfinite(dmg)) or dmg.max() <= 0:
        return None
    i, left, right = _band_edges(E, dmg)
    se = None
    if damage_stderr is not None:
        se = np.asarray([np.nan if v is None else v for v in damage_stderr], dtype=np.float64)[order]
        if not np.all(np.isfinite(se)):
            se = None
    band = Band(peak=float(E[i]), max_damage=float(dmg[i]), max_damage_stderr=None if se is None else float(se[i]),
                left=left, right=right)
    if se is not None:
        rng = np.random.default_rng(seed)
        lefts, rights = [], []
        for _ in range(draws):
            d = dmg + se * rng.standard_normal(dmg.size)
            if d.max() <= 0:
                continue
            _, lo, hi = _band_edges(E, d)
            lefts.append(lo)
            rights.append(hi)

        def spread(values, edge):
            closed = [math.log(v) for v in values if v is not None]
            if edge is None or len(closed) < draws / 2:
                return None
            return float(np.std(closed))

        band.left_log_stderr, band.right_log_stderr = spread(lefts, left), spread(rights, right)
    return band


@dataclass
class EdgeFit:
    """E_edge = k N^a fitted across sizes (ln E = ln k + a ln N)."""
    k: float
    a: float
    cov: Optional[np.ndarray]  # covariance of (ln k, a); None when not determined
    n_sizes: int
    weighted: bool  # weights from the edges' own standard errors
    note: str = ""

    @property
    def k_log_stderr(self) -> Optional[float]:
        return None if self.cov is None else math.sqrt(self.cov[0, 0])

    @property
    def a_stderr(self) -> Optional[float]:
        return None if self.cov is None else math.sqrt(self.cov[1, 1])

    def predict(self, params: float) -> tuple[float, Optional[float]]:
        """(E at N, standard error of ln E there)."""
        x = np.array([1.0, math.log(params)])
        value = math.exp(math.log(self.k) + self.a * x[1])
        return value, None if self.cov is None else math.sqrt(float(x @ self.cov @ x))

    def to_dict(self) -> dict:
        return {"k": self.k, "a": self.a, "k_log_stderr": self.k_log_stderr, "a_stderr": self.a_stderr,
                "n_sizes": self.n_sizes, "weighted": self.weighted, "note": self.note}


def fit_edges(params, edges, edge_log_stderr=None) -> EdgeFit:
    """Fit E = k N^a to one edge of the band at several sizes. Weighted by 1/se^2 when every edge has a
    standard error (scaled up by sqrt(chi2/dof) when the points scatter more than their errors say);
    else ordinary least squares, whose errors need at least 3 sizes."""
    N = np.asarray(params, dtype=np.float64)
    y = np.log(np.asarray(edges, dtype=np.float64))
    if np.unique(N).size < 2:
        raise FitError(f"an edge fit needs the edge at 2 or more sizes, got {np.unique(N).size}")
    X = np.column_stack([np.ones(N.size), np.log(N)])
    se = None
    if edge_log_stderr is not None and all(v is not None and v > 0 for v in edge_log_stderr):
        se = np.asarray(edge_log_stderr, dtype=np.float64)
    w = np.ones(N.size) if se is None else 1.0 / se**2
    XtWX = X.T @ (X * w[:, None])
    coef = np.linalg.solve(XtWX, X.T @ (w * y))
    resid = y - X @ coef
    dof = N.size - 2
    note, cov = "", None
    if se is not None:
        cov = np.linalg.inv(XtWX)
        if dof > 0:
            chi2 = float((w * resid**2).sum()) / dof
            if chi2 > 1:
                cov = cov * chi2
                note = f"edges scatter {math.sqrt(chi2):.2g}x more than their errors; errors scaled up to match"
    elif dof > 0:
        cov = np.linalg.inv(XtWX) * float((resid**2).sum()) / dof
    else:
        note = "2 sizes and no errors on the edges: the fit passes through both, its errors are not determined"
    return EdgeFit(k=float(math.exp(coef[0])), a=float(coef[1]), cov=cov, n_sizes=int(np.unique(N).size),
                   weighted=se is not None, note=note)
