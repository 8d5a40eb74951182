"""`python -m grid`: tasks, prompt and score as a user runs them, and one-line errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from grid.data import load_split
from grid.parsing import format_answer
from grid.prompting import gold_of
from grid.tasks import get_task
from tests.conftest import run_cli


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_tasks_lists_kinds_labels_and_sizes():
    proc = run_cli("-m", "grid", "tasks")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "| massive-multi" in ln)
    assert "multi (JSON)" in line and "60, 56" in line and "11514" in line and "2974" in line


def test_prompt_prints_the_exact_text():
    proc = run_cli("-m", "grid", "prompt", "massive-intent", "--shots", "5", "--index", "0", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Beginning of <<Utter>>") == 6
    assert proc.stdout.strip().endswith("wake me up at five am this week\nEnd of <<Utter>>\n\nLabel:")
    again = run_cli("-m", "grid", "prompt", "massive-intent", "--shots", "5", "--index", "0", "--seed", "1")
    assert again.stdout == proc.stdout


def test_score_gold_answers_is_perfect(tmp_path):
    task = get_task("massive-multi")
    rows = load_split(task, "test").select(range(200)).to_list()
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"example_id": [r["example_id"] for r in rows],
                             "prediction": [format_answer(task, gold_of(task, r)) for r in rows]}), path)
    proc = run_cli("-m", "grid", "score", str(path), "--task", "massive-multi")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["intent/accuracy"] == 1.0 and metrics["slots/slot_f1"] == 1.0
    assert metrics["invalid_rate"] == 0.0 and metrics["n"] == 200


def test_score_of_a_grid_predictions_file_equals_its_cell(tmp_path):
    """The grid writes the model's text to raw_output and the parsed answer (JSON) to prediction:
    re-scoring such a file reads raw_output, as the cell's own scoring did."""
    task = get_task("fpb-sentiment")
    rows = load_split(task, "test").select(range(40)).to_list()
    golds = [gold_of(task, r) for r in rows]
    raw = [format_answer(task, g) if i % 4 else "no idea" for i, g in enumerate(golds)]  # 10 invalid
    path = tmp_path / "predictions.parquet"
    pq.write_table(pa.table({"cell_id": ["c"] * 40, "example_id": [r["example_id"] for r in rows],
                             "raw_output": raw, "prediction": [json.dumps(g) for g in golds]}), path)
    proc = run_cli("-m", "grid", "score", str(path), "--task", "fpb-sentiment")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["sentiment/accuracy"] == 0.75 and metrics["invalid_rate"] == 0.25


def test_unknown_task():
    assert_one_line_error(run_cli("-m", "grid", "prompt", "massive-intnet", "--index", "0"),
                          "unknown task 'massive-intnet'")


def test_missing_data_dir(tmp_path):
    assert_one_line_error(run_cli("-m", "grid", "tasks", "--data", str(tmp_path / "nope")), "does not exist")


def test_malformed_jsonl_line(tmp_path):
    (tmp_path / "massive_en_us").mkdir()
    (tmp_path / "massive_en_us" / "en-US.jsonl").write_text('{"id": "1"}\nnot json\n')
    assert_one_line_error(run_cli("-m", "grid", "prompt", "massive-intent", "--index", "0", "--data", str(tmp_path)),
                          "en-US.jsonl:1", "missing field")


def test_parquet_without_prediction(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"example_id": ["0"], "answer": ["alarm_set"]}), path)
    assert_one_line_error(run_cli("-m", "grid", "score", str(path), "--task", "massive-intent"),
                          "p.parquet", "missing column 'prediction'")


def test_parquet_with_an_unknown_example(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"example_id": ["0", "no-such-id"], "prediction": ["alarm_set", "x"]}), path)
    assert_one_line_error(run_cli("-m", "grid", "score", str(path), "--task", "massive-intent"),
                          "row 1", "no-such-id")


def test_not_a_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text("hello")
    assert_one_line_error(run_cli("-m", "grid", "score", str(path), "--task", "massive-intent"), "not a parquet")


def test_readers_never_create_a_results_dir(tmp_path):
    """`grid status`, a dry run and the query API read a results dir; a typo is an error (status,
    query) or an empty plan (dry run), and no folder appears."""
    import pytest

    from grid.errors import GridError
    from grid.query import cells

    typo = tmp_path / "resluts"
    status = run_cli("-m", "grid", "status", str(typo))
    assert status.returncode == 2 and "has no cells/ folder: no grid has run there" in status.stderr
    assert "Traceback" not in status.stderr
    dry = run_cli("-m", "grid", "run", "grids/smoke.yaml", "--results", str(typo), "--dry-run", "--num-cpus", "1")
    assert dry.returncode == 0, dry.stderr
    assert "cells: 7 in all, 0 done, 7 to do" in dry.stdout and "planned as if no cell had run" in dry.stderr
    with pytest.raises(GridError, match="no grid has run there"):
        cells(typo)
    assert not typo.exists()
