"""The task catalog: one YAML file per task under `tasks/`, validated here.

A task says which dataset it reads, which gold fields it asks for (its sub-tasks), which prompt
template renders it and which metrics score it. Three kinds of sub-task cover the papers:
`label` (one label from a set), `word_tags` (one label per word, MASSIVE slots) and `text`
(free generation scored with ROUGE). A task with several sub-tasks is answered as the paper's
JSON object `{"task1": ..., "task2": ...}`, keys in sub-task order. A new task of an existing
kind is a new YAML file; no code changes.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from grid.errors import GridError, read_yaml_mapping, validate_file

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
OUTSIDE_TAG = "Other"  # the paper's word label for "no slot"; MASSIVE's `outside` value

SubtaskType = Literal["label", "word_tags", "text"]


class Subtask(BaseModel):
    """One gold field a task asks for, and how an answer to it is read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="name used in metrics, e.g. `intent`")
    field: str = Field(description="gold field of the dataset's normalized rows")
    type: SubtaskType = "label"
    labels: tuple[str, ...] | None = Field(
        default=None,
        description="explicit label set (in prompt order); default: sorted labels of the train split",
    )


class Split(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: str = "train"
    test: str = "test"


class TaskDef(BaseModel):
    """A declarative task: everything needed to build prompts for it and score answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    dataset: str = Field(description="loader name in grid.data.LOADERS")
    dataset_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    splits: Split = Split()
    subtasks: tuple[Subtask, ...]
    prompt: str = Field(description="template file under prompts/, without .jinja")
    input_name: str = Field(default="Utter", description="the paper's <<...>> block name")
    metrics: tuple[str, ...] = ("accuracy", "macro_f1")
    text_budget: int | None = Field(
        default=None, description="default cut of the input text, in whitespace tokens"
    )

    def __hash__(self) -> int:  # dict fields are not hashable; the JSON form is, and is the identity
        return hash(self.model_dump_json())

    @property
    def is_multi(self) -> bool:
        return len(self.subtasks) > 1

    @property
    def needs_words(self) -> bool:
        return any(s.type == "word_tags" for s in self.subtasks)


def _task_files(tasks_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(tasks_dir.glob("*.yaml"))}


def load_task_file(path: Path) -> TaskDef:
    """Read and validate one task file; errors name the file and the field."""
    task = validate_file(TaskDef, read_yaml_mapping(path, "a task file"), path)
    if task.name != path.stem:
        raise GridError(f"{path}: field name: {task.name!r} must equal the file name {path.stem!r}")
    return task


@cache
def catalog(tasks_dir: Path = TASKS_DIR) -> dict[str, TaskDef]:
    """Every task of the catalog, by name."""
    return {name: load_task_file(path) for name, path in _task_files(tasks_dir).items()}


def get_task(name: str, tasks_dir: Path = TASKS_DIR) -> TaskDef:
    tasks = catalog(tasks_dir)
    if name not in tasks:
        raise GridError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]
