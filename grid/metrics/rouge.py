"""ROUGE-1, ROUGE-2 and ROUGE-L F-measure with Google's rouge-score package, Porter stemmer on.

Per example `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gold, pred)`,
F-measure; the score is the mean over examples. An invalid answer (None) is scored as "" (0).
A gold with several references (DialogSum's test has three) scores, per example and per ROUGE
type, the MAX F-measure over its references (what `RougeScorer.score_multi` does), not the mean:
an answer as good as any one human summary is fully right.
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


def references(gold: object) -> list[str]:
    """A text gold's references: one string, or a list of them (a list column read back from
    parquet arrives as an array)."""
    if isinstance(gold, str):
        return [gold]
    return [str(g) for g in gold]  # type: ignore[union-attr]


def rouge_per_example(golds: Sequence[object], preds: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Per example F-measure, by ROUGE type: {"rouge1": (n,), "rouge2": (n,), "rougeL": (n,)};
    the max over references where a gold has several."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    out = {t: np.zeros(len(golds), dtype=np.float64) for t in ROUGE_TYPES}
    scorer = _scorer()
    for i, (gold, pred) in enumerate(zip(golds, preds)):
        answer = "" if pred is None else str(pred)
        per_ref = [scorer.score(ref, answer) for ref in references(gold)]
        for t in ROUGE_TYPES:
            out[t][i] = max(s[t].fmeasure for s in per_ref)
    return out


def rouge(golds: Sequence[object], preds: Sequence[str | None]) -> dict[str, float]:
    """Mean F-measure over examples, by ROUGE type."""
    per = rouge_per_example(golds, preds)
    return {t: float(v.mean()) if len(v) else float("nan") for t, v in per.items()}
