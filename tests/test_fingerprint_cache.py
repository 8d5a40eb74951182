"""The data fingerprints' on-disk cache (grid/data.py): a plan reads no rows when a task's files,
definition and reading code are as they were, and any change to a file is seen."""

from __future__ import annotations

import os

import pytest
import yaml

from grid import data
from grid.tasks import TaskDef
from tests.test_bad_inputs import ROW as ROWS
from tests.test_bad_inputs import TASK


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("CLFGRID_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data" / "d").mkdir(parents=True)
    (tmp_path / "data" / "d" / "train.jsonl").write_text(ROWS * 2)
    (tmp_path / "data" / "d" / "test.jsonl").write_text(ROWS)
    data._fingerprint.cache_clear()
    yield TaskDef.model_validate(yaml.safe_load(TASK)), tmp_path / "data"
    data._fingerprint.cache_clear()


def fresh(task, data_dir):
    """A new process's fingerprint: the in-process caches (fingerprints, rows) cleared."""
    for cached in (data._fingerprint, data._load_cached, data._split_rows):
        cached.cache_clear()
    return data.data_fingerprint(task, data_dir)


def test_a_cached_fingerprint_reads_no_rows_and_a_changed_file_is_read_again(setup, monkeypatch):
    task, data_dir = setup
    first = fresh(task, data_dir)
    assert data.fingerprint_cache_file().is_file()

    real = data._rows_fingerprint
    monkeypatch.setattr(data, "_rows_fingerprint", lambda *a: pytest.fail("the rows were read on a cache hit"))
    assert fresh(task, data_dir) == first

    monkeypatch.setattr(data, "_rows_fingerprint", real)
    train = data_dir / "d" / "train.jsonl"
    train.write_text(ROWS * 2 + '{"text": "dim the lights", "label": "iot"}\n')  # a new row
    second = fresh(task, data_dir)
    assert second != first
    stat = train.stat()
    train.write_text(train.read_text().replace("iot", "tv!"))  # same size: the modification time tells
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fresh(task, data_dir) not in (first, second)


def test_an_edited_definition_misses_the_cache_and_an_unreadable_cache_is_recomputed(setup):
    task, data_dir = setup
    first = fresh(task, data_dir)
    edited = TaskDef.model_validate(yaml.safe_load(TASK.replace("type: label}", "type: label, labels: [alarm, "
                                                                "music, weather]}")))
    assert fresh(edited, data_dir) != first
    data.fingerprint_cache_file().write_text("{not json")
    assert fresh(task, data_dir) == first
