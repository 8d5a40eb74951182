"""Inference chunks: grouped by request length, answers put back in the cell's order."""

from __future__ import annotations

import json
from types import SimpleNamespace

from grid.execute import chunk_rows, in_cell_order


def test_chunks_group_by_length_and_answers_come_back_in_order():
    lengths = [90, 5, 60, 7, 80, 6, 70]
    items = [{"prompt": "x" * n, "example_id": str(i)} for i, n in enumerate(lengths)]
    cell = SimpleNamespace(items=items, cell=SimpleNamespace(id="c1"))
    rows = chunk_rows([cell], 3)
    chunks = [[it["prompt"] for it in json.loads(r["items"])] for r in rows]
    assert [[len(p) for p in c] for c in chunks] == [[5, 6, 7], [60, 70, 80], [90]]
    assert rows == chunk_rows([cell], 3)  # cut the same way on every run
    # answers come back chunk by chunk, in any order; the cell gets them in its own order
    answers = {r["chunk"]: [{"raw_output": it["example_id"]} for it in json.loads(r["items"])] for r in reversed(rows)}
    indices = {r["chunk"]: json.loads(r["index"]) for r in rows}
    assert [a["raw_output"] for a in in_cell_order(answers, indices)] == [str(i) for i in range(len(items))]
