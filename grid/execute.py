"""Running a plan on Ray: fine-tune cells as Ray Train jobs, inference cells as Ray Data batch
inference, every finished cell written to the store at once.

Inference cells are grouped by the model they load (a base model, or a fine-tune cell's
artifact). Each group is one Ray Data pipeline over an actor pool that holds the model, so a
model is loaded once per actor however many cells (tasks x shots x seeds) use it, and cells
stream through it concurrently. A cell is written (predictions, then cell.json) the moment its
last chunk comes back.

The driver runs units (a fine-tune or merge cell, then the group that reads its model; or a base
model's group) in up to `parallel` threads, each unit once the cells it reads are done: the order
is grid/schedule.py's, and this module wires what running a unit means.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa

from grid.claims import Claims
from grid.config import GridConfig
from grid.data import label_sets, load_split, sample_test_rows, warn_unseen_test_labels
from grid.errors import GridError
from grid.metrics.label_scores import label_logprobs_column, stored_label_logprobs
from grid.metrics.score import score
from grid.plan import Cell, Plan
from grid.progress import Progress
from grid.prompting import Prompt, PromptBuilder, prompt_hash
from grid.registry import BACKENDS, FAMILIES, load, own_python
from grid.schedule import Unit, plan_units, schedule
from grid.scoring import golds_and_parsed
from grid.sources import portable
from grid.store import CellState, Store
from grid.tasks import get_task
from grid.uris import is_remote
from workers.artifacts import fetch, staging
from workers.models import resolve

log = logging.getLogger("clfgrid")


@dataclass
class RunSummary:
    planned: int
    already_done: int
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    elsewhere: dict[str, dict[str, Any]] = field(default_factory=dict)  # cells another driver ran: its claim
    rescored: list[str] = field(default_factory=list)  # done cells scored again (their metrics changed)


def cell_record(cell: Cell, status: str, **extra: Any) -> dict[str, Any]:
    """A cell.json: the cell, its status, and what its run gives (metrics, error, `seconds` of
    work, `started_at` / `finished_at` wall clock)."""
    return {"cell_id": cell.id, "status": status, "cell": cell.model_dump(), **extra}


# --- inference: requests in, predictions out ----------------------------------------------


@dataclass
class PreparedCell:
    cell: Cell
    rows: list[dict[str, Any]]  # test rows (example_id, text, words, gold fields)
    items: list[dict[str, Any]]  # requests, in row order
    labels: dict[str, tuple[str, ...]]  # the task's label sets, read once from the run's data


@lru_cache(maxsize=64)
def _test_rows(task_name: str, data_dir: str | None, limits: tuple[tuple[str, Any], ...]) -> list[dict[str, Any]]:
    """The (sampled) test rows of a task under a cell's `limits` (as sorted items, to cache), read
    once per run however many cells use them."""
    lim = dict(limits)
    task = get_task(task_name)
    test = load_split(task, "test", data_dir)
    return test.select(sample_test_rows(task, test, lim["test"], lim["seed"], lim.get("stratify", False))).to_list()


def test_rows(cell: Cell, data_dir: str | None) -> list[dict[str, Any]]:
    """The test rows an inference cell scores: its task's split, sampled by its limits."""
    return _test_rows(cell.task, data_dir, tuple(sorted(cell.limits.items())))


_BUILDERS: dict[tuple, PromptBuilder] = {}


def _prompt_builder(task_name: str, data_dir: str | None, text_budget: int | None, sampler: str,
                    budget_tokenizer: Any = None) -> PromptBuilder:
    """One prompt builder (train rows and few-shot index) per task, shared by all its cells (per
    model tokenizer when budgets count tokens)."""
    key = (task_name, data_dir, text_budget, sampler, getattr(budget_tokenizer, "name_or_path", None))
    if key not in _BUILDERS:
        task = get_task(task_name)
        _BUILDERS[key] = PromptBuilder(task, label_sets(task, data_dir), load_split(task, "train", data_dir).to_list(),
                                       text_budget, sampler, budget_tokenizer)
    return _BUILDERS[key]


def prepare_cell(cell: Cell, data_dir: str | None, tokenizer: Any) -> PreparedCell:
    """The requests of one inference cell: a prompt per test example (or text for encoders).

    A calibrated decoding's request also carries `calibration_prompts`, in the same format as
    its prompt: the prompts whose label scores correct the prompt's (workers.constrained)."""
    task = get_task(cell.task)
    rows = test_rows(cell, data_dir)
    labels = label_sets(task, data_dir)
    warn_unseen_test_labels(task, data_dir)  # once per task: test labels no train row has
    if not FAMILIES[cell.family].prompted:  # an encoder reads the bare text
        items = [{"example_id": r["example_id"], "text": r["text"], "words": r["words"]} for r in rows]
        return PreparedCell(cell, rows, items, labels)
    builder = _prompt_builder(cell.task, data_dir, cell.text_budget, cell.sampler,
                              tokenizer if cell.budget_unit == "tokens" else None)
    calibration = (cell.decoding or {}).get("calibration", "none")

    def as_text(prompt: Prompt) -> str:
        return prompt.as_text(cell.prompt_format, tokenizer) if FAMILIES[cell.family].templated else prompt.user

    items = []
    for r in rows:
        prompt = builder.build(r, cell.shots, cell.seed)
        text = as_text(prompt)
        item = {"example_id": r["example_id"], "prompt": text, "messages": prompt.messages(),
                "prompt_hash": prompt_hash(text), "decoding": cell.decoding, "task": cell.task, "seed": cell.seed,
                "labels": labels, "words": r["words"] if task.needs_words else None,
                # as training tokenizes it: a chat template writes its own BOS, raw text does not
                "add_special_tokens": cell.prompt_format != "chat"}
        if calibration != "none":
            item["calibration_prompts"] = [as_text(p) for p in
                                           builder.calibration_prompts(r, cell.shots, cell.seed, calibration)]
        items.append(item)
    return PreparedCell(cell, rows, items, labels)


def finish_cell(store: Store, prepared: PreparedCell, results: list[dict[str, Any]], started_at: float) -> dict:
    """Parse, write and score one cell. Returns its record (done, or failed with the error).

    The cells of a model stream through its actors together, so a cell has no wall time of its
    own: `seconds` is the model's time on its chunks (their latencies summed), `started_at` the
    start of its model's stream. Answers with label scores (constrained score decoding) keep
    them in column `label_logprobs` as grid.metrics.label_scores stores them (null in other
    rows), and the cell is scored from what is stored, so that re-scoring it gives the same."""
    cell = prepared.cell
    seconds = sum(r.get("latency_s") or 0.0 for r in results)
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        record = cell_record(cell, "failed", error=errors[0], seconds=seconds, started_at=started_at)
        store.write_cell(cell.id, record)
        return record
    task = get_task(cell.task)
    labels = prepared.labels
    golds, parsed = golds_and_parsed(task, labels, prepared.rows, [res["raw_output"] for res in results])
    label_logprobs = [stored_label_logprobs(task, res.get("label_logprobs"), g) for res, g in zip(results, golds)]
    table = pa.table({
        "cell_id": [cell.id] * len(results),
        "example_id": [r["example_id"] for r in prepared.rows],
        "prompt_hash": [it.get("prompt_hash") for it in prepared.items],
        "raw_output": [res["raw_output"] for res in results],
        "prediction": [json.dumps({k: p.value for k, p in ps.items()}) for ps in parsed],
        "gold": [json.dumps(g) for g in golds],
        "valid": [all(p.valid for p in ps.values()) for ps in parsed],
        "invalid_reason": ["; ".join(f"{k}: {p.reason}" for k, p in ps.items() if not p.valid) or None
                           for ps in parsed],
        "n_prompt_tokens": pa.array([res.get("n_prompt_tokens") for res in results], pa.int64()),
        "n_output_tokens": pa.array([res.get("n_output_tokens") for res in results], pa.int64()),
        "latency_s": pa.array([res.get("latency_s") for res in results], pa.float64()),
        "cost_usd": pa.array([res.get("cost_usd") for res in results], pa.float64()),
        "cached": pa.array([bool(res.get("cached")) for res in results], pa.bool_()),
        "label_logprobs": pa.array([None if lp is None else json.dumps(lp) for lp in label_logprobs], pa.string()),
    })
    store.write_predictions(cell.id, table)  # before scoring: a scoring error loses no answer
    usage = cell_usage(results)
    try:
        metrics = score(task, golds, parsed, seed=cell.seed, label_logprobs=label_logprobs)
    except GridError as exc:
        record = cell_record(cell, "failed", error=f"scoring: {exc} (its answers are in "
                             f"{store.predictions_path(cell.id)})", seconds=seconds, usage=usage, started_at=started_at)
        store.write_cell(cell.id, record)
        return record
    record = cell_record(cell, "done", metrics=metrics, scored_with=list(task.metrics), seconds=seconds,
                         n_examples=len(results), usage=usage, started_at=started_at, finished_at=time.time())
    store.write_cell(cell.id, record)
    return record


def cell_usage(results: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens and cost of a cell's answers. `cost_usd` is what the answers cost when they were
    paid for (the price of the cell, comparable across runs); `spent_usd` is what this run paid,
    leaving out answers served from the request cache (`n_cached`)."""
    usage = {key: sum(res.get(key) or 0 for res in results)
             for key in ("n_prompt_tokens", "n_output_tokens", "cost_usd")}
    usage["spent_usd"] = sum(res.get("cost_usd") or 0 for res in results if not res.get("cached"))
    usage["n_cached"] = sum(bool(res.get("cached")) for res in results)
    return usage


def _request_length(item: dict[str, Any]) -> int:
    return len(item.get("prompt") or item.get("text") or "")


def chunk_rows(prepared: Iterable[PreparedCell], chunk_size: int) -> list[dict[str, Any]]:
    """One Ray Data row per chunk of a cell's requests, cut the same way on every run.

    A chunk runs padded to its longest request, so a cell's requests are grouped by length
    first (as training groups its batches): one long 20NG text no longer makes seven short ones
    pay for its length. `index` is each request's place in the cell, to put the answers back."""
    out = []
    for p in prepared:
        order = sorted(range(len(p.items)), key=lambda i: _request_length(p.items[i]))
        for k, start in enumerate(range(0, len(order), chunk_size)):
            index = order[start:start + chunk_size]
            out.append({"cell_id": p.cell.id, "chunk": k, "index": json.dumps(index),
                        "items": json.dumps([p.items[i] for i in index])})
    return out


def in_cell_order(chunks: dict[int, list[dict[str, Any]]], indices: dict[int, list[int]]) -> list[dict[str, Any]]:
    """A cell's answers, from its chunks (keyed by chunk number), in the order of its requests."""
    placed = {i: a for k, answers in chunks.items() for i, a in zip(indices[k], answers)}
    return [placed[i] for i in range(len(placed))]


def model_spec(cell: Cell, store: Store, config: GridConfig) -> dict[str, Any]:
    """What the inference actor loads: the fine-tuned artifact, or the base model."""
    model = config.model(cell.model)  # a declared model, or a merge of the grid
    if cell.depends_on:  # a local path or an object-store URI: each actor fetches it (workers/artifacts.py)
        path = store.cell_uri(cell.depends_on, "model")
    else:  # resolved by each actor on its own node (workers/artifacts.fetch)
        path = portable(model.source)
    return {"family": cell.family, "backend": cell.backend, "path": path, "dtype": model.dtype,
            "options": model.options, "model_name": model.source, "revision": model.revision}


def rescore_stale(plan: Plan, store: Store, data_dir: str | None, states: list[CellState]) -> list[str]:
    """Finished inference cells whose task's metrics changed since they were scored: their stored
    raw answers are parsed and scored again, with their label log-probs where the file has them
    (the model is not run; a metric is not an input of the answers, so it is not in the cell id).
    Returns their ids."""
    by_id = {s.cell_id: s for s in states}
    redone = []
    for cell in plan.cells:
        state = by_id.get(cell.id)
        if cell.kind != "infer" or not state or state.status != "done" or state.scored_with is None:
            continue
        task = get_task(cell.task)
        if state.scored_with == list(task.metrics):
            continue
        record = store.read_cell(cell.id)  # the whole record, rewritten with the new metrics
        if record is None:  # removed since the scan
            continue
        rows = {r["example_id"]: r for r in test_rows(cell, data_dir)}
        labels = label_sets(task, data_dir)
        table = store.read_predictions(cell.id)
        answers = table.select(["example_id", "raw_output"]).to_pylist()
        golds, parsed = golds_and_parsed(task, labels, [rows[a["example_id"]] for a in answers],
                                         [a["raw_output"] for a in answers])
        metrics = score(task, golds, parsed, seed=cell.seed, label_logprobs=label_logprobs_column(table))
        store.write_cell(cell.id, {**record, "metrics": metrics, "scored_with": list(task.metrics)})
        log.info("re-scored %s with %s (was %s)", cell.label(), ", ".join(task.metrics), ", ".join(state.scored_with))
        redone.append(cell.id)
    return redone


def backend_python(name: str) -> str | None:
    """The Python a backend's actors run in, if not the driver's (grid.registry.own_python).
    Fails, naming the fix, when that Python is missing or lacks the module its actors import."""
    info = BACKENDS[name]
    python = own_python(name)
    if info.requires:
        how = (f"./install.sh installs it in {info.default_python}" if info.default_python else "install it") + (
            f", or set {info.python_env} to a Python that has it" if info.python_env else "")
        if python and not os.access(python, os.X_OK):
            raise GridError(f"backend {name}: {info.python_env}={python} is not an executable Python; {how}")
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({info.requires!r}) is None)"
        if subprocess.run([python or sys.executable, "-c", probe], capture_output=True).returncode:
            raise GridError(f"backend {name}: {info.requires} is not installed in {python or sys.executable}; {how}")
    return python


class _Answers:
    """A model group's answers as they come, by cell and request index: a cell is finished
    (written and scored) as soon as all its answers are in, whichever path gave them."""

    def __init__(self, prepared: dict[str, PreparedCell], store: Store, progress: Progress, summary: RunSummary):
        self.prepared, self.store, self.progress, self.summary = prepared, store, progress, summary
        self.got: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        self.started_at = time.time()

    def add(self, cell_id: str, indices: list[int], answers: list[dict[str, Any]]) -> None:
        self.got[cell_id].update(zip(indices, answers))
        self.progress.examples_done(len(answers))
        p = self.prepared[cell_id]
        if len(self.got[cell_id]) == len(p.items):
            results = [self.got[cell_id][i] for i in range(len(p.items))]
            _account(self.summary, self.progress, p.cell, finish_cell(self.store, p, results, self.started_at))


def run_inference_group(
    cells: list[Cell], spec: dict[str, Any], config: GridConfig, store: Store,
    data_dir: str | None, progress: Progress, summary: RunSummary,
) -> None:
    """All inference cells that share one model: through its backend's use of Ray's own batch
    API for what that serves (vLLM's generation: ray.data.llm), the rest through one Ray Data
    actor pool of workers.predict.Predictor."""
    backend = BACKENDS[spec["backend"]]
    python = backend_python(spec["backend"])  # a missing vLLM fails the group here, before any work
    tokenizer = None
    if FAMILIES[spec["family"]].templated and (backend.batch_api or any(
            c.prompt_format == "chat" or c.budget_unit == "tokens" for c in cells)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(fetch(spec["path"]))
    prepared = {c.id: prepare_cell(c, data_dir, tokenizer) for c in cells}
    inf = config.inference_for(config.model(cells[0].model))
    progress.add_examples(sum(len(p.items) for p in prepared.values()))
    answers = _Answers(prepared, store, progress, summary)
    serves = load(backend.batch_api_serves) if backend.batch_api_serves else (lambda decoding: False)
    through_api = [p for p in prepared.values() if serves(p.cell.decoding)]
    on_actors = [p for p in prepared.values() if not serves(p.cell.decoding)]
    if (python or through_api) and not is_remote(spec["path"]):
        # resolved here, on the driver's node: the backend's own Python may lack what resolves a
        # packaged or GGUF model, and Ray's batch API reads the folder as it is (an object-store
        # URI or a hub id is fetched by each engine's node)
        spec = {**spec, "path": fetch(spec["path"])}
    if on_actors:
        _run_on_actors(on_actors, spec, inf, python, answers)
    if through_api:
        for a in load(backend.batch_api)([(p.cell.id, p.items) for p in through_api], tokenizer, spec, inf, python):
            answers.add(a["cell_id"], [a["index"]], [a])


def _run_on_actors(prepared: list[PreparedCell], spec: dict[str, Any], inf: Any, python: str | None,
                   answers: _Answers) -> None:
    """Cells through a Ray Data actor pool of Predictor, a chunk of requests a row."""
    import ray.data

    from workers.predict import Predictor

    rows = chunk_rows(prepared, inf.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # a backend that pins its own torch/transformers (vLLM) runs its actors in its own Python:
    # .venv-vllm here (install.sh), the one cluster.yaml installs on every node there
    remote_args: dict[str, Any] = {"runtime_env": {"py_executable": python}} if python else {}
    out = ds.map_batches(
        Predictor, fn_constructor_kwargs={"spec": spec, "retries": inf.retries},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=inf.concurrency), num_cpus=inf.num_cpus,
        num_gpus=inf.num_gpus, resources=inf.custom_resources or None, **remote_args,
    )
    indices = {(r["cell_id"], r["chunk"]): json.loads(r["index"]) for r in rows}
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        for cid, k, res in zip(batch["cell_id"].to_pylist(), batch["chunk"].to_pylist(),
                               batch["results"].to_pylist()):
            answers.add(cid, indices[(cid, k)], json.loads(res))


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception as one line: a Ray error's text ends with the original exception's line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    named = re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", last)
    return (last if named else f"{type(exc).__name__}: {last}")[:limit]


def _account(summary: RunSummary, progress: Progress, cell: Cell, record: dict[str, Any]) -> None:
    summary.ran.append(cell.id)
    if record["status"] == "failed":
        summary.failed[cell.id] = record["error"]
        log.error("cell %s failed: %s (%s)", cell.id, record["error"], cell.label())
    progress.cell_done(cell, record)


# --- fine-tuning --------------------------------------------------------------------------


def run_finetune(cell: Cell, store: Store, data_dir: str | None, retries: int) -> dict[str, Any]:
    """One fine-tune cell as a Ray Train job; resumes from its own checkpoints when rerun."""
    from grid.jobs import FinetuneJob, Resources

    recipe = cell.recipe or {}
    # A model the grid made (finetuned_from) trains from its parent cell's saved model.
    start_from = store.cell_uri(cell.depends_on, "model") if cell.depends_on else portable(cell.source)
    job = FinetuneJob(
        model=start_from, family=cell.family, task=cell.task, mode=cell.finetune,
        shots=cell.shots, prompt_format=cell.prompt_format if FAMILIES[cell.family].templated else "plain",
        text_budget=cell.text_budget, text_budget_unit=cell.budget_unit or "words",
        sampler=cell.sampler, seed=cell.seed,
        train_limit=recipe.get("train_limit") or cell.limits.get("train"),
        mix_with=tuple(recipe.get("mix_with", ())),
        hparams=recipe.get("hparams", {}), data_dir=data_dir, output_dir=store.cell_uri(cell.id),
        resources=Resources(**recipe.get("resources", {})),
    )
    if recipe.get("search"):  # a Ray Tune experiment whose best trial's model is the cell's
        from functools import partial

        from grid.search import SearchSpec
        from workers.search import run_search

        run = partial(run_search, spec=SearchSpec.model_validate(recipe["search"]))
    else:
        run = load(FAMILIES[cell.family].trainer)
    error = None
    start, started_at = time.perf_counter(), time.time()
    for attempt in range(retries + 1):
        try:
            metrics = run(job)
        except Exception as exc:  # noqa: BLE001 - recorded, and the grid goes on
            error = f"{type(exc).__name__}: {exc}"
            log.warning("fine-tune %s failed (try %d): %s\n%s", cell.id, attempt + 1, error,
                        traceback.format_exc(limit=3))
            continue
        record = cell_record(cell, "done", metrics=metrics, seconds=time.perf_counter() - start,
                             artifact="model", started_at=started_at, finished_at=time.time())
        store.write_cell(cell.id, record)
        return record
    record = cell_record(cell, "failed", error=error, seconds=time.perf_counter() - start, started_at=started_at)
    store.write_cell(cell.id, record)
    return record


# --- merging ------------------------------------------------------------------------------


def run_merge_cell(cell: Cell, store: Store) -> dict[str, Any]:
    """One merge cell: fill the mergekit template with the inputs' paths, check, merge on CPU.

    The record keeps the lineage (method, each input and its cell or source, seen tasks) and the
    resolved mergekit config; the merged model is the cell's `model/` folder.
    """
    from grid.merges import substitute
    from merge.run import merge

    recipe = cell.recipe or {}
    start, started_at = time.perf_counter(), time.time()
    lineage = {**(cell.lineage or {}), "input_cells": recipe["inputs"]}
    try:
        paths = {key: fetch(store.cell_uri(ref["cell"], "model")) if "cell" in ref else resolve(ref["source"])
                 for key, ref in recipe["inputs"].items()}
        with staging(store.cell_uri(cell.id, "model")) as folder:
            result = merge(substitute(recipe["mergekit"], paths), folder, where=f"merge {cell.model}",
                           random_seed=recipe.get("random_seed", 0))
    except Exception as exc:  # noqa: BLE001 - recorded, and the grid goes on
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.error("merge %s failed: %s\n%s", cell.model, error, traceback.format_exc(limit=3))
        record = cell_record(cell, "failed", error=error, lineage=lineage, seconds=time.perf_counter() - start,
                             started_at=started_at)
        store.write_cell(cell.id, record)
        return record
    record = cell_record(cell, "done", metrics={"merge_seconds": result["seconds"]}, lineage=lineage,
                         mergekit_config=result["config"], artifact="model",
                         seconds=time.perf_counter() - start, started_at=started_at, finished_at=time.time())
    store.write_cell(cell.id, record)
    return record


# --- the whole plan -----------------------------------------------------------------------


class OtherDrivers:
    """Other drivers on the same results dir, through the claims (grid/claims.py): the scheduler's
    `Others` (grid/schedule.py). A cell another driver holds is recorded in the run's summary."""

    def __init__(self, store: Store, plan: Plan, claims: Claims, summary: RunSummary, damaged: dict[str, str]):
        self.store, self.claims, self.summary, self.damaged = store, claims, summary, damaged
        self.producers = {c.id for c in plan.cells if c.kind in ("finetune", "merge")}  # cells others may make

    def claim(self, unit: Unit, done: set[str]) -> Unit | None:
        producer, inputs = unit.producer, unit.inputs
        if producer is not None:
            if not self.claims.claim(producer.id):
                return None
            if _status(self.store, producer.id) == "done":  # another driver made it after this run started
                self.claims.release(producer.id)
                done.add(producer.id)
                producer, inputs = None, [producer.id]
        mine = []
        for c in unit.group:
            if not self.claims.claim(c.id):
                self.summary.elsewhere[c.id] = self.claims.holder(c.id) or {}
            elif _status(self.store, c.id) == "done" and (
                    c.id not in self.damaged or not self.store.predictions_problem(c.id)):
                self.claims.release(c.id)  # another driver did it (again, if its predictions were damaged)
            else:
                mine.append(c)
        if producer is None and not mine:
            return None
        return Unit(producer, inputs, mine)

    def making(self, cell_id: str) -> bool:
        return self.claims.holder(cell_id) is not None

    def refresh(self, done: set[str], failed: set[str], made_here: set[str]) -> None:
        """Done cells join `done`; an input that no one makes any more (failed elsewhere, and not
        to be made here) joins `failed`."""
        statuses = self.store.statuses()
        done.update(cid for cid, s in statuses.items() if s == "done")
        for cid in self.producers - done - made_here:
            if statuses.get(cid) == "failed":
                failed.add(cid)


def execute(plan: Plan, config: GridConfig, store: Store, data_dir: str | None,
            num_cpus: int | None = None, poll_s: float = 3.0) -> RunSummary:
    """Run every cell not yet done; Ray is started (or joined) only when there is work.

    Up to `config.parallel` units run at once, each in a driver thread (grid/schedule.py): a unit
    starts when the cells it reads are done, and Ray queues its workers and actors until the
    cluster can place them. With `parallel: 1` units run one after another, in `plan_units` order.

    Another driver on the same results dir (grid/claims.py): a cell it has claimed is left to it;
    a unit whose model it is making waits for that model (every `poll_s` seconds), or takes the
    work over when the other driver's claim goes stale.
    """
    states = store.states()  # one scan of the results dir: re-scoring changes no status
    # A finished inference cell whose predictions file was damaged since (writes are atomic, so
    # by something else): its answers are gone, so it runs again.
    finished = {s.cell_id for s in states if s.status == "done"}
    damaged = store.damaged([c.id for c in plan.cells if c.kind == "infer" and c.id in finished])
    for why in damaged.values():
        log.warning("running again: %s", why)
    states = [s for s in states if s.cell_id not in damaged]
    rescored = rescore_stale(plan, store, data_dir, states)
    done = {s.cell_id for s in states if s.status == "done"}
    todo = [c for c in plan.cells if c.id not in done]
    summary = RunSummary(planned=len(plan.cells), already_done=len(plan.cells) - len(todo), rescored=rescored)
    if not todo:
        return summary
    if not store.is_local and any((c.recipe or {}).get("search") for c in todo):
        # Tune keeps its experiment state and each trial's folder on a local path (workers/search.py)
        raise GridError(f"results dir {store.uri}: fine-tune searches (recipe 'search') need a local or "
                        "shared-filesystem results dir; run the search there, or drop 'search' from the recipe")
    connect_ray(num_cpus, state_api=any((c.recipe or {}).get("search") for c in todo))
    progress = Progress(total_cells=len(todo))
    claims = Claims(store)

    def fail(cells: list[Cell], error: str) -> None:
        for c in cells:
            record = cell_record(c, "failed", error=error)
            store.write_cell(c.id, record)
            _account(summary, progress, c, record)

    def run_unit(unit: Unit) -> bool:
        """Run a unit; False when its producer failed (then its group is marked failed)."""
        try:
            if unit.producer is not None:
                cell = unit.producer
                record = run_merge_cell(cell, store) if cell.kind == "merge" else \
                    run_finetune(cell, store, data_dir, config.finetune_retries)
                _account(summary, progress, cell, record)
                if record["status"] != "done":
                    fail(unit.group, f"{cell.kind} cell {cell.id} failed")
                    return False
            if unit.group:
                try:
                    run_inference_group(unit.group, model_spec(unit.group[0], store, config), config, store,
                                        data_dir, progress, summary)
                except Exception as exc:  # a model that cannot load or answer fails its own cells
                    log.debug("inference of %s failed", unit.group[0].model, exc_info=True)
                    fail([c for c in unit.group if c.id not in summary.ran], one_line(exc))
            return True
        finally:
            for c in unit.cells():
                claims.release(c.id)

    try:
        schedule(plan_units(plan, todo), run=run_unit, fail=fail, done=done, parallel=config.parallel,
                 others=OtherDrivers(store, plan, claims, summary, damaged), poll_s=poll_s)
    finally:
        claims.close()
        progress.close()
    return summary


def _status(store: Store, cell_id: str) -> str | None:
    record = store.read_cell(cell_id)
    return record["status"] if record else None


def connect_ray(num_cpus: int | None = None, state_api: bool = False) -> None:
    """Use the cluster in RAY_ADDRESS (a `ray job submit` sets it), else start a local Ray.

    A local Ray runs without its dashboard (a faster start, one port fewer), unless `state_api`:
    a search needs Ray's state API, which the dashboard serves. When ASHA stops a trial, Tune kills
    the trial and with it its Ray Train controller; the worker group's placement group outlives the
    controller (a placement group lives as long as its job), and only Ray Train's
    PlacementGroupCleaner removes it, once the state API says the controller is dead. Without the
    dashboard it never can, and the next trial waits forever for the CPUs the stopped one held.
    Nor can it when the state API finds another local Ray first: each worker is told its own
    cluster's address (workers/ray_setup.py).
    """
    import ray

    if ray.is_initialized():
        return
    # Workers' logs reach the driver's stderr: a training cell's steps and loss are its progress;
    # Ray's own chatter goes to a file in the session's log folder, and each worker knows its own
    # cluster's address (workers/ray_setup.py).
    setup = {"worker_process_setup_hook": "workers.ray_setup.setup_worker"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=setup)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=state_api, runtime_env=setup)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
