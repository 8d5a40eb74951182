"""The tasks added by config alone (issue 12): sizes and labels from the data README, the quirks
their YAML declares, and DialogSum's ROUGE against all three references."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer

from grid.data import label_sets, load_split
from grid.metrics.score import score
from grid.parsing import Parsed, format_answer
from grid.prompting import PromptBuilder
from grid.tasks import get_task

SIZES = {"sst2": (67349, 872), "dialogsum": (12460, 500), "fincausal": (13478, 8580),
         "finarg": (7753, 969), "gold-headline": (8456, 2114)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_and_a_prompt(name):
    task = get_task(name)
    train, test = load_split(task, "train"), load_split(task, "test")
    assert (len(train), len(test)) == SIZES[name]
    assert task.prompt is None  # the generic template of its kind
    builder = PromptBuilder(task, label_sets(task), train.to_list())
    prompt = builder.build(test[0], shots=2, seed=1)
    assert test[0]["text"][:40] in prompt.user and task.description in prompt.user


def test_label_sets_and_counts():
    assert label_sets(get_task("sst2"))["sentiment"] == ("negative", "positive")
    assert load_split(get_task("sst2"), "test")["sentiment"].count("positive") == 444
    assert load_split(get_task("fincausal"), "train")["causal"].count("causal") == 1010
    assert load_split(get_task("finarg"), "test")["unit"].count("claim") == 461
    assert label_sets(get_task("gold-headline"))["sentiment"] == ("negative", "neutral", "none", "positive")
    gold = get_task("gold-headline")
    assert len(load_split(gold, "test")) == sum(round(n * 0.2) for n in (4412, 3814, 1968, 376))


def test_sst2_texts_are_the_file_lines_as_written():
    from grid.data import resolve_data_dir

    lines = (resolve_data_dir(None) / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = load_split(get_task("sst2"), "train")["text"]
    assert texts == [line.rsplit("\t", 1)[0] for line in lines]  # quotes, trailing spaces kept


def test_fincausal_reader_splits_at_the_first_and_last_separator(tmp_path):
    """The README's quirk (texts contain "; "; BOM; CRLF), on a file written here: the two real
    files happen to hold no such text."""
    from grid.readers import read_files

    path = tmp_path / "f.csv"
    path.write_bytes("\ufeffIndex; Text; Gold\r\n1.1; Sales fell; costs rose; 1\r\n1.2; Flat.; 0\r\n".encode())
    ds = read_files([path], get_task("fincausal").data.read).rows
    assert ds.to_list() == [{"Index": "1.1", "Text": "Sales fell; costs rose", "Gold": "1"},
                            {"Index": "1.2", "Text": "Flat.", "Gold": "0"}]
    assert load_split(get_task("fincausal"), "test")[0]["example_id"] == "0001.00001"


def test_dialogsum_rouge_is_max_over_three_references():
    task = get_task("dialogsum")
    rows = load_split(task, "test").to_list()[:40]
    assert all(len(r["summary"]) == 3 for r in rows)
    assert all(len(r["summary"]) == 1 for r in load_split(task, "train").to_list()[:5])
    assert format_answer(task, rows[0]) == rows[0]["summary"][0]
    rng = random.Random(3)
    preds = [" ".join(rng.sample(r["text"].split(), 12)) for r in rows]
    parsed = [{"summary": Parsed(p, True, None)} for p in preds]
    got = score(task, rows, parsed)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        want = sum(max(scorer.score(ref, p)[rouge_type].fmeasure for ref in r["summary"])
                   for r, p in zip(rows, preds)) / len(rows)
        assert got[f"summary/{rouge_type}"] == pytest.approx(want, abs=1e-12)
    # status and the run's closing table show ROUGE-L (the scorer's key is rougeL) with its CI
    from grid.terminal import headline

    assert f"summary/rougeL={got['summary/rougeL']:.3f} [" in headline(got)
