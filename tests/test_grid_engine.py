"""The grid engine end to end on a real local Ray: run (and its provenance record), resume, add a
seed, a damaged file, a fine-tune killed and resumed from its checkpoint, and units in parallel.
The driver killed at random and resumed: tests/test_kills.py; `ray job submit` to a real head:
tests/test_multinode.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from grid.provenance import report_provenance
from grid.query import cells, metrics, predictions
from grid.store import Store
from tests.conftest import ROOT, run_cli

TINY = {"name": "tiny-llama", "source": "tiny:llama", "family": "decoder", "prompt_format": "chat"}


def write_grid(path: Path, **overrides) -> Path:
    grid = {"name": "t", "models": [TINY], "tasks": ["massive-intent", "20ng-7"], "shots": [0, 5],
            "decoding": {"mode": "free", "max_new_tokens": 8}, "limits": {"test": 12}, "text_budget": 48,
            "inference": {"batch_size": 4}}
    grid.update(overrides)
    path.write_text(yaml.safe_dump(grid))
    return path


def file_hashes(results: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(results)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(results.rglob("*")) if p.is_file()}


def ran(proc) -> tuple[int, int]:
    match = re.search(r"ran (\d+) cells \((\d+) already done\)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return int(match.group(1)), int(match.group(2))


# --- run, rerun, add a seed ----------------------------------------------------------------

@pytest.mark.slow
def test_run_rerun_and_add_a_seed(tmp_path):
    config = write_grid(tmp_path / "grid.yaml")
    results = tmp_path / "results"
    first = run_cli("grid/run.py", str(config), "--results", str(results))
    assert first.returncode == 0, first.stderr
    assert ran(first) == (4, 0)
    assert "progress: cells" in first.stderr and "examples/s" in first.stderr
    # the run ends with its cells' metrics: accuracy, its CI and the majority rate it must clear
    assert re.search(r"intent/accuracy=[0-9.]+ \[[0-9.]+, [0-9.]+\] \(majority [0-9.]+\)", first.stdout), first.stdout

    table = cells(results).collect()
    assert table.height == 4 and set(table["status"]) == {"done"}
    preds = predictions(results).collect()
    assert preds.height == 4 * 12
    assert {"cell_id", "example_id", "prompt_hash", "raw_output", "prediction", "gold", "valid",
            "invalid_reason", "n_prompt_tokens", "n_output_tokens", "latency_s"} <= set(preds.columns)
    assert preds["n_prompt_tokens"].min() > 0
    acc = metrics(results).filter(pl.col("metric").str.ends_with("/accuracy")).collect()
    assert acc.height == 4

    # the run's provenance record (grid/provenance.py): what it ran, its command, the grid's bytes
    (run_file,) = sorted((results / "runs").glob("*.json"))
    record = json.loads(run_file.read_text())
    assert record["ran"] == sorted(table["cell_id"]) and record["failed"] == [] and record["already_done"] == []
    assert record["wall_s"] > 0 and record["finished_at"] >= record["started_at"]
    assert record["command"] == f"python grid/run.py {config} --results {results}"
    assert record["grid_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()

    before = file_hashes(results)
    again = run_cli("grid/run.py", str(config), "--results", str(results))
    assert again.returncode == 0 and ran(again) == (0, 4)
    assert file_hashes(results) == before  # no work, no file touched: no run record either
    prov = report_provenance(Store.open(results, create=False), [json.loads(p.read_text())
                                                                 for p in results.glob("cells/*/cell.json")])
    assert len(prov["runs"]) == 1 and set(prov["cell_seconds"]) == set(table["cell_id"])
    assert prov["cell_seconds_total"] > 0

    write_grid(config, seeds=[0, 1])
    more = run_cli("grid/run.py", str(config), "--results", str(results))
    assert more.returncode == 0 and ran(more) == (4, 4)
    after = file_hashes(results)
    assert all(after[k] == v for k, v in before.items())  # the old cells were not rewritten

    status = run_cli("-m", "grid", "status", str(results))
    assert status.returncode == 0 and "cells: 8 in all, 8 done, 0 to do, 0 failed" in status.stdout
    assert "intent/accuracy=" in status.stdout

    # a predictions file damaged after it was written: the next run does that cell again, alone
    victim = sorted(results.glob("cells/*/predictions.parquet"))[0]
    answers = pq.read_table(victim, columns=["example_id", "raw_output"]).to_pylist()
    victim.write_bytes(victim.read_bytes()[:100])  # cut short
    redo = run_cli("grid/run.py", str(config), "--results", str(results))
    assert redo.returncode == 0 and ran(redo) == (1, 7), redo.stdout + redo.stderr[-2000:]
    assert f"running again: {victim}: not a parquet file (100 bytes)" in redo.stderr
    assert pq.read_table(victim, columns=["example_id", "raw_output"]).to_pylist() == answers


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    config = write_grid(tmp_path / "grid.yaml", seeds=[0, 1])
    proc = run_cli("grid/run.py", str(config), "--results", str(tmp_path / "r"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "cells: 8 in all, 0 done, 8 to do, 0 failed" in proc.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing, not even the results dir


# --- kill a training cell midway -----------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_a_finetune_cell_resumes_from_its_checkpoint(tmp_path):
    config = write_grid(
        tmp_path / "grid.yaml", tasks=["massive-intent"], shots=[0], finetune=["full"],
        limits={"test": 4, "train": 200},
        recipes={"decoder/full": {"hparams": {"max_steps": 30, "batch_size": 4, "lr": 1e-3,
                                              "checkpoint_every_steps": 6, "max_length": 1024}}})
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "grid/run.py", str(config), "--results", str(results)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and not list(results.glob("cells/*/checkpoints/step_*")):
        time.sleep(0.2)
    time.sleep(1)  # let the checkpoint's files land before the kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(results.glob("cells/*/checkpoints/step_*")), "a checkpoint should exist before the kill"
    assert not list(results.glob("cells/*/cell.json")), "the kill should land during training"

    resumed = run_cli("grid/run.py", str(config), "--results", str(results))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finetune = cells(results).filter(pl.col("kind") == "finetune").collect()
    assert finetune["status"].to_list() == ["done"]
    record = json.loads(next(results.glob(f"cells/{finetune['cell_id'][0]}/cell.json")).read_text())
    assert 0 < record["metrics"]["resumed_from_step"] < 30  # from the checkpoint, not from step 0
    assert record["metrics"]["steps"] == 30


# --- units in parallel -----------------------------------------------------------------------

@pytest.mark.slow
def test_parallel_units_overlap_on_a_real_ray(tmp_path):
    """With `parallel: 2` the base model's cells and a fine-tune run at the same time on Ray, and
    the fine-tuned model's cells wait for their fine-tune. (The order with `parallel: 1`, and every
    other case of the scheduler, is tested on plain functions: tests/test_schedule.py.)"""
    config = write_grid(tmp_path / "p2.yaml", parallel=2, tasks=["massive-intent"], shots=[0],
                        finetune=["none", "lora"], limits={"test": 24, "train": 64},
                        recipes={"decoder/lora": {"hparams": {"max_steps": 12, "batch_size": 4, "lr": 1e-3,
                                                              "max_length": 1024}}})
    proc = run_cli("grid/run.py", str(config), "--results", str(tmp_path / "p2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "p2").glob("cells/*/cell.json")]
    assert {r["status"] for r in records} == {"done"} and len(records) == 3
    span = {("base" if r["cell"]["finetune"] == "none" else r["cell"]["kind"]):
            (r["started_at"], r["finished_at"]) for r in records}
    assert span["infer"][0] >= span["finetune"][1]  # the tuned model's cells after its fine-tune
    assert span["base"][0] < span["finetune"][1] and span["finetune"][0] < span["base"][1]  # they overlapped


def test_a_model_that_cannot_load_fails_its_own_cells_and_the_grid_finishes(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    config = write_grid(tmp_path / "grid.yaml", shots=[0], tasks=["massive-intent"],
                        models=[TINY, {"name": "broken", "source": str(broken), "family": "decoder",
                                       "prompt_format": "plain"}])
    results = tmp_path / "results"
    proc = run_cli("grid/run.py", str(config), "--results", str(results))
    assert proc.returncode == 1, proc.stderr[-3000:]  # something failed, and the run said so
    assert "ran 2 cells (0 already done), 1 failed" in proc.stdout
    table = {r["model"]: r for r in cells(results).collect().to_dicts()}
    assert table["tiny-llama"]["status"] == "done"
    assert table["broken"]["status"] == "failed"
    error = table["broken"]["error"]
    assert "\n" not in error and "tokenizer" in error, error  # the folder has no tokenizer: why it failed
