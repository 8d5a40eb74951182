"""A task's rows: its declared data (grid.dataspec) read and normalized, one split at a time.

Every split is an HF `datasets.Dataset` of normalized rows with the columns `example_id` (str),
`text` (str), `words` (list of str: the text split on whitespace, or an annotation's words, which
must equal them) and one column per gold field the task declares (e.g. `intent`, `slots`).

Where the data comes from: an explicit `--data DIR`, else `$CLFGRID_DATA`, else `../shared/data`
beside the project when it exists, else the task's hub copy (`HF_HUB_OFFLINE=1` then fails with a
clear line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from grid.annotations import bio_tags, bracket_slots, plain_tags
from grid.dataspec import FieldSpec, FractionSplit, PartitionSplit
from grid.errors import GridError
from grid.readers import Source, expand, read_files, read_hub
from grid.tasks import OUTSIDE_TAG, TaskDef

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCAL_DATA = PROJECT_ROOT.parent / "shared" / "data"

def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data folder to read, or None for the hub. An explicit folder must exist."""
    explicit = data_dir or os.environ.get("CLFGRID_DATA")
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_dir():
            raise GridError(f"data dir {path} does not exist")
        return path
    return DEFAULT_LOCAL_DATA if DEFAULT_LOCAL_DATA.is_dir() else None


def data_dir_arg(data_dir: str | Path | None) -> str | None:
    """`--data` as the engine passes it on (to Ray workers too): an existing folder's path, or None
    for the hub."""
    resolved = resolve_data_dir(data_dir)
    return str(resolved) if resolved else None


# --- normalized rows ---------------------------------------------------------------------

_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "first_dotted_component": lambda value: value.split(".")[0],  # talk.religion.misc -> talk
}


def _source_rows(task: TaskDef, key: str, data_dir: Path | None) -> Source:
    """One source split (`train`, `test` or `all`) as found."""
    spec = task.data
    if data_dir is not None and spec.files is not None:
        files = expand(data_dir, spec.files[key])  # type: ignore[index]
        return read_files(files, spec.read, _required_columns(task))  # type: ignore[arg-type]
    if spec.hub is None:
        raise GridError(f"task {task.name}: no hub copy is declared; pass --data DIR (see ../shared/data/README.md)")
    return read_hub(spec.hub, key)


def _required_columns(task: TaskDef) -> tuple[str, ...]:
    """The columns every source row must have (references may differ by split, so are left out)."""
    spec = task.data
    partition = spec.split.partition if isinstance(spec.split, PartitionSplit) else None
    columns = [spec.id, spec.text, partition] + [f.column for f in spec.fields.values()]
    return tuple(dict.fromkeys(c for c in columns if c is not None))


def _source_keys(task: TaskDef, data_dir: Path | None) -> set[str]:
    spec = task.data
    keys = spec.files if data_dir is not None and spec.files is not None else (spec.hub.splits if spec.hub else {})
    return set(keys)


def _check_columns(task: TaskDef, ds: datasets.Dataset, where: str, partition: str | None) -> None:
    """Every column the spec reads is in the source; a missing one is named with what asks for it."""
    spec = task.data
    wanted = [("id", spec.id), ("text", spec.text), ("split.partition", partition)]
    wanted += [(f"fields.{name}", f.column) for name, f in spec.fields.items()]
    for what, column in wanted:
        if column is not None and column not in ds.column_names:
            raise GridError(f"{where}: missing column {column!r} (task {task.name}, data.{what}); "
                            f"columns: {', '.join(ds.column_names)}")
    for name, f in spec.fields.items():
        if f.references and not set(f.references) & set(ds.column_names):
            raise GridError(f"{where}: none of the columns {', '.join(f.references)} "
                            f"(task {task.name}, data.fields.{name}.references)")


def _gold(name: str, f: FieldSpec, row: dict[str, Any], words: list[str], at: str) -> Any:
    """One gold value of a row, as the field spec reads it."""
    if f.references is not None:
        refs = [str(row[c]) for c in f.references if row.get(c) is not None]
        if not refs:
            raise GridError(f"{at}: field {name}: no reference in {', '.join(f.references)}")
        return refs
    value = row[f.column]  # type: ignore[index]
    if value is None:
        raise GridError(f"{at}: field {name}: column {f.column!r} is empty")
    if f.annotation == "bracket_slots":
        annotated_words, tags = bracket_slots(str(value), at)
        if annotated_words != words:
            raise GridError(f"{at}: field {name}: the annotated words differ from the text's words")
        return tags
    if f.annotation == "bio":
        return bio_tags(value, len(words), at)
    if f.annotation == "tags":
        return plain_tags(value, len(words), f.outside, at)
    if f.names is not None:
        try:
            index = int(value)
            if index < 0:
                raise IndexError(index)
            value = f.names[index]
        except (ValueError, IndexError):
            raise GridError(f"{at}: field {name}: {value!r} is not an index into names "
                            f"(0..{len(f.names) - 1})") from None
    value = str(value)
    if f.transform is not None:
        value = _TRANSFORMS[f.transform](value)
    if f.pattern is not None:
        match = re.search(f.pattern, value)
        if match is None:
            raise GridError(f"{at}: field {name}: {value!r} does not match pattern {f.pattern!r}")
        value = match.group(1) if match.groups() else match.group(0)
    return value


def _text(value: Any) -> str:
    """The input text: a missing one is empty; a list of words (a word + tag source) is joined
    with spaces, so its words are the list's."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(w) for w in value)
    return str(value)


def _normalize(task: TaskDef, source: Source, key: str, kept: list[int] | None = None) -> datasets.Dataset:
    """The normalized rows of one source split (its rows `kept`, by default all); ids from a
    column or the template (the index counts the rows kept); errors name the source file's row."""
    spec = task.data
    ds = source.rows if kept is None else source.rows.select(kept)

    def norm(row: dict[str, Any], idx: int) -> dict[str, Any]:
        at = source.where(idx if kept is None else kept[idx])
        text = _text(row[spec.text])
        words = text.split()
        example_id = str(row[spec.id]) if spec.id else spec.id_template.format(split=key, index=idx)
        gold = {name: _gold(name, f, row, words, at) for name, f in spec.fields.items()}
        return {"example_id": example_id, "text": text, "words": words, **gold}

    out = ds.map(norm, with_indices=True, remove_columns=ds.column_names)
    for name, f in spec.fields.items():
        # a label column of numbers keeps its number type through map (datasets casts the strings
        # `_gold` made back to it): make it the text it was normalized to
        feature = out.features[name]
        if f.references is None and f.annotation is None and isinstance(feature, datasets.Value) \
                and feature.dtype != "string":
            out = out.cast_column(name, datasets.Value("string"))
    if spec.drop_empty_text:
        out = out.filter(lambda text: bool(text.strip()), input_columns="text")
    return out


def _stratified_split(
    ds: datasets.Dataset, label_col: str, seed: int, test_fraction: float, split: str
) -> datasets.Dataset:
    """A seeded split that keeps each label's share: per label, shuffle, the first share is test."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(ds[label_col]):
        by_label[label].append(i)
    rng = random.Random(seed)
    test: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        test.update(idx[: round(len(idx) * test_fraction)])
    chosen = [i for i in range(len(ds)) if (i in test) == (split == "test")]
    return ds.select(chosen)


def label_fields(task: TaskDef) -> list[str]:
    """The task's data fields that hold one label per row (not word tags, not reference texts):
    every such field of the source, used by its sub-tasks or not, so the tasks that share a source
    (20ng-7, 20ng-20, 20ng-multi) see the same strata."""
    return [name for name, f in task.data.fields.items() if f.annotation is None and f.references is None]


def sample_test_rows(task: TaskDef, test: datasets.Dataset, limit: int | None, seed: int,
                stratify: bool = False) -> list[int]:
    """Which test rows a cell scores (`limits.test`, `limits.seed`, `limits.stratify`), in file
    order: all of them, a seeded random sample, or a seeded sample that keeps each stratum's share
    of the split (strata: the rows' `label_fields`; a task without any is sampled at random).

    Stratified, each stratum gets its proportional share of `limit`, rounded by largest remainder
    (ties to the larger stratum, then the earlier key), so the sample's majority rate is the split's
    to within one row; the rows within a stratum are a seeded shuffle's first. A sample depends on
    the rows, the fields and the seed only: every cell and every task of one source gets the same."""
    n = len(test)
    if limit is None or limit >= n:
        return list(range(n))
    fields = label_fields(task) if stratify else []
    if not fields:
        return sorted(random.Random(seed).sample(range(n), limit))
    strata: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(*(test[f] for f in fields))):
        strata[tuple(str(k) for k in key)].append(i)
    keys = sorted(strata)
    quotas = {k: limit * len(strata[k]) / n for k in keys}
    take = {k: int(quotas[k]) for k in keys}
    by_remainder = sorted(keys, key=lambda k: (-(quotas[k] - take[k]), -len(strata[k]), keys.index(k)))
    for k in by_remainder[: limit - sum(take.values())]:
        take[k] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for k in keys:
        idx = list(strata[k])
        rng.shuffle(idx)
        chosen += idx[: take[k]]
    return sorted(chosen)


@cache
def _split_rows(task: TaskDef, split: str, data_dir: Path | None) -> tuple[datasets.Dataset, str]:
    """A split's normalized rows and the source's name: read directly, or cut from `all` rows."""
    spec = task.data
    if split in _source_keys(task, data_dir):
        source = _source_rows(task, split, data_dir)
        _check_columns(task, source.rows, source.name, None)
        return _normalize(task, source, split), source.name
    source = _source_rows(task, "all", data_dir)
    rule = spec.split
    if isinstance(rule, PartitionSplit):
        _check_columns(task, source.rows, source.name, rule.partition)
        value = rule.values[split]  # type: ignore[index]
        kept = [i for i, p in enumerate(source.rows[rule.partition]) if str(p) == value]
        return _normalize(task, source, split, kept), source.name
    assert isinstance(rule, FractionSplit)  # DataSpec requires a rule for `all` sources
    _check_columns(task, source.rows, source.name, None)
    rows = _normalize(task, source, "all")
    return _stratified_split(rows, rule.stratify, rule.split_seed, rule.test_fraction, split), source.name


def _check_labels(task: TaskDef, ds: datasets.Dataset, split: str, where: str) -> None:
    """A label column holds text (a column that mixes numbers and text reaches here as JSON values
    and would sort as neither); gold values outside a declared label set are named with their row."""
    for sub in task.subtasks:
        if sub.type == "label":
            bad = next((i for i, v in enumerate(ds[sub.field]) if not isinstance(v, str)), None)
            if bad is not None:
                value = ds[bad][sub.field]
                raise GridError(f"{where}: {split} row {bad + 1} (id {ds[bad]['example_id']}): {sub.name} {value!r} is "
                                f"a {type(value).__name__} where the column's other labels are text: quote it, "
                                f"or give every label of the column one type")
        if sub.labels is None or sub.type == "text":
            continue
        allowed = set(sub.labels) | ({OUTSIDE_TAG} if sub.type == "word_tags" else set())
        for i, value in enumerate(ds[sub.field]):
            for v in value if sub.type == "word_tags" else [value]:
                if v not in allowed:
                    raise GridError(f"{where}: {split} row {i + 1} (id {ds[i]['example_id']}): "
                                    f"{sub.name} {v!r} is not in the label set of task {task.name}")

def _check_unique_ids(ds: datasets.Dataset, split: str, where: str) -> None:
    """Every row of a split has its own example_id: predictions, paired tests and resumes join on it."""
    first: dict[str, int] = {}
    for i, example_id in enumerate(ds["example_id"]):
        j = first.setdefault(example_id, i)
        if j != i:
            raise GridError(f"{where}: {split} rows {j + 1} and {i + 1} share the id {example_id!r}: ids must be "
                            f"unique (name a unique column as the task's data.id, or leave it out to number the rows)")

# --- the task view -------------------------------------------------------------------------


@cache
def _load_cached(task: TaskDef, split: str, data_dir: Path | None) -> datasets.Dataset:
    ds, where = _split_rows(task, split, data_dir)
    if len(ds) == 0:
        raise GridError(f"task {task.name}: the {split} split is empty ({where})")
    _check_labels(task, ds, split, where)
    _check_unique_ids(ds, split, where)
    return ds


def load_split(task: TaskDef, split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """The normalized rows of a task's `train` or `test` split, or of the `validation` split a
    task declares (grid.dataspec)."""
    if split not in ("train", "validation", "test"):
        raise GridError(f"unknown split {split!r}; use train, validation or test")
    if split == "validation" and not task.data.has_validation:
        raise GridError(f"task {task.name} declares no validation split (data.files, data.hub.splits or "
                        "data.split.values name none)")
    return _load_cached(task, split, resolve_data_dir(data_dir))


def data_splits(task: TaskDef) -> tuple[str, ...]:
    """The splits a task's rows come in: train and test, and validation where it declares one."""
    return ("train", "validation", "test") if task.data.has_validation else ("train", "test")


@cache
def _label_sets(task: TaskDef, data_dir: Path | None) -> dict[str, tuple[str, ...]]:
    train = _load_cached(task, "train", data_dir)
    out: dict[str, tuple[str, ...]] = {}
    for sub in task.subtasks:
        if sub.labels is not None:
            out[sub.name] = sub.labels
        elif sub.type == "label":
            out[sub.name] = tuple(sorted(set(train[sub.field])))
        elif sub.type == "word_tags":
            tags = {t for row in train[sub.field] for t in row} - {OUTSIDE_TAG}
            out[sub.name] = tuple(sorted(tags)) + (OUTSIDE_TAG,)
        else:
            out[sub.name] = ()
    return out


@cache
def warn_unseen_test_labels(task: TaskDef, data_dir: str | Path | None = None) -> None:
    """One warning line per label sub-task whose test rows carry labels the train split never has:
    a label set read from train cannot offer them, so those rows count as wrong for every model
    (scored as they are, not dropped). A task that lists its labels is checked row by row instead
    (_check_labels). Called where test rows are read anyway (`grid tasks`, an inference cell's
    preparation on the driver), once per task and process; not on every read of a label set (a
    fine-tune worker reads no test rows)."""
    labels = label_sets(task, data_dir)
    test = load_split(task, "test", data_dir)
    for sub in task.subtasks:
        if sub.type != "label" or sub.labels is not None:
            continue
        known = set(labels[sub.name])
        unseen = sorted({v for v in test[sub.field] if v not in known})
        if unseen:
            rows = sum(v not in known for v in test[sub.field])
            log.warning("task %s: %d of %d test rows have a %s value no train row has (%s); they stay in the "
                        "scores, and no model can answer them", task.name, rows, len(test), sub.name,
                        ", ".join(unseen[:5]) + (f", ... {len(unseen)} in all" if len(unseen) > 5 else ""))


def label_sets(task: TaskDef, data_dir: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """Each sub-task's label set, in prompt order. Word tags end with "Other"."""
    return _label_sets(task, resolve_data_dir(data_dir))


@cache
def _fingerprint(task: TaskDef, data_dir: Path | None) -> str:
    """The fingerprint from the on-disk cache when the task's files, definition and the reading
    code are as they were (`_file_key`), else computed from the rows and cached."""
    key = _file_key(task, data_dir)
    if key is not None and (known := _read_fingerprint_cache().get(key)):
        return known
    fingerprint = _rows_fingerprint(task, data_dir)
    if key is not None:
        _write_fingerprint_cache(key, fingerprint)
    return fingerprint


def _rows_fingerprint(task: TaskDef, data_dir: Path | None) -> str:
    digest = hashlib.sha256()
    # The task's data definition (source, split rule, fields, sub-tasks and labels), so that an
    # edited split_seed or label list makes new cells even where the rows read happen to agree.
    digest.update(json.dumps(task.data_identity(), sort_keys=True).encode())
    for split in data_splits(task):  # a declared validation split too: it changes what a search holds out
        ds = _load_cached(task, split, data_dir)
        cols = ["example_id", "text"] + [s.field for s in task.subtasks]
        # The rows as read: the arrow view follows a split's indices mapping (a seeded split is a
        # selection of one table). Content only: the schema's metadata holds HF's own fingerprint,
        # which follows the files' paths and modification times, and a fresh copy must resume.
        table: pa.Table = ds.select_columns(cols).with_format("arrow")[:]
        rows = table.combine_chunks().replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()[:16]


# --- the fingerprint cache ------------------------------------------------------------------
# Fingerprinting reads and normalizes every row of a task's splits (seconds for the catalog), and
# every plan needs the fingerprints: a resume of a big grid paid it each time. The cache keys a
# fingerprint by what decides it: each source file's path, size and modification time, the task's
# data definition, and the code that reads and normalizes rows (the modules' bytes). A changed
# file, definition or reader misses the cache, and the rows are read again. Hub sources are not
# cached (no files to check).

_READING_CODE = ("data.py", "readers.py", "annotations.py", "dataspec.py")


def fingerprint_cache_file() -> Path:
    """$CLFGRID_CACHE/fingerprints.json (default ~/.cache/clfgrid)."""
    root = os.environ.get("CLFGRID_CACHE") or Path.home() / ".cache" / "clfgrid"
    return Path(root) / "fingerprints.json"


@cache
def _reading_code_digest() -> str:
    here = Path(__file__).resolve().parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _READING_CODE)).hexdigest()


def _source_files(task: TaskDef, data_dir: Path | None) -> list[Path] | None:
    """Every local file the task's splits read (a line-files folder: its files), or None."""
    spec = task.data
    if data_dir is None or spec.files is None:
        return None
    files: list[Path] = []
    for patterns in spec.files.values():
        for path in expand(data_dir, patterns):
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def _file_key(task: TaskDef, data_dir: Path | None) -> str | None:
    files = _source_files(task, data_dir)
    if files is None:
        return None
    stats = [(str(p), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),)]
    blob = json.dumps({"task": task.data_identity(), "code": _reading_code_digest(), "files": stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_fingerprint_cache() -> dict[str, str]:
    try:
        found = json.loads(fingerprint_cache_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: computed again
        return {}
    return found if isinstance(found, dict) else {}


def _write_fingerprint_cache(key: str, fingerprint: str) -> None:
    """Add one entry (the newest 1,000 kept), written whole by a rename; a cache that cannot be
    written costs only the time it would have saved."""
    path = fingerprint_cache_file()
    entries = _read_fingerprint_cache()
    entries.pop(key, None)
    entries[key] = fingerprint
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(entries.items())[-1000:])))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("fingerprint cache %s not written: %s", path, exc)


def data_fingerprint(task: TaskDef, data_dir: str | Path | None = None) -> str:
    """A hash of the task's data definition and the rows it reads (ids, texts, gold), so changed
    data or a changed definition makes new cells."""
    return _fingerprint(task, resolve_data_dir(data_dir))
