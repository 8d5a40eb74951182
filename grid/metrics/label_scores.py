"""Skill under the argmax: metrics of the probability a model gives each label of an example.

An untuned model that answers one label for every row has an accuracy that only says which label
it defaults to; the probability it gives the gold label still moves when it learns or forgets.
Constrained "score" decoding (workers/constrained.py) scores every label, so the predictions
parquet keeps, per example, column `label_logprobs` (JSON text, null without label scores):

    {"<sub-task>": {"<label>": log-prob, ...}, ...}

the log-softmax over the sub-task's label set of the scores its answer is the argmax of
(workers.constrained says which). `keep_label_logprobs` is the storage rule: a label set of more
than MAX_FULL_LABELS labels keeps only its TOP_LABELS likeliest labels and the gold label (a
60-intent MASSIVE row keeps 10 or 11), so the parquet stays small.

Per example, with p = exp(log-probs) and g the gold label:
- gold_logprob = log p(g); the metric is its mean (higher is better; log 1/K for a uniform
  guess). An example whose gold is not one of the labels the model was asked about (a label
  the train split lacks) has no value and is left out of that mean.
- brier = sum over labels (p(l) - [l = g])^2, the multi-class Brier score (0 best, 2 worst).
  A truncated label set counts its left-out labels as one "other" bucket holding the missing
  mass 1 - sum(kept p), never the gold (which is kept): since the left-out labels' squares sum
  to at most the square of their sum, this is an upper bound of the full Brier score, exact
  when the left-out mass is 0 or sits on one label, and off by at most (left-out mass)^2. A
  gold outside the label set has p 0: it adds 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from grid.parsing import gold_value
from grid.tasks import TaskDef

COLUMN = "label_logprobs"
MAX_FULL_LABELS = 20  # label sets up to this size are kept whole
TOP_LABELS = 10  # larger ones keep their likeliest labels (and the gold)

LabelLogprobs = dict[str, dict[str, float]]  # sub-task -> label -> log-prob: one example's


def keep_label_logprobs(logprobs: dict[str, float], gold: str) -> dict[str, float]:
    """One sub-task's log-probs as stored: all of them, or for a label set larger than
    MAX_FULL_LABELS the TOP_LABELS likeliest (the first of equal ones) and the gold, in the
    label set's order."""
    if len(logprobs) <= MAX_FULL_LABELS:
        return dict(logprobs)
    keep = set(sorted(logprobs, key=logprobs.__getitem__, reverse=True)[:TOP_LABELS]) | {gold}
    return {label: value for label, value in logprobs.items() if label in keep}


def stored_label_logprobs(task: TaskDef, logprobs: LabelLogprobs | None, gold: dict) -> LabelLogprobs | None:
    """An answer's label log-probs (every label sub-task it scored) as the parquet keeps them;
    None when it has none."""
    if not logprobs:
        return None
    return {sub.name: keep_label_logprobs(logprobs[sub.name], str(gold_value(sub, gold)))
            for sub in task.subtasks if sub.name in logprobs}


def label_logprobs_column(table: pa.Table) -> list[LabelLogprobs | None] | None:
    """The label log-probs of a predictions table's rows; None for a file written before the
    column existed (it is scored without them)."""
    if COLUMN not in table.column_names:
        return None
    return [None if text is None else json.loads(text) for text in table[COLUMN].to_pylist()]


def label_score_terms(golds: Sequence[str], logprobs: Sequence[dict[str, float]]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per example: log p(gold) (NaN where the gold is not a scored label) and the Brier score,
    each (n,) float64 (module docstring)."""
    if len(golds) != len(logprobs):
        raise ValueError(f"{len(golds)} golds but {len(logprobs)} label log-prob rows")
    gold_lp = np.full(len(golds), np.nan)
    brier = np.empty(len(golds))
    for i, (gold, row) in enumerate(zip(golds, logprobs)):
        probs = {label: math.exp(value) for label, value in row.items()}
        other = max(0.0, 1.0 - sum(probs.values()))  # mass of the labels not kept
        brier[i] = sum((p - (label == gold)) ** 2 for label, p in probs.items()) + other ** 2
        if gold in row:
            gold_lp[i] = row[gold]
        else:
            brier[i] += 1.0
    return gold_lp, brier
