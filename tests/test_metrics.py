"""Scoring on the real MASSIVE test split, checked against values computed independently here.

The reference numbers in this file do not use grid.metrics: they use a copy of MASSIVE's own
`convert_to_bio` (alexa/massive, src/massive/utils/training_utils.py), its pad/cut rule, seqeval's
f1_score, sklearn's f1_score and rouge-score directly.
"""

from __future__ import annotations

import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from rouge_score import rouge_scorer
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import f1_score as sklearn_f1

from grid.data import label_sets, load_split
from grid.errors import GridError
from grid.metrics import per_example_correct, per_subtask_correct, score
from grid.metrics.bootstrap import bootstrap_ci, bootstrap_values, mean_ci, resample_blocks
from grid.metrics.classification import accuracy, class_indices, macro_f1, macro_f1_statistic
from grid.metrics.rouge import rouge
from grid.metrics.slots import (
    convert_to_bio,
    entity_counts,
    f1_from_counts,
    slot_f1,
    slot_f1_statistic,
)
from grid.parsing import Parsed, format_answer, parse_answer
from grid.tasks import TaskDef, get_task

TOL = 1e-12


# --- the reference: MASSIVE's rule, copied here -------------------------------------------


def massive_convert_to_bio(seq_tags, outside="Other", labels_merge=None):
    """Verbatim logic of alexa/massive training_utils.convert_to_bio."""
    seq_tags = [str(x) for x in seq_tags]
    outside = [outside] if not isinstance(outside, list) else outside
    outside = [str(x) for x in outside]
    if labels_merge:
        labels_merge = [labels_merge] if not isinstance(labels_merge, list) else labels_merge
        labels_merge = [str(x) for x in labels_merge]
    else:
        labels_merge = []
    bio_tagged = []
    prev_tag = None
    for tag in seq_tags:
        if prev_tag == None and tag in labels_merge:  # noqa: E711 (as upstream)
            bio_tagged.append("O")
        elif tag in outside:
            bio_tagged.append("O")
            prev_tag = tag
        elif tag != prev_tag and tag not in labels_merge:
            bio_tagged.append("B-" + tag)
            prev_tag = tag
        elif tag == prev_tag or tag in labels_merge:
            if prev_tag in outside:
                bio_tagged.append("O")
            else:
                bio_tagged.append("I-" + prev_tag)
    return bio_tagged


def reference_bio(golds, preds):
    """MASSIVE eval_preds: pad/cut with 'Other', then BIO on both."""
    bio_l, bio_p = [], []
    for lab, pred in zip(golds, preds):
        pred = list(pred) if pred is not None else []
        pred = pred[: len(lab)] + ["Other"] * (len(lab) - len(pred))
        bio_l.append(massive_convert_to_bio(lab))
        bio_p.append(massive_convert_to_bio(pred))
    return bio_l, bio_p


# --- perturbed answers for the whole MASSIVE test split ------------------------------------


def _perturb(rows, intents, tags, seed):
    """Per row: the intended prediction (intent or None, tag list or None) and how it was made."""
    rng = random.Random(seed)
    slot_tags = [t for t in tags if t != "Other"]
    out = []
    for row in rows:
        gold_i, gold_t = row["intent"], list(row["slots"])
        r = rng.random()
        if r < 0.65:
            intent, intent_raw = gold_i, gold_i
        elif r < 0.80:
            intent = rng.choice([i for i in intents if i != gold_i])
            intent_raw = intent
        elif r < 0.85:
            intent, intent_raw = gold_i, rng.choice([f"Label: {gold_i.upper()}.", f"`{gold_i}`"])
        elif r < 0.92:
            intent, intent_raw = None, rng.choice(["set_the_alarm", "I don't know", ""])
        else:
            intent, intent_raw = None, None  # missing key / unparseable
        r = rng.random()
        pred = list(gold_t)
        if r < 0.55:
            pass
        elif r < 0.70:  # some tags changed to other known tags
            for _ in range(rng.randint(1, 2)):
                j = rng.randrange(len(pred))
                pred[j] = rng.choice([t for t in tags if t != pred[j]])
        elif r < 0.80:  # shortened
            pred = pred[: rng.randrange(len(pred))]
        elif r < 0.90:  # lengthened
            pred = pred + [rng.choice(tags) for _ in range(rng.randint(1, 3))]
        elif r < 0.95:  # an unknown tag: the parser keeps it, a false positive in slot F1
            j = rng.randrange(len(pred))
            pred[j] = "not_a_slot"
        else:
            pred = None
        if pred is not None and rng.random() < 0.1 and slot_tags:  # a slot at a random word
            j = rng.randrange(len(pred)) if pred else None
            if j is not None:
                pred[j] = rng.choice(slot_tags)
        unknown = pred is not None and "not_a_slot" in pred
        out.append({"intent": intent, "intent_raw": intent_raw, "tags_raw": pred,
                    "tags": None if pred is None else list(pred),
                    "unknown": unknown, "broken": rng.random() < 0.04, "style": rng.randrange(6)})
    return out


def _render(task_name, p, rng):
    """The raw answer text for a perturbed prediction, in the task's answer form."""
    if task_name == "massive-intent":
        return "" if p["intent_raw"] is None else p["intent_raw"]
    tags = p["tags_raw"]
    plain_ok = bool(tags) and not p["unknown"]  # a plain sequence must be non-empty, known tags
    if task_name == "massive-slots":
        if tags is None:
            return rng.choice(["", "The slots are time and date.", '["Other", "ti'])
        forms = [json.dumps(tags), str(tags), " ".join(tags), ", ".join(tags)]
        return forms[p["style"] % 4] if plain_ok or p["style"] % 4 < 2 else forms[0]
    if p["broken"]:
        return rng.choice(["", "alarm_set", '{"task1": "alarm_set", "task2": ["Other"',
                           "I cannot answer that."])
    obj = {}
    if p["intent_raw"] is not None:
        obj["task1"] = p["intent_raw"]
    if tags is not None:
        obj["task2"] = " ".join(tags) if p["style"] == 5 and plain_ok else tags
    text = json.dumps(obj)
    return [text, f"```json\n{text}\n```", f"Output: {text} done", str(obj), text, text][p["style"]]


def _expected_intent(task_name, p):
    if task_name == "massive-multi" and p["broken"]:
        return None
    return p["intent"]


def _expected_tags(task_name, p):
    if task_name == "massive-multi" and p["broken"]:
        return None
    return p["tags"]


@pytest.fixture(scope="module")
def massive():
    task = get_task("massive-multi")
    rows = load_split(task, "test").to_list()
    labels = label_sets(task)
    perturbed = _perturb(rows, labels["intent"], labels["slots"], seed=2024)
    return rows, labels, perturbed


def _parse_all(task, rows, labels, perturbed):
    rng = random.Random(5)
    raws = [_render(task.name, p, rng) for p in perturbed]
    return [parse_answer(raw, task, labels, len(r["words"])) for raw, r in zip(raws, rows)]


@pytest.mark.parametrize("task_name", ["massive-multi", "massive-intent", "massive-slots"])
def test_whole_massive_test_split_against_independent_reference(massive, task_name):
    rows, labels, perturbed = massive
    task = get_task(task_name)
    assert len(rows) == 2974
    parsed = _parse_all(task, rows, labels, perturbed)
    got = score(task, rows, parsed, seed=0, n_boot=200)
    assert got["n"] == 2974

    gold_i = [r["intent"] for r in rows]
    gold_t = [r["slots"] for r in rows]
    exp_i = [_expected_intent(task_name, p) for p in perturbed]
    exp_t = [_expected_tags(task_name, p) for p in perturbed]
    names = [s.name for s in task.subtasks]

    # the parser read each answer as intended
    for k, (p, exp_intent, exp_tags) in enumerate(zip(parsed, exp_i, exp_t)):
        if "intent" in names:
            assert p["intent"].value == exp_intent, (k, p)
            assert p["intent"].valid == (exp_intent is not None), (k, p)
        if "slots" in names:
            assert p["slots"].value == exp_tags, (k, p)
            n_words = len(rows[k]["words"])
            ok = exp_tags is not None and len(exp_tags) == n_words and not perturbed[k]["unknown"]
            assert p["slots"].valid == ok, (k, p)

    bio_l, bio_p = reference_bio(gold_t, exp_t)
    intent_right = [e is not None and e == g for e, g in zip(exp_i, gold_i)]
    slots_right = [bl == bp for bl, bp in zip(bio_l, bio_p)]
    if "intent" in names:
        ref_acc = sum(intent_right) / len(rows)
        assert abs(got["intent/accuracy"] - ref_acc) < TOL
        ref_macro = sklearn_f1(gold_i, [e if e is not None else "<invalid>" for e in exp_i],
                               labels=sorted(set(gold_i)), average="macro", zero_division=0)
        assert abs(got["intent/macro_f1"] - ref_macro) < TOL
        assert 0.5 < ref_acc < 0.95  # the perturbations did something, not everything
    if "slots" in names:
        ref_f1 = seqeval_f1(bio_l, bio_p)
        assert abs(got["slots/slot_f1"] - ref_f1) < TOL
        assert 0.5 < ref_f1 < 0.98
    if task_name == "massive-multi":
        ref_em = sum(a and b for a, b in zip(intent_right, slots_right)) / len(rows)
        assert abs(got["exact_match"] - ref_em) < TOL
        assert per_example_correct(task, rows, parsed) == [
            a and b for a, b in zip(intent_right, slots_right)]
        per_sub = per_subtask_correct(task, rows, parsed)
        assert per_sub == {"intent": intent_right, "slots": slots_right}
        invalid_any = [not all(x.valid for x in p.values()) for p in parsed]
        assert abs(got["invalid_rate"] - sum(invalid_any) / len(rows)) < TOL
        assert 0 < got["slots/invalid_rate"] < got["invalid_rate"] < 1
    else:
        assert "exact_match" not in got
    for key, value in got.items():
        if key.endswith("_ci_low"):
            base = key[: -len("_ci_low")]
            assert value <= got[base] <= got[base + "_ci_high"], key


def test_score_keys(massive):
    rows, labels, perturbed = massive
    task = get_task("massive-multi")
    parsed = _parse_all(task, rows[:300], labels, perturbed[:300])
    got = score(task, rows[:300], parsed, n_boot=50)
    assert list(got) == [
        "n", "invalid_rate",
        "intent/invalid_rate", "intent/accuracy", "intent/accuracy_ci_low",
        "intent/accuracy_ci_high", "intent/majority_rate", "intent/macro_f1", "intent/macro_f1_ci_low",
        "intent/macro_f1_ci_high", "intent/balanced_accuracy", "intent/balanced_accuracy_ci_low",
        "intent/balanced_accuracy_ci_high",
        "slots/invalid_rate", "slots/slot_f1", "slots/slot_f1_ci_low", "slots/slot_f1_ci_high",
        "exact_match", "exact_match_ci_low", "exact_match_ci_high",
    ]
    assert all(isinstance(v, float) for v in got.values())
    from collections import Counter

    intents = Counter(r["intent"] for r in rows[:300])
    assert got["intent/majority_rate"] == max(intents.values()) / 300  # the floor to beat
    no_ci = score(task, rows[:300], parsed, n_boot=0)
    assert not any(k.endswith(("_ci_low", "_ci_high")) for k in no_ci)
    assert all(no_ci[k] == got[k] for k in no_ci)


def test_perfect_and_empty_answers(massive):
    rows, labels, _ = massive
    task = get_task("massive-multi")
    rows = rows[:500]
    perfect = [parse_answer(format_answer(task, r), task, labels, len(r["words"])) for r in rows]
    got = score(task, rows, perfect, n_boot=100)
    for key in ("intent/macro_f1", "intent/balanced_accuracy", "slots/slot_f1"):  # bootstrap CIs
        assert got[key] == 1.0 and got[key + "_ci_low"] == 1.0, key
    for key in ("intent/accuracy", "exact_match"):  # exact CIs: 500 of 500 is not proof of 100%
        assert got[key] == got[key + "_ci_high"] == 1.0, key
        assert got[key + "_ci_low"] == pytest.approx(0.025 ** (1 / 500)), key  # Clopper-Pearson at k = n
    assert got["invalid_rate"] == 0.0
    empty = [parse_answer("", task, labels, len(r["words"])) for r in rows]
    got = score(task, rows, empty, n_boot=100)
    assert got["intent/accuracy"] == 0.0 and got["slots/slot_f1"] == 0.0
    assert got["invalid_rate"] == 1.0 and got["slots/invalid_rate"] == 1.0
    # all "Other" is exactly right where the gold has no slot
    no_slot = sum(all(t == "Other" for t in r["slots"]) for r in rows) / len(rows)
    assert got["exact_match"] == 0.0 and no_slot > 0
    tags_only = per_subtask_correct(task, rows, empty)["slots"]
    assert abs(sum(tags_only) / len(rows) - no_slot) < TOL


def test_score_rejects_bad_input(massive):
    rows, labels, _ = massive
    task = get_task("massive-multi")
    parsed = [parse_answer("", task, labels, 1) for _ in rows[:3]]
    with pytest.raises(GridError, match="3 gold rows but 2 parsed"):
        score(task, rows[:3], parsed[:2])
    with pytest.raises(GridError, match="no examples"):
        score(task, [], [])
    with pytest.raises(GridError, match="no sub-task 'slots'"):
        score(task, rows[:1], [{"intent": Parsed(None, False, "x")}])
    bad = task.model_copy(update={"metrics": ("accuracy", "bleu")})
    with pytest.raises(GridError, match="unknown metric 'bleu'"):
        score(bad, rows[:3], parsed)
    slots_only = get_task("massive-slots")
    wrong = slots_only.model_copy(update={"metrics": ("accuracy",)})
    with pytest.raises(GridError, match="accuracy needs a label sub-task"):
        score(wrong, rows[:3], [{"slots": p["slots"]} for p in parsed])


# --- slots ----------------------------------------------------------------------------------


def test_convert_to_bio_matches_massive():
    assert convert_to_bio(["city", "city", "Other", "country", -100, "Other"],
                          labels_merge=[-100]) == ["B-city", "I-city", "O", "B-country",
                                                   "I-country", "O"]
    rng = random.Random(3)
    alphabet = ["Other", "time", "date", "place_name", -100, "x"]
    for _ in range(3000):
        seq = [rng.choice(alphabet) for _ in range(rng.randint(0, 9))]
        merge = rng.choice([None, [-100], -100, "x", []])
        outside = rng.choice(["Other", ["Other", "x"]])
        assert convert_to_bio(seq, outside, merge) == massive_convert_to_bio(seq, outside, merge)
    # adjacent spans of one slot type become one entity, as in MASSIVE
    assert convert_to_bio(["date", "date", "Other", "time"]) == ["B-date", "I-date", "O", "B-time"]


def test_slot_f1_small_cases():
    gold = [["Other", "time", "time", "Other", "date"]]
    assert slot_f1(gold, [["Other", "time", "time", "Other", "date"]]) == 1.0
    assert slot_f1(gold, [["Other", "time", "time"]]) == pytest.approx(2 * 1 / 3)  # padded
    assert slot_f1(gold, [["Other", "time", "Other", "Other", "date", "date"]]) == 0.5  # cut
    assert slot_f1(gold, [None]) == 0.0
    assert slot_f1([["Other"]], [["Other"]]) == 0.0  # no entity at all: seqeval's 0


def test_entity_counts_give_seqeval_f1(massive):
    rows, _labels, perturbed = massive
    gold_t = [r["slots"] for r in rows]
    pred_t = [p["tags"] for p in perturbed]
    counts = entity_counts(gold_t, pred_t)
    assert counts.shape == (len(rows), 3)
    bio_l, bio_p = reference_bio(gold_t, pred_t)
    full = seqeval_f1(bio_l, bio_p)
    tp, n_pred, n_gold = counts.sum(axis=0)
    assert abs(float(f1_from_counts(tp, n_pred, n_gold)) - full) < TOL
    assert abs(float(slot_f1_statistic(counts)) - full) < TOL
    # on bootstrap resamples too: seqeval on the resampled examples equals the counts' F1
    idx = next(resample_blocks(len(rows), n_boot=4, seed=11))
    from_counts = slot_f1_statistic(counts[idx])
    for b in range(4):
        sample_l = [bio_l[i] for i in idx[b]]
        sample_p = [bio_p[i] for i in idx[b]]
        assert abs(from_counts[b] - seqeval_f1(sample_l, sample_p)) < TOL


# --- classification -------------------------------------------------------------------------


def test_accuracy_and_macro_f1_against_sklearn(massive):
    rows, _, perturbed = massive
    gold = [r["intent"] for r in rows]
    pred = [p["intent"] for p in perturbed]
    ref = sklearn_f1(gold, [p or "<none>" for p in pred], labels=sorted(set(gold)),
                     average="macro", zero_division=0)
    assert abs(macro_f1(gold, pred) - ref) < TOL
    assert accuracy(gold, pred) == sum(g == p for g, p in zip(gold, pred)) / len(gold)
    # per resample: the average is over that resample's gold labels
    gold_ids, pred_ids, classes = class_indices(gold, pred)
    idx = next(resample_blocks(len(gold), n_boot=3, seed=1))
    values = macro_f1_statistic(gold_ids[idx], pred_ids[idx], len(classes))
    for b in range(3):
        g = [gold[i] for i in idx[b]]
        p = [pred[i] or "<none>" for i in idx[b]]
        ref = sklearn_f1(g, p, labels=sorted(set(g)), average="macro", zero_division=0)
        assert abs(values[b] - ref) < TOL


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_deterministic_and_contains_the_estimate(massive):
    rows, _, perturbed = massive
    correct = np.array([p["intent"] == r["intent"] for p, r in zip(perturbed, rows)])
    a = mean_ci(correct, n_boot=1000, seed=3)
    assert a == mean_ci(correct, n_boot=1000, seed=3)
    assert a != mean_ci(correct, n_boot=1000, seed=4)
    assert a[0] < correct.mean() < a[1]
    assert 0.01 < a[1] - a[0] < 0.06  # about 2 * 1.96 * sqrt(p (1 - p) / n) ~ 0.03
    values = bootstrap_values(lambda c: c.mean(axis=-1), [correct], n_boot=1000, seed=3)
    assert values.shape == (1000,)
    assert a == (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
    counts = entity_counts([r["slots"] for r in rows], [p["tags"] for p in perturbed])
    low, high = bootstrap_ci(slot_f1_statistic, [counts], n_boot=300, seed=0)
    assert low < float(slot_f1_statistic(counts)) < high
    assert (low, high) == bootstrap_ci(slot_f1_statistic, [counts], n_boot=300, seed=0)
    # score() is deterministic for a seed and its CIs move with it
    task = get_task("massive-intent")
    labels = label_sets(task)
    parsed = [parse_answer(p["intent_raw"] or "", task, labels, None) for p in perturbed]
    s1 = score(task, rows, parsed, seed=9, n_boot=200)
    assert s1 == score(task, rows, parsed, seed=9, n_boot=200)
    assert s1 != score(task, rows, parsed, seed=10, n_boot=200)


def test_bootstrap_speed():
    correct = np.random.default_rng(0).random(3000) < 0.8
    mean_ci(correct, n_boot=50)  # warm up
    times = []
    for _ in range(3):  # the best of three, so a busy machine does not fail it
        start = time.perf_counter()
        low, high = mean_ci(correct, n_boot=1000, seed=0)
        times.append(time.perf_counter() - start)
    assert low < correct.mean() < high
    assert min(times) < 0.5, times


def test_bootstrap_edge_cases():
    assert all(np.isnan(mean_ci([], n_boot=100)))
    assert all(np.isnan(mean_ci([1.0, 0.0], n_boot=0)))
    assert mean_ci([1.0, 1.0, 1.0], n_boot=100) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(lambda v: v.mean(axis=-1), [np.zeros(3), np.zeros(4)])
    blocks = list(resample_blocks(10, n_boot=7, seed=1))
    assert sum(b.shape[0] for b in blocks) == 7 and all(b.shape[1] == 10 for b in blocks)


# --- rouge ----------------------------------------------------------------------------------


def test_rouge_on_real_sentences():
    task = TaskDef.model_validate({
        "name": "fpb-echo", "data": {"hub": {"path": "x", "splits": {"train": "train", "test": "test"}},
                 "text": "sentence",
                 "fields": {"sentiment": {"column": "label_text"}}},
        "prompt": "x", "metrics": ["rouge"],
        "subtasks": [{"name": "summary", "field": "text", "type": "text"}],
    })
    rows = load_split(get_task("fpb-sentiment"), "test").to_list()[:300]
    rng = random.Random(8)
    raws, preds = [], []
    for r in rows:
        words = r["text"].split()
        kind = rng.random()
        if kind < 0.1:
            raw = "  "
        elif kind < 0.5:
            raw = " ".join(w for w in words if rng.random() < 0.7)
        else:
            raw = " ".join(words[: max(1, len(words) // 2)]) + " running runners"
        raws.append(raw)
        preds.append(raw.strip() or None)
    parsed = [parse_answer(raw, task, {}, None) for raw in raws]
    got = score(task, rows, parsed, n_boot=100)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for t in ("rouge1", "rouge2", "rougeL"):
        ref = np.mean([scorer.score(r["text"], p or "")[t].fmeasure for r, p in zip(rows, preds)])
        assert abs(got[f"summary/{t}"] - ref) < TOL
        assert got[f"summary/{t}_ci_low"] < got[f"summary/{t}"] < got[f"summary/{t}_ci_high"]
    assert abs(got["summary/invalid_rate"] - sum(p is None for p in preds) / len(rows)) < TOL
    assert rouge(["the cats running"], ["the cat runs"])["rouge1"] == 1.0  # stemmer on
    assert rouge(["the cats running"], [None])["rouge1"] == 0.0
