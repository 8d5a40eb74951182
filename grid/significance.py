"""Paired significance tests between two cells scored on the same examples.

Two tests, both paired on `example_id` (only examples present in both cells count):

- `mcnemar_exact(a, b)`: for accuracy (any per-example right/wrong metric). Only the discordant
  examples carry information: n10 (A right, B wrong) and n01 (A wrong, B right). Under the null
  (same accuracy), n10 ~ Binomial(n10 + n01, 1/2); the two-sided exact p-value is
  min(1, 2 * P[X <= min(n10, n01)]), computed with exact integer arithmetic (no normal
  approximation, no continuity correction).
- `paired_bootstrap(statistic, a_arrays, b_arrays)`: for slot F1, macro F1 and other metrics that
  are not a mean of per-example values. The same resample of examples (seeded, see
  grid.metrics.bootstrap.resample_blocks) is applied to both systems; the statistic is recomputed
  on each, giving n_boot differences d*_i = stat_A - stat_B. The 95% CI of the difference is the
  percentile interval of d*; the two-sided p-value tests "no difference" by shifting the
  bootstrap distribution to the null (Berg-Kirkpatrick et al. 2012 / Koehn 2004 style):
  p = (1 + #{ |d*_i - mean(d*)| >= |d| }) / (1 + n_boot), with d the observed difference.

`cell_outcomes(store, record, subtask)` reads one cell's predictions parquet and returns, per
example, what these tests need (right/wrong for label sub-tasks, entity counts for word-tag
sub-tasks), with the same correctness rules as grid.metrics.score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from grid.metrics.bootstrap import DEFAULT_N_BOOT, bootstrap_values, resample_blocks
from grid.metrics.slots import entity_counts, slot_f1_statistic
from grid.parsing import Parsed

ALPHA = 0.05


@dataclass(frozen=True)
class TestResult:
    """One paired comparison of A against B on `n` shared examples."""

    test: str  # "mcnemar-exact" or "paired-bootstrap"
    metric: str
    n: int
    a: float  # the metric of A on the shared examples
    b: float
    diff: float  # a - b
    p_value: float
    ci_low: float | None = None  # CI of the difference (bootstrap only)
    ci_high: float | None = None
    n10: int | None = None  # McNemar: A right, B wrong
    n01: int | None = None  # McNemar: A wrong, B right
    n_boot: int | None = None
    seed: int | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"significant": self.significant}


def binom_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials with p = 1/2: min(1, 2 P[X <= min(k, n-k)])."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mcnemar_exact(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray,
                  metric: str = "accuracy") -> TestResult:
    """Exact McNemar test on paired per-example correctness (module docstring)."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired arrays must be 1-d and of one length, got {a.shape} and {b.shape}")
    n10 = int(np.sum(a & ~b))
    n01 = int(np.sum(~a & b))
    acc_a = float(a.mean()) if a.size else float("nan")
    acc_b = float(b.mean()) if b.size else float("nan")
    return TestResult(test="mcnemar-exact", metric=metric, n=int(a.size), a=acc_a, b=acc_b,
                      diff=acc_a - acc_b, p_value=binom_two_sided_half(n10, n10 + n01), n10=n10, n01=n01)


def paired_bootstrap(statistic: Callable[..., np.ndarray], a_arrays: Sequence[np.ndarray],
                     b_arrays: Sequence[np.ndarray], metric: str = "metric",
                     n_boot: int = DEFAULT_N_BOOT, seed: int = 0, confidence: float = 0.95) -> TestResult:
    """Paired bootstrap of statistic(A) - statistic(B) (module docstring).

    `statistic` takes per-example arrays with examples on axis -2 or -1 as in
    grid.metrics.bootstrap (a block of resamples in front) and returns one value per resample;
    called on the full arrays with a leading axis of 1 for the observed values.
    """
    a_arrays = [np.asarray(x) for x in a_arrays]
    b_arrays = [np.asarray(x) for x in b_arrays]
    n = len(a_arrays[0])
    if any(len(x) != n for x in [*a_arrays, *b_arrays]):
        raise ValueError("paired arrays differ in length")
    observed_a = float(np.asarray(statistic(*(x[None, ...] for x in a_arrays))).reshape(-1)[0])
    observed_b = float(np.asarray(statistic(*(x[None, ...] for x in b_arrays))).reshape(-1)[0])
    diff = observed_a - observed_b
    k = len(a_arrays)

    def both(*arrays: np.ndarray) -> np.ndarray:
        return np.asarray(statistic(*arrays[:k])) - np.asarray(statistic(*arrays[k:]))

    # the same index block is applied to every array, so A and B are resampled alike (paired)
    deltas = bootstrap_values(both, [*a_arrays, *b_arrays], n_boot=n_boot, seed=seed) if n else np.empty(0)
    if deltas.size == 0:
        return TestResult(test="paired-bootstrap", metric=metric, n=n, a=observed_a, b=observed_b,
                          diff=diff, p_value=1.0, n_boot=0, seed=seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(deltas, [100 * alpha, 100 * (1 - alpha)])
    extreme = int(np.sum(np.abs(deltas - deltas.mean()) >= abs(diff) - 1e-12))
    p = (1 + extreme) / (1 + deltas.size)
    return TestResult(test="paired-bootstrap", metric=metric, n=n, a=observed_a, b=observed_b, diff=diff,
                      p_value=float(min(1.0, p)), ci_low=float(low), ci_high=float(high),
                      n_boot=int(deltas.size), seed=seed)


# --- reading cells --------------------------------------------------------------------------


@dataclass
class Outcomes:
    """Per example of one cell and one sub-task: what the tests need, keyed by example_id."""

    kind: str  # "label" (correct: bool) or "word_tags" (counts: tp, n_pred, n_gold)
    example_ids: list[str]
    values: np.ndarray  # (n,) bool, or (n, 3) int64

    def align(self, other: "Outcomes") -> tuple[np.ndarray, np.ndarray]:
        """Both cells' values on the examples they share, in a common order (row by row when both
        cells answered the same rows in the same order, as every cell of a grid does)."""
        if self.example_ids == other.example_ids:
            return self.values, other.values
        if len(set(other.example_ids)) < len(other.example_ids):
            raise ValueError("the cells' example ids repeat and their rows differ: they cannot be paired")
        pos = {e: i for i, e in enumerate(other.example_ids)}
        mine, theirs = [], []
        for i, e in enumerate(self.example_ids):
            j = pos.get(e)
            if j is not None:
                mine.append(i)
                theirs.append(j)
        return self.values[mine], other.values[theirs]


def subtask_valid(invalid_reason: str | None, name: str) -> bool:
    """Was sub-task `name` valid, from the parquet's `invalid_reason` ("name: why; other: why")."""
    if not invalid_reason:
        return True
    return not (invalid_reason.startswith(f"{name}: ") or f"; {name}: " in invalid_reason)


def outcomes_from_rows(rows: Sequence[dict[str, Any]], task_name: str, subtask: str) -> Outcomes:
    """Per-example outcomes of one sub-task from prediction rows (example_id, prediction, gold,
    invalid_reason), with grid.metrics.score's rules of what counts as right."""
    from grid.metrics.score import per_subtask_correct
    from grid.parsing import gold_value
    from grid.tasks import get_task

    task = get_task(task_name)
    sub = next((s for s in task.subtasks if s.name == subtask), None)
    if sub is None:
        raise ValueError(f"task {task_name} has no sub-task {subtask!r}")
    ids = [str(r["example_id"]) for r in rows]
    golds = [json.loads(r["gold"]) for r in rows]
    preds = [json.loads(r["prediction"]) if r.get("prediction") else {} for r in rows]
    if sub.type == "word_tags":
        gold_tags = [[str(t) for t in gold_value(sub, g)] for g in golds]
        pred_tags = [list(p.get(sub.name)) if isinstance(p.get(sub.name), list) else None for p in preds]
        return Outcomes("word_tags", ids, entity_counts(gold_tags, pred_tags))
    parsed = [{s.name: Parsed(p.get(s.name), subtask_valid(r.get("invalid_reason"), s.name), None)
               for s in task.subtasks} for p, r in zip(preds, rows)]
    correct = per_subtask_correct(task, golds, parsed)[sub.name]
    return Outcomes(sub.type, ids, np.asarray(correct, dtype=bool))


def compare(a: Outcomes, b: Outcomes, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> TestResult:
    """The right test for the sub-task's kind: McNemar for right/wrong, paired bootstrap for slot F1."""
    if a.kind != b.kind:
        raise ValueError(f"cannot compare a {a.kind} sub-task with a {b.kind} one")
    va, vb = a.align(b)
    if a.kind == "word_tags":
        return paired_bootstrap(slot_f1_statistic, [va], [vb], metric="slot_f1", n_boot=n_boot, seed=seed)
    return mcnemar_exact(va, vb, metric="accuracy")


__all__ = ["TestResult", "mcnemar_exact", "paired_bootstrap", "binom_two_sided_half", "Outcomes",
           "outcomes_from_rows", "compare", "subtask_valid", "resample_blocks"]
