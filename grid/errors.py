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


MAX_YAML_DEPTH = 64  # nesting levels: a grid or task file needs about 8
MAX_YAML_NODES = 200_000  # values once aliases are expanded: the largest committed grid has about 2,000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a mapping with a key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key].line + 1})", mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any, depth: int, sizes: dict[int, int]) -> int:
    """Values in `value` with every alias expanded (each shared object counted where it is used),
    computed once per object; refuses nesting past MAX_YAML_DEPTH."""
    if depth > MAX_YAML_DEPTH:
        raise GridError(f"nested more than {MAX_YAML_DEPTH} levels deep")
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in sizes:
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = 1 + sum(_expanded_size(c, depth + 1, sizes) for c in children)
    return sizes[id(value)]


def read_text(path: Path, encoding: str = "UTF-8") -> str:
    """A text file's contents; a byte the encoding cannot read names the file and its offset."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise GridError(f"{path}: not {encoding} text: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a grid, a task, a merge recipe); errors name the file.
    Bounded: text must be UTF-8, a key may not repeat, nesting stops at MAX_YAML_DEPTH and aliases
    may not expand past MAX_YAML_NODES values (a few hundred bytes of nested aliases can stand for
    billions, and a cell id would write them all out)."""
    text = read_text(path)
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: {yaml_message(exc)}") from None
    except RecursionError:
        raise GridError(f"{path}: not valid YAML: nested too deep to read") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: {what} must be a mapping")
    try:
        size = _expanded_size(raw, 0, {})
    except GridError as exc:
        raise GridError(f"{path}: {exc}") from None
    if size > MAX_YAML_NODES:
        raise GridError(f"{path}: holds {size:,} values once its aliases are expanded (at most {MAX_YAML_NODES:,})")
    return raw


def validate_file(model: type[M], raw: dict[str, Any], path: Path) -> M:
    """Validate a file's mapping; the first error names the file and the field path."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise GridError(f"{path}: {pydantic_message(exc)}") from None
