"""Intervals of a cell's metrics: proportions get the exact Clopper-Pearson interval (checked
against scipy's binomtest directly), F1 keeps its percentile bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from grid.metrics import score
from grid.metrics.bootstrap import bootstrap_ci, mean_ci
from grid.metrics.classification import class_indices, macro_f1_statistic
from grid.metrics.proportion import exact_ci, proportion_ci
from grid.parsing import Parsed
from grid.tasks import get_task


def scipy_exact(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return ci.low, ci.high


@pytest.mark.parametrize("k, n", [(0, 64), (64, 64), (1, 64), (32, 64), (17, 300), (2974, 2974), (0, 1)])
def test_exact_ci_is_scipys_clopper_pearson(k, n):
    assert exact_ci(k, n) == scipy_exact(k, n)
    assert proportion_ci([True] * k + [False] * (n - k)) == scipy_exact(k, n)


def test_zero_of_64_is_not_a_point():
    """The bootstrap prints [0, 0] for 0 right of 64; the exact interval reaches 5.6%, which is
    1 - 0.025^(1/64) in closed form."""
    low, high = exact_ci(0, 64)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 64), rel=1e-9)
    assert high == pytest.approx(0.0560, abs=5e-5)
    assert mean_ci(np.zeros(64), n_boot=200) == (0.0, 0.0)  # what it replaces
    assert all(np.isnan(exact_ci(0, 0)))


def _sentiment(golds: list[str], preds: list[str | None]):
    return ([{"sentiment": g} for g in golds],
            [{"sentiment": Parsed(p, p is not None, None if p is not None else "no label")} for p in preds])


def test_cell_accuracy_gets_the_exact_interval_and_f1_the_bootstrap():
    task = get_task("fpb-sentiment")
    rng = np.random.default_rng(1)
    labels = ["negative", "neutral", "positive"]
    golds = [labels[i] for i in rng.integers(0, 3, 64)]
    wrong = [labels[(labels.index(g) + 1) % 3] for g in golds]
    got = score(task, *_sentiment(golds, wrong), seed=3, n_boot=200)
    assert got["sentiment/accuracy"] == 0.0
    assert (got["sentiment/accuracy_ci_low"], got["sentiment/accuracy_ci_high"]) == scipy_exact(0, 64)

    preds = [g if i % 3 else None for i, g in enumerate(golds)]  # a third invalid, the rest right
    got = score(task, *_sentiment(golds, preds), seed=3, n_boot=200)
    k = sum(p is not None for p in preds)
    assert got["sentiment/accuracy"] == k / 64
    assert (got["sentiment/accuracy_ci_low"], got["sentiment/accuracy_ci_high"]) == scipy_exact(k, 64)
    gold_ids, pred_ids, classes = class_indices(golds, preds)
    boot = bootstrap_ci(lambda g, p: macro_f1_statistic(g, p, len(classes)), [gold_ids, pred_ids], n_boot=200, seed=3)
    assert (got["sentiment/macro_f1_ci_low"], got["sentiment/macro_f1_ci_high"]) == boot


def test_exact_match_gets_the_exact_interval():
    task = get_task("20ng-multi")
    names = [s.name for s in task.subtasks]
    golds = [dict.fromkeys(names, "a") for _ in range(50)]
    parsed = [{name: Parsed("a" if i < 30 or name == names[0] else "b", True, None) for name in names}
              for i in range(50)]
    got = score(task, golds, parsed, n_boot=100)
    assert got["exact_match"] == 0.6
    assert (got["exact_match_ci_low"], got["exact_match_ci_high"]) == scipy_exact(30, 50)
