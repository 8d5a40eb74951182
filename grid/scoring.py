"""Answers against a task's gold: the one rule for a row's gold and a raw answer's parse, used by a
cell as it finishes, by a re-score, and by `python -m grid score` on any predictions parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grid.data import label_sets, load_split
from grid.errors import GridError
from grid.metrics.label_scores import label_logprobs_column
from grid.metrics.score import score
from grid.parsing import Parsed, parse_answer
from grid.prompting import gold_of
from grid.tasks import TaskDef, get_task

REQUIRED = ("example_id", "prediction")


def golds_and_parsed(task: TaskDef, labels: dict[str, tuple[str, ...]], rows: list[dict[str, Any]],
                     raw_outputs: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Parsed]]]:
    """Each answer's gold (from its test row) and its parse against the task's label sets."""
    golds = [gold_of(task, row) for row in rows]
    parsed = [parse_answer(raw, task, labels, len(row["words"])) for raw, row in zip(raw_outputs, rows)]
    return golds, parsed


def score_parquet(path: str | Path, task_name: str, data_dir: str | None = None, split: str = "test") -> dict[str, Any]:
    """Metrics of the answers in a parquet, gold taken from the task by `example_id`.

    A grid's own predictions file holds the model's text in `raw_output` and the parsed answer
    as JSON in `prediction`: its `raw_output` is parsed again, and its `label_logprobs` (where
    the file has them) scored too, so the metrics equal the cell's. Any other file's
    `prediction` is the raw answer text."""
    task = get_task(task_name)
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: file does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise GridError(f"{path}: not a parquet file ({exc})") from None
    for column in REQUIRED:
        if column not in table.column_names:
            raise GridError(f"{path}: missing column {column!r} (has: {', '.join(table.column_names)})")
    rows = {r["example_id"]: r for r in load_split(task, split, data_dir).to_list()}
    labels = label_sets(task, data_dir)
    answers = table["raw_output" if "raw_output" in table.column_names else "prediction"].to_pylist()
    matched = []
    first: dict[str, int] = {}
    for i, eid in enumerate(table["example_id"].to_pylist()):
        row = rows.get(str(eid))
        if row is None:
            raise GridError(f"{path}: row {i}: example_id {eid!r} is not in the {split} split of {task_name}")
        if (j := first.setdefault(str(eid), i)) != i:  # one example counted twice would weigh twice
            raise GridError(f"{path}: rows {j} and {i} both answer example_id {eid!r}: one answer per example")
        matched.append(row)
    if not matched:
        raise GridError(f"{path}: no rows")
    golds, parsed = golds_and_parsed(task, labels, matched, ["" if raw is None else str(raw) for raw in answers])
    return score(task, golds, parsed, label_logprobs=label_logprobs_column(table))
