"""Exact (Clopper-Pearson) confidence intervals of proportions: accuracy, exact match.

A share of right answers is k successes in n trials, so its interval can come from the binomial
distribution itself: scipy's `binomtest(k, n).proportion_ci(method="exact")`. A percentile
bootstrap fails exactly where a reader looks hardest: 0 right of 64 resamples to 0 every time
and prints [0, 0], while the exact 95% interval is [0, 0.056]. Clopper-Pearson covers at least
the nominal share for every n and p (it is conservative), and needs no resampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest


def exact_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval (low, high) of successes / n; NaN when n is 0."""
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def proportion_ci(right: Sequence[bool] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of the share of True in a per-example bool array."""
    right = np.asarray(right, dtype=bool)
    return exact_ci(int(right.sum()), len(right), confidence)
