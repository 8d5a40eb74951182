"""Task-level scoring: a task's metrics over parsed answers, with bootstrap CIs, as flat keys.

`score(task, golds, parsed)` applies each metric the task lists to the sub-tasks of the matching
type: accuracy and macro_f1 to `label` sub-tasks, slot_f1 to `word_tags`, rouge to `text`, and
exact_match (every sub-task right) to the whole task. Label sub-tasks also always get balanced
accuracy, and, given the examples' label log-probs (`label_logprobs`, grid.metrics.label_scores),
the gold label's mean log-prob and the Brier score: derived metrics, not listed by tasks, so no
task file (and no stored cell's `scored_with`) changes for them. Keys:

    n                                 examples scored
    invalid_rate                      share of examples with any invalid sub-task
    <sub>/invalid_rate                per sub-task
    <sub>/accuracy, <sub>/macro_f1    label sub-tasks
    <sub>/majority_rate               label sub-tasks: the accuracy of always answering the most
                                      frequent gold label of these rows (the floor to beat)
    <sub>/balanced_accuracy           label sub-tasks: mean recall over the gold labels
    <sub>/gold_logprob, <sub>/brier   label sub-tasks whose every example has label log-probs
    <sub>/slot_f1                     word_tags sub-tasks (MASSIVE's official slot F1)
    <sub>/rouge1, /rouge2, /rougeL    text sub-tasks
    exact_match                       when the task lists it
    <metric key>_ci_low, _ci_high     95% CI of each metric (not for rates): exact Clopper-Pearson
                                      for proportions (accuracy, exact_match; grid.metrics.proportion),
                                      percentile bootstrap for the rest

What counts as right: a label when the answer is valid and equals the gold; word tags when the
predicted tags, padded with "Other" or cut to the gold length (MASSIVE's exact match), equal the
gold tags (an answer with no usable list counts as all "Other"); text when valid and equal to the
stripped gold (any of its references). Golds are dicts keyed by sub-task name or by gold field (dataset rows work).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import get_args

import numpy as np

from grid.errors import GridError
from grid.metrics.bootstrap import DEFAULT_N_BOOT, bootstrap_ci
from grid.metrics.classification import (
    all_correct,
    balanced_accuracy_statistic,
    class_indices,
    label_correct,
    macro_f1_statistic,
    mean_statistic,
)
from grid.metrics.label_scores import LabelLogprobs, label_score_terms
from grid.metrics.proportion import proportion_ci
from grid.metrics.rouge import ROUGE_TYPES, references, rouge_per_example
from grid.metrics.slots import pad_or_cut, slot_f1_and_counts, slot_f1_statistic
from grid.parsing import Parsed, gold_value
from grid.tasks import Metric, Subtask, TaskDef, unscorable_metric

METRICS: tuple[str, ...] = get_args(Metric)


def _check(task: TaskDef, golds: Sequence[dict], parsed: Sequence[dict[str, Parsed]]) -> None:
    if len(golds) != len(parsed):
        raise GridError(f"task {task.name}: {len(golds)} gold rows but {len(parsed)} parsed answers")
    for i, row in enumerate(parsed):
        for sub in task.subtasks:
            if sub.name not in row:
                raise GridError(f"task {task.name}: parsed answer {i} has no sub-task {sub.name!r}")


def _gold_labels(sub: Subtask, golds: Sequence[dict]) -> list[str]:
    return [str(gold_value(sub, g)) for g in golds]


def _gold_tags(sub: Subtask, golds: Sequence[dict]) -> list[list[str]]:
    return [[str(t) for t in gold_value(sub, g)] for g in golds]  # type: ignore[union-attr]


def _pred_label(p: Parsed) -> str | None:
    return p.value if p.valid and isinstance(p.value, str) else None


def _pred_tags(p: Parsed) -> list[str] | None:
    return list(p.value) if isinstance(p.value, list) else None


def _subtask_correct(sub: Subtask, golds: Sequence[dict], parsed: Sequence[dict[str, Parsed]]
                     ) -> np.ndarray:
    answers = [row[sub.name] for row in parsed]
    if sub.type == "label":
        return label_correct(_gold_labels(sub, golds), [_pred_label(p) for p in answers])
    if sub.type == "word_tags":
        return np.fromiter(
            (pad_or_cut(_pred_tags(p), len(g)) == g
             for g, p in zip(_gold_tags(sub, golds), answers)),
            dtype=bool, count=len(answers))
    return np.fromiter(
        (p.valid and p.value in [r.strip() for r in references(gold_value(sub, g))]
         for g, p in zip(golds, answers)),
        dtype=bool, count=len(answers))


def per_subtask_correct(task: TaskDef, golds: Sequence[dict[str, object]],
                        parsed: Sequence[dict[str, Parsed]]) -> dict[str, list[bool]]:
    """Per sub-task name, per example: is the answer right (see the module docstring)."""
    _check(task, golds, parsed)
    return {sub.name: _subtask_correct(sub, golds, parsed).tolist() for sub in task.subtasks}


def per_example_correct(task: TaskDef, golds: Sequence[dict[str, object]],
                        parsed: Sequence[dict[str, Parsed]]) -> list[bool]:
    """Per example: every sub-task right (the exact-match rule)."""
    _check(task, golds, parsed)
    if not golds:
        return []
    return all_correct([_subtask_correct(s, golds, parsed) for s in task.subtasks]).tolist()


def _put(out: dict[str, float], key: str, value: float, ci: tuple[float, float] | None) -> None:
    out[key] = float(value)
    if ci is not None:
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = ci


def score(task: TaskDef, golds: list[dict[str, object]], parsed: list[dict[str, Parsed]],
          seed: int = 0, n_boot: int = DEFAULT_N_BOOT,
          label_logprobs: Sequence[LabelLogprobs | None] | None = None) -> dict[str, float]:
    """The task's metrics over parsed answers, flat keys (module docstring); n_boot=0: no CIs.

    `label_logprobs`: per example, its label log-probs by sub-task (None where it has none); a
    sub-task gets gold_logprob and brier only when every example has them (else they would be
    scored on other examples than its accuracy)."""
    _check(task, golds, parsed)
    if label_logprobs is not None and len(label_logprobs) != len(golds):
        raise GridError(f"task {task.name}: {len(golds)} gold rows but {len(label_logprobs)} label log-prob rows")
    n = len(golds)
    if n == 0:
        raise GridError(f"task {task.name}: no examples to score")
    # A task's metrics are checked when it loads (grid/tasks.py); a task built in code is checked here.
    unknown = [m for m in task.metrics if m not in METRICS]
    if unknown:
        raise GridError(f"task {task.name}: unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    if problem := unscorable_metric(task.metrics, task.subtasks):
        raise GridError(f"task {task.name}: metric {problem}")

    def ci(statistic, *arrays) -> tuple[float, float] | None:
        return bootstrap_ci(statistic, arrays, n_boot=n_boot, seed=seed) if n_boot > 0 else None

    def exact(right: np.ndarray) -> tuple[float, float] | None:
        return proportion_ci(right) if n_boot > 0 else None

    out: dict[str, float] = {"n": float(n)}
    invalid = {s.name: np.array([not row[s.name].valid for row in parsed]) for s in task.subtasks}
    out["invalid_rate"] = float(np.logical_or.reduce(list(invalid.values())).mean())

    correct: list[np.ndarray] = []
    for sub in task.subtasks:
        name = sub.name
        out[f"{name}/invalid_rate"] = float(invalid[name].mean())
        answers = [row[name] for row in parsed]
        right = _subtask_correct(sub, golds, parsed)
        correct.append(right)
        if sub.type == "label":
            gold_labels = _gold_labels(sub, golds)
            if "accuracy" in task.metrics:
                _put(out, f"{name}/accuracy", right.mean(), exact(right))
                out[f"{name}/majority_rate"] = Counter(gold_labels).most_common(1)[0][1] / n
            gold_ids, pred_ids, classes = class_indices(gold_labels, [_pred_label(p) for p in answers])
            k = len(classes)
            if "macro_f1" in task.metrics:
                _put(out, f"{name}/macro_f1", macro_f1_statistic(gold_ids, pred_ids, k),
                     ci(partial(macro_f1_statistic, k=k), gold_ids, pred_ids))
            _put(out, f"{name}/balanced_accuracy", balanced_accuracy_statistic(gold_ids, pred_ids, k),
                 ci(partial(balanced_accuracy_statistic, k=k), gold_ids, pred_ids))
            if label_logprobs is not None and all(row and name in row for row in label_logprobs):
                gold_lp, brier = label_score_terms(gold_labels, [row[name] for row in label_logprobs])
                asked = gold_lp[~np.isnan(gold_lp)]
                if len(asked):
                    _put(out, f"{name}/gold_logprob", asked.mean(), ci(mean_statistic, asked))
                _put(out, f"{name}/brier", brier.mean(), ci(mean_statistic, brier))
        elif sub.type == "word_tags":
            if "slot_f1" in task.metrics:
                f1, counts = slot_f1_and_counts(_gold_tags(sub, golds),
                                                [_pred_tags(p) for p in answers])
                _put(out, f"{name}/slot_f1", f1, ci(slot_f1_statistic, counts))
        elif "rouge" in task.metrics:
            per = rouge_per_example([gold_value(sub, g) for g in golds],
                                    [p.value if p.valid else None for p in answers])
            for rouge_type in ROUGE_TYPES:
                _put(out, f"{name}/{rouge_type}", per[rouge_type].mean(),
                     ci(mean_statistic, per[rouge_type]))

    if "exact_match" in task.metrics:
        rows = all_correct(correct)
        _put(out, "exact_match", rows.mean(), exact(rows))
    return out
