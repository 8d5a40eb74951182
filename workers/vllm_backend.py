"""Local decoders on GPU nodes with vLLM: continuous batching, prefix caching, structured outputs.

vLLM pins its own torch and transformers (see the environment notes), so it lives in its own
environment on GPU nodes and is imported lazily, inside `VLLMBackend`. Everything up to the
engine call is a pure function of plain data, tested on CPU (tests/test_vllm_requests.py):

- `sampling_kwargs(decoding)`: SamplingParams arguments (greedy when temperature is 0).
- `structured_output(task, labels, n_words)`: StructuredOutputsParams arguments for constrained
  decoding: `choice=[labels]` for a single-label task, `json=schema` for word tags (an array of
  tag enums, one per word) and for multi-task answers (an object `task1`, `task2`, ... in order).
  (vLLM >= 0.12; the old guided_* parameters are gone.)
- `build_requests(items)`: one (prompt, sampling kwargs, structured kwargs or None) per item.
- `answer_from_output(text, ...)`: the answer dict; JSON answers rewritten in canonical form.

Every prompt of a cell starts with the same instruction and label list, so
`enable_prefix_caching=True` computes that prefix once per engine, whatever the batching.

Options (`ModelSpec.options`, all optional): `gpu_memory_utilization`, `max_model_len`,
`tensor_parallel_size`, `max_num_seqs`, `seed` (default 0), `structured_outputs_backend`
("auto"), `engine` (a dict passed to vllm.LLM as is).
"""

from __future__ import annotations

import json
from typing import Any

from grid.tasks import TaskDef, get_task, tag_set

ENGINE_OPTIONS = ("gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "max_num_seqs")


# --- pure request building (CPU-tested) ------------------------------------------------------


def sampling_kwargs(decoding: dict[str, Any], seed: int | None = 0) -> dict[str, Any]:
    """SamplingParams arguments for a cell's decoding."""
    temperature = float(decoding.get("temperature", 0.0))
    kwargs: dict[str, Any] = {"max_tokens": int(decoding.get("max_new_tokens", 64)), "temperature": temperature}
    if temperature > 0:
        kwargs["seed"] = seed
    else:
        kwargs["top_p"] = 1.0
        kwargs["top_k"] = -1
    return kwargs



def tags_schema(tags: list[str], n_words: int | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": {"type": "string", "enum": list(tag_set(tags))}}
    if n_words is not None:
        schema.update(minItems=n_words, maxItems=n_words)
    return schema


def multi_schema(task: TaskDef, labels: dict[str, list[str]], n_words: int | None) -> dict[str, Any]:
    """The paper's multi-task answer {"task1": ..., "task2": ...} as a JSON schema, keys in order."""
    props: dict[str, Any] = {}
    for i, sub in enumerate(task.subtasks, 1):
        if sub.type == "label":
            props[f"task{i}"] = {"type": "string", "enum": list(labels[sub.name])}
        elif sub.type == "word_tags":
            props[f"task{i}"] = tags_schema(list(labels[sub.name]), n_words)
        else:
            props[f"task{i}"] = {"type": "string"}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def structured_output(task: TaskDef, labels: dict[str, list[str]], n_words: int | None) -> dict[str, Any]:
    """StructuredOutputsParams arguments that admit exactly the task's valid answers."""
    if task.is_multi:
        return {"json": multi_schema(task, labels, n_words)}
    sub = task.subtasks[0]
    if sub.type == "label":
        return {"choice": list(labels[sub.name])}
    if sub.type == "word_tags":
        return {"json": tags_schema(list(labels[sub.name]), n_words)}
    raise ValueError(f"task {task.name}: free-text sub-tasks cannot be constrained")


def build_requests(items: list[dict[str, Any]], seed: int | None = 0) -> list[dict[str, Any]]:
    """One request per item: the prompt, SamplingParams kwargs, StructuredOutputsParams kwargs."""
    requests = []
    for item in items:
        decoding = item.get("decoding") or {}
        structured = None
        if decoding.get("mode") == "constrained":
            words = item.get("words")
            structured = structured_output(get_task(item["task"]), item["labels"],
                                           len(words) if words is not None else None)
        requests.append({"prompt": item["prompt"], "sampling": sampling_kwargs(decoding, seed),
                         "structured": structured})
    return requests


def canonical_text(text: str, structured: dict[str, Any] | None) -> str:
    """A JSON answer rewritten the way format_answer writes it (vLLM's JSON spacing varies)."""
    if not structured or "json" not in structured:
        return text.strip() if structured else text
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


def answer_from_output(text: str, n_prompt: int, n_output: int, structured: dict[str, Any] | None) -> dict[str, Any]:
    return {"raw_output": canonical_text(text, structured), "n_prompt_tokens": n_prompt,
            "n_output_tokens": n_output}


def engine_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """vllm.LLM arguments for a model group's spec."""
    opts = spec.get("options") or {}
    kwargs: dict[str, Any] = {"model": spec["path"], "enable_prefix_caching": True, "seed": opts.get("seed", 0)}
    if spec.get("revision"):
        kwargs["revision"] = spec["revision"]
    dtype = spec.get("dtype", "auto")
    kwargs["dtype"] = "auto" if dtype in (None, "auto") else dtype
    for key in ENGINE_OPTIONS:
        if key in opts:
            kwargs[key] = opts[key]
    if opts.get("structured_outputs_backend"):
        kwargs["structured_outputs_config"] = {"backend": opts["structured_outputs_backend"]}
    kwargs.update(opts.get("engine") or {})
    return kwargs


# --- the engine (GPU nodes) ------------------------------------------------------------------


class VLLMBackend:
    def __init__(self, spec: dict[str, Any]):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("backend vllm needs vLLM installed (GPU nodes; its own environment, "
                               "see the environment notes)") from exc
        self.seed = (spec.get("options") or {}).get("seed", 0)
        self.llm = LLM(**engine_kwargs(spec))

    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        requests = build_requests(items, self.seed)
        params = []
        for req in requests:
            structured = StructuredOutputsParams(**req["structured"]) if req["structured"] else None
            params.append(SamplingParams(**req["sampling"], structured_outputs=structured))
        outputs = self.llm.generate([r["prompt"] for r in requests], params, use_tqdm=False)
        return [answer_from_output(out.outputs[0].text, len(out.prompt_token_ids or []),
                                   len(out.outputs[0].token_ids), req["structured"])
                for out, req in zip(outputs, requests)]
