"""Answer parsing on real rows: canonical answers round-trip, bad answers are invalid with a reason."""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from grid.data import label_sets, load_split
from grid.parsing import Parsed, format_answer, parse_answer
from grid.tasks import TaskDef, catalog, get_task


@pytest.fixture(scope="module")
def intent():
    task = get_task("massive-intent")
    return task, label_sets(task)


@pytest.fixture(scope="module")
def slots():
    task = get_task("massive-slots")
    return task, label_sets(task)


@pytest.fixture(scope="module")
def multi():
    task = get_task("massive-multi")
    return task, label_sets(task)


def _assert_shape(out: dict[str, Parsed], task: TaskDef) -> None:
    assert list(out) == [s.name for s in task.subtasks]
    for p in out.values():
        assert isinstance(p, Parsed)
        if p.valid:
            assert p.reason is None and p.value is not None
        else:
            assert isinstance(p.reason, str) and p.reason


# --- round trip on every task ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(catalog()))
def test_format_parse_round_trip_on_real_rows(name):
    task = get_task(name)
    labels = label_sets(task)
    rows = load_split(task, "test")
    fields = {s.field for s in task.subtasks} | {"words"}
    columns = {f: rows[f] for f in fields}
    assert len(rows) > 400
    for i in range(len(rows)):
        row = {f: columns[f][i] for f in fields}
        text = format_answer(task, row)
        out = parse_answer(text, task, labels, len(row["words"]))
        for sub in task.subtasks:
            got = out[sub.name]
            assert got.valid, (name, i, text, got)
            gold = row[sub.field]
            want = gold[0] if sub.type == "text" and isinstance(gold, list) else gold  # first reference
            assert got.value == want, (name, i, text, got)


def test_format_answer_forms(multi, slots, intent):
    task, _ = multi
    gold = {"intent": "alarm_set", "slots": ["Other", "time", "time"]}
    assert format_answer(task, gold) == '{"task1": "alarm_set", "task2": ["Other", "time", "time"]}'
    assert format_answer(slots[0], gold) == '["Other", "time", "time"]'
    assert format_answer(intent[0], gold) == "alarm_set"


# --- label answers --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    "alarm_set", " alarm_set\n", "Alarm_Set", '"alarm_set"', "'alarm_set'", "`alarm_set`",
    "alarm_set.", "Label: alarm_set", "label:  `ALARM_SET`.", "```\nalarm_set\n```",
])
def test_label_normalized_matches(intent, raw):
    task, labels = intent
    out = parse_answer(raw, task, labels, None)
    _assert_shape(out, task)
    assert out["intent"] == Parsed("alarm_set", True, None)


@pytest.mark.parametrize("raw, reason", [
    ("", "empty answer"),
    ("   \n\t", "empty answer"),
    (None, "empty answer"),
    ("Label:", "empty answer"),
    ("I think the user wants to set an alarm.", "not in the label set"),
    ("alarm_sett", "label 'alarm_sett' not in the label set"),
    ("weather", "not in the label set"),
    ('{"task1": "alarm_set"}', "not in the label set"),
    ("alarm_set alarm_query", "not in the label set"),
])
def test_label_invalid(intent, raw, reason):
    task, labels = intent
    out = parse_answer(raw, task, labels, None)
    _assert_shape(out, task)
    assert out["intent"].valid is False
    assert out["intent"].value is None
    assert reason in out["intent"].reason


def test_label_ambiguous_normal_form_needs_the_exact_label():
    task = get_task("massive-intent")
    labels = {"intent": ("yes", "Yes", "no")}
    assert parse_answer("Yes", task, labels, None)["intent"].value == "Yes"
    assert parse_answer("yes", task, labels, None)["intent"].value == "yes"
    assert not parse_answer("YES", task, labels, None)["intent"].valid
    assert parse_answer("NO.", task, labels, None)["intent"].value == "no"


# --- word tags ------------------------------------------------------------------------------

TAGS = ["Other", "Other", "Other", "Other", "time", "time", "date", "date"]


@pytest.mark.parametrize("raw", [
    json.dumps(TAGS),
    str(TAGS),  # a Python literal, single quotes
    " ".join(TAGS),
    ", ".join(TAGS),
    "[" + ", ".join(TAGS) + "]",
    "Slots: " + json.dumps(TAGS),
    "```json\n" + json.dumps(TAGS) + "\n```",
    "Here are the slots: " + json.dumps(TAGS) + " Done.",
    json.dumps([t.upper() for t in TAGS]),
])
def test_word_tags_accepted_forms(slots, raw):
    task, labels = slots
    out = parse_answer(raw, task, labels, len(TAGS))
    _assert_shape(out, task)
    assert out["slots"] == Parsed(TAGS, True, None)


def test_word_tags_wrong_count_keeps_the_list(slots):
    task, labels = slots
    short = parse_answer(json.dumps(TAGS[:6]), task, labels, 8)["slots"]
    assert short == Parsed(TAGS[:6], False, "expected 8 word tags, got 6")
    long = parse_answer(json.dumps(TAGS + ["Other"]), task, labels, 8)["slots"]
    assert long == Parsed(TAGS + ["Other"], False, "expected 8 word tags, got 9")
    empty = parse_answer("[]", task, labels, 8)["slots"]
    assert empty == Parsed([], False, "expected 8 word tags, got 0")
    # no length check without a word count
    assert parse_answer(json.dumps(TAGS[:6]), task, labels, None)["slots"].valid


def test_word_tags_unknown_tag_is_kept_in_place(slots):
    """An unknown tag stays as written, so scoring counts it as a wrong slot (as MASSIVE does)."""
    from grid.metrics.slots import slot_f1

    task, labels = slots
    raw = json.dumps(["Other", "alarm", "time", 3])
    got = parse_answer(raw, task, labels, 4)["slots"]
    assert got.valid is False
    assert got.value == ["Other", "alarm", "time", "3"]
    assert "'alarm'" in got.reason and "not in the label set" in got.reason
    # the gold's one slot is found, and "alarm" and "3" are two false positives: P 1/3, R 1
    assert slot_f1([["Other", "Other", "time", "Other"]], [got.value]) == pytest.approx(0.5)
    both = parse_answer(json.dumps(["alarm", "time"]), task, labels, 3)["slots"]
    assert both.value == ["alarm", "time"]
    assert "not in the label set" in both.reason and "expected 3 word tags, got 2" in both.reason


@pytest.mark.parametrize("raw, reason", [
    ("", "empty answer"),
    ("Slots:", "empty answer"),
    ("The word nine am is a time.", "not a list of word tags"),
    ('["Other", "time", "ti', "not a list of word tags"),
    ("Other time blah", "not a list of word tags"),
    ('{"slots": "time"}', "not a list of word tags"),
])
def test_word_tags_unparseable(slots, raw, reason):
    task, labels = slots
    got = parse_answer(raw, task, labels, 3)["slots"]
    assert got.valid is False and got.value is None
    assert reason in got.reason


# --- multi-task JSON ------------------------------------------------------------------------

GOOD = '{"task1": "alarm_set", "task2": ["Other", "time", "time"]}'


@pytest.mark.parametrize("raw", [
    GOOD,
    "```json\n" + GOOD + "\n```",
    "```\n" + GOOD + "```",
    "Output: " + GOOD,
    "Sure, here it is:\n" + GOOD + "\nLet me know if you need more {help}.",
    "{'task1': 'alarm_set', 'task2': ['Other', 'time', 'time']}",
    '{"task1": "Alarm_Set.", "task2": "Other time time"}',
    '{"task1": "alarm_set", "task2": "[\\"Other\\", \\"time\\", \\"time\\"]"}',
    '{"Task1": "alarm_set", "TASK2": ["Other", "time", "time"]}',
    '{"task2": ["Other", "time", "time"], "task1": "alarm_set"}',
])
def test_multi_accepted_forms(multi, raw):
    task, labels = multi
    out = parse_answer(raw, task, labels, 3)
    _assert_shape(out, task)
    assert out["intent"] == Parsed("alarm_set", True, None)
    assert out["slots"] == Parsed(["Other", "time", "time"], True, None)


@pytest.mark.parametrize("raw, reason", [
    ("", "empty answer"),
    ("alarm_set", "not valid JSON"),
    ("The intent is alarm_set and the slots are Other time time.", "not valid JSON"),
    ('{"task1": "alarm_set", "task2": ["Other", "time"', "not valid JSON"),
    ('{"task1": "alarm_set" "task2": ["Other", "time", "time"]}', "not valid JSON"),
    ('{task1: alarm_set}', "not valid JSON"),
    ('["alarm_set", ["Other", "time", "time"]]', "not valid JSON"),
])
def test_multi_broken_json_invalidates_every_subtask(multi, raw, reason):
    task, labels = multi
    out = parse_answer(raw, task, labels, 3)
    _assert_shape(out, task)
    for p in out.values():
        assert p.valid is False and p.value is None
        assert reason in p.reason


def test_multi_missing_key_and_bad_values(multi):
    task, labels = multi
    out = parse_answer('{"task1": "alarm_set"}', task, labels, 3)
    assert out["intent"] == Parsed("alarm_set", True, None)
    assert out["slots"] == Parsed(None, False, "missing key task2")

    out = parse_answer('{"task2": ["Other", "time", "time"]}', task, labels, 3)
    assert out["intent"] == Parsed(None, False, "missing key task1")
    assert out["slots"].valid

    out = parse_answer('{"task1": "set_alarm", "task2": ["Other", "time"]}', task, labels, 3)
    assert out["intent"] == Parsed(None, False, "label 'set_alarm' not in the label set")
    assert out["slots"] == Parsed(["Other", "time"], False, "expected 3 word tags, got 2")

    out = parse_answer('{"task1": ["alarm_set"], "task2": 7}', task, labels, 3)
    assert out["intent"] == Parsed(None, False, "task1: expected a string, got a list")
    assert out["slots"] == Parsed(None, False, "task2: expected a list of word tags, got a number")

    out = parse_answer('{"task1": null, "task2": null}', task, labels, 3)
    assert out["intent"].reason == "task1: expected a string, got null"


def test_text_subtask():
    task = TaskDef.model_validate({
        "name": "fpb-echo", "data": {"hub": {"path": "x", "splits": {"train": "train", "test": "test"}},
                 "text": "sentence",
                 "fields": {"sentiment": {"column": "label_text"}}},
        "prompt": "x", "metrics": ["rouge"],
        "subtasks": [{"name": "summary", "field": "text", "type": "text"}],
    })
    assert parse_answer("  a summary.\n", task, {}, None)["summary"] == Parsed("a summary.", True, None)
    assert parse_answer(" \n", task, {}, None)["summary"] == Parsed(None, False, "empty answer")
    assert format_answer(task, {"text": "Sales rose."}) == "Sales rose."
    multi = TaskDef.model_validate({
        "name": "fpb-both", "data": {"hub": {"path": "x", "splits": {"train": "train", "test": "test"}},
                 "text": "sentence",
                 "fields": {"sentiment": {"column": "label_text"}}},
        "prompt": "x", "metrics": ["accuracy", "rouge"],
        "subtasks": [{"name": "sentiment", "field": "sentiment"},
                     {"name": "summary", "field": "text", "type": "text"}],
    })
    labels = {"sentiment": ("negative", "neutral", "positive"), "summary": ()}
    gold = {"sentiment": "positive", "text": 'Sales "rose" {a lot}.'}
    out = parse_answer(format_answer(multi, gold), multi, labels, None)
    assert out == {"sentiment": Parsed("positive", True, None),
                   "summary": Parsed('Sales "rose" {a lot}.', True, None)}
    out = parse_answer('{"task1": "positive", "task2": 3}', multi, labels, None)
    assert out["summary"] == Parsed(None, False, "task2: expected a string, got a number")


# --- never an exception ---------------------------------------------------------------------


def test_random_garbage_never_raises(intent, slots, multi):
    rng = random.Random(7)
    pieces = ['{', '}', '[', ']', '"', "'", '\\', ',', ':', '`', '```', 'json', 'task1', 'task2',
              'Other', 'time', 'alarm_set', 'null', '\n', ' ', 'é', '\x00', '{"task1": ', '.',
              'Label:', 'Slots:', '1e999', 'NaN', '[[[[', '{{{{']
    seen_valid = 0
    for _ in range(2000):
        raw = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        for task, labels in (intent, slots, multi):
            out = parse_answer(raw, task, labels, rng.randint(0, 4))
            _assert_shape(out, task)
            seen_valid += sum(p.valid for p in out.values())
    assert seen_valid > 0  # the pieces do sometimes form a valid answer
    for task, labels in (intent, slots, multi):
        for raw in ("[" * 5000, "{" * 5000 + "}" * 5000, '["Other"' + ', "Other"' * 20000 + "]",
                    b"alarm_set", 3.5, ["alarm_set"]):
            _assert_shape(parse_answer(raw, task, labels, 2), task)
