"""Malformed data files and task YAML: one GridError line naming the file, row or field."""

from __future__ import annotations

from pathlib import Path

import pytest

from grid.data import label_sets, load_split
from grid.errors import GridError
from grid.tasks import load_task_file

BASE = """\
name: t
description: a test task
data:
  files: {train: d/train.jsonl, test: d/test.jsonl}
  read: {format: jsonl}
  text: text
  fields:
    label: {column: label}
    slots: {column: annot, annotation: bracket_slots}
subtasks:
  - {name: label, field: label, type: label}
  - {name: slots, field: slots, type: word_tags}
"""
GOOD = '{"text": "wake me at nine", "label": "alarm", "annot": "wake me at [time : nine]"}\n'


def make(tmp_path: Path, task: str = BASE, train: str = GOOD * 3, test: str = GOOD) -> Path:
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "train.jsonl").write_text(train)
    (tmp_path / "d" / "test.jsonl").write_text(test)
    path = tmp_path / "t.yaml"
    path.write_text(task)
    return path


def load(tmp_path: Path, **kw: str):
    task = load_task_file(make(tmp_path, **kw))
    load_split(task, "train", tmp_path)
    load_split(task, "test", tmp_path)
    return label_sets(task, tmp_path)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_the_good_task_loads(tmp_path):
    assert load(tmp_path) == {"label": ("alarm",), "slots": ("time", "Other")}


def test_missing_file(tmp_path):
    with pytest.raises(GridError) as exc:
        load(tmp_path, task=BASE.replace("d/test.jsonl", "d/nope.jsonl"))
    assert "nope.jsonl does not exist" in one_line(exc)


def test_missing_column(tmp_path):
    with pytest.raises(GridError) as exc:
        load(tmp_path, task=BASE.replace("column: label}", "column: intent}"))
    assert "train.jsonl" in one_line(exc) and "'intent'" in str(exc.value)


def test_unknown_format(tmp_path):
    with pytest.raises(GridError) as exc:
        load(tmp_path, task=BASE.replace("format: jsonl", "format: xml"))
    assert "t.yaml" in one_line(exc) and "data.read.format" in str(exc.value)


def test_label_not_in_the_label_set(tmp_path):
    task = BASE.replace("{name: label, field: label, type: label}",
                        "{name: label, field: label, type: label, labels: [music]}")
    with pytest.raises(GridError) as exc:
        load(tmp_path, task=task)
    assert "train.jsonl" in one_line(exc) and "row 1" in str(exc.value) and "'alarm'" in str(exc.value)


def test_empty_split(tmp_path):
    with pytest.raises(GridError) as exc:
        load(tmp_path, test="")
    assert "test" in one_line(exc) and ("empty" in str(exc.value) or "test.jsonl" in str(exc.value))


def test_unclosed_annotation(tmp_path):
    bad = GOOD.replace("[time : nine]", "[time : nine")
    with pytest.raises(GridError) as exc:
        load(tmp_path, train=GOOD + bad)
    assert "train.jsonl row 2" in one_line(exc) and "unbalanced bracket" in str(exc.value)


def test_a_subtask_field_must_be_declared(tmp_path):
    with pytest.raises(GridError) as exc:
        load(tmp_path, task=BASE.replace("field: slots,", "field: slot,"))
    assert "t.yaml" in one_line(exc) and "subtasks.1.field" in str(exc.value)


def test_a_misspelt_metric_fails_when_the_task_loads(tmp_path):
    """Not inside scoring, after a model has answered: then every answer of its cells was lost."""
    with pytest.raises(GridError) as exc:
        load_task_file(make(tmp_path, task=BASE + "metrics: [accuracy, macro-f1]\n"))
    assert "t.yaml" in one_line(exc) and "metrics.1" in str(exc.value) and "macro_f1" in str(exc.value)


def test_a_metric_without_its_kind_of_subtask_fails_when_the_task_loads(tmp_path):
    with pytest.raises(GridError) as exc:
        load_task_file(make(tmp_path, task=BASE + "metrics: [accuracy, rouge]\n"))
    assert "t.yaml" in one_line(exc) and "rouge needs a text sub-task" in str(exc.value)


def test_bad_bio_tag_names_the_row(tmp_path):
    from grid.annotations import bio_tags

    with pytest.raises(GridError, match=r"f.txt row 3: 'X-time' is not a BIO tag"):
        bio_tags("O X-time", 2, "f.txt row 3")


def test_a_row_of_a_globbed_split_is_named_in_its_own_file(tmp_path):
    task = BASE.replace("d/train.jsonl", "d/train.part*.jsonl")
    make(tmp_path, task=task)
    (tmp_path / "d" / "train.part1.jsonl").write_text(GOOD * 2)
    (tmp_path / "d" / "train.part2.jsonl").write_text(GOOD + GOOD.replace("[time : nine]", "[time : nine"))
    with pytest.raises(GridError) as exc:
        load_split(load_task_file(tmp_path / "t.yaml"), "train", tmp_path)
    assert "train.part2.jsonl row 2: unbalanced bracket" in one_line(exc)


WORD_TAGS = """\
name: t
data:
  files: {train: d/train.jsonl, test: d/test.jsonl}
  read: {format: jsonl}
  text: tokens
  fields:
    ner: {column: tags, annotation: tags}
    polarity: {column: y, names: [neg, pos]}
subtasks:
  - {name: ner, field: ner, type: word_tags}
  - {name: polarity, field: polarity, type: label}
"""
WT_ROW = '{"tokens": ["Acme", "Corp", "fell"], "tags": ["ORG", "ORG", "O"], "y": 0}\n'


def test_word_and_tag_columns(tmp_path):
    task = load_task_file(make(tmp_path, task=WORD_TAGS, train=WT_ROW, test=WT_ROW))
    row = load_split(task, "test", tmp_path)[0]
    assert (row["text"], row["words"], row["ner"], row["polarity"]) == (
        "Acme Corp fell", ["Acme", "Corp", "fell"], ["ORG", "ORG", "Other"], "neg")


def test_an_index_outside_names_is_named(tmp_path):
    task = load_task_file(make(tmp_path, task=WORD_TAGS, train=WT_ROW + WT_ROW.replace('"y": 0', '"y": -1'),
                               test=WT_ROW))
    with pytest.raises(GridError) as exc:
        load_split(task, "train", tmp_path)
    assert "train.jsonl row 2: field polarity: -1 is not an index into names (0..1)" in one_line(exc)


def test_repeated_example_ids(tmp_path):
    """Predictions and paired tests join on example_id: a split whose id column repeats is refused
    (FOMC's `index` column did: 476 test rows, 417 values)."""
    rows = ['{"id": "a", "text": "x", "label": "alarm", "annot": "x"}\n',
            '{"id": "b", "text": "y", "label": "alarm", "annot": "y"}\n',
            '{"id": "a", "text": "z", "label": "alarm", "annot": "z"}\n']
    with pytest.raises(GridError) as exc:
        load(tmp_path, task=BASE.replace("  text: text\n", "  id: id\n  text: text\n"), train="".join(rows))
    msg = one_line(exc)
    assert "train.jsonl" in msg and "rows 1 and 3 share the id 'a'" in msg
