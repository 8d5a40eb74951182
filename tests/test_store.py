"""The store's scan of every cell record: what a resume and every query read first."""

from __future__ import annotations

import math
import re

from grid.store import CellState, Store


def test_the_scan_reads_every_record_whole_or_its_state_and_leaves_out_a_broken_file(tmp_path):
    store = Store.open(tmp_path / "r")
    done = {"cell_id": "a1", "status": "done", "scored_with": ["accuracy"], "metrics": {"x/accuracy": 0.5},
            "cell": {"kind": "infer", "limits": {"test": None}}}
    # json.dumps writes NaN; a long curve makes the file bigger than one read's chunk (64 KiB)
    diverged = {"cell_id": "b2", "status": "done", "cell": {"kind": "finetune"},
                "metrics": {"train_loss": math.nan, "curve": list(range(30_000))}}
    store.write_cell("a1", done)
    store.write_cell("b2", diverged)
    (tmp_path / "r" / "cells" / "c3").mkdir()  # a cell being written: no cell.json yet

    records = store.records()
    assert [r["cell_id"] for r in records] == ["a1", "b2"] and records[0] == done
    assert math.isnan(records[1]["metrics"]["train_loss"])
    assert store.states() == [CellState("a1", "done", ["accuracy"]), CellState("b2", "done", None)]
    assert store.statuses() == {"a1": "done", "b2": "done"}

    # a broken cell.json is left out (its cell runs again) and named, never the end of the scan
    broken = {'{"cell_id": "c3", "status": ': "not a cell record",  # cut short
              '{"cell_id": "c3"}': "not a cell record .*status"}
    path = tmp_path / "r" / "cells" / "c3" / "cell.json"
    for text, why in broken.items():
        path.write_text(text)
        assert store.statuses() == {"a1": "done", "b2": "done"}
        assert list(store.unreadable) == ["c3"] and re.search(f"cells/c3/cell.json: {why}", store.unreadable["c3"])
    path.write_text('{"cell_id": "c3", "status": "done"}')
    assert [r["cell_id"] for r in store.records()] == ["a1", "b2"]  # a record without its cell: no readers' KeyError
    assert "no cell" in store.unreadable["c3"] and "c3" in store.statuses()
    path.write_bytes(b'{"cell_id": "c3", "status": "done", "cell": {}, "x": "\xff"}')  # not UTF-8
    assert [r["cell_id"] for r in store.records()] == ["a1", "b2"] and "c3" in store.unreadable
    path.unlink()
    path.mkdir()  # a folder where the file should be
    assert [r["cell_id"] for r in store.records()] == ["a1", "b2"] and "c3" in store.unreadable


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


def test_status_and_report_name_a_broken_record_and_go_on(tmp_path):
    """A cell.json without its cell, and one that is a folder: `grid status` lists them as not run,
    `grid report` writes its report without them; neither stops on them."""
    from tests.conftest import run_cli

    store = Store.open(tmp_path / "r")
    store.write_cell("abc", {"cell_id": "abc", "status": "done"})
    (tmp_path / "r" / "cells" / "def" / "cell.json").mkdir(parents=True)
    status = run_cli("-m", "grid", "status", str(tmp_path / "r"))
    assert status.returncode == 0, status.stderr
    assert ("2 cell records could not be read" in status.stdout
            and "abc/cell.json: not a cell record (no cell)" in status.stdout)
    report = run_cli("-m", "grid", "report", str(tmp_path / "r"), "--out", str(tmp_path / "out"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "out" / "report.json").is_file() and "def/cell.json" in report.stderr
