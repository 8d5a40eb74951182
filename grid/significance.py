"""Paired significance tests between systems scored on the same examples, and their correction
for multiplicity. The test follows the metric:

- **Right/wrong per example** (`accuracy`, `exact_match`: BINARY_METRICS): the exact McNemar
  test. Only discordant examples carry information, n10 (A right, B wrong) and n01 (A wrong,
  B right); under "same accuracy" n10 ~ Binomial(n10 + n01, 1/2), and the two-sided p is
  scipy's exact `binomtest`. Pooled over strata (seeds, tasks), the discordant counts are summed
  within strata only: each stratum's pairs are exchangeable under the null, so the sum is again
  Binomial(d, 1/2).
- **Every other metric** (slot F1, macro-F1, balanced accuracy, ROUGE-1/2/L, any corpus-level
  metric): a paired permutation test, the metric recomputed on each permutation. Under "no
  difference" A's and B's answers to one example are exchangeable, so each permutation swaps
  them on a random half of the examples; p = (1 + #{|d*| >= |d|}) / (1 + B). Its floor is
  1/(1 + B): `TestResult.p_floor` says when p sits there, and the views print "< 1/B".
  A non-binary metric never goes through McNemar (`mcnemar_exact` refuses non-0/1 values).

Both give the difference A - B with a 95% percentile CI from a paired bootstrap (the same
resample of examples for A and B; each stratum resampled apart). With several strata the
difference is the mean over strata of each stratum's difference.

Both also give `mde`, the smallest |A - B| the design detects at alpha 0.05 (two-sided) with 80%
power, so that "no difference" can say how large a difference it rules out:
- McNemar (`mcnemar_mde`): exact, conditional on the discordant pairs, as the test is. With d
  discordant pairs among n, a true difference delta makes n10 ~ Binomial(d, (1 + delta n/d) / 2);
  the MDE is the smallest delta whose power (the binomial mass on the test's rejection region)
  reaches 80%, at the observed discordance rate d/n. None when A and B never disagree.
- The permutation test: the normal approximation (z_0.975 + z_0.80) x SE, SE the standard
  deviation of the paired bootstrap's differences (the same resamples as the CI).

Pairs are like with like: examples pair on `example_id`; seeds pair seed s with seed s
(`pair_by_seed`), never across seeds. Across seeds both tests are given: the pooled,
seed-stratified test above (the seeds fixed; it uses every example) and a one-sample t-test of
the per-seed differences (`seed_t_test`, seeds as the unit: does the difference hold for a new
seed?).

Multiplicity (`adjust`): Holm over the primary family, Benjamini-Hochberg within each other
family (statsmodels' `multipletests`); the views star and colour the adjusted p.

`outcomes_from_rows` reads one cell's prediction rows into the per-example values every metric's
test needs, with grid.metrics.score's rules of what counts as right.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from grid.metrics.bootstrap import DEFAULT_N_BOOT, resample_blocks
from grid.metrics.classification import macro_f1_statistic, mean_statistic
from grid.metrics.slots import entity_counts, slot_f1_statistic
from grid.parsing import Parsed

ALPHA = 0.05
POWER = 0.80  # the power at which `mde` is the smallest detectable difference
BINARY_METRICS = frozenset({"accuracy", "exact_match"})
FAMILY_METHOD = {"primary": "holm", "secondary": "fdr_bh", "exploratory": "fdr_bh"}
METHOD_NAME = {"holm": "Holm", "fdr_bh": "Benjamini-Hochberg"}
_BLOCK_ELEMENTS = 4_000_000  # swap-mask elements per block of permutations

Statistic = Callable[..., np.ndarray]
Stratum = tuple[Sequence[np.ndarray], Sequence[np.ndarray]]  # (A's per-example arrays, B's)


@dataclass(frozen=True)
class TestResult:
    """One paired comparison of A against B, on `n` shared examples in `strata` strata."""

    test: str  # "mcnemar-exact" or "paired-permutation"
    metric: str
    n: int
    a: float  # the metric of A on the shared examples (mean over strata)
    b: float
    diff: float  # a - b
    p_value: float
    ci_low: float | None = None  # paired bootstrap CI of the difference
    ci_high: float | None = None
    n10: int | None = None  # McNemar: A right, B wrong (summed over strata)
    n01: int | None = None  # McNemar: A wrong, B right
    n_resamples: int | None = None  # bootstrap resamples and permutations
    seed: int | None = None
    strata: int = 1
    p_floor: bool = False  # p is 1/(1 + B), the smallest a B-permutation test can give
    p_adjusted: float | None = None  # set by `adjust_results`
    adjustment: str | None = None  # "holm" or "fdr_bh"
    mde: float | None = None  # smallest |A - B| detected at alpha 0.05 with 80% power (module docstring)

    @property
    def significant(self) -> bool:
        return (self.p_value if self.p_adjusted is None else self.p_adjusted) < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"significant": self.significant}


# --- the tests -----------------------------------------------------------------------------------


def mcnemar_exact(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray,
                  metric: str = "accuracy") -> TestResult:
    """Exact McNemar test on paired per-example correctness (module docstring)."""
    return mcnemar_strata([(a_correct, b_correct)], metric, n_resamples=0)


def _binary(values: Sequence[bool] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"per-example right/wrong must be 1-d, got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError("McNemar's test takes right/wrong per example (0/1); this metric is not binary")
    return arr.astype(bool)


def mcnemar_strata(strata: Sequence[tuple[Sequence[bool] | np.ndarray, Sequence[bool] | np.ndarray]],
                   metric: str = "accuracy", n_resamples: int = DEFAULT_N_BOOT, seed: int = 0) -> TestResult:
    """Exact McNemar on the discordant pairs of every stratum summed (pairs never cross strata);
    the difference's CI from the stratified paired bootstrap (none when n_resamples is 0)."""
    from scipy.stats import binomtest

    pairs = [(_binary(a), _binary(b)) for a, b in strata]
    if any(a.shape != b.shape for a, b in pairs):
        raise ValueError("paired arrays must be of one length")
    n10 = sum(int(np.sum(a & ~b)) for a, b in pairs)
    n01 = sum(int(np.sum(~a & b)) for a, b in pairs)
    d = n10 + n01
    p = 1.0 if d == 0 else float(binomtest(n10, d, 0.5).pvalue)
    as_float = [([a.astype(float)], [b.astype(float)]) for a, b in pairs]
    a_val, b_val = _mean_over_strata(mean_statistic, as_float)
    low = high = None
    if n_resamples and all(len(a) for a, _ in pairs):
        low, high = bootstrap_diff_ci(mean_statistic, as_float, n_resamples, seed)
    n = sum(len(a) for a, _ in pairs)
    return TestResult(test="mcnemar-exact", metric=metric, n=n, a=a_val, b=b_val,
                      diff=a_val - b_val, p_value=min(1.0, p), ci_low=low, ci_high=high, n10=n10, n01=n01,
                      n_resamples=n_resamples or None, seed=seed if n_resamples else None, strata=len(pairs),
                      mde=mcnemar_mde(d, n))


def mcnemar_power(discordant: int, p10: float, alpha: float = ALPHA) -> float:
    """Power of the exact two-sided McNemar test on `discordant` pairs when each is (A right,
    B wrong) with probability p10: the Binomial(discordant, p10) mass where binomtest rejects."""
    from scipy.stats import binom

    k = np.arange(discordant + 1)
    # binomtest's two-sided p at p = 1/2 is min(1, 2 * the smaller tail): reject where that is <= alpha
    tail = np.minimum(binom.cdf(k, discordant, 0.5), binom.sf(k - 1, discordant, 0.5))
    reject = np.minimum(1.0, 2 * tail) <= alpha
    return float(binom.pmf(k[reject], discordant, p10).sum())


def mcnemar_mde(discordant: int, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest |accuracy difference| the exact McNemar test on `discordant` of `n` pairs detects
    with `power` (module docstring); None when no pair is discordant or no difference could be."""
    from scipy.optimize import brentq

    if discordant == 0 or n == 0 or mcnemar_power(discordant, 1.0, alpha) < power:
        return None
    # the rejection region is fixed, so the power rises continuously from its size (<= alpha) at 1/2
    p10 = brentq(lambda q: mcnemar_power(discordant, q, alpha) - power, 0.5, 1.0, xtol=1e-9)
    return float((2 * p10 - 1) * discordant / n)


def paired_permutation(statistic: Statistic, strata: Sequence[Stratum], metric: str = "metric",
                       n_resamples: int = DEFAULT_N_BOOT, seed: int = 0) -> TestResult:
    """Paired permutation test of statistic(A) - statistic(B), averaged over strata, with its
    stratified paired bootstrap CI (module docstring).

    `statistic` takes per-example arrays with the examples on axis -1 (or -2 for arrays with a
    trailing axis, as slot-F1 counts) and any leading resample axes, and returns one value per
    resample, as in grid.metrics.bootstrap.
    """
    strata = [([np.asarray(x) for x in a], [np.asarray(x) for x in b]) for a, b in strata]
    for a, b in strata:
        if len({len(x) for x in [*a, *b]}) > 1:
            raise ValueError("paired arrays differ in length")
    a_val, b_val = _mean_over_strata(statistic, strata)
    diff = a_val - b_val
    n = sum(len(a[0]) for a, _ in strata)
    if n_resamples <= 0 or any(len(a[0]) == 0 for a, _ in strata):
        return TestResult(test="paired-permutation", metric=metric, n=n, a=a_val, b=b_val, diff=diff, p_value=1.0,
                          strata=len(strata))
    diffs = bootstrap_diffs(statistic, strata, n_resamples, seed)
    low, high = percentile_ci(diffs)
    null = np.zeros(n_resamples)
    rng = np.random.default_rng([seed, 1])
    for a, b in strata:
        null += _permuted_deltas(statistic, a, b, n_resamples, rng)
    null /= len(strata)
    extreme = int(np.sum(np.abs(null) >= abs(diff) - 1e-12))
    return TestResult(test="paired-permutation", metric=metric, n=n, a=a_val, b=b_val, diff=diff,
                      p_value=min(1.0, (1 + extreme) / (1 + n_resamples)), ci_low=low, ci_high=high,
                      n_resamples=n_resamples, seed=seed, strata=len(strata), p_floor=extreme == 0,
                      mde=normal_mde(float(np.std(diffs, ddof=1))))


def normal_mde(se: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """(z_(1 - alpha/2) + z_power) x SE: the difference a two-sided level-alpha test of a normal
    estimate with standard error `se` detects with `power`."""
    from scipy.stats import norm

    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * se)


def _observed(statistic: Statistic, arrays: Sequence[np.ndarray]) -> float:
    return float(np.asarray(statistic(*(x[None, ...] for x in arrays))).reshape(-1)[0])


def _mean_over_strata(statistic: Statistic, strata: Sequence[Stratum]) -> tuple[float, float]:
    a = [_observed(statistic, [np.asarray(x) for x in sa]) for sa, _ in strata]
    b = [_observed(statistic, [np.asarray(x) for x in sb]) for _, sb in strata]
    return float(np.mean(a)), float(np.mean(b))


def bootstrap_diff_ci(statistic: Statistic, strata: Sequence[Stratum], n_resamples: int, seed: int,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over strata of statistic(A*) - statistic(B*) (`bootstrap_diffs`)."""
    return percentile_ci(bootstrap_diffs(statistic, strata, n_resamples, seed), confidence)


def percentile_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100 * tail, 100 * (1 - tail)])
    return float(low), float(high)


def bootstrap_diffs(statistic: Statistic, strata: Sequence[Stratum], n_resamples: int, seed: int) -> np.ndarray:
    """The mean over strata of statistic(A*) - statistic(B*) on each of `n_resamples` paired
    resamples, each stratum's examples resampled apart, the same draw for A and B
    (grid.metrics.bootstrap's draws)."""
    total = np.zeros(n_resamples)
    for s, (a, b) in enumerate(strata):
        arrays = [np.asarray(x) for x in [*a, *b]]
        k = len(a)
        parts = [np.asarray(statistic(*(x[idx] for x in arrays[:k])), dtype=np.float64).reshape(-1)
                 - np.asarray(statistic(*(x[idx] for x in arrays[k:])), dtype=np.float64).reshape(-1)
                 for idx in resample_blocks(len(arrays[0]), n_resamples, seed + s)]
        total += np.concatenate(parts)
    return total / len(strata)


def _blocks(n: int, total: int) -> Iterator[int]:
    block = max(1, min(total, _BLOCK_ELEMENTS // max(n, 1)))
    done = 0
    while done < total:
        yield min(block, total - done)
        done += block


def _permuted_deltas(statistic: Statistic, a: Sequence[np.ndarray], b: Sequence[np.ndarray], n_resamples: int,
                     rng: np.random.Generator) -> np.ndarray:
    """statistic(A') - statistic(B') for `n_resamples` random swaps of A's and B's answers."""
    n = len(a[0])
    out = []
    for size in _blocks(n, n_resamples):
        swap = rng.random((size, n)) < 0.5
        a_perm, b_perm = [], []
        for x, y in zip(a, b):
            mask = swap.reshape(swap.shape + (1,) * (x.ndim - 1))
            a_perm.append(np.where(mask, y[None, ...], x[None, ...]))
            b_perm.append(np.where(mask, x[None, ...], y[None, ...]))
        out.append(np.asarray(statistic(*a_perm), dtype=np.float64).reshape(-1)
                   - np.asarray(statistic(*b_perm), dtype=np.float64).reshape(-1))
    return np.concatenate(out)


def seed_t_test(per_seed_diffs: Sequence[float]) -> float | None:
    """Two-sided p of a one-sample t-test of the per-seed differences against 0 (scipy's
    `ttest_1samp`); None under two seeds. Equal differences have no spread and no t: p is 0 when
    they are all the same nonzero value, 1 when all are 0."""
    from scipy.stats import ttest_1samp

    diffs = np.asarray(per_seed_diffs, dtype=np.float64)
    if diffs.size < 2:
        return None
    if np.ptp(diffs) == 0:
        return 0.0 if diffs[0] != 0 else 1.0
    return float(ttest_1samp(diffs, 0.0).pvalue)


# --- multiplicity --------------------------------------------------------------------------------


def adjust(p_values: Sequence[float], method: str) -> list[float]:
    """Adjusted p-values of one family: statsmodels' `multipletests` ("holm" or "fdr_bh")."""
    from statsmodels.stats.multitest import multipletests

    if not p_values:
        return []
    return [float(p) for p in multipletests(list(p_values), alpha=ALPHA, method=method)[1]]


def adjust_results(results: Sequence[TestResult], family: str) -> list[TestResult]:
    """The family's results with p_adjusted set (Holm for "primary", Benjamini-Hochberg else)."""
    from dataclasses import replace

    method = FAMILY_METHOD[family]
    adjusted = adjust([r.p_value for r in results], method)
    return [replace(r, p_adjusted=p, adjustment=method) for r, p in zip(results, adjusted)]


# --- per-example values of one cell ------------------------------------------------------------


@dataclass
class Outcomes:
    """One cell's per-example values for one sub-task (or "*", the whole task for exact_match),
    keyed by example_id: what every metric's test of that sub-task needs."""

    kind: str  # the sub-task's type: "label", "word_tags", "text"; "task" for "*"
    example_ids: list[str]
    correct: np.ndarray | None = None  # (n,) bool: label sub-tasks, and "*"
    golds: list[str] = field(default_factory=list)  # label sub-tasks: gold and predicted labels
    preds: list[str | None] = field(default_factory=list)
    counts: np.ndarray | None = None  # (n, 3) int: word_tags (tp, predicted, gold entities)
    rouge: dict[str, np.ndarray] = field(default_factory=dict)  # text: per-example F by ROUGE type
    gold_logprob: np.ndarray | None = None  # label: (n,) log p(gold) of scored answers (NaN: not scored)

    def positions(self, other: Outcomes) -> tuple[list[int], list[int]]:
        """Row positions of the examples both cells answered, in a common order."""
        if self.example_ids == other.example_ids:
            return list(range(len(self.example_ids))), list(range(len(other.example_ids)))
        for cell in (self, other):
            if len(set(cell.example_ids)) < len(cell.example_ids):
                raise ValueError("the cells' example ids repeat and their rows differ: they cannot be paired")
        pos = {e: i for i, e in enumerate(other.example_ids)}
        pairs = [(i, pos[e]) for i, e in enumerate(self.example_ids) if e in pos]
        return [i for i, _ in pairs], [j for _, j in pairs]


METRICS_OF = {"label": ("accuracy", "macro_f1", "balanced_accuracy", "gold_logprob"), "word_tags": ("slot_f1",),
              "text": ("rouge1", "rouge2", "rougeL"), "task": ("exact_match",)}


def balanced_accuracy_statistic(gold_ids: np.ndarray, pred_ids: np.ndarray, k: int) -> np.ndarray:
    """Mean recall over the gold classes present, from class ids (..., n) -> (...); sklearn's
    `balanced_accuracy_score` on each row. Predicted id k: outside the gold set, or invalid."""
    gold_ids = np.asarray(gold_ids)
    hits = gold_ids == np.asarray(pred_ids)
    recalls, present = [], []
    for c in range(k):
        is_c = gold_ids == c
        n_c = is_c.sum(axis=-1)
        recalls.append(np.divide((hits & is_c).sum(axis=-1), n_c, out=np.zeros(n_c.shape), where=n_c > 0))
        present.append(n_c > 0)
    recall, seen = np.stack(recalls), np.stack(present)
    n_seen = seen.sum(axis=0)
    return np.divide((recall * seen).sum(axis=0), n_seen, out=np.zeros(n_seen.shape), where=n_seen > 0)


def metric_arrays(metric: str, a: Outcomes, b: Outcomes) -> tuple[Statistic, list[np.ndarray], list[np.ndarray]]:
    """The statistic of `metric` and both cells' per-example arrays on their shared examples,
    aligned (label ids drawn from one index for A and B)."""
    if a.kind != b.kind:
        raise ValueError(f"cannot compare a {a.kind} sub-task with a {b.kind} one")
    if metric not in METRICS_OF.get(a.kind, ()):
        raise ValueError(f"metric {metric!r} does not apply to a {a.kind} sub-task "
                         f"(it has {', '.join(METRICS_OF.get(a.kind, ()))})")
    ia, ib = a.positions(b)
    if metric in BINARY_METRICS:
        return mean_statistic, [a.correct[ia].astype(float)], [b.correct[ib].astype(float)]
    if metric == "slot_f1":
        return slot_f1_statistic, [a.counts[ia]], [b.counts[ib]]
    if a.kind == "text":
        return mean_statistic, [a.rouge[metric][ia]], [b.rouge[metric][ib]]
    if metric == "gold_logprob":  # a mean of per-example values, in nats: the permutation test
        values = []
        for cell, rows in ((a, ia), (b, ib)):
            lp = None if cell.gold_logprob is None else cell.gold_logprob[rows]
            if lp is None or np.isnan(lp).any():
                raise ValueError("gold_logprob needs every example's label log-probs (constrained score "
                                 "decoding with label_logprobs kept); a cell lacks them")
            values.append(lp)
        return mean_statistic, [values[0]], [values[1]]
    golds = [a.golds[i] for i in ia]
    if golds != [b.golds[j] for j in ib]:
        raise ValueError("the cells' gold labels differ on the same example ids: they were scored on different data")
    classes = sorted(set(golds))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    gold_ids = np.array([index[g] for g in golds], dtype=np.int64)

    def ids(preds: list[str | None], rows: list[int]) -> np.ndarray:
        return np.array([index.get(preds[i], k) if preds[i] is not None else k for i in rows], dtype=np.int64)

    base = macro_f1_statistic if metric == "macro_f1" else balanced_accuracy_statistic

    def statistic(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return base(gold, pred, k)

    return statistic, [gold_ids, ids(a.preds, ia)], [gold_ids, ids(b.preds, ib)]


def compare_strata(pairs: Sequence[tuple[Outcomes, Outcomes]], metric: str, n_resamples: int = DEFAULT_N_BOOT,
                   seed: int = 0) -> TestResult:
    """The metric's test (McNemar for right/wrong, else the paired permutation test) of A against
    B, pooled over strata: each (A, B) pair of outcomes is one stratum (a seed, a task)."""
    arrays = [metric_arrays(metric, a, b) for a, b in pairs]
    if metric in BINARY_METRICS:
        return mcnemar_strata([(x[0], y[0]) for _, x, y in arrays], metric, n_resamples, seed)
    # A label metric's statistic knows its stratum's label set: each stratum's arrays carry their
    # stratum's number in front, and the statistic dispatches on it.
    stats = [st for st, _, _ in arrays]

    def statistic(stratum: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        return stats[int(stratum.reshape(-1)[0])](*rest)

    strata = [([np.full(len(x[0]), s), *x], [np.full(len(y[0]), s), *y]) for s, (_, x, y) in enumerate(arrays)]
    return paired_permutation(statistic, strata, metric, n_resamples, seed)


def per_seed_differences(pairs: Sequence[tuple[Outcomes, Outcomes]], metric: str) -> tuple[list[float], float | None]:
    """Each stratum's (seed's) difference A - B in the metric, and the t-test of those differences
    (`seed_t_test`): the across-seeds view beside the pooled test."""
    diffs = [compare_strata([pair], metric, n_resamples=0).diff for pair in pairs]
    return diffs, seed_t_test(diffs)


def compare(a: Outcomes, b: Outcomes, metric: str, n_resamples: int = DEFAULT_N_BOOT, seed: int = 0) -> TestResult:
    """The metric's test of two cells on the examples they share."""
    return compare_strata([(a, b)], metric, n_resamples, seed)


def pair_by_seed(a_cells: dict[int, Any], b_cells: dict[int, Any]) -> list[tuple[int, Any, Any]]:
    """(seed, A's, B's) for every seed both sides have: seed s of A with seed s of B only."""
    return [(s, a_cells[s], b_cells[s]) for s in sorted(set(a_cells) & set(b_cells))]


# --- reading cells -----------------------------------------------------------------------------


def subtask_valid(invalid_reason: str | None, name: str) -> bool:
    """Was sub-task `name` valid, from the parquet's `invalid_reason` ("name: why; other: why")."""
    if not invalid_reason:
        return True
    return not (invalid_reason.startswith(f"{name}: ") or f"; {name}: " in invalid_reason)


def outcomes_from_rows(rows: Sequence[dict[str, Any]], task_name: str, subtask: str) -> Outcomes:
    """Per-example values of one sub-task (or "*": every sub-task right) from prediction rows
    (example_id, prediction, gold, invalid_reason, and label_logprobs where kept), with
    grid.metrics.score's rules."""
    from grid.metrics.label_scores import label_score_terms
    from grid.metrics.rouge import rouge_per_example
    from grid.metrics.score import per_subtask_correct
    from grid.parsing import gold_value
    from grid.tasks import get_task

    task = get_task(task_name)
    sub = next((s for s in task.subtasks if s.name == subtask), None)
    if sub is None and subtask != "*":
        raise ValueError(f"task {task_name} has no sub-task {subtask!r}")
    ids = [str(r["example_id"]) for r in rows]
    golds = [json.loads(r["gold"]) for r in rows]
    preds = [json.loads(r["prediction"]) if r.get("prediction") else {} for r in rows]
    preds = [p if isinstance(p, dict) else {} for p in preds]
    if sub is not None and sub.type == "word_tags":
        gold_tags = [[str(t) for t in gold_value(sub, g)] for g in golds]
        pred_tags = [list(p.get(sub.name)) if isinstance(p.get(sub.name), list) else None for p in preds]
        return Outcomes("word_tags", ids, counts=entity_counts(gold_tags, pred_tags))
    if sub is not None and sub.type == "text":
        texts = [p.get(sub.name) if subtask_valid(r.get("invalid_reason"), sub.name) else None
                 for p, r in zip(preds, rows)]
        answers = [t if isinstance(t, str) else None for t in texts]
        return Outcomes("text", ids, rouge=rouge_per_example([gold_value(sub, g) for g in golds], answers))
    parsed = [{s.name: Parsed(p.get(s.name), subtask_valid(r.get("invalid_reason"), s.name), None)
               for s in task.subtasks} for p, r in zip(preds, rows)]
    correct = per_subtask_correct(task, golds, parsed)
    if sub is None:
        return Outcomes("task", ids, correct=np.logical_and.reduce([np.asarray(c, bool) for c in correct.values()]))
    answers = [p[sub.name].value if p[sub.name].valid and isinstance(p[sub.name].value, str) else None
               for p in parsed]
    gold_labels = [str(gold_value(sub, g)) for g in golds]
    kept = [json.loads(r["label_logprobs"]).get(sub.name) if r.get("label_logprobs") else None for r in rows]
    gold_lp = None
    if kept and all(k is not None for k in kept):
        gold_lp = label_score_terms(gold_labels, kept)[0]
    return Outcomes("label", ids, correct=np.asarray(correct[sub.name], dtype=bool), golds=gold_labels,
                    preds=answers, gold_logprob=gold_lp)
