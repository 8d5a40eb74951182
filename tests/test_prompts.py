"""Prompts: the paper's listings, reproducible five-shot draws, the text budget, the formats."""

from __future__ import annotations

import pytest

from grid.data import label_sets, load_split
from grid.prompting import FewShotSampler, PromptBuilder, cut_text, render
from grid.tasks import catalog, get_task


def builder(name: str, sampler: str = "random", budget: int | None = None) -> PromptBuilder:
    task = get_task(name)
    return PromptBuilder(task, label_sets(task), load_split(task, "train").to_list(), budget, sampler)


def test_zero_shot_massive_intent_follows_listing_7():
    task = get_task("massive-intent")
    row = load_split(task, "test")[0]
    prompt = builder("massive-intent").build(row, shots=0, seed=0)
    lines = prompt.user.splitlines()
    assert lines[0] == "You will be given an utter text."
    assert lines[1].startswith("Your task is to classifity it as one of the labels in the list ['alarm_query', ")
    assert "Output the label only and absolutely nothing else." in lines
    assert prompt.user.endswith(f"Beginning of <<Utter>>\n{row['text']}\nEnd of <<Utter>>\n\nLabel:")
    assert "Examples" not in prompt.user
    assert (prompt.as_text("inst").startswith("[INST]You will be given")
            and prompt.as_text("inst").endswith("Label: [/INST]"))


def test_massive_multi_has_the_listing_11_system_prompt():
    task = get_task("massive-multi")
    prompt = builder("massive-multi").build(load_split(task, "test")[0], shots=0, seed=0)
    assert prompt.system.endswith('{"task1": "task1_label", "task2": "task2_label"}')
    assert prompt.user.startswith("In the first task, given the utter text")
    assert [m["role"] for m in prompt.messages()] == ["system", "user"]


@pytest.mark.parametrize("name", sorted(catalog()))
def test_five_shot_is_reproducible_and_never_the_example_itself(name):
    task = get_task(name)
    test = load_split(task, "test")
    b = builder(name)
    for i in (0, 1, 2):
        row = test[i]
        first = b.build(row, shots=5, seed=3)
        assert first == builder(name).build(row, shots=5, seed=3)  # a fresh builder: same prompt
        assert first.user.count("Beginning of <<") == 5 + 2  # five examples + the query + the Examples block
        picks = b.sampler.draw(row["example_id"], row["text"], 5, 3)
        assert len(set(picks)) == 5
        assert all(b.train[j]["text"] != row["text"] for j in picks)
    assert b.build(test[0], 5, seed=3) != b.build(test[0], 5, seed=4)


def test_stratified_sampler_draws_distinct_labels():
    b = builder("massive-intent", sampler="stratified")
    picks = b.sampler.draw("x", "some text", 5, 0)
    assert len({b.train[i]["intent"] for i in picks}) == 5


def test_stratified_sampler_draws_all_the_shots_on_a_task_with_fewer_labels():
    from collections import Counter

    b = builder("fpb-sentiment", sampler="stratified")  # 3 labels, 5 shots
    for seed in range(5):
        picks = b.sampler.draw(f"x{seed}", "some text", 5, seed)
        counts = Counter(b.train[i]["sentiment"] for i in picks)
        assert len(picks) == len(set(picks)) == 5 and sorted(counts.values()) == [1, 2, 2]  # each label once first


def test_five_shot_excludes_train_rows_with_the_same_text():
    task = get_task("massive-intent")
    train = load_split(task, "train").to_list()
    sampler = FewShotSampler(task, train[:6])
    # with six train rows and one sharing the query's text, the five drawn are exactly the others
    picks = sampler.draw("query", train[0]["text"], 5, 0)
    assert sorted(picks) == [1, 2, 3, 4, 5]


def test_text_budget_cuts_the_same_way_every_time():
    text = "one  two\nthree four five"
    assert cut_text(text, 3) == "one  two\nthree"
    assert cut_text(text, 10) == text
    assert cut_text(text, None) == text
    task = get_task("20ng-20")
    row = max(load_split(task, "test").select(range(50)), key=lambda r: len(r["text"]))
    short = builder("20ng-20", budget=16).build(row, 0, 0).user
    long = builder("20ng-20", budget=256).build(row, 0, 0).user
    assert len(short) < len(long)


def test_render_shows_labels_in_the_papers_forms():
    task = get_task("20ng-multi")
    prompt = render(task, label_sets(task), "text", [])
    assert '["alt", "comp", "misc", "rec", "sci", "soc", "talk"]' in prompt.user
    assert "['alt.atheism', 'comp.graphics'," in prompt.user


def test_a_text_budget_in_tokens_cuts_at_the_model_s_own_tokens():
    from transformers import AutoTokenizer

    from workers.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("tiny:llama"))
    text = "begin 644 data.bin\nM" + "X" * 300 + " then some words after the uuencoded line"
    cut = cut_text(text, 20, tokenizer)
    assert text.startswith(cut) and len(tokenizer(cut, add_special_tokens=False).input_ids) <= 20
    assert len(cut_text(text, 20).split()) == 11  # in words the one 300-character "word" stays whole
    assert cut_text("short text", 20, tokenizer) == "short text"
    b = PromptBuilder(get_task("20ng-7"), label_sets(get_task("20ng-7")), [], 20, budget_tokenizer=tokenizer)
    assert b.build({"example_id": "q", "text": text}, 0, 0).user.count("X") < 300


def test_the_budget_unit_is_in_the_id_of_local_decoders_only():
    from grid.config import GridConfig
    from grid.plan import build_plan

    def cells(unit: str) -> dict:
        raw = {"name": "t", "tasks": ["20ng-7"], "text_budget": 96, "text_budget_unit": unit,
               "models": [{"name": "m", "source": "tiny:llama", "family": "decoder"},
                          {"name": "api", "source": "openai/gpt-4o-mini", "family": "api", "backend": "litellm"}]}
        return {c.model: c for c in build_plan(GridConfig.model_validate(raw)).cells}

    words, tokens = cells("words"), cells("tokens")
    assert words["m"].budget_unit is None and tokens["m"].budget_unit == "tokens"
    assert words["m"].id != tokens["m"].id
    assert words["api"].id == tokens["api"].id  # a hosted model's tokenizer is unknown: words
