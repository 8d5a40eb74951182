"""The store's scan of every cell record: what a resume and every query read first."""

from __future__ import annotations

import math

import pytest

from grid.errors import GridError
from grid.store import CellState, Store


def test_the_scan_reads_every_record_whole_or_its_state_and_names_a_broken_file(tmp_path):
    store = Store.open(tmp_path / "r")
    done = {"cell_id": "a1", "status": "done", "scored_with": ["accuracy"], "metrics": {"x/accuracy": 0.5},
            "cell": {"kind": "infer", "limits": {"test": None}}}
    # json.dumps writes NaN; a long curve makes the file bigger than one read's chunk (64 KiB)
    diverged = {"cell_id": "b2", "status": "done", "metrics": {"train_loss": math.nan, "curve": list(range(30_000))}}
    store.write_cell("a1", done)
    store.write_cell("b2", diverged)
    (tmp_path / "r" / "cells" / "c3").mkdir()  # a cell being written: no cell.json yet

    records = store.records()
    assert [r["cell_id"] for r in records] == ["a1", "b2"] and records[0] == done
    assert math.isnan(records[1]["metrics"]["train_loss"])
    assert store.states() == [CellState("a1", "done", ["accuracy"]), CellState("b2", "done", None)]
    assert store.statuses() == {"a1": "done", "b2": "done"}

    (tmp_path / "r" / "cells" / "c3" / "cell.json").write_text('{"cell_id": "c3", "status": ')
    with pytest.raises(GridError, match=r"cells/c3/cell.json: not a cell record"):
        store.states()
    (tmp_path / "r" / "cells" / "c3" / "cell.json").write_text('{"cell_id": "c3"}')  # no status
    with pytest.raises(GridError, match=r"cells/c3/cell.json: not a cell record .*status"):
        store.statuses()


def test_a_prefetched_scan_is_what_states_returns_once_and_the_collector_is_back_on_after(tmp_path):
    import gc

    store = Store.open(tmp_path / "r")
    store.write_cell("a1", {"cell_id": "a1", "status": "done"})
    store.prefetch_states()
    store.write_cell("b2", {"cell_id": "b2", "status": "failed"})  # may or may not be in the prefetch
    first = store.states()
    assert first[0] == CellState("a1", "done") and len(first) in (1, 2)
    assert store.states() == [CellState("a1", "done"), CellState("b2", "failed")]  # read again, whole
    assert gc.isenabled()
