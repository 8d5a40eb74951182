"""Paired significance tests (grid.significance) against independent libraries and numbers
computed by hand: exact McNemar vs statsmodels, the paired permutation test and bootstrap vs
scipy's, Holm and Benjamini-Hochberg vs hand-computed adjusted p, the test chosen by the metric,
pooling within seeds only, and per-example outcomes that agree with grid.metrics.score."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from grid.metrics.classification import mean_statistic
from grid.metrics.rouge import rouge_per_example
from grid.metrics.score import score
from grid.parsing import Parsed
from grid.significance import (
    Outcomes,
    adjust,
    balanced_accuracy_statistic,
    compare,
    compare_strata,
    mcnemar_exact,
    mcnemar_mde,
    mcnemar_power,
    mcnemar_strata,
    outcomes_from_rows,
    pair_by_seed,
    paired_permutation,
    seed_t_test,
    subtask_valid,
)
from grid.tasks import get_task


def _table(a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    return [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]


@pytest.mark.parametrize("n,p_a,p_b,seed",
                         [(8, 0.5, 0.5, 0), (64, 0.9, 0.6, 1), (300, 0.7, 0.68, 2), (20, 1.0, 1.0, 3)])
def test_mcnemar_matches_statsmodels_exact(n, p_a, p_b, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) < p_a, rng.random(n) < p_b
    r = mcnemar_exact(a, b)
    assert (r.n10, r.n01) == (int(np.sum(a & ~b)), int(np.sum(~a & b)))
    assert r.p_value == pytest.approx(sm_mcnemar(_table(a, b), exact=True).pvalue, rel=1e-12)
    assert r.diff == pytest.approx(a.mean() - b.mean())


def test_mcnemar_refuses_a_metric_that_is_not_right_or_wrong():
    """A ROUGE or F1 value per example is not a right/wrong outcome: McNemar must not take it."""
    with pytest.raises(ValueError, match="not binary"):
        mcnemar_exact(np.array([0.3, 0.5, 1.0]), np.array([0.2, 0.5, 0.0]))
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


def test_the_test_follows_the_metric():
    ids = [str(i) for i in range(60)]
    rng = np.random.default_rng(0)
    text_a = Outcomes("text", ids, rouge={t: rng.random(60) for t in ("rouge1", "rouge2", "rougeL")})
    text_b = Outcomes("text", ids, rouge={t: rng.random(60) for t in ("rouge1", "rouge2", "rougeL")})
    for metric in ("rouge1", "rouge2", "rougeL"):
        assert compare(text_a, text_b, metric, n_resamples=50).test == "paired-permutation"
    with pytest.raises(ValueError, match="does not apply to a text sub-task"):
        compare(text_a, text_b, "accuracy")  # seed003's fault: McNemar on a summary's "accuracy"
    golds = ["x", "y", "z"] * 20
    label_a = Outcomes("label", ids, correct=rng.random(60) < 0.5, golds=golds, preds=list(rng.choice(["x", "y"], 60)))
    label_b = Outcomes("label", ids, correct=rng.random(60) < 0.5, golds=golds, preds=list(rng.choice(["x", "z"], 60)))
    assert compare(label_a, label_b, "accuracy").test == "mcnemar-exact"
    assert compare(label_a, label_b, "macro_f1", n_resamples=50).test == "paired-permutation"
    assert compare(label_a, label_b, "balanced_accuracy", n_resamples=50).test == "paired-permutation"
    tags = Outcomes("word_tags", ids, counts=rng.integers(0, 3, size=(60, 3)))
    assert compare(tags, tags, "slot_f1", n_resamples=50).test == "paired-permutation"


def test_paired_permutation_p_matches_scipy():
    """scipy's permutation_test with permutation_type="samples" swaps A and B within each pair:
    the same null. Both are Monte Carlo with 4000 permutations: agreement to a few hundredths."""
    rng = np.random.default_rng(5)
    a = rng.random(80)
    b = a - 0.04 + rng.normal(0, 0.15, 80)
    ours = paired_permutation(mean_statistic, [([a], [b])], "rougeL", n_resamples=4000, seed=1)
    theirs = stats.permutation_test((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
                                    permutation_type="samples", n_resamples=4000, rng=2)
    assert ours.diff == pytest.approx(a.mean() - b.mean())
    assert ours.p_value == pytest.approx(theirs.pvalue, abs=0.03)


@pytest.mark.parametrize("discordant,n", [(12, 200), (53, 200), (150, 600)])
def test_mcnemar_mde_is_where_scipys_exact_test_reaches_80_percent_power(discordant, n):
    """At the MDE, n10 ~ Binomial(d, (1 + MDE n / d) / 2): simulated, scipy's binomtest rejects
    in 80% of draws; its rejection region is the one `mcnemar_power` sums over."""
    mde = mcnemar_mde(discordant, n)
    p10 = (1 + mde * n / discordant) / 2
    rng = np.random.default_rng(0)
    draws = rng.binomial(discordant, p10, 4000)
    rejects = np.array([stats.binomtest(int(k), discordant, 0.5).pvalue <= 0.05 for k in range(discordant + 1)])
    assert rejects[draws].mean() == pytest.approx(0.80, abs=0.02)
    assert mcnemar_power(discordant, p10) == pytest.approx(0.80, abs=1e-6)
    # Connor's (1987) normal approximation for the paired-proportions design agrees to within 15%
    psi = discordant / n
    assert mde == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * np.sqrt(psi / n), rel=0.15)


def test_no_mde_without_discordant_pairs_and_the_permutation_mde_is_280_standard_errors():
    same = np.ones(50, dtype=bool)
    assert mcnemar_exact(same, same).mde is None
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.2, 400)
    b = a + rng.normal(0, 0.1, 400)
    result = paired_permutation(mean_statistic, [([a], [b])], "rougeL", n_resamples=4000, seed=0)
    assert result.mde == pytest.approx(2.8016 * np.std(a - b, ddof=1) / np.sqrt(400), rel=0.05)


def test_paired_bootstrap_ci_of_rouge_l_matches_scipy():
    """The CI of ROUGE-L(A) - ROUGE-L(B) from real ROUGE-L scores, against scipy.stats.bootstrap
    (paired, percentile): both resample examples with replacement, A and B alike."""
    golds = [f"the person {i} wants a ticket to the town of {i % 7} on monday" for i in range(120)]
    a_preds = [g if i % 3 else " ".join(g.split()[:4]) for i, g in enumerate(golds)]
    b_preds = [" ".join(g.split()[:6]) for g in golds]
    a = rouge_per_example(golds, a_preds)["rougeL"]
    b = rouge_per_example(golds, b_preds)["rougeL"]
    ids = [str(i) for i in range(120)]
    ours = compare(Outcomes("text", ids, rouge={"rougeL": a}), Outcomes("text", ids, rouge={"rougeL": b}), "rougeL",
                   n_resamples=4000, seed=0)
    theirs = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), paired=True,
                             method="percentile", n_resamples=4000, rng=3).confidence_interval
    assert ours.ci_low == pytest.approx(theirs.low, abs=0.01)
    assert ours.ci_high == pytest.approx(theirs.high, abs=0.01)
    assert ours.p_floor and ours.p_value == pytest.approx(1 / 4001)  # no permutation was as extreme


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone: 0.02, 0.03, 0.06, 0.06
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted p * m / rank = 0.02, 0.02, 0.04, 0.04, made monotone from the top
    assert adjust(p, "fdr_bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust([], "holm") == []


def test_seeds_pair_like_with_like():
    assert pair_by_seed({0: "a0", 1: "a1", 2: "a2"}, {1: "b1", 2: "b2", 3: "b3"}) == [(1, "a1", "b1"), (2, "a2", "b2")]


def test_mcnemar_pooled_over_seeds_sums_discordant_pairs_within_seeds():
    rng = np.random.default_rng(3)
    strata = [(rng.random(50) < 0.8, rng.random(50) < 0.6) for _ in range(3)]
    r = mcnemar_strata(strata, n_resamples=200)
    n10 = sum(int(np.sum(a & ~b)) for a, b in strata)
    n01 = sum(int(np.sum(~a & b)) for a, b in strata)
    assert (r.n10, r.n01, r.strata, r.n) == (n10, n01, 3, 150)
    assert r.p_value == pytest.approx(stats.binomtest(n10, n10 + n01).pvalue)
    assert r.diff == pytest.approx(np.mean([a.mean() - b.mean() for a, b in strata]))
    assert r.ci_low < r.diff < r.ci_high


def test_seed_t_test_is_scipys():
    diffs = [0.05, 0.02, 0.08]
    assert seed_t_test(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert seed_t_test([0.1]) is None
    assert seed_t_test([0.0, 0.0]) == 1.0


def test_balanced_accuracy_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, gold, rng.integers(0, 5, 200))  # 4: outside the gold set
    with pytest.warns(UserWarning):  # sklearn: "y_pred contains classes not in y_true"; it drops them, as we do
        expected = balanced_accuracy_score(gold, pred)
    assert float(balanced_accuracy_statistic(gold[None], pred[None], 4)[0]) == pytest.approx(expected)


def test_slot_f1_outcomes_and_test_match_the_scorer():
    task = get_task("massive-slots")
    gold_tags = [["Other", "date", "date"], ["place_name", "Other"], ["Other", "Other", "time"],
                 ["song_name", "song_name"]] * 10
    preds = [["Other", "date", "date"], ["Other", "Other"], ["Other", "Other", "time"], None] * 10
    golds = [{"slots": g} for g in gold_tags]
    parsed = [{"slots": Parsed(p, p is not None, None if p is not None else "no list")} for p in preds]
    expected = score(task, golds, parsed, n_boot=0)["slots/slot_f1"]
    rows = [{"example_id": str(i), "gold": json.dumps(g), "prediction": json.dumps({"slots": p}),
             "invalid_reason": None if p is not None else "slots: no list"}
            for i, (g, p) in enumerate(zip(golds, preds))]
    out = outcomes_from_rows(rows, "massive-slots", "slots")
    assert out.kind == "word_tags" and out.counts.shape == (40, 3)
    perfect = outcomes_from_rows([{**r, "prediction": json.dumps({"slots": g["slots"]}), "invalid_reason": None}
                                  for r, g in zip(rows, golds)], "massive-slots", "slots")
    r = compare(out, perfect, "slot_f1", n_resamples=300, seed=0)
    assert r.test == "paired-permutation" and r.metric == "slot_f1"
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
    assert out.correct.tolist() == [True, True, False]  # an invalid label never counts as right
    assert out.preds == ["x", "y", None]
    whole = outcomes_from_rows(rows, task.name, "*")
    # exact match, every sub-task right by the scorer's rules (a missing tag list is all "Other")
    assert whole.correct.tolist() == [True, True, False]
    other = outcomes_from_rows(list(reversed(rows[:2])), task.name, "intent")
    r = compare(out, other, "accuracy")
    assert r.n == 2 and r.test == "mcnemar-exact" and r.p_value == 1.0
    assert compare_strata([(whole, whole)], "exact_match").test == "mcnemar-exact"
    assert subtask_valid("intent: x; slots: y", "slots") is False
    assert subtask_valid("intent: x", "slots") is True


def test_gold_logprob_is_tested_on_the_kept_label_logprobs_with_the_permutation_test():
    """The gold label's log-prob moves when a model answers the same default label with more or
    less confidence in the truth: the merge study's forgetting measure beside accuracy."""
    rng = np.random.default_rng(0)
    golds = rng.choice(["positive", "negative"], size=60).tolist()

    def rows(gold_p: np.ndarray) -> list[dict]:  # every row answers "positive"; p(gold) varies
        out = []
        for i, (g, p) in enumerate(zip(golds, gold_p)):
            lp = {g: float(np.log(p)), ("negative" if g == "positive" else "positive"): float(np.log1p(-p))}
            out.append({"example_id": str(i), "gold": json.dumps({"sentiment": g}),
                        "prediction": json.dumps({"sentiment": "positive"}), "invalid_reason": None,
                        "label_logprobs": json.dumps({"sentiment": lp})})
        return out

    sure, unsure = rng.uniform(0.6, 0.9, 60), rng.uniform(0.2, 0.5, 60)
    a = outcomes_from_rows(rows(sure), "sst2", "sentiment")
    b = outcomes_from_rows(rows(unsure), "sst2", "sentiment")
    assert np.allclose(a.gold_logprob, np.log(sure))
    assert compare(a, b, "accuracy").diff == 0  # the same answers: accuracy cannot see it
    r = compare(a, b, "gold_logprob", n_resamples=500)
    assert r.test == "paired-permutation" and r.diff == pytest.approx(np.mean(np.log(sure) - np.log(unsure)))
    assert r.significant and r.ci_low < r.diff < r.ci_high
    without = outcomes_from_rows([{k: v for k, v in row.items() if k != "label_logprobs"} for row in rows(sure)],
                                 "sst2", "sentiment")
    with pytest.raises(ValueError, match="label log-probs"):
        compare(without, b, "gold_logprob")


def test_text_outcomes_score_rouge_like_the_scorer():
    task = get_task("dialogsum")
    sub = task.subtasks[0].name
    golds = ["#Person1# asks about the train.", "They agree to meet at noon."]
    answers = ["Person1 asks about a train.", None]
    rows = [{"example_id": str(i), "gold": json.dumps({sub: g}), "prediction": json.dumps({sub: a}) if a else None,
             "invalid_reason": None if a else f"{sub}: empty"} for i, (g, a) in enumerate(zip(golds, answers))]
    parsed = [{sub: Parsed(a, a is not None, None)} for a in answers]
    expected = score(task, [{sub: g} for g in golds], parsed, n_boot=0)
    out = outcomes_from_rows(rows, task.name, sub)
    for t in ("rouge1", "rouge2", "rougeL"):
        assert out.rouge[t].mean() == pytest.approx(expected[f"{sub}/{t}"])
