"""File formats: one source split (a list of files, or a hub split) read into an HF `Dataset`.

Every reader returns the source's columns as found; grid.data turns them into a task's rows.
A bad file is reported as one GridError line naming the file (and the line, where one is at fault).
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from grid.dataspec import HubSpec, ReadSpec
from grid.errors import GridError, read_text

datasets.disable_progress_bars()
# A bad file is reported as one GridError line naming file and row; datasets' own log would repeat it.
datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def expand(data_dir: Path, patterns: str | tuple[str, ...]) -> list[Path]:
    """The files a split names: each pattern a path or glob under the data dir, globs sorted."""
    files: list[Path] = []
    for pattern in (patterns,) if isinstance(patterns, str) else patterns:
        if any(ch in pattern for ch in "*?["):
            found = sorted(data_dir.glob(pattern))
            if not found:
                raise GridError(f"no file matches {data_dir / pattern}")
            files += found
        else:
            path = data_dir / pattern
            if not path.exists():
                raise GridError(f"data file {path} does not exist")
            files.append(path)
    return files


@dataclass(frozen=True)
class Source:
    """One source split's rows and, for messages, which file each row came from."""

    rows: datasets.Dataset
    files: tuple[str, ...]  # file paths (or a hub split's name)
    sizes: tuple[int, ...]  # rows per file, in order

    def where(self, index: int) -> str:
        """`file row N` for the split's row `index` (0-based), N counted within its file."""
        ends = list(itertools.accumulate(self.sizes))
        k = bisect.bisect_right(ends, index)
        return f"{self.files[k]} row {index - (ends[k] - self.sizes[k]) + 1}"

    @property
    def name(self) -> str:
        return self.files[0] + (f" (+{len(self.files) - 1} files)" if len(self.files) > 1 else "")


def read_files(files: list[Path], spec: ReadSpec, required: tuple[str, ...] = ()) -> Source:
    """The rows of these files, in order, as one split; each file is read alone (so that a row
    is named by its own file) and the first file's column types hold for the rest. `required`:
    the columns the task reads (a JSON line without one is named by its line number)."""
    parts = [_read_file(f, spec, required) for f in files]
    features = parts[0].features
    try:
        rows = datasets.concatenate_datasets([p if p.features == features else p.cast(features) for p in parts])
    except (ValueError, TypeError) as exc:
        raise GridError(f"{files[0]} and the next files differ in columns or types: {exc}") from None
    return Source(rows, tuple(map(str, files)), tuple(len(p) for p in parts))


def _read_file(path: Path, spec: ReadSpec, required: tuple[str, ...]) -> datasets.Dataset:
    fmt = spec.format
    if fmt == "jsonl":
        return _read_jsonl(path, required)
    if fmt == "json":
        return _load("json", path)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, spec)
    if fmt == "parquet":
        return _load("parquet", path)
    if fmt == "delimited":
        return _read_delimited(path, spec)
    return _read_lines(path, spec)


def _load(builder: str, path: Path, **options: object) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=[str(path)], split="train", **options)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message names the file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise GridError(f"cannot read {path} as {builder}: {type(exc).__name__}: {first}") from None


def _first_bad_json_line(path: Path, required: tuple[str, ...]) -> str | None:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{lineno}: not valid JSON ({exc.msg})"
            if not isinstance(obj, dict):
                return f"{path}:{lineno}: expected a JSON object"
            missing = [f for f in required if f not in obj]
            if missing:
                return f"{path}:{lineno}: missing field {missing[0]!r}"
    return None


def _read_jsonl(path: Path, required: tuple[str, ...]) -> datasets.Dataset:
    """JSON lines through HF datasets; a bad line, or one without a required field, is named."""
    if not read_text(path).strip():
        raise GridError(f"{path}: the file has no rows")
    try:
        ds = datasets.load_dataset("json", data_files=[str(path)], split="train")
    except Exception as exc:  # noqa: BLE001 - any failure: the first bad line is named instead
        bad = _first_bad_json_line(path, required)
        raise GridError(bad or f"cannot read {path} as jsonl: {type(exc).__name__}") from None
    if set(required) - set(ds.column_names):
        bad = _first_bad_json_line(path, required)
        if bad:
            raise GridError(bad)  # else the caller names the missing column
    return ds


def _read_csv(path: Path, spec: ReadSpec) -> datasets.Dataset:
    """csv/tsv through pandas (HF's csv builder); no value is read as missing (an "NA" is text)."""
    sep = spec.delimiter or ("\t" if spec.format == "tsv" else ",")
    options: dict[str, object] = {
        "sep": sep, "encoding": spec.encoding, "keep_default_na": False, "na_filter": False,
        "quoting": csv.QUOTE_NONE if spec.quoting == "none" else csv.QUOTE_MINIMAL,
        "header": 0 if spec.header else None,
    }
    if spec.column_names:
        options["column_names"] = list(spec.column_names)
    return _load("csv", path, **options)


def _lines(path: Path, encoding: str) -> list[str]:
    return read_text(path, encoding).splitlines()


def _read_delimited(path: Path, spec: ReadSpec) -> datasets.Dataset:
    """Lines split at a delimiter with no quoting; `free_column` may itself hold the delimiter."""
    delim = spec.delimiter or ""
    lines = [line for line in _lines(path, spec.encoding) if line.strip()]
    if spec.header:
        if not lines:
            raise GridError(f"{path}: empty file, no header line")
        names, lines, first = lines[0].split(delim), lines[1:], 2
    else:
        names, first = list(spec.column_names or ()), 1
    free = names.index(spec.free_column) if spec.free_column in names else None
    if spec.free_column and free is None:
        raise GridError(f"{path}: free_column {spec.free_column!r} is not a column ({', '.join(names)})")
    columns: dict[str, list[str]] = {n: [] for n in names}
    for lineno, line in enumerate(lines, first):
        if free is None:
            parts = line.split(delim)
        else:
            head = line.split(delim, free)
            rest = head.pop() if len(head) > free else ""
            tail = rest.rsplit(delim, len(names) - free - 1)
            parts = head + tail
        if len(parts) != len(names):
            raise GridError(f"{path}:{lineno}: {len(parts)} fields, expected {len(names)} ({', '.join(names)})")
        for name, value in zip(names, parts):
            columns[name].append(value)
    return datasets.Dataset.from_dict(columns)


def _read_lines(folder: Path, spec: ReadSpec) -> datasets.Dataset:
    """Parallel line files in one folder (seq.in / seq.out / label): line i of each is row i."""
    columns: dict[str, list[str]] = {}
    for column, name in (spec.line_files or {}).items():
        path = folder / name
        if not path.is_file():
            raise GridError(f"data file {path} does not exist")
        columns[column] = _lines(path, spec.encoding)
        blank = next((i for i, line in enumerate(columns[column], 1) if not line.strip()), None)
        if blank is not None:  # dropping it would shift every later row against the other files
            raise GridError(f"{path}:{blank}: a blank line; line i of each file is row i, so every line needs a value")
    counts = {name: len(columns[col]) for col, name in (spec.line_files or {}).items()}
    if len(set(counts.values())) > 1:
        raise GridError(f"{folder}: line files differ in length: "
                        + ", ".join(f"{n} {c} lines" for n, c in counts.items()))
    return datasets.Dataset.from_dict(columns)


def read_hub(hub: HubSpec, split: str) -> Source:
    """A hub split, class-label columns as their names, renamed and indexed as the spec says."""
    try:
        ds = datasets.load_dataset(hub.path, hub.config, split=hub.splits[split])  # type: ignore[index]
    except Exception as exc:  # noqa: BLE001 - the hub's many errors become one line
        raise GridError(
            f"cannot load {hub.path} ({hub.splits[split]}) from the hub: {type(exc).__name__}; "  # type: ignore[index]
            "pass --data DIR to read a local copy"
        ) from None
    for name, feature in list(ds.features.items()):
        if isinstance(feature, datasets.ClassLabel):  # ints -> their names, as the local copies write them
            values = [feature.int2str(i) for i in ds[name]]
            ds = ds.remove_columns(name).add_column(name, values)
    if hub.rename:
        ds = ds.rename_columns(hub.rename)
    if hub.index_column:
        ds = ds.add_column(hub.index_column, list(range(len(ds))))
    return Source(ds, (f"{hub.path} ({hub.splits[split]})",), (len(ds),))  # type: ignore[index]
