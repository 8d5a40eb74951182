"""The test rows a cell scores (grid.data.sample_test_rows): a plain seeded sample as before, or one
stratified by label that keeps the split's label shares, the same rows for every task of a source."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from grid.config import GridConfig
from grid.data import label_fields, load_split, sample_test_rows
from grid.plan import build_plan
from grid.tasks import get_task
from tests.conftest import DATA


def sample(task_name: str, limit: int, seed: int = 0, stratify: bool = True) -> tuple[list[dict], list[dict]]:
    task = get_task(task_name)
    test = load_split(task, "test", DATA)
    return test.to_list(), test.select(sample_test_rows(task, test, limit, seed, stratify)).to_list()


@pytest.mark.parametrize("task_name,field", [("20ng-7", "root"), ("20ng-20", "label"), ("massive-intent", "intent")])
def test_a_stratified_sample_keeps_every_labels_share(task_name, field):
    """Each stratum (the source's label fields: 20NG's 20 names, of which 20ng-7's roots are unions)
    within one row of its share, so each of the task's labels within one row per stratum it holds."""
    rows, chosen = sample(task_name, 200)
    assert len(chosen) == 200 == len({r["example_id"] for r in chosen})
    strata = Counter(tuple(r[f] for f in label_fields(get_task(task_name))) for r in rows)
    got_strata = Counter(tuple(r[f] for f in label_fields(get_task(task_name))) for r in chosen)
    assert all(abs(got_strata[k] - 200 * n / len(rows)) < 1 for k, n in strata.items())
    split, got = Counter(r[field] for r in rows), Counter(r[field] for r in chosen)
    held = Counter(r[field] for r in (dict(zip(label_fields(get_task(task_name)), k)) for k in strata))
    for label, n in split.items():
        assert abs(got[label] - 200 * n / len(rows)) < held[label], label


def test_every_task_of_one_source_draws_the_same_rows_and_each_seed_its_own():
    ids = {t: [r["example_id"] for r in sample(t, 200)[1]] for t in ("20ng-7", "20ng-20", "20ng-multi")}
    assert ids["20ng-7"] == ids["20ng-20"] == ids["20ng-multi"]
    assert ids["20ng-7"] == sorted(ids["20ng-7"])  # file order
    assert [r["example_id"] for r in sample("20ng-7", 200, seed=1)[1]] != ids["20ng-7"]


def test_without_stratify_the_sample_is_the_plain_seeded_one_it_always_was():
    rows, chosen = sample("fpb-sentiment", 50, seed=3, stratify=False)
    assert [r["example_id"] for r in chosen] == [rows[i]["example_id"]
                                                for i in sorted(random.Random(3).sample(range(len(rows)), 50))]
    text_rows, text_chosen = sample("dialogsum", 30, seed=0)  # no label field: stratify has nothing to keep
    assert [r["example_id"] for r in text_chosen] == [
        text_rows[i]["example_id"] for i in sorted(random.Random(0).sample(range(len(text_rows)), 30))]


def test_stratify_is_in_the_cell_id_only_when_it_is_asked_for():
    raw = {"name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
           "tasks": ["fpb-sentiment"], "limits": {"test": 12}}
    (plain,) = build_plan(GridConfig.model_validate(raw)).cells
    assert "stratify" not in plain.limits
    (strat,) = build_plan(GridConfig.model_validate(raw | {"limits": {"test": 12, "stratify": True}})).cells
    assert strat.limits["stratify"] is True and strat.id != plain.id
