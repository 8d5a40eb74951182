"""The task catalog: one YAML file per task under `tasks/`, validated here.

A task says which data it reads (its `data:` block, grid.dataspec: files, format, fields), which gold
fields it asks for (its sub-tasks), which prompt
template renders it and which metrics score it. Three kinds of sub-task cover the papers:
`label` (one label from a set), `word_tags` (one label per word, MASSIVE slots) and `text`
(free generation scored with ROUGE). A task with several sub-tasks is answered as the paper's
JSON object `{"task1": ..., "task2": ...}`, keys in sub-task order. A new task of an existing
kind is a new YAML file; no code changes. A task may start with `include: _shared.yaml` (a file
beside it): that mapping is the base and the task's own keys replace its keys (several tasks of
one dataset share its `data:` block). Files whose names start with `_` are not tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grid.dataspec import DataSpec
from grid.errors import GridError, read_yaml_mapping, validate_file

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
TASKS_ENV = "CLFGRID_TASKS"  # `--tasks DIR` sets it, so Ray workers (which inherit it) read the same tasks
OUTSIDE_TAG = "Other"  # the paper's word label for "no slot"; MASSIVE's `outside` value


def tag_set(labels: Sequence[str]) -> tuple[str, ...]:
    """The tags a word may get: a word-tag sub-task's labels, and OUTSIDE_TAG if they lack it."""
    return tuple(labels) if OUTSIDE_TAG in labels else (*labels, OUTSIDE_TAG)

SubtaskType = Literal["label", "word_tags", "text"]


class Subtask(BaseModel):
    """One gold field a task asks for, and how an answer to it is read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="name used in metrics, e.g. `intent`")
    field: str = Field(description="gold field of the normalized rows: a key of the task's data.fields")
    type: SubtaskType = "label"
    labels: tuple[str, ...] | None = Field(
        default=None,
        description="explicit label set (in prompt order); default: sorted labels of the train split",
    )


# The metrics a task can name, and the kind of sub-task each needs (exact_match: any). They are
# checked when the task loads, so a misspelt metric fails before any model runs.
Metric = Literal["accuracy", "macro_f1", "slot_f1", "exact_match", "rouge"]
METRIC_NEEDS: dict[str, SubtaskType] = {"accuracy": "label", "macro_f1": "label", "slot_f1": "word_tags",
                                        "rouge": "text"}


def unscorable_metric(metrics: Sequence[str], subtasks: Sequence[Subtask]) -> str | None:
    """Why these metrics cannot score these sub-tasks (a metric whose kind of sub-task is absent),
    or None: the one rule, read when a task loads and when one built in code is scored."""
    for metric in metrics:
        kind = METRIC_NEEDS.get(metric)
        if kind and not any(s.type == kind for s in subtasks):
            return f"{metric} needs a {kind} sub-task"
    return None


class TaskDef(BaseModel):
    """A declarative task: everything needed to build prompts for it and score answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    data: DataSpec
    subtasks: tuple[Subtask, ...]
    prompt: str | None = Field(
        default=None,
        description="template file under prompts/, without .jinja; default: the generic one of the task's kind")
    input_name: str = Field(default="Utter", description="the paper's <<...>> block name")
    metrics: tuple[Metric, ...] = ("accuracy", "macro_f1")
    encoder_epochs: int = Field(
        default=10, description="encoder fine-tune epochs when the recipe says epochs: null (the paper's)")
    text_budget: int | None = Field(
        default=None, description="default cut of the input text, in whitespace tokens"
    )

    def __hash__(self) -> int:  # dict fields are not hashable; the JSON form is, and is the identity
        return hash(self.model_dump_json())

    @model_validator(mode="after")
    def _fields_declared(self) -> TaskDef:
        for i, sub in enumerate(self.subtasks):
            if sub.field not in self.data.fields and sub.field != "text":  # a text task may echo its input
                raise ValueError(f"subtasks.{i}.field: {sub.field!r} is not one of data.fields "
                                 f"({', '.join(self.data.fields)})")
        if problem := unscorable_metric(self.metrics, self.subtasks):
            raise ValueError(f"metrics: {problem}")
        return self

    def data_identity(self) -> dict[str, Any]:
        """What decides a task's rows and gold: the data spec and the sub-tasks (fields, kinds,
        label lists). A comment or a description edit leaves it as it is."""
        return {"data": self.data.model_dump(mode="json"),
                "subtasks": [s.model_dump(mode="json") for s in self.subtasks]}

    @property
    def prompt_name(self) -> str:
        """The template this task's prompts render: its own, or the generic one for its kind."""
        if self.prompt is not None:
            return self.prompt
        return "generic-multi" if self.is_multi else f"generic-{self.subtasks[0].type.replace('word_', '')}"

    @property
    def is_multi(self) -> bool:
        return len(self.subtasks) > 1

    @property
    def needs_words(self) -> bool:
        return any(s.type == "word_tags" for s in self.subtasks)


def _task_files(tasks_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(tasks_dir.glob("*.yaml")) if not p.name.startswith("_")}


def _with_include(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The task's mapping over its `include:` file's mapping (one level: the task's keys win)."""
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise GridError(f"{path}: field include: expected a file name beside the task")
    base_path = path.parent / include
    if not base_path.is_file():
        raise GridError(f"{path}: field include: {base_path} does not exist")
    base = read_yaml_mapping(base_path, "an included task file")
    if "include" in base:
        raise GridError(f"{base_path}: field include: an included file cannot include another")
    return {**base, **raw}


def load_task_file(path: Path) -> TaskDef:
    """Read and validate one task file; errors name the file and the field."""
    if not path.is_file():
        raise GridError(f"task file {path} does not exist")
    task = validate_file(TaskDef, _with_include(read_yaml_mapping(path, "a task file"), path), path)
    if task.name != path.stem:
        raise GridError(f"{path}: field name: {task.name!r} must equal the file name {path.stem!r}")
    return task


def tasks_dirs() -> tuple[Path, ...]:
    """The folders tasks are read from: the project's `tasks/`, then `$CLFGRID_TASKS` (a folder
    of the user's task files, outside the repo; its tasks may not reuse a catalog name)."""
    extra = os.environ.get(TASKS_ENV)
    if not extra:
        return (TASKS_DIR,)
    path = Path(extra).expanduser().resolve()
    if not path.is_dir():
        raise GridError(f"tasks dir {path} does not exist")
    return (TASKS_DIR, path) if path != TASKS_DIR else (TASKS_DIR,)


def catalog(dirs: tuple[Path, ...] | None = None) -> dict[str, TaskDef]:
    """Every task of the catalog (and of a `--tasks DIR`), by name."""
    return _catalog(dirs or tasks_dirs())


@cache
def _catalog(dirs: tuple[Path, ...]) -> dict[str, TaskDef]:
    tasks: dict[str, TaskDef] = {}
    for folder in dirs:
        for name, path in _task_files(folder).items():
            if name in tasks:
                raise GridError(f"{path}: task {name!r} is already defined in {TASKS_DIR}; rename it")
            tasks[name] = load_task_file(path)
    return tasks


def use_tasks_dir(tasks_dir: str | Path | None) -> None:
    """Add a folder of task files for this process and the Ray workers it starts."""
    if tasks_dir:
        os.environ[TASKS_ENV] = str(Path(tasks_dir).expanduser().resolve())
        tasks_dirs()  # a missing folder fails here, naming it


def get_task(name: str) -> TaskDef:
    tasks = catalog()
    if name not in tasks:
        raise GridError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]
