"""The vLLM backend's requests, built and read back without vLLM (tests/test_vllm.py runs it)."""

from __future__ import annotations

import re

import pytest

from grid.data import label_sets, load_split
from grid.errors import GridError
from grid.execute import backend_python
from grid.parsing import format_answer
from grid.prompting import gold_of
from grid.tasks import catalog, get_task
from workers.constrained import answer_program, answer_regex
from workers.vllm_backend import (
    CPU_DEFAULTS,
    answer_row,
    engine_kwargs,
    generation_rows,
    runtime_env,
    sampling_kwargs,
    through_batch_api,
)


def test_sampling_kwargs_always_the_same_keys():
    """A Ray Data column keeps one type: greedy and sampled requests carry the same non-null keys."""
    greedy = sampling_kwargs({"max_new_tokens": 24, "temperature": 0.0})
    sampled = sampling_kwargs({"max_new_tokens": 8, "temperature": 0.7}, seed=3)
    assert greedy == {"max_tokens": 24, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 0}
    assert sampled == {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "seed": 3}


@pytest.mark.parametrize("task_name", sorted(n for n, t in catalog().items()
                                             if all(s.type != "text" for s in t.subtasks)))  # free text: no regex
def test_answer_regex_admits_exactly_the_valid_answers(task_name):
    """Every gold answer in canonical form (with up to two spaces around) matches the regex vLLM
    constrains to; the same answer with one label changed to a non-label does not."""
    task = get_task(task_name)
    labels = {k: list(v) for k, v in label_sets(task).items()}
    for row in load_split(task, "test").select(range(5)).to_list():
        regex = answer_regex(answer_program(task, labels, len(row["words"]) if task.needs_words else None))
        answer = format_answer(task, gold_of(task, row))
        assert re.fullmatch(regex, answer) and re.fullmatch(regex, f"  {answer} ")
        assert not re.fullmatch(regex, f"   {answer}")  # three: greedy allows two
        gold_label = next(iter(gold_of(task, row).values()))
        first = gold_label if isinstance(gold_label, str) else gold_label[0]
        assert not re.fullmatch(regex, answer.replace(first, first + "x", 1))


def test_rows_of_one_pass_have_one_shape():
    """Free and constrained requests run as separate passes; within each, every row has the same
    keys, none null (Ray Data cannot concatenate a null struct with a struct)."""
    base = {"prompt": "P", "task": "massive-multi", "words": ["wake", "me", "up"],
            "labels": {"intent": ["alarm_set", "alarm_query"], "slots": ["time", "date"]},
            "decoding": {"mode": "free", "max_new_tokens": 16, "temperature": 0.0}}
    label = {**base, "task": "fpb-sentiment", "labels": {"sentiment": ["negative", "positive"]},
             "decoding": {**base["decoding"], "mode": "constrained", "strategy": "greedy"}}
    multi = {**base, "decoding": label["decoding"]}
    rows = generation_rows("c1", [base, label, multi], [[1, 2], [3], [4, 5, 6]])
    assert [(r["index"], r["constrained"]) for r in rows] == [(0, False), (1, True), (2, True)]
    assert "structured_outputs" not in rows[0]["sampling_params"]
    shapes = {tuple(sorted(r["sampling_params"])) for r in rows[1:]}
    assert len(shapes) == 1 and all(v is not None for r in rows for v in r["sampling_params"].values())
    assert rows[1]["sampling_params"]["structured_outputs"] == {"regex": r"\s{0,2}(?:negative|positive)\s{0,2}"}
    multi_regex = rows[2]["sampling_params"]["structured_outputs"]["regex"]
    assert re.fullmatch(multi_regex, '{"task1": "alarm_set", "task2": ["Other", "time", "date"]}')
    assert not re.fullmatch(multi_regex, '{"task1": "alarm_set", "task2": ["Other", "time"]}')  # 3 words


def test_which_requests_take_ray_llm():
    assert through_batch_api({"mode": "free"}) and through_batch_api({"mode": "constrained", "strategy": "greedy"})
    assert not through_batch_api({"mode": "constrained"})  # strategy score: label log-probs, the actor
    assert not through_batch_api({"mode": "constrained", "strategy": "score", "calibration": "contextual"})


def test_answer_rows_read_back():
    row = {"cell_id": "c", "index": 3, "generated_text": " positive\n", "num_input_tokens": 40,
           "num_generated_tokens": 3, "time_taken_llm": 0.5, "__inference_error__": "", "constrained": True}
    assert answer_row(row) == {"cell_id": "c", "index": 3, "raw_output": "positive", "n_prompt_tokens": 40,
                               "n_output_tokens": 3, "latency_s": 0.5, "error": None}
    assert answer_row({**row, "constrained": False})["raw_output"] == " positive\n"  # free: as written
    failed = answer_row({**row, "__inference_error__": "ValueError: prompt too long"})
    assert failed["error"] == "ValueError: prompt too long" and failed["raw_output"] is None


def test_engine_kwargs_defaults_fit_a_cpu_machine():
    spec = {"path": "/models/llama", "revision": "abc", "dtype": "bfloat16",
            "options": {"gpu_memory_utilization": 0.8, "max_model_len": 4096, "engine": {"max_num_batched_tokens": 64}}}
    assert engine_kwargs(spec, on_gpu=True) == {"enable_prefix_caching": True, "seed": 0, "revision": "abc",
                                                "dtype": "bfloat16", "gpu_memory_utilization": 0.8,
                                                "max_model_len": 4096, "max_num_batched_tokens": 64}
    cpu = engine_kwargs({"path": "m", "dtype": "auto"}, on_gpu=False)
    assert cpu == {"enable_prefix_caching": True, "seed": 0, "dtype": "float32", **CPU_DEFAULTS}
    assert engine_kwargs({"path": "m", "options": {"max_model_len": 512}}, on_gpu=False)["max_model_len"] == 512
    assert runtime_env({"options": {"cpu_threads_bind": "0-1"}}, "/py") == {
        "py_executable": "/py", "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}}
    assert runtime_env({}, None) == {}


def test_missing_vllm_python_is_named(monkeypatch, tmp_path):
    """A named Python that is not there, or has no vLLM, fails with the fix in one line."""
    monkeypatch.setenv("CLFGRID_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(GridError, match=r"backend vllm: CLFGRID_VLLM_PYTHON=.*nope/python is not an executable "
                                        r"Python; \./install\.sh installs it in \.venv-vllm/bin/python"):
        backend_python("vllm")
    import sys

    monkeypatch.setenv("CLFGRID_VLLM_PYTHON", sys.executable)  # the project's own: no vllm there
    with pytest.raises(GridError, match=r"vllm is not installed in .*; \./install\.sh installs it"):
        backend_python("vllm")
    assert backend_python("transformers") is None


def test_a_grid_without_vllm_fails_only_the_vllm_cells(tmp_path):
    """vLLM missing from the Python its actors would run in: that model's cells fail with the one
    line that names the fix, before any engine starts, and the other model's cells finish."""
    import json
    import sys

    import yaml

    from tests.conftest import run_cli

    tiny = {"source": "tiny:llama", "family": "decoder", "prompt_format": "chat"}
    grid = {"name": "no-vllm", "models": [{"name": "hf", **tiny}, {"name": "vl", "backend": "vllm", **tiny}],
            "tasks": ["fpb-sentiment"], "shots": [0], "decoding": {"mode": "free", "max_new_tokens": 4},
            "limits": {"test": 4}, "inference": {"batch_size": 4}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    proc = run_cli("grid/run.py", str(tmp_path / "grid.yaml"), "--results", str(tmp_path / "results"),
                   env={"CLFGRID_VLLM_PYTHON": sys.executable})
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "cells").glob("*/cell.json")]
    status = {r["cell"]["model"]: (r["status"], r.get("error")) for r in records}
    assert status["hf"] == ("done", None), proc.stderr[-2000:]
    assert status["vl"] == ("failed", f"GridError: backend vllm: vllm is not installed in {sys.executable}; "
                            "./install.sh installs it in .venv-vllm/bin/python, or set CLFGRID_VLLM_PYTHON to a "
                            "Python that has it"), status
    assert proc.returncode != 0 and "backend vllm: vllm is not installed" in proc.stdout + proc.stderr


def test_head_decoding_is_not_planned_on_vllm():
    """Classification heads are read by the transformers backend only (grid/registry.py)."""
    from grid.config import GridConfig
    from grid.data import data_dir_arg
    from grid.plan import build_plan

    head = {"mode": "head"}
    cfg = GridConfig.model_validate({
        "name": "h", "tasks": ["fpb-sentiment"], "shots": [0], "finetune": ["lora"], "decoding": [head],
        "models": [{"name": "vl", "source": "tiny:llama", "family": "decoder", "backend": "vllm"},
                   {"name": "hf", "source": "tiny:llama", "family": "decoder"}],
        "recipes": {"decoder/lora": {"hparams": {"heads": ["fpb-sentiment"], "max_steps": 1}}}})
    infer = [c for c in build_plan(cfg, data_dir_arg(None)).cells if c.kind == "infer"]
    assert [c.model for c in infer] == ["hf"]
