"""Which grid config fields are part of a cell's id: every input that can change a cell's
predictions makes a new cell, and fields that only change how or where it runs do not (so a
rerun with, say, a bigger batch or another API timeout redoes nothing). Task-file edits are in
tests/test_task_identity.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from grid.config import GridConfig
from grid.plan import build_plan

BASE: dict[str, Any] = {
    "name": "ids",
    "models": [{"name": "m", "source": "tiny:llama", "family": "decoder", "prompt_format": "chat"}],
    "tasks": ["fpb-sentiment"],
    "shots": [0],
    "finetune": ["none"],
    "seeds": [0],
    "decoding": {"mode": "constrained"},
    "limits": {"test": 16, "train": 32},
}


def untuned_infer_id(overrides: dict[str, Any]) -> str:
    raw = copy.deepcopy(BASE)
    for path, value in overrides.items():
        target = raw
        *parents, leaf = path.split(".")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target.setdefault(key, {})
        target[leaf] = value
    plan = build_plan(GridConfig.model_validate(raw))
    (cell,) = [c for c in plan.cells if c.kind == "infer" and c.finetune == "none" and c.shots == 0 and c.seed == 0]
    return cell.id


CHANGES = {  # each can change what the model answers
    "models.0.source": "tiny:mistral",
    "models.0.prompt_format": "inst",
    "models.0.dtype": "bfloat16",
    "models.0.options": {"structured_outputs": "off"},
    "decoding": {"mode": "free", "max_new_tokens": 8},
    "limits.test": 17,
    "limits.seed": 1,
    "text_budget": 32,
}
KEEPS = {  # how, where and how fast it runs, or what other cells exist
    "name": "renamed",
    "models.0.name": "renamed",
    "models.0.options": {"timeout_s": 5, "max_retries": 1, "requests_per_second": 2, "cache_dir": "/tmp/x",
                         "max_concurrency": 2, "api_key_env": "KEY", "gpu_memory_utilization": 0.5},
    "models.0.inference": {"num_cpus": 2, "batch_size": 4},
    "inference": {"batch_size": 4, "concurrency": 2, "num_cpus": 2, "retries": 0},
    "parallel": 3,
    "shots": [0, 5],
    "seeds": [0, 1],
    "finetune": ["none", "lora"],
    "recipes": {"decoder/lora": {"hparams": {"lr": 0.01}}},
    "exclude": [{"shots": 5}],
    "finetuned_eval": "all",
    "limits.train": 64,  # the fine-tunes' rows: an untuned model's cells never read them
    "sampler": "stratified",  # draws five-shot examples: a zero-shot cell has none
}


@pytest.mark.parametrize("path", sorted(CHANGES))
def test_fields_that_change_answers_change_the_id(path):
    assert untuned_infer_id({path: CHANGES[path]}) != untuned_infer_id({})


@pytest.mark.parametrize("path", sorted(KEEPS))
def test_fields_that_do_not_change_answers_keep_the_id(path):
    assert untuned_infer_id({path: KEEPS[path]}) == untuned_infer_id({})


def test_the_train_limit_and_the_sampler_reach_the_cells_that_use_them():
    def ids(**overrides: Any) -> dict[tuple[str, int, str], str]:
        raw = copy.deepcopy(BASE) | {"shots": [0, 5], "finetune": ["none", "lora"]} | overrides
        return {(c.kind, c.shots, c.finetune): c.id for c in build_plan(GridConfig.model_validate(raw)).cells}

    base, more_rows = ids(), ids(limits={"test": 16, "train": 64})
    changed = {k for k in base if base[k] != more_rows[k]}
    assert changed == {k for k in base if k[2] == "lora"}  # the fine-tunes and what they made
    stratified = ids(sampler="stratified")
    assert {k for k in base if base[k] != stratified[k]} == {k for k in base if k[1] == 5}
    # the cells record the algorithm's version: shots drawn by another version are not reused
    five = next(c for c in build_plan(GridConfig.model_validate(copy.deepcopy(BASE) | {"shots": [5],
                "sampler": "stratified"})).cells if c.shots == 5)
    assert five.sampler == "stratified/2"


def test_where_a_fine_tune_runs_is_not_part_of_its_id():
    """custom_resources pins a fine-tune's workers to some nodes; the same job elsewhere is the same
    cell. How many workers train it (the effective batch) is part of it, and the placement still
    reaches the job."""
    def finetunes(resources: dict[str, Any]) -> dict[int, Any]:
        raw = copy.deepcopy(BASE) | {"finetune": ["lora"], "recipes": {"decoder/lora": {"resources": resources}}}
        return {c.seed: c for c in build_plan(GridConfig.model_validate(raw)).cells if c.kind == "finetune"}

    plain, pinned = finetunes({}), finetunes({"custom_resources": {"trainer": 1}})
    assert [c.id for c in plain.values()] == [c.id for c in pinned.values()]
    assert pinned[0].recipe["resources"]["custom_resources"] == {"trainer": 1}
    assert finetunes({"num_workers": 2})[0].id != plain[0].id


def test_a_hub_model_s_revision_changes_the_id():
    hub = {"models.0.source": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert untuned_infer_id(hub | {"models.0.revision": "abc123"}) != untuned_infer_id(hub)


def test_float32_and_no_options_keep_the_ids_of_grids_written_before_runtime_was_hashed():
    explicit = untuned_infer_id({"models.0.dtype": "float32", "models.0.options": {"timeout_s": 9}})
    assert explicit == untuned_infer_id({})


def test_ids_are_the_sha256_of_the_fields_json_on_every_committed_grid():
    """The id is written a field at a time with memoized field texts (grid/plan.py); it must stay
    the sha256 of json.dumps(fields, sort_keys=True), or every results dir would be redone."""
    import hashlib
    import json

    from grid.config import load_config
    from grid.plan import _IN_ID_WHEN_SET, _NOT_IN_ID
    from tests.conftest import ROOT

    checked = 0
    for path in sorted((ROOT / "grids").glob("*.yaml")):
        for cell in build_plan(load_config(path)).cells:
            fields = {k: v for k, v in cell.__dict__.items()
                      if k not in _NOT_IN_ID and not (v is None and k in _IN_ID_WHEN_SET)}
            expected = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
            assert cell.id == expected, (path.name, cell.label())
            checked += 1
    assert checked > 500


def test_a_metrics_change_rescores_the_stored_answers_without_running_the_model(tmp_path):
    import pyarrow as pa

    from grid.execute import rescore_stale, test_rows
    from grid.store import Store

    raw = {"name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
           "tasks": ["fpb-sentiment"], "limits": {"test": 12}}
    (cell,) = build_plan(GridConfig.model_validate(raw)).cells
    store = Store.open(tmp_path / "r")
    rows = test_rows(cell, None)
    store.write_predictions(cell.id, pa.table({"example_id": [r["example_id"] for r in rows],
                                               "raw_output": ["positive"] * len(rows)}))
    parquet = (tmp_path / "r" / "cells" / cell.id / "predictions.parquet").read_bytes()
    store.write_cell(cell.id, {"cell_id": cell.id, "status": "done", "cell": cell.model_dump(),
                               "metrics": {"sentiment/accuracy": 0.0}, "scored_with": ["accuracy"]})
    plan = build_plan(GridConfig.model_validate(raw))
    assert rescore_stale(plan, store, None, store.states()) == [cell.id]
    record = store.read_cell(cell.id)
    right = sum(r["sentiment"] == "positive" for r in rows) / len(rows)
    assert record["metrics"]["sentiment/accuracy"] == pytest.approx(right)
    assert "sentiment/macro_f1" in record["metrics"] and record["scored_with"] == ["accuracy", "macro_f1"]
    assert (tmp_path / "r" / "cells" / cell.id / "predictions.parquet").read_bytes() == parquet
    assert rescore_stale(plan, store, None, store.states()) == []  # scored with today's metrics: left alone
