"""Without a data dir a task reads its declared hub copy. No hub is reachable here, so the hub is
stood in for by in-memory datasets in the hub's own shape (class-label ints, its split names, no
ids for PhraseBank), built from the local files: the rows must equal the local reading."""

from __future__ import annotations

import datasets
import pytest

from grid import readers
from grid.data import _load_cached, resolve_data_dir
from grid.tasks import get_task

SENTIMENTS = ["negative", "neutral", "positive"]  # takala/financial_phrasebank's ClassLabel names


def fake_hub(hub: dict[tuple[str, str | None, str], datasets.Dataset]):
    """`datasets.load_dataset` with these hub splits; local builders (json, ...) read as usual."""
    real = datasets.load_dataset

    def load_dataset(path, config=None, split=None, **options):
        if "/" in path:
            return hub[(path, config, split)]
        return real(path, config, split=split, **options)
    return load_dataset


def test_phrasebank_hub_rows_equal_the_local_rows(monkeypatch):
    task = get_task("fpb-sentiment")
    rows = datasets.load_dataset("json", split="train", data_files=str(
        resolve_data_dir(None) / "financial_phrasebank/normalized/Sentences_50Agree.jsonl"))
    hub = datasets.Dataset.from_dict(
        {"sentence": rows["sentence"], "label": [SENTIMENTS.index(t) for t in rows["label_text"]]},
        features=datasets.Features({"sentence": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=SENTIMENTS)}))
    monkeypatch.setattr(readers.datasets, "load_dataset",
                        fake_hub({("takala/financial_phrasebank", "sentences_50agree", "train"): hub}))
    for split in ("train", "test"):
        assert _load_cached(task, split, None).to_list() == _load_cached(task, split, resolve_data_dir(None)).to_list()


def test_massive_hub_rows_equal_the_local_rows(monkeypatch):
    task = get_task("massive-multi")
    local = datasets.load_dataset("json", split="train",
                                  data_files=str(resolve_data_dir(None) / "massive_en_us/en-US.jsonl"))
    intents = sorted(set(local["intent"]))
    hub = {}
    for split in ("train", "test"):
        part = local.filter(lambda p, split=split: p == split, input_columns="partition").select(range(200))
        hub[("AmazonScience/massive", "en-US", split)] = datasets.Dataset.from_dict(
            {"id": part["id"], "utt": part["utt"], "annot_utt": part["annot_utt"],
             "intent": [intents.index(i) for i in part["intent"]]},
            features=datasets.Features({"id": datasets.Value("string"), "utt": datasets.Value("string"),
                                        "annot_utt": datasets.Value("string"),
                                        "intent": datasets.ClassLabel(names=intents)}))
    monkeypatch.setattr(readers.datasets, "load_dataset", fake_hub(hub))
    for split in ("train", "test"):
        got = _load_cached(task, split, None).to_list()
        assert got == _load_cached(task, split, resolve_data_dir(None)).to_list()[:200]


def test_no_hub_copy_says_pass_data():
    from grid.errors import GridError

    with pytest.raises(GridError, match="no hub copy is declared; pass --data DIR"):
        _load_cached(get_task("fomc-stance"), "test", None)
