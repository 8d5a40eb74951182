"""The vLLM backend's requests, built and read back on CPU; the engine itself only on a GPU."""

from __future__ import annotations

import json

import jsonschema
import pytest

from grid.data import label_sets, load_split
from grid.parsing import format_answer, parse_answer
from grid.prompting import gold_of
from grid.tasks import catalog, get_task
from workers.vllm_backend import (
    answer_from_output,
    build_requests,
    canonical_text,
    engine_kwargs,
    sampling_kwargs,
    structured_output,
)


def test_sampling_kwargs_greedy_and_sampled():
    assert sampling_kwargs({"max_new_tokens": 24, "temperature": 0.0}) == {
        "max_tokens": 24, "temperature": 0.0, "top_p": 1.0, "top_k": -1}
    assert sampling_kwargs({"max_new_tokens": 8, "temperature": 0.7}, seed=3) == {
        "max_tokens": 8, "temperature": 0.7, "seed": 3}


@pytest.mark.parametrize("task_name", sorted(n for n, t in catalog().items()
                                             if all(s.type != "text" for s in t.subtasks)))  # free text: no spec
def test_structured_outputs_admit_exactly_the_gold_answers(task_name):
    """Every gold answer in canonical form fits the structured-output spec; a wrong label does not."""
    task = get_task(task_name)
    labels = {k: list(v) for k, v in label_sets(task).items()}
    for row in load_split(task, "test").select(range(5)).to_list():
        spec = structured_output(task, labels, len(row["words"]))
        answer = format_answer(task, gold_of(task, row))
        if "choice" in spec:
            assert answer in spec["choice"] and set(spec) == {"choice"}
            continue
        jsonschema.validate(json.loads(answer), spec["json"])
        bad = json.loads(answer)
        if task.is_multi:
            bad["task1"] = "not-a-label"
        else:
            bad = bad + ["Other"]  # one tag too many
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, spec["json"])


def test_build_requests_free_and_constrained():
    base = {"prompt": "P", "task": "massive-multi", "words": ["wake", "me", "up"],
            "labels": {"intent": ["alarm_set", "alarm_query"], "slots": ["time", "date"]},
            "decoding": {"mode": "free", "max_new_tokens": 16, "temperature": 0.0}}
    free, con = build_requests([base, {**base, "decoding": {**base["decoding"], "mode": "constrained"}}])
    assert free == {"prompt": "P", "sampling": sampling_kwargs(base["decoding"]), "structured": None}
    schema = con["structured"]["json"]
    assert list(schema["properties"]) == ["task1", "task2"]
    assert schema["properties"]["task1"]["enum"] == ["alarm_set", "alarm_query"]
    assert schema["properties"]["task2"]["minItems"] == 3 == schema["properties"]["task2"]["maxItems"]
    assert schema["properties"]["task2"]["items"]["enum"] == ["time", "date", "Other"]
    label = build_requests([{**base, "task": "fpb-sentiment", "labels": {"sentiment": ["negative", "positive"]},
                             "decoding": {**base["decoding"], "mode": "constrained"}}])[0]
    assert label["structured"] == {"choice": ["negative", "positive"]}


def test_outputs_read_back_in_canonical_form():
    task = get_task("massive-multi")
    labels = label_sets(task)
    spec = {"json": {}}
    raw = '{ "task1" :"alarm_set",\n "task2":["Other","time"] }'
    answer = answer_from_output(raw, 100, 12, spec)
    assert answer == {"raw_output": '{"task1": "alarm_set", "task2": ["Other", "time"]}',
                      "n_prompt_tokens": 100, "n_output_tokens": 12}
    parsed = parse_answer(answer["raw_output"], task, labels, 2)
    assert all(p.valid for p in parsed.values())
    assert canonical_text("broken {", spec) == "broken {"
    assert canonical_text(" alarm_set", {"choice": ["alarm_set"]}) == "alarm_set"
    assert canonical_text(" free text", None) == " free text"


def test_engine_kwargs():
    spec = {"path": "/models/llama", "revision": "abc", "dtype": "bfloat16",
            "options": {"gpu_memory_utilization": 0.8, "max_model_len": 4096, "engine": {"enforce_eager": True}}}
    assert engine_kwargs(spec) == {"model": "/models/llama", "enable_prefix_caching": True, "seed": 0,
                                   "revision": "abc", "dtype": "bfloat16", "gpu_memory_utilization": 0.8,
                                   "max_model_len": 4096, "enforce_eager": True}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_engine_answers_are_always_valid(tmp_path):
    """On a GPU node with vLLM: the tiny decoder, constrained, answers every task validly."""
    pytest.importorskip("vllm")
    from workers.models import resolve
    from workers.vllm_backend import VLLMBackend

    backend = VLLMBackend({"path": resolve("tiny:llama"), "dtype": "float32",
                           "options": {"gpu_memory_utilization": 0.3, "max_model_len": 4096}})
    for name in ("fpb-sentiment", "massive-slots", "massive-multi"):
        task = get_task(name)
        labels = label_sets(task)
        rows = load_split(task, "test").select(range(4)).to_list()
        items = [{"prompt": f"Text: {r['text']}\nAnswer:", "task": name, "words": r["words"],
                  "labels": {k: list(v) for k, v in labels.items()},
                  "decoding": {"mode": "constrained", "max_new_tokens": 256, "temperature": 0.0}} for r in rows]
        for answer, row in zip(backend.generate(items), rows):
            parsed = parse_answer(answer["raw_output"], task, labels, len(row["words"]))
            assert all(p.valid for p in parsed.values()), answer
