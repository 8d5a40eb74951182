"""`python -m grid compare`: two results dirs, cell by cell."""

from __future__ import annotations

import shutil

import pyarrow as pa

from grid.compare import compare, describe
from grid.store import Store
from tests.conftest import run_cli


def write(store: Store, cell_id: str, answers: list[str], accuracy: float, seconds: float = 1.0) -> None:
    store.write_predictions(cell_id, pa.table({
        "cell_id": [cell_id] * len(answers), "example_id": [f"ex{i}" for i in range(len(answers))],
        "raw_output": answers, "prediction": [f'{{"label": "{a}"}}' for a in answers]}))
    store.write_cell(cell_id, {"cell_id": cell_id, "status": "done", "seconds": seconds,
                               "cell": {"kind": "infer", "task": "sst2"},
                               "metrics": {"label/accuracy": accuracy, "examples_per_s": 1 / seconds}})


def test_equal_dirs_differ_only_in_timing(tmp_path):
    a = Store.open(tmp_path / "a")
    write(a, "c1", ["positive", "negative"], 0.5)
    write(a, "c2", ["negative", "negative"], 1.0)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    write(Store.open(tmp_path / "b"), "c2", ["negative", "negative"], 1.0, seconds=9.0)  # slower, same answers
    diff = compare(tmp_path / "a", tmp_path / "b")
    assert diff.equal, describe(diff, "a", "b")
    proc = run_cli("-m", "grid", "compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert proc.returncode == 0 and "the same cells, answers and metrics" in proc.stdout


def test_every_kind_of_difference_is_named(tmp_path):
    a, b = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    write(a, "c1", ["positive", "negative"], 0.5)
    write(b, "c1", ["positive", "positive"], 1.0)
    write(a, "gone", ["x"], 0.0)
    write(b, "new", ["x"], 0.0)
    write(a, "broke", ["x"], 0.0)
    b.write_cell("broke", {"cell_id": "broke", "status": "failed", "cell": {"kind": "infer"}, "error": "boom"})
    diff = compare(tmp_path / "a", tmp_path / "b")
    assert diff.only_a == ["gone"] and diff.only_b == ["new"] and diff.status == {"broke": ("done", "failed")}
    assert diff.answers == {"c1": 1} and diff.metrics == {"c1": {"label/accuracy": (0.5, 1.0)}}
    proc = run_cli("-m", "grid", "compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert proc.returncode == 1 and "c1: 1 examples answered differently" in proc.stdout


def test_log_prob_metrics_equal_within_their_last_digits():
    """A rerun batches examples otherwise: log-prob metrics move in the 8th digit, answers do not."""
    from grid.compare import same_number

    assert same_number(-3.6083321571350098, -3.608332157135011)
    assert not same_number(-3.6083, -3.6084) and not same_number(0.5, 1.0)
    assert same_number(None, None) and not same_number(1.0, None) and same_number(3, 3)


def test_a_resumed_fine_tune_is_compared_without_its_run_figures(tmp_path):
    """After a kill the rerun resumes from a checkpoint: it ran and averaged other steps (as
    benchmarks/kill_at_random.py found); its other numbers are still compared."""
    a, b = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    cell = {"kind": "finetune"}
    base = {"steps": 10, "world_size": 1}
    a.write_cell("ft", {"cell_id": "ft", "status": "done", "cell": cell, "metrics": base | {
        "resumed_from_step": 0, "steps_run": 10, "train_loss": 7.35, "first_loss": 7.73}})
    b.write_cell("ft", {"cell_id": "ft", "status": "done", "cell": cell, "metrics": base | {
        "resumed_from_step": 4, "steps_run": 6, "train_loss": 7.33, "first_loss": 7.35}})
    assert compare(tmp_path / "a", tmp_path / "b").equal
    b.write_cell("ft", {"cell_id": "ft", "status": "done", "cell": cell, "metrics": base | {
        "resumed_from_step": 0, "steps_run": 10, "train_loss": 7.33, "first_loss": 7.73}})
    assert compare(tmp_path / "a", tmp_path / "b").metrics == {"ft": {"train_loss": (7.35, 7.33)}}
