"""The task catalog on the real data: split sizes, label sets, gold tags, the documented choices."""

from __future__ import annotations

import pytest

from grid.annotations import bracket_slots
from grid.data import data_fingerprint, label_sets, load_split
from grid.errors import GridError
from grid.metrics.slots import convert_to_bio
from grid.tasks import catalog, get_task

PAPER_TASKS = {"20ng-20", "20ng-7", "20ng-multi", "massive-intent", "massive-slots", "massive-multi"}


def test_catalog_has_the_paper_tasks_and_the_financial_ones():
    assert PAPER_TASKS | {"fpb-sentiment", "fomc-stance"} <= set(catalog())
    assert [s.name for s in get_task("20ng-multi").subtasks] == ["root", "label"]  # Listing 5 order
    assert [s.type for s in get_task("massive-multi").subtasks] == ["label", "word_tags"]


def test_split_sizes():
    massive = get_task("massive-intent")
    assert (len(load_split(massive, "train")), len(load_split(massive, "test"))) == (11514, 2974)
    ng = get_task("20ng-20")
    assert (len(load_split(ng, "train")), len(load_split(ng, "test"))) == (11314, 7532)
    fomc = get_task("fomc-stance")
    assert (len(load_split(fomc, "train")), len(load_split(fomc, "test"))) == (1903, 476)


def test_label_counts():
    assert len(label_sets(get_task("massive-intent"))["intent"]) == 60
    slots = label_sets(get_task("massive-slots"))["slots"]
    assert len(slots) == 56 and slots[-1] == "Other"  # 55 slot types + "Other"
    assert len(label_sets(get_task("20ng-20"))["label"]) == 20
    assert label_sets(get_task("20ng-7"))["root"] == ("alt", "comp", "misc", "rec", "sci", "soc", "talk")
    assert label_sets(get_task("fpb-sentiment"))["sentiment"] == ("negative", "neutral", "positive")
    assert label_sets(get_task("fomc-stance"))["stance"] == ("dovish", "hawkish", "neutral")


@pytest.mark.parametrize("annot, tags, bio", [
    ("wake me up at [time : five am] [date : this week]",
     ["Other", "Other", "Other", "Other", "time", "time", "date", "date"],
     ["O", "O", "O", "O", "B-time", "I-time", "B-date", "I-date"]),
    ("wake me up at [time : nine am] on [date : friday]",
     ["Other", "Other", "Other", "Other", "time", "time", "Other", "date"],
     ["O", "O", "O", "O", "B-time", "I-time", "O", "B-date"]),
    ("olly quiet", ["Other", "Other"], ["O", "O"]),
])
def test_massive_word_tags_and_bio(annot, tags, bio):
    _words, got = bracket_slots(annot)
    assert got == tags
    assert convert_to_bio(got) == bio


def test_known_test_utterance_gold():
    test = load_split(get_task("massive-slots"), "test")
    row = next(r for r in test if r["example_id"] == "0")
    assert row["text"] == "wake me up at five am this week"
    assert row["slots"] == ["Other", "Other", "Other", "Other", "time", "time", "date", "date"]
    assert row["intent"] == "alarm_set"


def test_every_massive_row_has_one_tag_per_word():
    for split in ("train", "test"):
        ds = load_split(get_task("massive-slots"), split)
        assert all(len(w) == len(t) for w, t in zip(ds["words"], ds["slots"]))


def test_newsgroups_empty_texts_are_kept_and_roots_derived():
    task = get_task("20ng-7")
    train, test = load_split(task, "train"), load_split(task, "test")
    assert sum(1 for t in train["text"] if not t.strip()) == 300
    assert sum(1 for t in test["text"] if not t.strip()) == 215
    assert all(root == label.split(".")[0] for root, label in zip(train["root"], train["label"]))


def test_phrasebank_split_is_seeded_stratified_and_disjoint():
    task = get_task("fpb-sentiment")
    train, test = load_split(task, "train"), load_split(task, "test")
    assert len(train) + len(test) == 4846
    assert not set(train["example_id"]) & set(test["example_id"])
    for label, total in {"neutral": 2879, "positive": 1363, "negative": 604}.items():
        assert test["sentiment"].count(label) == round(total * 0.2)


def test_fingerprint_is_stable_and_task_specific():
    a, b = get_task("massive-intent"), get_task("massive-slots")
    assert data_fingerprint(a) == data_fingerprint(a)
    assert data_fingerprint(a) != data_fingerprint(b)


def test_fingerprint_follows_content_not_files(tmp_path):
    """A fresh copy of the same data (new path, new mtimes) keeps every cell id, so it resumes."""
    import shutil

    from grid.data import resolve_data_dir

    task = get_task("fpb-sentiment")
    shutil.copytree(resolve_data_dir(None) / "financial_phrasebank", tmp_path / "financial_phrasebank")
    assert data_fingerprint(task, tmp_path) == data_fingerprint(task)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(GridError, match=r"unknown task 'massive-intnet'.*massive-intent"):
        get_task("massive-intnet")


def test_missing_data_dir(tmp_path):
    with pytest.raises(GridError, match="does not exist"):
        load_split(get_task("massive-intent"), "test", tmp_path / "nope")


def test_malformed_jsonl_line_is_named(tmp_path):
    folder = tmp_path / "massive_en_us"
    folder.mkdir()
    good = ('{"id": "1", "locale": "en-US", "partition": "test", "scenario": "alarm", "intent": "alarm_set", '
            '"utt": "wake me", "annot_utt": "wake me", "worker_id": "1"}')
    (folder / "en-US.jsonl").write_text(good + "\n" + good.replace('"id": "1"', '"id": "2"') + "\n{broken\n")
    with pytest.raises(GridError, match=r"en-US.jsonl:3: not valid JSON"):
        load_split(get_task("massive-intent"), "test", tmp_path)
