"""Planning: the grid config becomes cells, each with an id that hashes what can change its result.

Nothing here touches Ray or loads a model: a dry run is the plan printed. An inference cell of a
fine-tuned model depends on its fine-tune cell (same model, task, mode, training prompt shots,
seed and recipe); the fine-tune cell's artifact is the model the inference cell loads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from grid.config import Decoding, GridConfig, ModelSpec, decoding_name
from grid.data import data_fingerprint
from grid.errors import GridError
from grid.gcpause import gc_paused
from grid.prompting import SAMPLER_IDS, template_source_hash
from grid.registry import BACKENDS, FAMILIES, planned
from grid.sources import check_source, is_local_path, source_revision
from grid.tasks import TaskDef, get_task

CellKind = Literal["finetune", "infer", "merge"]


class computed_once:
    """functools.cached_property without the lock Python 3.11's takes on each first access (a third
    of planning 100,000 cells): the value goes into the instance's __dict__, which later lookups
    find first. Two threads computing it at once compute the same value."""

    def __init__(self, func: Any):
        self.func, self.name = func, func.__name__

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


class Cell(BaseModel):
    """One unit of work and of resume. `id` covers every field except `name` and `depends_on`'s
    own inputs, which enter through the dependency's id."""

    model_config = ConfigDict(frozen=True, ignored_types=(computed_once,))

    kind: CellKind
    model: str  # display name; not part of the id (renaming a model redoes nothing)
    source: str
    weights: str  # revision or tiny-model recipe hash
    family: str
    backend: str
    prompt_format: str
    task: str
    data_fp: str
    template_fp: str | None
    shots: int
    finetune: str
    seed: int
    decoding: dict[str, Any] | None
    text_budget: int | None
    sampler: str
    limits: dict[str, Any]
    recipe: dict[str, Any] | None
    depends_on: str | None = None
    endpoint: str | None = None  # an API model's server (options.api_base): another server, other answers
    # A model's dtype and the options that can change its answers (model_runtime); None for the
    # defaults, and then left out of the id, so grids that set neither keep their cells.
    runtime: dict[str, Any] | None = None
    # "tokens" when text_budget counts the model's tokens; None for words (then left out of the id).
    budget_unit: str | None = None
    # What the weights saw and where they came from (seen tasks, merge inputs, the grid's
    # reference model): derived from fields already hashed, so not part of the id.
    lineage: dict[str, Any] | None = None

    @computed_once  # hashed once per cell: a 10,000-cell plan asks for ids often
    def id(self) -> str:
        # The fields as they are, not model_dump(): every field already holds plain JSON values
        # (str, int, None, dicts of them), which dump as themselves, and copying 100,000 cells
        # through pydantic's serializer was a third of a large plan's time.
        identity = {k: v for k, v in self.__dict__.items()
                    if k not in _NOT_IN_ID and not (v is None and k in _IN_ID_WHEN_SET)}
        resources = (self.recipe or {}).get("resources") or {}
        if any(k in _PLACEMENT for k in resources):  # where a job runs is not what it is
            kept = {k: v for k, v in resources.items() if k not in _PLACEMENT}
            identity["recipe"] = {**self.recipe, "resources": kept}
        blob = _ID_ENCODER.encode(identity)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def inputs(self) -> list[str]:
        """The cells whose models this one reads: a fine-tune's or inference's parent, a merge's inputs."""
        if self.kind == "merge":
            return [ref["cell"] for ref in (self.recipe or {})["inputs"].values() if "cell" in ref]
        return [self.depends_on] if self.depends_on else []

    def label(self) -> str:
        dec = f" {decoding_name(self.decoding)}" if self.decoding else ""
        return f"{self.kind} {self.model} {self.task} {self.shots}-shot ft={self.finetune} seed={self.seed}{dec}"


_NOT_IN_ID = frozenset({"model", "lineage", "id"})  # "id": the cached id itself, once computed
# A fine-tune's placement: which nodes its workers may run on, not what they compute.
_PLACEMENT = frozenset({"custom_resources"})
_IN_ID_WHEN_SET = frozenset({"runtime", "budget_unit"})  # fields added later: None keeps old ids
# json.dumps(identity, sort_keys=True, default=str), the ids' encoding, with one encoder for all cells
_ID_ENCODER = json.JSONEncoder(sort_keys=True, default=str)


@dataclass
class Plan:
    cells: list[Cell]
    skipped: int = 0  # combinations removed by built-in rules and `exclude`

    @cached_property  # derived on demand: planning a large grid need not build it
    def by_id(self) -> dict[str, Cell]:
        return {c.id: c for c in self.cells}


def _matches(rule: dict[str, Any], combo: dict[str, Any]) -> bool:
    for key, wanted in rule.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if combo[key] not in options:
            return False
    return True


def _headless(config: GridConfig, decoding: Decoding, model: ModelSpec, mode: str, task: str) -> bool:
    """Decoding `head` needs a fine-tune that trained a classification head for the task: the
    model's own (`finetuned_from` with `heads`) or the recipe of the fine-tune mode, and a
    backend that answers from heads (grid/registry.py)."""
    if decoding.mode != "head":
        return False
    if model.family != "decoder" or not BACKENDS[model.backend].heads:
        return True
    ff = model.finetuned_from
    if ff is not None and mode == "none":
        hparams = config.recipe_for(model, ff.finetune, ff.hparams)["hparams"]
    elif mode != "none":
        hparams = config.recipe_for(model, mode)["hparams"]
    else:
        return True
    return task not in hparams.get("heads", [])


def _uncalibratable(decoding: Decoding, model: ModelSpec, task: TaskDef) -> bool:
    """A calibrated decoding corrects the log-probs of every label of one choice: only a backend
    that scores every label computes them (grid/registry.py), and only a single-label task is one choice (word tags and
    multi-task answers chain many). Encoders answer from their heads and ignore decodings."""
    single_label = not task.is_multi and task.subtasks[0].type == "label"
    return (decoding.calibration != "none" and FAMILIES[model.family].prompted
            and (not BACKENDS[model.backend].label_logprobs or not single_label))


def validate_references(config: GridConfig, source: str | Path = "grid config", hub_cache: bool = True) -> None:
    """Unknown tasks and unreachable models fail here, before any work, naming the field.

    `hub_cache=False` (a dry run) skips the offline check that hub models are in the local cache:
    planning a cluster's grid on a laptop needs no weights. API models name no weights at all.
    """
    for i, name in enumerate(config.tasks):
        try:
            get_task(name)
        except GridError as exc:
            raise GridError(f"{source}: field tasks.{i}: {exc}") from None
    for i, model in enumerate(config.models):
        if model.family == "api" or (not hub_cache and not is_local_path(model.source)
                                     and ":" not in model.source):
            continue
        try:
            check_source(model.source, model.revision)
        except GridError as exc:
            raise GridError(f"{source}: field models.{i}.source: {exc}") from None
        for t in model.finetuned_from.tasks if model.finetuned_from else ():
            try:
                get_task(t)
            except GridError as exc:
                raise GridError(f"{source}: field models.{i}.finetuned_from.tasks: {exc}") from None
    for j, merge in enumerate(config.merges):
        for key, ref in merge.template()[1].items():
            if ref.source is not None:
                try:
                    check_source(ref.source, ref.revision)
                except GridError as exc:
                    raise GridError(f"{source}: field merges.{j} ({key}).source: {exc}") from None


@gc_paused
def build_plan(config: GridConfig, data_dir: str | Path | None = None) -> Plan:
    """Every cell of the grid, fine-tune cells before the inference cells that need them."""
    finetunes: dict[str, Cell] = {}
    infers: dict[str, Cell] = {}
    skipped = 0
    tasks = {name: get_task(name) for name in config.tasks}
    fingerprints = {name: data_fingerprint(task, data_dir) for name, task in tasks.items()}
    limits = config.limits.model_dump()
    infer_limits = limits | {"train": None}  # an inference cell reads test rows only
    # once per model: a GGUF source's identity is its file's sha256, found on disk
    weights = {m.name: source_revision(m.source, m.revision) for m in config.models}
    # What every cell of a model, task or decoding shares, worked out once: a 100,000-cell plan
    # would otherwise spend most of its time serializing the same config objects again.
    templates = {name: template_source_hash(task) for name, task in tasks.items()}
    decodings = [(d, d.model_dump(), decoding_name(d.model_dump())) for d in config.decoding]
    recipes: dict[tuple[str, str], dict[str, Any]] = {}
    # A fine-tune cell is the same for every decoding of its inference cells: made once.
    ft_cells: dict[tuple[str, str, int, str, int], Cell] = {}
    made = _finetune_chains(config, finetunes, data_dir)  # fine-tune chains of `finetuned_from` models
    for model, task_name, shots, mode, seed, (decoding, decoding_dump, decoding_label) in itertools.product(
        config.models, config.tasks, config.shots, config.finetune, config.seeds, decodings
    ):
        combo = {"model": model.name, "family": model.family, "backend": model.backend,
                 "task": task_name, "shots": shots, "finetune": mode, "seed": seed,
                 "decoding": decoding_label}
        task = tasks[task_name]
        is_encoder = model.family == "encoder"
        own = not (_uncalibratable(decoding, model, task) or _headless(config, decoding, model, mode, task_name)
                   or any(_matches(r, combo) for r in config.exclude))
        # With `finetuned_eval: all` a fine-tune is also evaluated on the other tasks, each with the
        # decodings the rules keep for it: a rule naming a decoding says where a model is scored
        # so (held-out tasks calibrated, seen tasks raw), and drops only that evaluation; the
        # other rules say what is trained.
        cross_eval = mode != "none" and model.family == "decoder" and config.finetuned_eval == "all"
        trains = cross_eval and not any(_matches(r, combo) for r in config.exclude if "decoding" not in r)
        if not planned(model.family, mode, shots) or not (own or trains):
            skipped += 1
            continue
        common = {
            "model": model.name, "source": model.source, "weights": weights[model.name],
            "family": model.family, "backend": model.backend,
            "prompt_format": "none" if is_encoder else model.prompt_format,
            "task": task_name, "data_fp": fingerprints[task_name],
            "template_fp": None if is_encoder else templates[task_name],
            "shots": shots, "finetune": mode, "seed": seed,
            "text_budget": config.text_budget or task.text_budget, "sampler": sampler_of(config, shots),
            "limits": infer_limits, "endpoint": model.options.get("api_base"), "runtime": model_runtime(model),
            "budget_unit": budget_unit(config, model),
        }
        depends_on, seen = made.get((model.name, seed), (None, list(model.seen_tasks)))
        if mode != "none":
            seen = _union(seen, [task_name])
            ft = ft_cells.get((model.name, task_name, shots, mode, seed))
            if ft is None:
                if (model.name, mode) not in recipes:
                    recipes[(model.name, mode)] = config.recipe_for(model, mode)
                ft = Cell(kind="finetune", decoding=None, recipe=recipes[(model.name, mode)],  # trains in fp32
                          depends_on=depends_on, lineage={"seen_tasks": seen, "from": depends_on},
                          **(common | {"runtime": None, "limits": limits}))
                ft_cells[(model.name, task_name, shots, mode, seed)] = ft
                finetunes[ft.id] = ft
            depends_on = ft.id
        decoding_dict = None if is_encoder else decoding_dump
        if own:
            cell = Cell(kind="infer", decoding=decoding_dict, recipe=None, depends_on=depends_on,
                        lineage=_infer_lineage(config, model.name, seen, task_name if mode != "none" else None),
                        **common)
            infers.setdefault(cell.id, cell)
        else:
            skipped += 1
        if cross_eval:
            for other in config.tasks:  # the fine-tuned model on the grid's other (unseen) tasks
                if other == task_name:
                    continue
                t = tasks[other]
                if (_uncalibratable(decoding, model, t) or _headless(config, decoding, model, mode, other)
                        or any(_matches(r, combo | {"task": other}) for r in config.exclude if "decoding" in r)):
                    skipped += 1
                    continue
                cross = {**common, "task": other, "data_fp": fingerprints[other],
                         "template_fp": templates[other],
                         "text_budget": config.text_budget or t.text_budget}
                cell = Cell(kind="infer", decoding=decoding_dict, recipe=None, depends_on=depends_on,
                            lineage=_infer_lineage(config, model.name, seen, task_name), **cross)
                infers.setdefault(cell.id, cell)
    merges, merge_infers, merge_skipped = _merge_cells(config, finetunes, made, fingerprints, tasks)
    for cell in merge_infers:
        infers.setdefault(cell.id, cell)
    return Plan(cells=[*finetunes.values(), *merges, *infers.values()], skipped=skipped + merge_skipped)


# --- models made by the grid: fine-tune chains (`finetuned_from`) and merges --------------------


# Options that change how a model is reached or paced, never what it answers: not in a cell's id.
OPERATIONAL_OPTIONS = frozenset({
    "api_base",  # in the id as `endpoint`
    "api_key_env", "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "breaker_after",
    "requests_per_second", "max_concurrency", "cache", "cache_dir",  # LiteLLM
    "gpu_memory_utilization", "max_num_seqs", "tensor_parallel_size",  # vLLM placement and memory
})


def budget_unit(config: GridConfig, model: ModelSpec) -> str | None:
    """"tokens" where the grid counts text budgets in the model's tokens and the model's tokenizer
    is at hand (a local decoder); None (words) otherwise."""
    tokens = (config.text_budget_unit == "tokens" and FAMILIES[model.family].prompted
              and BACKENDS[model.backend].local_tokenizer)
    return "tokens" if tokens else None


def sampler_of(config: GridConfig, shots: int) -> str:
    """The few-shot sampler's id (its strategy and algorithm version), as far as it matters: a
    zero-shot prompt draws no examples."""
    return SAMPLER_IDS[config.sampler] if shots > 0 else "random"


def model_runtime(model: ModelSpec) -> dict[str, Any] | None:
    """What of a model's dtype and options can change its answers (None: float32, no such option)."""
    options = {k: v for k, v in sorted(model.options.items()) if k not in OPERATIONAL_OPTIONS}
    out = ({"dtype": model.dtype} if model.dtype != "float32" else {}) | ({"options": options} if options else {})
    return out or None


def _union(*lists: list[str]) -> list[str]:
    out: list[str] = []
    for items in lists:
        out += [t for t in items if t not in out]
    return out


def _joined(fingerprints: list[str]) -> str:
    """One task's fingerprint as it is (cell ids of single-task cells do not change); several
    tasks' (a mixed fine-tune) hashed together."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("+".join(fingerprints).encode()).hexdigest()[:16]


def _infer_lineage(config: GridConfig, model: str, seen: list[str], trained_on: str | None = None) -> dict[str, Any]:
    return {"seen_tasks": seen, "reference": config.reference_of(model), "trained_on": trained_on}


Made = dict[tuple[str, int], tuple[str | None, list[str]]]


def _finetune_chains(config: GridConfig, finetunes: dict[str, Cell], data_dir: str | Path | None) -> Made:
    """For each model and seed: (the cell whose saved model it is, or None; the tasks its weights saw).

    A `finetuned_from` model is, for each seed of the grid, a chain of fine-tune cells, one per
    task, each from the last, or (`mix`) one cell on all its tasks; these cells join `finetunes`
    (so they run before anything that needs them), and the model's inference cells of a seed use
    that seed's chain. A mixed cell is named by its first task; its data and template fingerprints
    cover every task, and its recipe names the others (`mix_with`).
    """
    made: Made = {}
    for model in config.models:
        for seed in config.seeds:
            made[(model.name, seed)] = _made_model(config, model, seed, made, finetunes, data_dir)
    return made


def _made_model(config: GridConfig, model: ModelSpec, seed: int, made: Made, finetunes: dict[str, Cell],
                data_dir: str | Path | None) -> tuple[str | None, list[str]]:
    """One model's fine-tune chain for one seed (its cells added to `finetunes`)."""
    limits = config.limits.model_dump()
    ff = model.finetuned_from
    if ff is None:
        return None, list(model.seen_tasks)
    parent_id, seen = made[(ff.model, seed)]
    recipe_dict = config.recipe_for(model, ff.finetune, ff.hparams)
    if ff.train_limit is not None:
        recipe_dict["train_limit"] = ff.train_limit
    steps = [list(ff.tasks)] if ff.mix else [[t] for t in ff.tasks]
    for step_tasks in steps:
        step_defs = [get_task(t) for t in step_tasks]
        task_name, task = step_tasks[0], step_defs[0]
        seen = _union(seen, step_tasks)
        if ff.mix:
            recipe_dict = {**recipe_dict, "mix_with": step_tasks[1:]}
        ft = Cell(
            kind="finetune", model=model.name, source=model.source,
            weights=source_revision(model.source, model.revision), family=model.family,
            backend=model.backend, prompt_format=model.prompt_format, task=task_name,
            data_fp=_joined([data_fingerprint(t, data_dir) for t in step_defs]),
            template_fp=_joined([template_source_hash(t) for t in step_defs]),
            shots=0, finetune=ff.finetune, seed=seed, decoding=None,
            text_budget=config.text_budget or task.text_budget, sampler=sampler_of(config, 0), limits=limits,
            recipe=recipe_dict, depends_on=parent_id, budget_unit=budget_unit(config, model),
            lineage={"seen_tasks": seen, "from": parent_id, "prepares": model.name},
        )
        finetunes[ft.id] = ft
        parent_id = ft.id
    return parent_id, _union(seen, list(model.seen_tasks))


def _merge_cells(config: GridConfig, finetunes: dict[str, Cell], made: Made,
                 fingerprints: dict[str, str], tasks: dict[str, Any]) -> tuple[list[Cell], list[Cell], int]:
    """One merge cell per `merges:` entry, and the merged model's inference cells (finetune none).

    The merge cell's id hashes the mergekit template (method, weights, density, lambda, ...) and
    the identity of every input: a cell id for grid-made models, source and revision otherwise.
    """
    by_name = {m.name: m for m in config.models}
    merges: list[Cell] = []
    infers: list[Cell] = []
    skipped = 0
    for j, spec in enumerate(config.merges):
        template, bind = spec.template()
        inputs: dict[str, dict[str, Any]] = {}
        described: dict[str, str] = {}
        seen: list[str] = []
        for key, ref in bind.items():
            described[key] = ref.describe()
            if ref.source is not None:
                inputs[key] = {"source": ref.source, "weights": source_revision(ref.source, ref.revision)}
                continue
            seed = config.seeds[0] if ref.seed is None else ref.seed
            cell_id, ref_seen = made[(ref.model, seed)]
            if ref.task is not None:
                match = [c for c in finetunes.values()
                         if c.model == ref.model and c.task == ref.task and c.finetune == ref.finetune
                         and c.shots == ref.shots and c.seed == seed and c.depends_on == cell_id]
                if not match:
                    raise GridError(
                        f"field merges.{j} ({key}): the grid has no fine-tune cell of {ref.model} on "
                        f"{ref.task} (finetune {ref.finetune}, shots {ref.shots}, seed {seed}); "
                        f"add it to the finetune/shots/seeds axes or drop the exclude rule")
                cell_id, ref_seen = match[0].id, match[0].lineage["seen_tasks"]
            if cell_id is None:
                m = by_name[ref.model]
                inputs[key] = {"source": m.source, "weights": source_revision(m.source, m.revision)}
            else:
                inputs[key] = {"cell": cell_id}
            seen = _union(seen, ref_seen)
        # The merged weights follow the config and, for DARE, the masks' seed (0 keeps the ids it had).
        seeded = {"random_seed": spec.random_seed} if spec.random_seed else {}
        weights = hashlib.sha256(json.dumps(template | seeded, sort_keys=True).encode()).hexdigest()[:12]
        spec_model = config.model(spec.name)
        cell = Cell(
            kind="merge", model=spec.name, source=spec_model.source, weights=weights, family="decoder",
            backend="transformers", prompt_format=spec_model.prompt_format, task="-", data_fp="-",
            template_fp=None, shots=0, finetune="none", seed=0, decoding=None, text_budget=None,
            sampler=config.sampler, limits={}, recipe={"mergekit": template, "inputs": inputs, **seeded},
            lineage={"seen_tasks": seen, "inputs": described, "method": template.get("merge_method"),
                     "recipe": spec.recipe},
        )
        merges.append(cell)
        for seed in config.seeds:  # one merged model, whatever the seed of its inference cells
            made[(spec.name, seed)] = (cell.id, seen)
        for task_name, shots, seed, decoding in itertools.product(
            config.tasks, config.shots, config.seeds, config.decoding
        ):
            combo = {"model": spec.name, "family": "decoder", "backend": "transformers", "task": task_name,
                     "shots": shots, "finetune": "none", "seed": seed,
                     "decoding": decoding_name(decoding.model_dump())}
            if (_uncalibratable(decoding, spec_model, tasks[task_name]) or decoding.mode == "head"
                    or any(_matches(r, combo) for r in config.exclude)):
                skipped += 1
                continue
            task = tasks[task_name]
            infers.append(Cell(
                kind="infer", model=spec.name, source=spec_model.source, weights=cell.id, family="decoder",
                backend="transformers", prompt_format=spec_model.prompt_format, task=task_name,
                data_fp=fingerprints[task_name], template_fp=template_source_hash(task), shots=shots,
                finetune="none", seed=seed, decoding=decoding.model_dump(),
                text_budget=config.text_budget or task.text_budget, sampler=sampler_of(config, shots),
                limits=config.limits.model_dump() | {"train": None}, recipe=None, depends_on=cell.id,
                runtime=model_runtime(spec_model), lineage=_infer_lineage(config, spec.name, seen),
                budget_unit=budget_unit(config, spec_model),
            ))
    return merges, infers, skipped
