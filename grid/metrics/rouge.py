"""ROUGE-1, ROUGE-2 and ROUGE-L F-measure with Google's rouge-score package, Porter stemmer on.

Per example `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gold, pred)`,
F-measure; the score is the mean over examples. An invalid answer (None) is scored as "" (0).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@cache
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_per_example(golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Per example F-measure, by ROUGE type: {"rouge1": (n,), "rouge2": (n,), "rougeL": (n,)}."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    out = {t: np.zeros(len(golds), dtype=np.float64) for t in ROUGE_TYPES}
    scorer = _scorer()
    for i, (gold, pred) in enumerate(zip(golds, preds)):
        scores = scorer.score(str(gold), "" if pred is None else str(pred))
        for t in ROUGE_TYPES:
            out[t][i] = scores[t].fmeasure
    return out


def rouge(golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, float]:
    """Mean F-measure over examples, by ROUGE type."""
    per = rouge_per_example(golds, preds)
    return {t: float(v.mean()) if len(v) else float("nan") for t, v in per.items()}
