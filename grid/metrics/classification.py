"""Label metrics: accuracy, macro F1 and balanced accuracy over the gold label set, exact match.

A prediction is a label or None (an invalid answer); None is simply wrong. Macro F1 averages the
per-class F1 over the labels that occur in the gold answers (sklearn's
`f1_score(gold, pred, labels=sorted(set(gold)), average="macro", zero_division=0)`); a predicted
label outside that set, or None, is a miss for its gold class and counts for no class of its own.
Balanced accuracy is the mean recall over the same gold classes (sklearn's
`balanced_accuracy_score(gold, pred)`, None read as a label no gold has): a model that answers
one label everywhere gets 1/K whatever that label's share of the gold, where its accuracy is
that share. In a bootstrap resample the averages are over the labels that occur in that
resample's gold. The `*_statistic` functions take resampled per-example arrays for bootstrap CIs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_correct(golds: Sequence[str], preds: Sequence[str | None]) -> np.ndarray:
    """Per example: the prediction equals the gold label (None is wrong). bool array (n,)."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    return np.fromiter((p is not None and p == g for g, p in zip(golds, preds)),
                       dtype=bool, count=len(golds))


def accuracy(golds: Sequence[str], preds: Sequence[str | None]) -> float:
    """Share of examples whose prediction equals the gold label; None counts as wrong."""
    correct = label_correct(golds, preds)
    return float(correct.mean()) if len(correct) else float("nan")


def class_indices(golds: Sequence[str], preds: Sequence[str | None]
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Gold and predicted class ids over the sorted gold label set; a prediction outside it -> K.

    Returns (gold ids (n,), predicted ids (n,), the K gold labels).
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    classes = sorted(set(golds))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    gold_ids = np.fromiter((index[g] for g in golds), dtype=np.int64, count=len(golds))
    pred_ids = np.fromiter((index.get(p, k) if p is not None else k for p in preds),
                           dtype=np.int64, count=len(preds))
    return gold_ids, pred_ids, classes


def _class_counts(gold_ids: np.ndarray, pred_ids: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """Per row of class ids (..., n): true positives, gold counts and predicted counts of the
    classes 0..k-1, each (rows, k), and the leading shape. Predicted id k (outside the gold label
    set, or invalid) counts for no class."""
    gold_ids = np.asarray(gold_ids)
    pred_ids = np.asarray(pred_ids)
    batch = gold_ids.shape[:-1]
    rows = int(np.prod(batch)) if batch else 1
    g = gold_ids.reshape(rows, -1)
    p = pred_ids.reshape(rows, -1)
    width = k + 1  # class k: predictions outside the gold label set
    offsets = (np.arange(rows, dtype=np.int64) * width)[:, None]
    gold_count = np.bincount((g + offsets).ravel(), minlength=rows * width).reshape(rows, width)
    pred_count = np.bincount((p + offsets).ravel(), minlength=rows * width).reshape(rows, width)
    hit = np.where(g == p, g, k)  # correct predictions, by class (misses go to the spare class)
    tp = np.bincount((hit + offsets).ravel(), minlength=rows * width).reshape(rows, width)
    return tp[:, :k], gold_count[:, :k], pred_count[:, :k], batch


def _mean_over_present(per_class: np.ndarray, gold_count: np.ndarray, batch: tuple) -> np.ndarray:
    """Each row's mean of a per-class value over the classes its gold has (a resample may miss a
    rare class, which then does not count as 0)."""
    present = gold_count > 0
    n_present = present.sum(axis=1)
    out = np.divide(np.where(present, per_class, 0.0).sum(axis=1), n_present,
                    out=np.zeros(len(per_class)), where=n_present > 0)
    return out.reshape(batch) if batch else out[0]


def macro_f1_statistic(gold_ids: np.ndarray, pred_ids: np.ndarray, k: int) -> np.ndarray:
    """Macro F1 from class ids of shape (..., n) -> (...); vectorized over leading axes.

    Averages over the classes among 0..k-1 that occur in that row's gold ids (for the full sample,
    all k). Per class F1 = 2 tp / (2 tp + fp + fn), which equals sklearn's 2PR / (P + R) with
    zero_division=0. Predicted id k means "outside the gold label set or invalid".
    """
    tp, gold_count, pred_count, batch = _class_counts(gold_ids, pred_ids, k)
    denom = (gold_count + pred_count).astype(np.float64)  # = 2 tp + fp + fn
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(denom), where=denom != 0)
    return _mean_over_present(f1, gold_count, batch)


def balanced_accuracy_statistic(gold_ids: np.ndarray, pred_ids: np.ndarray, k: int) -> np.ndarray:
    """Balanced accuracy (mean per-class recall) from class ids of shape (..., n) -> (...).

    Recall of class c = tp / (its gold count), averaged over the classes that occur in that row's
    gold ids, as `macro_f1_statistic` averages F1.
    """
    tp, gold_count, _, batch = _class_counts(gold_ids, pred_ids, k)
    recall = np.divide(tp, gold_count, out=np.zeros(tp.shape), where=gold_count != 0)
    return _mean_over_present(recall, gold_count, batch)


def macro_f1(golds: Sequence[str], preds: Sequence[str | None]) -> float:
    """Macro F1 over the labels that occur in the gold answers; None is a miss."""
    if not len(golds):
        return float("nan")
    gold_ids, pred_ids, classes = class_indices(golds, preds)
    return float(macro_f1_statistic(gold_ids, pred_ids, len(classes)))


def balanced_accuracy(golds: Sequence[str], preds: Sequence[str | None]) -> float:
    """Mean recall over the labels that occur in the gold answers; None is a miss."""
    if not len(golds):
        return float("nan")
    gold_ids, pred_ids, classes = class_indices(golds, preds)
    return float(balanced_accuracy_statistic(gold_ids, pred_ids, len(classes)))


def exact_match(correct_by_subtask: Sequence[Sequence[bool]]) -> float:
    """Share of examples with every sub-task right; one bool sequence per sub-task."""
    rows = all_correct(correct_by_subtask)
    return float(rows.mean()) if len(rows) else float("nan")


def all_correct(correct_by_subtask: Sequence[Sequence[bool]]) -> np.ndarray:
    """Per example: every sub-task right. bool array (n,)."""
    arrays = [np.asarray(c, dtype=bool) for c in correct_by_subtask]
    if not arrays:
        raise ValueError("no sub-task to combine")
    if len({len(a) for a in arrays}) > 1:
        raise ValueError("sub-tasks have different numbers of examples")
    return np.logical_and.reduce(arrays)


def mean_statistic(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis (accuracy, exact match, ROUGE of resampled per-example values)."""
    return np.asarray(values, dtype=np.float64).mean(axis=-1)
