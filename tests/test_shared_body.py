"""Seed 003's shared body on the tiny Llama: one decoder trained with a classification head (SST-2)
and its language-model head (DialogSum), as a Ray Train job and through the grid.

Three Ray Train fits in all: a job, its resume, and the grid's own fine-tune cell."""

from __future__ import annotations

import pytest

from grid.config import load_config
from grid.plan import build_plan

GRID = """
name: shared
models:
  - {name: inst, source: "tiny:llama", family: decoder, prompt_format: chat}
  - name: shared
    finetuned_from: {model: inst, tasks: [sst2, dialogsum], mix: true, finetune: lora,
                     hparams: {heads: [sst2]}}
tasks: [sst2, dialogsum]
shots: [0]
finetune: [none]
seeds: [0]
decoding:
  - {mode: head}
  - {mode: free, max_new_tokens: 8}
exclude:
  - {task: sst2, decoding: free}
limits: {test: 8, train: 16}
text_budget: 48
recipes:
  decoder/lora:
    hparams: {max_steps: 4, batch_size: 8, lr: 0.01, log_every_steps: 0, max_length: 512}
"""


def grid(tmp_path, text: str = GRID):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return load_config(path)


# --- the plan: no Ray -------------------------------------------------------------------------


def test_head_decoding_runs_only_where_a_head_was_trained(tmp_path):
    cells = build_plan(grid(tmp_path)).cells
    infers = {(c.model, c.task, c.decoding["mode"]) for c in cells if c.kind == "infer"}
    # the untuned model has no head; dialogsum has none either: it is generated
    assert infers == {("inst", "dialogsum", "free"), ("shared", "sst2", "head"), ("shared", "dialogsum", "free")}
    (ft,) = [c for c in cells if c.kind == "finetune"]
    assert ft.recipe["mix_with"] == ["dialogsum"] and ft.recipe["hparams"]["heads"] == ["sst2"]


def test_a_made_model_is_tuned_once_per_seed(tmp_path):
    cells = build_plan(grid(tmp_path, GRID.replace("seeds: [0]", "seeds: [0, 1, 2]"))).cells
    tunes = {c.seed: c for c in cells if c.kind == "finetune"}
    assert sorted(tunes) == [0, 1, 2] and len({c.id for c in tunes.values()}) == 3
    for c in cells:
        if c.kind == "infer" and c.model == "shared":
            assert c.depends_on == tunes[c.seed].id  # each seed's cells read that seed's model
    # the first seed's fine-tune is the one a one-seed grid plans (its id did not move)
    (single,) = [c for c in build_plan(grid(tmp_path)).cells if c.kind == "finetune"]
    assert tunes[0].id == single.id


def test_a_head_for_a_task_the_model_is_not_tuned_on_fails_at_load(tmp_path):
    from grid.errors import GridError

    with pytest.raises((GridError, ValueError), match="heads: \\['fpb-sentiment'\\] are not among its tasks"):
        grid(tmp_path, GRID.replace("hparams: {heads: [sst2]}", "hparams: {heads: [fpb-sentiment]}"))


# --- Ray Train and the grid ------------------------------------------------------------------


def shared_job(tiny: str, out, max_steps: int, **hparams):
    from grid.jobs import FinetuneJob

    return FinetuneJob(model=tiny, family="decoder", task="sst2", mix_with=("dialogsum",), mode="lora",
                       prompt_format="chat", text_budget=48, train_limit=24, output_dir=str(out),
                       hparams={"heads": ["sst2"], "max_steps": max_steps, "batch_size": 8, "lr": 0.01,
                                "checkpoint_every_steps": 4, "log_every_steps": 0, "max_length": 512, **hparams})


def test_a_standardized_head_reads_zero_mean_unit_variance_features_and_trains_at_its_own_rate(tmp_path):
    """head_norm: standardize fixes each head's mean and scale from the untuned body's states on its
    train rows; head_lr gives the heads their own optimizer group. No Ray: the pieces the loop calls."""
    import torch
    from transformers import AutoTokenizer

    from grid.jobs import DECODER_HPARAMS
    from workers.models import resolve
    from workers.train_decoder import build_examples, head_labels, head_param_groups, load_model, prepare_heads

    tiny = resolve("tiny:llama")
    job = shared_job(tiny, tmp_path, 4, head_norm="standardize", head_lr=0.05)
    hp = DECODER_HPARAMS | job.hparams
    heads = head_labels(job, hp)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    examples, _ = build_examples(job, tokenizer, 512, heads)
    model = load_model(job, hp, heads)
    stats = prepare_heads(model, examples, tokenizer.pad_token_id or 0, torch.device("cpu"), "standardize", "random",
                          batch_size=5)
    assert set(stats) == {"sst2"} and stats["sst2"]["state_norm"] > 0 and "probe_train_accuracy" not in stats["sst2"]
    from workers.train_decoder import collate

    rows = [e for e in examples if e.task == 0]
    with torch.no_grad():
        states = model.last_states(collate(rows, tokenizer.pad_token_id or 0))
        head = model.heads["sst2"]
        z = (states - head.mean) * head.scale
    assert torch.allclose(z.mean(0), torch.zeros_like(z[0]), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones_like(z[0]), atol=1e-3)
    body, head_group = head_param_groups(model, hp)
    assert head_group["lr"] == 0.05 and body["lr"] == 0.01
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.heads.parameters()}
    assert not {id(p) for p in body["params"]} & {id(p) for p in head_group["params"]}


def test_a_head_saved_as_a_bare_linear_layer_still_loads(tmp_path):
    import json

    import torch

    from workers.decoder_heads import HEADS_FILE, HEADS_META, load_heads

    linear = torch.nn.Linear(6, 2)
    torch.save({"sst2.weight": linear.weight.detach(), "sst2.bias": linear.bias.detach()}, tmp_path / HEADS_FILE)
    (tmp_path / HEADS_META).write_text(json.dumps({"heads": {"sst2": {"labels": ["negative", "positive"]}}}))
    head, labels = load_heads(tmp_path)["sst2"]
    x = torch.randn(3, 6)
    assert labels == ["negative", "positive"] and torch.allclose(head(x), linear(x))


def test_a_bad_head_norm_is_named():
    from grid.errors import GridError
    from grid.jobs import DECODER_HPARAMS
    from workers.train_decoder import head_labels

    job = shared_job("unused", "/tmp/unused", 4, head_norm="layer")
    with pytest.raises(GridError, match="head_norm 'layer' is none or standardize"):
        head_labels(job, DECODER_HPARAMS | job.hparams)


def test_a_probe_head_is_scikit_learns_logistic_regression():
    """head_init: probe fits the head as scikit-learn's multinomial logistic regression (C = 1) on
    the features it reads; three classes, where scikit-learn's multinomial penalty is ours."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from workers.decoder_heads import LabelHead
    from workers.train_decoder import fit_probe

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (90,), generator=gen)
    features = torch.randn(90, 6, generator=gen) + torch.nn.functional.one_hot(labels, 6).float() * 1.5
    head = LabelHead(6, 3, 0.02)
    with torch.no_grad():
        accuracy = fit_probe(head.linear, features, labels)
    theirs = LogisticRegression(C=1.0, tol=1e-8, max_iter=5000).fit(features.numpy(), labels.numpy())
    with torch.no_grad():
        ours = torch.softmax(head(features), 1).numpy()
    assert abs(ours - theirs.predict_proba(features.numpy())).max() < 1e-3
    assert accuracy == pytest.approx(theirs.score(features.numpy(), labels.numpy()), abs=1 / 90)


def test_both_heads_train_save_and_resume(ray_local, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.decoder_heads import head_answers, load_heads
    from workers.models import resolve
    from workers.train_decoder import run

    tiny = resolve("tiny:llama")
    # standardized features amplify the body's drift (this random model's states vary across rows by
    # about 5% of their size), so the body steps at 0.003: at 0.01 the head's loss rose to 13
    hp = {"head_norm": "standardize", "head_lr": 0.02, "lr": 0.003}
    first = run(shared_job(tiny, tmp_path, 8, **hp))
    for task in ("sst2", "dialogsum"):  # each task's loss falls, the head's and the summary's
        assert first["head_losses"][task]["last"] < first["head_losses"][task]["first"], first["head_losses"]
    heads = load_heads(tmp_path / "model")
    assert list(heads) == ["sst2"] and heads["sst2"][1] == ["negative", "positive"]
    assert set(first["head_features"]) == {"sst2"}  # standardized: the saved head keeps its scale
    assert not torch.equal(heads["sst2"][0].scale, torch.ones_like(heads["sst2"][0].scale))

    # the saved body and head classify a prompt; the same body generates
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    items = [{"task": "sst2", "prompt": p, "add_special_tokens": False} for p in ("a fine film", "dull , dull")]
    answers = head_answers(model, tokenizer, heads, items)
    assert [a["raw_output"] in ("negative", "positive") for a in answers] == [True, True]

    again = run(shared_job(tiny, tmp_path, 12, **hp))  # the checkpoint reloads
    assert again["resumed_from_step"] == 8 and again["steps"] == 12 and again["steps_run"] == 4
    assert again["head_features"] == first["head_features"]  # from the untuned body: the same on resume
    assert torch.equal(load_heads(tmp_path / "model")["sst2"][0].mean, heads["sst2"][0].mean)
    assert set(again["head_losses"]) == {"sst2", "dialogsum"}


def test_the_shared_body_classifies_and_summarizes_through_the_grid(ray_local, tmp_path):
    from grid.execute import execute
    from grid.query import predictions
    from grid.store import Store

    config = grid(tmp_path)
    plan = build_plan(config)
    store = Store.open(tmp_path / "results")
    summary = execute(plan, config, store, None)
    assert not summary.failed, [r.get("error") for r in store.records() if r["status"] == "failed"]
    records = {(r["cell"]["model"], r["cell"]["task"], r["cell"]["kind"]): r for r in store.records()}
    tuned = records[("shared", "sst2", "finetune")]["metrics"]
    assert set(tuned["head_losses"]) == {"sst2", "dialogsum"}

    rows = predictions(tmp_path / "results").collect().to_dicts()
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["cell_id"], []).append(r)
    head_cell = records[("shared", "sst2", "infer")]["cell_id"]
    assert len(by_cell[head_cell]) == 8 and all(r["valid"] for r in by_cell[head_cell])  # a head is always a label
    summaries = records[("shared", "dialogsum", "infer")]
    assert len(by_cell[summaries["cell_id"]]) == 8
    assert any(k.startswith("summary/rouge") for k in summaries["metrics"]), summaries["metrics"]
