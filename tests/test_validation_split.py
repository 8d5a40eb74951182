"""A dataset's own validation split (issue 33, item 6): declared in the common train/valid/test
folder layout with seq.in / seq.out / label files, listed by `grid tasks`, read by `load_split`,
and held out by a search in place of rows carved from train; a task without one is refused by name
when asked for it, and its data fingerprint (so its cell ids) is what it was."""

from __future__ import annotations

import random
import shutil

import pytest
from pydantic import ValidationError

from grid.data import data_fingerprint, data_splits, load_split
from grid.dataspec import DataSpec
from grid.errors import GridError
from grid.jobs import Validation
from grid.tasks import load_task_file
from tests.conftest import run_cli
from tests.test_custom_task import TASK_YAML, write_split
from tests.test_fingerprint_cache import fresh
from workers.training import split_validation

WITH_VALID = TASK_YAML.replace("name: toy-atis", "name: toy-atis-valid").replace(
    "files: {train: toy_atis/train, test: toy_atis/test}",
    "files: {train: toy_atis/train, validation: toy_atis/valid, test: toy_atis/test}")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("CLFGRID_CACHE", str(tmp_path / "cache"))
    rng = random.Random(3)
    data, tasks = tmp_path / "data", tmp_path / "tasks"
    for split, n in (("train", 30), ("valid", 9), ("test", 12)):
        write_split(data / "toy_atis" / split, n, rng)
    tasks.mkdir()
    (tasks / "toy-atis-valid.yaml").write_text(WITH_VALID)
    (tasks / "toy-atis.yaml").write_text(TASK_YAML)
    return data, tasks


def test_the_declared_validation_split_is_read_listed_and_held_out(folders):
    data, tasks = folders
    task = load_task_file(tasks / "toy-atis-valid.yaml")
    assert task.data.has_validation and data_splits(task) == ("train", "validation", "test")
    valid = load_split(task, "validation", data)
    assert len(valid) == 9 and valid[0]["example_id"] == "validation-00000"
    assert {"intent", "slots"} <= set(valid.column_names)

    # a search holds out the dataset's own rows and trains on every train row
    train = load_split(task, "train", data)
    fit, held, record = split_validation(train, Validation(fraction=0.2, seed=0), valid)
    assert len(fit) == 30 and held["example_id"] == valid["example_id"]
    assert record["split"] == "validation" and record["rows"] == 9 and record["train_rows"] == 30
    # without one, the rows are carved from train as before
    fit, held, record = split_validation(train, Validation(fraction=0.2, seed=0))
    assert len(fit) + len(held) == 30 and not set(fit["example_id"]) & set(held["example_id"])
    assert "split" not in record and record["fraction"] == 0.2

    listed = run_cli("-m", "grid", "tasks", "toy-atis-valid", "--tasks", str(tasks), "--data", str(data))
    assert listed.returncode == 0, listed.stderr
    header, _, row = listed.stdout.splitlines()[:3]
    fields = dict(zip([h.strip() for h in header.split("|")], [v.strip() for v in row.split("|")]))
    assert (fields["train"], fields["test"], fields["validation"]) == ("30", "12", "9")


def test_a_task_without_one_is_refused_by_name_and_keeps_its_fingerprint(folders):
    data, tasks = folders
    plain, valid = load_task_file(tasks / "toy-atis.yaml"), load_task_file(tasks / "toy-atis-valid.yaml")
    assert not plain.data.has_validation and data_splits(plain) == ("train", "test")
    with pytest.raises(GridError, match="task toy-atis declares no validation split"):
        load_split(plain, "validation", data)
    # the validation rows are part of the declaring task's data identity (so of its cell ids), and
    # only of it: new validation rows move its fingerprint, not that of the task on the same files
    before = data_fingerprint(plain, data), data_fingerprint(valid, data)
    shutil.rmtree(data / "toy_atis" / "valid")
    write_split(data / "toy_atis" / "valid", 9, random.Random(99))
    after = fresh(plain, data), fresh(valid, data)
    assert after[0] == before[0] and after[1] != before[1]


@pytest.mark.parametrize("block, error", [
    ({"files": {"train": "a", "validation": "b"}}, "give train and test"),
    ({"files": {"train": "a", "validation": "b", "test": "c"},
      "hub": {"path": "x/y", "splits": {"train": "train", "test": "test"}}}, "agree on a validation split"),
    ({"files": {"all": "a"}, "split": {"partition": "p", "values": {"train": "t", "validation": "t", "test": "s"}}},
     "its own value"),
    ({"files": {"all": "a"}, "split": {"partition": "p", "values": {"train": "t"}}}, "train and test"),
])
def test_a_validation_split_declared_wrong_is_one_error(block, error):
    with pytest.raises(ValidationError, match=error):
        DataSpec.model_validate({"read": {"format": "jsonl"}, "text": "t", "fields": {"y": {"column": "y"}}, **block})


def test_a_partition_value_declares_it_too():
    spec = DataSpec.model_validate({"files": {"all": "a"}, "read": {"format": "jsonl"}, "text": "t",
                                    "fields": {"y": {"column": "y"}},
                                    "split": {"partition": "p", "values": {"train": "tr", "validation": "dev",
                                                                           "test": "te"}}})
    assert spec.has_validation
