"""MASSIVE's official slot F1, reproduced exactly.

The reference is Amazon's MASSIVE code, repository alexa/massive, file
src/massive/utils/training_utils.py (commit 39327059fcef8f1b108fd30558c1a6648dea688f),
functions `convert_to_bio` and `eval_preds`, used as its text-to-text evaluation does
(`labels_ignore` = the outside tag "Other", no `labels_merge`, `pad='Other'`):

1. each predicted tag list is cut or padded with "Other" to the gold length
   (`pred[:len(lab)] + [pad] * (len(lab) - len(pred))`);
2. gold and prediction are converted to BIO with `convert_to_bio` (below): "Other" -> "O", a tag
   that differs from the previous tag -> "B-tag", a repeat -> "I-tag". So a run of equal tags is
   one entity, even where the gold annotation had two adjacent spans of the same slot type;
3. `seqeval.metrics.f1_score(bio_labels, bio_preds)` in its default (conlleval) mode, micro.

The paper (seed 002, section 5.8) scores slot filling the same way. An answer with nothing
usable (value None) counts as all "Other". For bootstrap CIs, `entity_counts` gives each
example's (true positives, predicted entities, gold entities); `f1_from_counts` on their sums is
seqeval's F1 on the whole set (tests check this).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from seqeval.metrics import f1_score
from seqeval.metrics.sequence_labeling import get_entities

from grid.tasks import OUTSIDE_TAG


def convert_to_bio(seq_tags: Sequence[object], outside: str | list = OUTSIDE_TAG,
                   labels_merge: object = None) -> list[str]:
    """MASSIVE's `convert_to_bio`, same behaviour for every input.

    ['city', 'city', 'Other', 'country', 'Other'] -> ['B-city', 'I-city', 'O', 'B-country', 'O'].
    `outside`: the tag(s) that become "O"; `labels_merge`: tags merged leftward (MASSIVE uses
    -100 for sub-word pieces; word-level tags here have none).
    """
    tags = [str(x) for x in seq_tags]
    outs = [str(x) for x in (outside if isinstance(outside, list) else [outside])]
    if labels_merge:
        merge = [str(x) for x in (labels_merge if isinstance(labels_merge, list) else [labels_merge])]
    else:
        merge = []

    bio: list[str] = []
    prev: str | None = None
    for tag in tags:
        if prev is None and tag in merge:
            bio.append("O")
        elif tag in outs:
            bio.append("O")
            prev = tag
        elif tag != prev and tag not in merge:
            bio.append("B-" + tag)
            prev = tag
        else:  # tag == prev, or a merged piece: continue the previous tag
            bio.append("O" if prev in outs else "I-" + prev)  # type: ignore[operator]
    return bio


def pad_or_cut(pred: Sequence[str] | None, n: int, pad: str = OUTSIDE_TAG) -> list[str]:
    """The prediction cut or padded with `pad` to n tags, as MASSIVE's `eval_preds`; None -> all pad."""
    pred = [] if pred is None else list(pred)
    return pred[:n] + [pad] * (n - len(pred))


def bio_pairs(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str] | None]
              ) -> tuple[list[list[str]], list[list[str]]]:
    """(gold BIO, predicted BIO) per example, predictions padded/cut to the gold length first."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    bio_gold, bio_pred = [], []
    for gold, pred in zip(golds, preds):
        gold = list(gold)
        bio_gold.append(convert_to_bio(gold))
        bio_pred.append(convert_to_bio(pad_or_cut(pred, len(gold))))
    return bio_gold, bio_pred


def _seqeval_f1(bio_gold: list[list[str]], bio_pred: list[list[str]]) -> float:
    with warnings.catch_warnings():  # seqeval warns (and returns 0) when nothing is predicted
        warnings.simplefilter("ignore")
        return float(f1_score(bio_gold, bio_pred))


def _counts(bio_gold: list[list[str]], bio_pred: list[list[str]]) -> np.ndarray:
    out = np.zeros((len(bio_gold), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(bio_gold, bio_pred)):
        gold_ents = set(get_entities(g))
        pred_ents = set(get_entities(p))
        out[i] = (len(gold_ents & pred_ents), len(pred_ents), len(gold_ents))
    return out


def slot_f1(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str] | None]) -> float:
    """MASSIVE slot F1 (seqeval micro F1 on MASSIVE's BIO); 0.0 when there is no entity at all."""
    return _seqeval_f1(*bio_pairs(golds, preds))


def entity_counts(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str] | None]
                  ) -> np.ndarray:
    """Per example (true positives, predicted entities, gold entities), shape (n, 3), int64.

    Entities are seqeval's (type, start, end) chunks of MASSIVE's BIO, so their sums give the
    same precision, recall and F1 as seqeval on the whole set.
    """
    return _counts(*bio_pairs(golds, preds))


def slot_f1_and_counts(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str] | None]
                       ) -> tuple[float, np.ndarray]:
    """`slot_f1` and `entity_counts` together, converting to BIO once."""
    bio_gold, bio_pred = bio_pairs(golds, preds)
    return _seqeval_f1(bio_gold, bio_pred), _counts(bio_gold, bio_pred)


def f1_from_counts(tp: np.ndarray | float, n_pred: np.ndarray | float,
                   n_gold: np.ndarray | float) -> np.ndarray:
    """Micro F1 from summed counts with seqeval's arithmetic (0 where undefined); vectorized."""
    tp = np.asarray(tp, dtype=np.float64)
    n_pred = np.asarray(n_pred, dtype=np.float64)
    n_gold = np.asarray(n_gold, dtype=np.float64)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred != 0)
    recall = np.divide(tp, n_gold, out=np.zeros_like(tp), where=n_gold != 0)
    denom = precision + recall
    return np.divide(2.0 * precision * recall, denom, out=np.zeros_like(tp), where=denom != 0)


def slot_f1_statistic(counts: np.ndarray) -> np.ndarray:
    """Slot F1 of resampled entity counts: `counts` (..., n, 3) -> (...) F1 values."""
    sums = counts.sum(axis=-2)
    return f1_from_counts(sums[..., 0], sums[..., 1], sums[..., 2])
