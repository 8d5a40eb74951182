"""The task definition is part of the cell id: a changed split seed or label list makes new cells
for that task only; a comment changes nothing. The data fingerprint hashes the rows as read."""

from __future__ import annotations

from pathlib import Path

import pytest

from grid.config import GridConfig
from grid.data import data_fingerprint
from grid.plan import build_plan
from grid.tasks import TASKS_DIR, TaskDef, _catalog, get_task


def with_split_seed(seed: int) -> TaskDef:
    raw = get_task("fpb-sentiment").model_dump(mode="json")
    raw["data"]["split"]["split_seed"] = seed
    return TaskDef.model_validate(raw)


def test_two_split_seeds_never_share_a_fingerprint():
    prints = {data_fingerprint(with_split_seed(seed)) for seed in (1, 2, 3, 42)}
    assert len(prints) == 4
    assert data_fingerprint(with_split_seed(42)) == data_fingerprint(get_task("fpb-sentiment"))


@pytest.fixture
def own_tasks(tmp_path, monkeypatch):
    """Two copies of fpb-sentiment in a --tasks folder; edits to one file are picked up."""
    source = (TASKS_DIR / "fpb-sentiment.yaml").read_text()
    for name in ("x-one", "x-two"):
        (tmp_path / f"{name}.yaml").write_text(source.replace("name: fpb-sentiment", f"name: {name}"))
    monkeypatch.setenv("CLFGRID_TASKS", str(tmp_path))
    yield tmp_path
    _catalog.cache_clear()


def ids(folder: Path) -> dict[str, set[str]]:
    _catalog.cache_clear()
    config = GridConfig.model_validate({
        "name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
        "tasks": ["x-one", "x-two"], "shots": [0, 5], "decoding": {"mode": "free", "max_new_tokens": 4}})
    out: dict[str, set[str]] = {"x-one": set(), "x-two": set()}
    for cell in build_plan(config).cells:
        out[cell.task].add(cell.id)
    return out


def test_a_label_list_edit_changes_that_tasks_cells_only(own_tasks):
    before = ids(own_tasks)
    path = own_tasks / "x-one.yaml"
    path.write_text("# a comment changes nothing\n" + path.read_text())
    assert ids(own_tasks) == before
    path.write_text(path.read_text().replace(
        "field: sentiment, type: label}", "field: sentiment, type: label, labels: [positive, negative, neutral]}"))
    after = ids(own_tasks)
    assert after["x-two"] == before["x-two"]
    assert not after["x-one"] & before["x-one"]


def test_a_split_seed_edit_changes_that_tasks_cells_only(own_tasks):
    before = ids(own_tasks)
    path = own_tasks / "x-two.yaml"
    path.write_text(path.read_text().replace("split_seed: 42", "split_seed: 7"))
    after = ids(own_tasks)
    assert after["x-one"] == before["x-one"]
    assert not after["x-two"] & before["x-two"]


def test_a_generic_prompt_follows_the_task_fields_it_fills_in():
    from grid.prompting import template_source_hash

    sst2 = get_task("sst2")
    assert sst2.prompt_name == "generic-label"
    edited = TaskDef.model_validate({**sst2.model_dump(mode="json"), "description": "another wording"})
    assert template_source_hash(edited) != template_source_hash(sst2)
    assert data_fingerprint(edited) == data_fingerprint(sst2)  # the rows did not change
