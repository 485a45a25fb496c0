"""The standard error every measurement reports with its mean.

A measurement averages one value per unit: a window, a context or a passage of held-out text, or a
sequence of random tokens. Tokens within one unit are correlated, so the error is never taken over tokens.
Units cut from the same document are correlated too (one document is harder than another: on the demo's
test split, 866 windows from 63 documents, the error of the test loss taken over documents is 3 times the
one taken over windows as if they were independent), so units of text are grouped by the document they
come from and the error is taken over documents (the cluster-robust standard error); random-token units
are independent draws and are their own groups. Units are treated as a random sample of what they stand
for, with no finite-population correction even when a split is read whole: the error says how much the
number would move on other documents of the same kind.
"""
from __future__ import annotations

import math

import numpy as np


def mean_and_stderr(values, groups=None) -> tuple[float, float | None]:
    """(mean, standard error of the mean) of per-unit values.

    Without groups: the sample standard deviation (ddof=1) / sqrt(n). With groups (one label per value,
    e.g. its document): sqrt(G / (G - 1) * sum over groups of (sum of the group's deviations from the
    mean)^2) / n, which is the former when every value is its own group. None when it cannot be estimated
    (fewer than 2 values, or fewer than 2 groups)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = values.size
    if n == 0:
        raise ValueError("no values to average")
    mean = float(values.mean())
    if groups is None:
        return mean, (float(values.std(ddof=1) / math.sqrt(n)) if n >= 2 else None)
    groups = np.asarray(groups).reshape(-1)
    if groups.size != n:
        raise ValueError(f"{groups.size} group labels for {n} values")
    _, label = np.unique(groups, return_inverse=True)
    G = int(label.max()) + 1
    if G < 2:
        return mean, None
    sums = np.bincount(label, weights=values - mean, minlength=G)
    return mean, float(math.sqrt(G / (G - 1) * float((sums ** 2).sum())) / n)
