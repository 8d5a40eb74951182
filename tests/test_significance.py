"""Paired significance tests: exact McNemar against a reference, paired bootstrap properties,
and per-example outcomes read from prediction rows that agree with grid.metrics.score."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grid.metrics.score import score
from grid.parsing import Parsed
from grid.significance import (
    binom_two_sided_half,
    compare,
    mcnemar_exact,
    outcomes_from_rows,
    paired_bootstrap,
    subtask_valid,
)
from grid.tasks import get_task


@pytest.mark.parametrize("k,n,expected", [
    (0, 5, 0.0625),            # 2 * (1/2)^5
    (3, 20, 0.0025768280029296875),  # scipy.stats.binomtest(3, 20).pvalue
    (10, 20, 1.0),
    (40, 100, 0.05688793364098089),
    (0, 0, 1.0),
])
def test_exact_binomial_matches_reference(k, n, expected):
    assert binom_two_sided_half(k, n) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_counts_only_discordant_pairs():
    a = np.array([1, 1, 1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 0, 0, 0, 1, 1, 0], bool)
    r = mcnemar_exact(a, b)
    assert (r.n10, r.n01, r.n) == (3, 1, 8)
    assert r.p_value == pytest.approx(binom_two_sided_half(1, 4))  # 0.625
    assert r.diff == pytest.approx(a.mean() - b.mean())
    assert not r.significant
    same = mcnemar_exact(a, a)
    assert same.p_value == 1.0 and same.n10 == same.n01 == 0


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


def test_paired_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.85).astype(float)
    b = (rng.random(400) < 0.60).astype(float)
    mean = lambda c: c.mean(axis=-1)  # noqa: E731
    r1 = paired_bootstrap(mean, [a], [b], n_boot=500, seed=3)
    r2 = paired_bootstrap(mean, [a], [b], n_boot=500, seed=3)
    assert r1 == r2
    assert r1.significant and r1.ci_low > 0
    assert r1.ci_low <= r1.diff <= r1.ci_high
    same = paired_bootstrap(mean, [a], [a], n_boot=200, seed=0)
    assert same.diff == 0 and same.ci_low == same.ci_high == 0 and same.p_value == 1.0


def test_slot_f1_outcomes_and_bootstrap_match_the_scorer():
    task = get_task("massive-slots")
    gold_tags = [["Other", "date", "date"], ["place_name", "Other"], ["Other", "Other", "time"],
                 ["song_name", "song_name"]] * 10
    preds = [["Other", "date", "date"], ["Other", "Other"], ["Other", "Other", "time"], None] * 10
    golds = [{"slots": g} for g in gold_tags]
    parsed = [{"slots": Parsed(p, p is not None, None if p is not None else "no list")} for p in preds]
    expected = score(task, golds, parsed, n_boot=0)["slots/slot_f1"]
    rows = [{"example_id": str(i), "gold": json.dumps(g), "prediction": json.dumps({"slots": p}),
             "invalid_reason": None if p is not None else "slots: no list"} for i, (g, p) in enumerate(zip(golds, preds))]
    out = outcomes_from_rows(rows, "massive-slots", "slots")
    assert out.kind == "word_tags" and out.values.shape == (40, 3)
    perfect = outcomes_from_rows([{**r, "prediction": json.dumps({"slots": g["slots"]}), "invalid_reason": None}
                                  for r, g in zip(rows, golds)], "massive-slots", "slots")
    r = compare(out, perfect, n_boot=300, seed=0)
    assert r.test == "paired-bootstrap" and r.metric == "slot_f1"
    assert r.a == pytest.approx(expected) and r.b == pytest.approx(1.0)
    assert r.diff < 0 and r.significant


def test_label_outcomes_use_validity_and_align_on_example_id():
    task = get_task("massive-multi")
    rows = [
        {"example_id": "a", "gold": json.dumps({"intent": "x", "slots": ["Other"]}),
         "prediction": json.dumps({"intent": "x", "slots": ["Other"]}), "invalid_reason": None},
        {"example_id": "b", "gold": json.dumps({"intent": "y", "slots": ["Other"]}),
         "prediction": json.dumps({"intent": "y", "slots": None}), "invalid_reason": "slots: no list"},
        {"example_id": "c", "gold": json.dumps({"intent": "z", "slots": ["Other"]}),
         "prediction": json.dumps({"intent": "z", "slots": ["Other"]}), "invalid_reason": "intent: not a label"},
    ]
    out = outcomes_from_rows(rows, task.name, "intent")
    assert out.values.tolist() == [True, True, False]  # an invalid label never counts as right
    other = outcomes_from_rows(list(reversed(rows[:2])), task.name, "intent")
    r = compare(out, other)
    assert r.n == 2 and r.test == "mcnemar-exact" and r.p_value == 1.0
    assert subtask_valid("intent: x; slots: y", "slots") is False
    assert subtask_valid("intent: x", "slots") is True
