"""The report's results across seeds (grid.report.seeds) on hand-built results: per-seed values,
mean and SD, and the two paired tests, checked against numbers computed here."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from grid.metrics.score import score
from grid.parsing import Parsed
from grid.plan import Cell
from grid.report import write_report
from grid.report.seeds import seed_numbers
from grid.significance import Outcomes, compare_strata
from grid.store import Store
from grid.tasks import get_task

N = 120


def add(store: Store, model: str, task: str, seed: int, answers: list, golds: list, seen: list[str],
        decoding: str | None = "head", shots: int = 0, finetune: str = "none", family: str = "decoder") -> str:
    cell = Cell(kind="infer", model=model, source=f"hub/{model}", weights="main", family=family, backend="transformers",
                prompt_format="chat", task=task, data_fp="fp", template_fp=None, shots=shots, finetune=finetune,
                seed=seed, decoding={"mode": decoding} if decoding else None, text_budget=None, sampler="random",
                limits={"test": None, "train": None, "seed": 0}, recipe=None,
                lineage={"seen_tasks": seen, "reference": None, "trained_on": None})
    sub = "sentiment" if task == "sst2" else "summary"
    store.write_predictions(cell.id, pa.table({
        "cell_id": [cell.id] * N, "example_id": [f"ex{i}" for i in range(N)], "raw_output": ["."] * N,
        "prediction": [json.dumps({sub: a}) for a in answers], "gold": [json.dumps({sub: g}) for g in golds],
        "valid": [True] * N, "invalid_reason": [None] * N}))
    parsed = [{sub: Parsed(a, True, None)} for a in answers]
    metrics = score(get_task(task), [{sub: g} for g in golds], parsed, n_boot=200)
    store.write_cell(cell.id, {"cell_id": cell.id, "status": "done", "cell": cell.model_dump(), "metrics": metrics,
                               "n_examples": N, "seconds": 1.0})
    return cell.id


def seeded_results(path, others: tuple[str, ...] = ()) -> tuple[Store, dict]:
    """sst2 at seeds 0-2: 'shared' right on 80/85/90% per seed, 'single' (and each of `others`,
    seen tasks none) on 60/62/64%; dialogsum: the shared model's summaries are the gold,
    'single-sum''s the first five words. Returns the store and each sst2 cell's right/wrong."""
    store = Store.open(path)
    golds = ["positive" if i % 2 else "negative" for i in range(N)]
    flip = {"positive": "negative", "negative": "positive"}
    truth = {}
    for seed, (p_shared, p_single) in enumerate([(0.80, 0.60), (0.85, 0.62), (0.90, 0.64)]):
        models = [("shared", p_shared, ["sst2", "dialogsum"]), ("single", p_single, ["sst2"])]
        for model, p, seen in models + [(o, p_single, []) for o in others]:
            right = [i < round(p * N) for i in range(N)]
            random.Random(f"{model}{seed}").shuffle(right)
            add(store, model, "sst2", seed, [g if r else flip[g] for g, r in zip(golds, right)], golds, seen)
            truth[(model, seed)] = np.array(right, dtype=float)
        texts = [f"person {i} asks about the train to town number {i}" for i in range(N)]
        add(store, "shared", "dialogsum", seed, texts, texts, ["sst2", "dialogsum"], "free")
        add(store, "single-sum", "dialogsum", seed, [" ".join(t.split()[:5]) for t in texts], texts,
            ["dialogsum"], "free")
    return store, truth


@pytest.fixture
def results(tmp_path):
    return seeded_results(tmp_path / "results")


def test_per_seed_values_mean_and_sd(results):
    store, _truth = results
    numbers = seed_numbers(store, store.records())
    rows = {(r["model"], r["task"], r["metric"]): r for r in numbers["rows"]}
    shared = rows[("shared", "sst2", "accuracy")]
    assert [s["value"] for s in shared["seeds"]] == pytest.approx([0.80, 0.85, 0.90])
    assert shared["mean"] == pytest.approx(0.85) and shared["sd"] == pytest.approx(0.05)
    assert all(s["ci_low"] < s["value"] < s["ci_high"] for s in shared["seeds"])
    assert rows[("shared", "dialogsum", "rouge1")]["mean"] == pytest.approx(1.0)
    assert {m for (_, t, m) in rows if t == "dialogsum"} == {"rouge1", "rouge2", "rougeL"}


def test_multi_task_against_single_task_uses_every_seed(results):
    store, truth = results
    tests = {(t["a"], t["b"], t["metric"]): t for t in seed_numbers(store, store.records())["tests"]}
    t = tests[("shared 0-shot head", "single 0-shot head", "accuracy")]
    diffs = [(truth[("shared", s)] - truth[("single", s)]).mean() for s in range(3)]
    assert t["seeds"] == [0, 1, 2] and t["per_seed_diff"] == pytest.approx(diffs)
    assert t["diff"] == pytest.approx(np.mean(diffs)) and t["ci_low"] < t["diff"] < t["ci_high"]
    assert t["p_seeds"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert t["p_pooled"] < 0.01  # 20+ points on 360 paired examples
    assert t["test"] == "mcnemar-exact" and rouge_test(tests)["test"] == "paired-permutation"
    rouge = tests[("shared 0-shot free", "single-sum 0-shot free", "rouge1")]
    assert rouge["diff"] > 0.3 and rouge["p_pooled"] < 0.01


def rouge_test(tests: dict) -> dict:
    return tests[("shared 0-shot free", "single-sum 0-shot free", "rouge1")]


def test_pooled_test_finds_nothing_between_equal_systems():
    rng = np.random.default_rng(1)
    ids = [str(i) for i in range(200)]
    pairs = [(Outcomes("text", ids, rouge={"rougeL": rng.random(200)}),
              Outcomes("text", ids, rouge={"rougeL": rng.random(200)})) for _ in range(3)]
    result = compare_strata(pairs, "rougeL", n_resamples=500)
    assert result.strata == 3 and result.test == "paired-permutation"
    assert result.p_value > 0.05 and result.ci_low < 0 < result.ci_high


def test_the_report_shows_the_section(results, tmp_path):
    _store, _ = results
    write_report(tmp_path / "results", tmp_path / "out", n_boot=100)
    md = (tmp_path / "out" / "table3.md").read_text()
    assert "## Across seeds" in md and "| shared 0-shot head | single 0-shot head | sst2 | accuracy | 3 |" in md
    assert "s1: 85.0 [" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["seeds"]["tests"]
    assert 'id="seed-tests"' in (tmp_path / "out" / "report.html").read_text()
