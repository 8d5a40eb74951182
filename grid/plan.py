"""Planning: the grid config becomes cells, each with an id that hashes what can change its result.

Nothing here touches Ray or loads a model: a dry run is the plan printed. An inference cell of a
fine-tuned model depends on its fine-tune cell (same model, task, mode, training prompt shots,
seed and recipe); the fine-tune cell's artifact is the model the inference cell loads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from grid.config import Decoding, GridConfig, ModelSpec
from grid.data import data_fingerprint
from grid.errors import GridError
from grid.prompting import template_source_hash
from grid.tasks import get_task
from workers.models import check_source, source_revision

CellKind = Literal["finetune", "infer"]


class Cell(BaseModel):
    """One unit of work and of resume. `id` covers every field except `name` and `depends_on`'s
    own inputs, which enter through the dependency's id."""

    model_config = ConfigDict(frozen=True)

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

    @property
    def id(self) -> str:
        identity = self.model_dump(exclude={"model"})
        blob = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def label(self) -> str:
        dec = f" {self.decoding['mode']}" if self.decoding else ""
        return f"{self.kind} {self.model} {self.task} {self.shots}-shot ft={self.finetune} seed={self.seed}{dec}"


@dataclass
class Plan:
    cells: list[Cell]
    skipped: int = 0  # combinations removed by built-in rules and `exclude`
    by_id: dict[str, Cell] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {c.id: c for c in self.cells}


def _matches(rule: dict[str, Any], combo: dict[str, Any]) -> bool:
    for key, wanted in rule.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if combo[key] not in options:
            return False
    return True


def _builtin_skip(model: ModelSpec, shots: int, finetune: str) -> bool:
    if model.family == "encoder":
        return finetune != "full" or shots != 0
    if model.family == "api":
        return finetune != "none"
    return False


def validate_references(config: GridConfig, source: str | Path = "grid config") -> None:
    """Unknown tasks and unreachable models fail here, before any work, naming the field."""
    for i, name in enumerate(config.tasks):
        try:
            get_task(name)
        except GridError as exc:
            raise GridError(f"{source}: field tasks.{i}: {exc}") from None
    for i, model in enumerate(config.models):
        try:
            check_source(model.source, model.revision)
        except GridError as exc:
            raise GridError(f"{source}: field models.{i}.source: {exc}") from None


def build_plan(config: GridConfig, data_dir: str | Path | None = None) -> Plan:
    """Every cell of the grid, fine-tune cells before the inference cells that need them."""
    finetunes: dict[str, Cell] = {}
    infers: dict[str, Cell] = {}
    skipped = 0
    tasks = {name: get_task(name) for name in config.tasks}
    fingerprints = {name: data_fingerprint(task, data_dir) for name, task in tasks.items()}
    limits = config.limits.model_dump()
    for model, task_name, shots, mode, seed, decoding in itertools.product(
        config.models, config.tasks, config.shots, config.finetune, config.seeds, config.decoding
    ):
        combo = {"model": model.name, "family": model.family, "backend": model.backend,
                 "task": task_name, "shots": shots, "finetune": mode, "seed": seed,
                 "decoding": decoding.mode}
        if _builtin_skip(model, shots, mode) or any(_matches(r, combo) for r in config.exclude):
            skipped += 1
            continue
        task = tasks[task_name]
        is_encoder = model.family == "encoder"
        common = dict(
            model=model.name, source=model.source, weights=source_revision(model.source, model.revision),
            family=model.family, backend=model.backend,
            prompt_format="none" if is_encoder else model.prompt_format,
            task=task_name, data_fp=fingerprints[task_name],
            template_fp=None if is_encoder else template_source_hash(task.prompt),
            shots=shots, finetune=mode, seed=seed,
            text_budget=config.text_budget or task.text_budget, sampler=config.sampler, limits=limits,
        )
        depends_on = None
        if mode != "none":
            recipe = config.recipe(model.family, mode)
            recipe_dict = recipe.model_dump()
            recipe_dict["hparams"] = {**recipe.hparams, **model.hparams}
            ft = Cell(kind="finetune", decoding=None, recipe=recipe_dict, **common)
            finetunes[ft.id] = ft
            depends_on = ft.id
        decoding_dict = None if is_encoder else _decoding_dict(decoding)
        cell = Cell(kind="infer", decoding=decoding_dict, recipe=None, depends_on=depends_on, **common)
        infers.setdefault(cell.id, cell)
    return Plan(cells=[*finetunes.values(), *infers.values()], skipped=skipped)


def _decoding_dict(decoding: Decoding) -> dict[str, Any]:
    return decoding.model_dump()
