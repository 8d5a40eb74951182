"""Reading a model's raw answer into one value per sub-task, and writing the canonical answer.

`parse_answer` never raises: whatever the text (empty, prose, broken JSON, a label outside the
set), each sub-task gets a `Parsed` with `valid` and, when invalid, a one-line `reason`. Scoring
(grid.metrics) decides what an invalid answer is worth: a wrong label, or for word tags the value
as given (padded/cut the MASSIVE way) or all "Other" when there is none.

Answer forms, by sub-task type:
- label: the exact label, else a normalized match (case, surrounding whitespace, quotes or
  backticks, a trailing period, a leading "Label:" as the paper's prompts end with).
- word_tags: one tag per word, a slot name or "Other": a JSON list, a Python literal list, or a
  plain whitespace/comma separated sequence of known tags.
- text: the stripped text.
A task with several sub-tasks is answered with the paper's JSON object `{"task1": ..., "task2": ...}`
(keys in sub-task order); code fences, prose before it and text after it are tolerated.

`format_answer` writes the canonical answer (training targets, few-shot examples);
`parse_answer(format_answer(gold))` gives back gold, every sub-task valid.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from grid.errors import GridError
from grid.tasks import Subtask, TaskDef, tag_set

_MAX_LITERAL_CHARS = 100_000  # ast.literal_eval on longer text is not worth the time
_MAX_OBJECT_TRIES = 8  # `{` (or `[`) starting points tried before giving up
_SHOWN_CHARS = 60  # how much of a bad answer a reason quotes

_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_PREFIX = re.compile(r"^\s*(?:label|labels|slots|output|answer)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'`"
_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class Parsed:
    """One sub-task's reading of an answer."""

    value: str | list[str] | None  # a label, a list of word tags, or text; None when nothing usable
    valid: bool
    reason: str | None  # why invalid; None when valid


_NOTHING = object()


# --- small helpers -------------------------------------------------------------------------


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _unfence(text: str) -> str:
    """The content of the first ``` code fence, or the text itself when there is none."""
    if "```" not in text:
        return text
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _clean(raw: object) -> str:
    """Raw answer as stripped text: None -> "", code fence removed, a leading "Label:" etc. removed."""
    if raw is None:
        return ""
    text = raw if isinstance(raw, str) else str(raw)
    text = _unfence(text).strip()
    return _PREFIX.sub("", text, count=1).strip()


def _normalize(text: str) -> str:
    """The loose form labels and tags are matched in: no prefix, quotes, trailing period; casefolded."""
    prev = None
    while text != prev:
        prev = text
        text = _PREFIX.sub("", text, count=1).strip().strip(_QUOTES).strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
    return text.casefold()


@lru_cache(maxsize=256)
def _matcher(labels: tuple[str, ...]) -> tuple[frozenset[str], dict[str, str]]:
    """Exact labels, and normalized form -> label for the forms that name exactly one label."""
    loose: dict[str, str | None] = {}
    for label in labels:
        key = _normalize(label)
        loose[key] = None if key in loose and loose[key] != label else label
    return frozenset(labels), {k: v for k, v in loose.items() if v is not None and k}


def _match(text: str, labels: tuple[str, ...]) -> str | None:
    exact, loose = _matcher(labels)
    if text in exact:
        return text
    stripped = text.strip()
    if stripped in exact:
        return stripped
    return loose.get(_normalize(text))


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> str | None:
    """The text from `start` (an `open_ch`) to its matching `close_ch`, skipping quoted strings."""
    depth = 0
    quote: str | None = None
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def _load(snippet: str) -> tuple[Any, str | None]:
    """JSON, else a Python literal (single quotes); (value, None) or (_NOTHING, the JSON error)."""
    try:
        return json.loads(snippet), None
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            error = f"{exc.msg} at char {exc.pos}"
        else:
            error = type(exc).__name__
    if len(snippet) <= _MAX_LITERAL_CHARS:
        try:
            with warnings.catch_warnings():  # invalid escapes in model text warn at compile time
                warnings.simplefilter("ignore")
                return ast.literal_eval(snippet), None
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return _NOTHING, error


def _find(text: str, open_ch: str, close_ch: str, kind: type) -> tuple[Any, str | None]:
    """The first balanced `open_ch ... close_ch` in text that loads as `kind`; else the first error."""
    first_error: str | None = None
    pos = text.find(open_ch)
    tries = 0
    while pos != -1 and tries < _MAX_OBJECT_TRIES:
        tries += 1
        snippet = _balanced(text, pos, open_ch, close_ch)
        if snippet is None:
            if first_error is None:
                _, error = _load(text[pos:])
                first_error = error or f"no closing {close_ch!r}"
            break  # an unclosed bracket stays unclosed for every later start
        value, error = _load(snippet)
        if value is not _NOTHING and isinstance(value, kind):
            return value, None
        if first_error is None:
            first_error = error or f"expected {'an object' if kind is dict else 'a list'}"
        pos = text.find(open_ch, pos + 1)
    if first_error is None:
        first_error = "no JSON object found" if kind is dict else "no list found"
    return _NOTHING, first_error


def _invalid(reason: str, value: str | list[str] | None = None) -> Parsed:
    return Parsed(value=value, valid=False, reason=reason)


# --- one sub-task --------------------------------------------------------------------------


def _parse_label(text: str, labels: tuple[str, ...]) -> Parsed:
    cleaned = _clean(text)
    if not cleaned:
        return _invalid("empty answer")
    label = _match(text, labels)
    if label is None:
        label = _match(cleaned, labels)
    if label is None:
        shown = _shown(cleaned.strip(_QUOTES).rstrip(".").strip())
        return _invalid(f"label {shown!r} not in the label set")
    return Parsed(value=label, valid=True, reason=None)


def _tags_from_items(items: list, tags: tuple[str, ...], n_words: int | None) -> Parsed:
    """A list of tags (already parsed) checked against the tag set and the number of words.

    A tag outside the set keeps its place as written (the answer is invalid): scored, it is a
    predicted slot of an unknown type, a false positive, as MASSIVE's own scorer counts it.
    """
    out: list[str] = []
    unknown: list[str] = []
    for item in items:
        tag = _match(item, tags) if isinstance(item, str) else None
        if tag is None:
            tag = item if isinstance(item, str) else json.dumps(item, default=str)
            unknown.append(tag)
        out.append(tag)
    reasons: list[str] = []
    if unknown:
        distinct = list(dict.fromkeys(unknown))
        shown = ", ".join(repr(_shown(u)) for u in distinct[:5])
        more = f" (and {len(distinct) - 5} more)" if len(distinct) > 5 else ""
        word = "tags" if len(distinct) > 1 else "tag"
        reasons.append(f"word {word} {shown}{more} not in the label set")
    if n_words is not None and len(out) != n_words:
        reasons.append(f"expected {n_words} word tags, got {len(out)}")
    if reasons:
        return _invalid("; ".join(reasons), out)
    return Parsed(value=out, valid=True, reason=None)


def _parse_word_tags(text: str, tags: tuple[str, ...], n_words: int | None) -> Parsed:
    cleaned = _clean(text)
    if not cleaned:
        return _invalid("empty answer")
    if "[" in cleaned:
        items, _ = _find(cleaned, "[", "]", list)
        if items is not _NOTHING:
            return _tags_from_items(items, tags, n_words)
    tokens = [t.strip(_QUOTES) for t in _SEPARATORS.split(cleaned.strip("[]"))]
    tokens = [t for t in tokens if t]
    if tokens and all(_match(t, tags) is not None for t in tokens):
        return _tags_from_items(tokens, tags, n_words)
    return _invalid(f"not a list of word tags: {_shown(cleaned)!r}")


def _parse_text(text: str) -> Parsed:
    stripped = text.strip()
    if not stripped:
        return _invalid("empty answer")
    return Parsed(value=stripped, valid=True, reason=None)


def _parse_one(raw: str, sub: Subtask, labels: tuple[str, ...], n_words: int | None) -> Parsed:
    if sub.type == "label":
        return _parse_label(raw, labels)
    if sub.type == "word_tags":
        return _parse_word_tags(raw, tag_set(labels), n_words)
    return _parse_text(raw)



def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _parse_value(value: object, key: str, sub: Subtask, labels: tuple[str, ...],
                 n_words: int | None) -> Parsed:
    """One sub-task's value from the multi-task JSON object."""
    if sub.type == "word_tags":
        if isinstance(value, (list, tuple)):
            return _tags_from_items(list(value), tag_set(labels), n_words)
        if isinstance(value, str):
            return _parse_word_tags(value, tag_set(labels), n_words)
        return _invalid(f"{key}: expected a list of word tags, got {_json_type(value)}")
    if not isinstance(value, str):
        return _invalid(f"{key}: expected a string, got {_json_type(value)}")
    return _parse_label(value, labels) if sub.type == "label" else _parse_text(value)


def _lookup(obj: dict, key: str, name: str) -> object:
    """obj[key]; else a key equal to it up to case and spaces; else the sub-task's name as key."""
    if key in obj:
        return obj[key]
    for k, v in obj.items():
        if isinstance(k, str) and k.strip().casefold() == key:
            return v
    return obj.get(name, _NOTHING)


def _parse_multi(raw: str, task: TaskDef, labels: dict[str, tuple[str, ...]],
                 n_words: int | None) -> dict[str, Parsed]:
    text = raw.strip()
    if not text:
        return {s.name: _invalid("empty answer") for s in task.subtasks}
    obj, error = _find(text, "{", "}", dict)
    if obj is _NOTHING:
        return {s.name: _invalid(f"not valid JSON: {error}") for s in task.subtasks}
    out: dict[str, Parsed] = {}
    for i, sub in enumerate(task.subtasks, 1):
        key = f"task{i}"
        value = _lookup(obj, key, sub.name)
        if value is _NOTHING:
            out[sub.name] = _invalid(f"missing key {key}")
        else:
            out[sub.name] = _parse_value(value, key, sub, labels.get(sub.name, ()), n_words)
    return out


# --- the interface -------------------------------------------------------------------------


def parse_answer(raw: str, task: TaskDef, labels: dict[str, tuple[str, ...]],
                 n_words: int | None) -> dict[str, Parsed]:
    """One `Parsed` per sub-task name, from a model's raw answer. Never raises.

    `labels` is `grid.data.label_sets(task)`; `n_words` the number of words of the input
    (`len(row["words"])`) for word-tag sub-tasks, or None to skip the length check.
    """
    try:
        text = "" if raw is None else raw if isinstance(raw, str) else str(raw)
        if task.is_multi:
            return _parse_multi(text, task, labels, n_words)
        sub = task.subtasks[0]
        return {sub.name: _parse_one(text, sub, labels.get(sub.name, ()), n_words)}
    except Exception as exc:  # noqa: BLE001 - a safety net: a parser bug must not stop a scoring run
        reason = f"parser error: {type(exc).__name__}: {_shown(str(exc))}"
        return {s.name: _invalid(reason) for s in task.subtasks}


def gold_value(sub: Subtask, gold: dict[str, object]) -> object:
    """A sub-task's gold from a dict keyed by sub-task name or by the dataset's gold field."""
    if sub.name in gold:
        return gold[sub.name]
    if sub.field in gold:
        return gold[sub.field]
    raise GridError(f"gold has no value for sub-task {sub.name!r} (field {sub.field!r})")


def _canonical(sub: Subtask, value: object) -> str | list[str]:
    if sub.type == "word_tags":
        return [str(t) for t in value]  # type: ignore[union-attr]
    if sub.type == "text" and not isinstance(value, str):
        return str(next(iter(value)))  # type: ignore[call-overload]  # several references: the first is the answer shown
    return str(value)


def format_answer(task: TaskDef, gold: dict[str, object]) -> str:
    """The canonical answer text: the label, json.dumps(tags), or the paper's JSON for multi-task.

    `gold` is keyed by sub-task name or by gold field (a dataset row works as is).
    """
    values = [_canonical(sub, gold_value(sub, gold)) for sub in task.subtasks]
    if task.is_multi:
        return json.dumps({f"task{i}": v for i, v in enumerate(values, 1)}, ensure_ascii=False)
    value = values[0]
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list) else value
