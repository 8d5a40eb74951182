"""Scores for the task catalog, one module per metric family.

- classification: accuracy, macro F1 over the gold label set, exact match (all sub-tasks right).
- slots: MASSIVE's official slot F1 (pad/cut with "Other", MASSIVE's BIO rule, seqeval F1).
- rouge: ROUGE-1/2/L F-measure (rouge-score, stemmer on), mean over examples.
- bootstrap: seeded percentile bootstrap CIs from per-example arrays, vectorized with numpy.
- score: the task-level entry point, `score(task, golds, parsed)` -> flat `{key: float}`.
"""

from grid.metrics.score import METRICS, per_example_correct, per_subtask_correct, score

__all__ = ["METRICS", "per_example_correct", "per_subtask_correct", "score"]
