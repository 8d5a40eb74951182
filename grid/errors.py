"""One error type for every bad input the user can fix, printed as one line without a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class GridError(Exception):
    """A problem with the user's input (config, data, task, file), stated in one line."""


def first_error(exc: ValidationError) -> str:
    """The first validation error as `field.path: message`; a validator's own message (which
    names its field itself) without pydantic's "Value error, " prefix."""
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}" if path else msg


def pydantic_message(exc: ValidationError) -> str:
    """`first_error` in the form every CLI error uses, with the count of the others."""
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return ("field " if exc.errors()[0]["loc"] else "") + first_error(exc) + suffix


def yaml_message(exc: Exception) -> str:
    """A YAML error on one line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"not valid YAML: {where}{problem}"


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a grid, a task, a merge recipe); errors name the file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: {yaml_message(exc)}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: {what} must be a mapping")
    return raw


def validate_file(model: type[M], raw: dict[str, Any], path: Path) -> M:
    """Validate a file's mapping; the first error names the file and the field path."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise GridError(f"{path}: {pydantic_message(exc)}") from None
