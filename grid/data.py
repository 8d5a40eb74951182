"""Dataset loaders: hub copies when online, the same formats from a local folder when offline.

Every loader returns an HF `datasets.Dataset` of normalized rows with the columns
`example_id` (str), `text` (str), `words` (list of str; the text split on whitespace) and one
column per gold field (e.g. `intent`, `slots`, `label`, `root`). Tasks name those gold fields.

Where the data comes from: an explicit `--data DIR`, else `$CLFGRID_DATA`, else `../shared/data`
beside the project when it exists, else the hub (`HF_HUB_OFFLINE=1` then fails with a clear line).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Callable

import datasets
import pyarrow as pa

from grid.errors import GridError
from grid.tasks import OUTSIDE_TAG, TaskDef

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCAL_DATA = PROJECT_ROOT.parent / "shared" / "data"

datasets.disable_progress_bars()
# A bad file is reported as one GridError line naming file and row; datasets' own log would repeat it.
datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data folder to read, or None for the hub. An explicit folder must exist."""
    explicit = data_dir or os.environ.get("CLFGRID_DATA")
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_dir():
            raise GridError(f"data dir {path} does not exist")
        return path
    return DEFAULT_LOCAL_DATA if DEFAULT_LOCAL_DATA.is_dir() else None


# --- reading files -------------------------------------------------------------------------


def _first_bad_line(path: Path, required: tuple[str, ...]) -> str | None:
    """Name the first line of a jsonl file that is not a JSON object with the required fields."""
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


def read_jsonl(files: list[Path], required: tuple[str, ...]) -> datasets.Dataset:
    """Load jsonl files through HF datasets; a bad file or line is named in a GridError."""
    for f in files:
        if not f.is_file():
            raise GridError(f"data file {f} does not exist")
    try:
        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets raises several types; find the line ourselves
        for f in files:
            bad = _first_bad_line(f, required)
            if bad:
                raise GridError(bad) from None
        raise GridError(f"cannot read {', '.join(map(str, files))}: {exc}") from None
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        for f in files:
            bad = _first_bad_line(f, required)
            if bad:
                raise GridError(bad) from None
        raise GridError(f"{files[0]}: missing field {missing[0]!r}")
    return ds


def _hub(repo: str, config: str | None, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as exc:
        raise GridError(
            f"cannot load {repo} ({split}) from the hub: {type(exc).__name__}; "
            "pass --data DIR to read a local copy"
        ) from None


# --- MASSIVE -------------------------------------------------------------------------------

_SLOT = re.compile(r"\[([^\]]*)\]")


def massive_word_tags(annot_utt: str, where: str = "") -> tuple[list[str], list[str]]:
    """Words and one tag per word (slot type or "Other") from MASSIVE's inline annotation.

    `wake me up at [time : nine am]` -> words [wake, me, up, at, nine, am],
    tags [Other, Other, Other, Other, time, time].
    """
    words: list[str] = []
    tags: list[str] = []
    pos = 0
    for match in _SLOT.finditer(annot_utt):
        outside = annot_utt[pos : match.start()].split()
        words += outside
        tags += [OUTSIDE_TAG] * len(outside)
        slot, sep, value = match.group(1).partition(" : ")
        if not sep:
            raise GridError(f"{where}: annot_utt has a bracket without ' : ': {match.group(0)!r}")
        inside = value.split()
        words += inside
        tags += [slot.strip()] * len(inside)
        pos = match.end()
    rest = annot_utt[pos:].split()
    words += rest
    tags += [OUTSIDE_TAG] * len(rest)
    return words, tags


def _normalize_massive(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    intent_names = getattr(ds.features.get("intent"), "names", None)  # hub: ClassLabel ints
    scenario_names = getattr(ds.features.get("scenario"), "names", None)

    def norm(row: dict, idx: int) -> dict:
        words, tags = massive_word_tags(row["annot_utt"], f"{source} row {idx + 1}")
        if words != row["utt"].split():
            raise GridError(f"{source} row {idx + 1}: annot_utt words differ from utt")
        intent = intent_names[row["intent"]] if intent_names else row["intent"]
        scenario = scenario_names[row["scenario"]] if scenario_names else row["scenario"]
        return {"example_id": str(row["id"]), "text": row["utt"], "words": words,
                "intent": intent, "slots": tags, "scenario": scenario}

    keep = ["example_id", "text", "words", "intent", "slots", "scenario"]
    out = ds.map(norm, with_indices=True, remove_columns=ds.column_names)
    return out.select_columns(keep)


def load_massive(split: str, data_dir: Path | None, locale: str = "en-US") -> datasets.Dataset:
    if data_dir is None:
        hub_split = {"dev": "validation"}.get(split, split)
        ds = _hub("AmazonScience/massive", locale, hub_split)
        return _normalize_massive(ds, f"AmazonScience/massive {split}")
    path = data_dir / "massive_en_us" / f"{locale}.jsonl"
    ds = read_jsonl([path], ("id", "partition", "intent", "utt", "annot_utt", "scenario"))
    ds = ds.filter(lambda p: p == split, input_columns="partition")
    return _normalize_massive(ds, str(path))


# --- 20 Newsgroups -------------------------------------------------------------------------


def _normalize_newsgroups(ds: datasets.Dataset, split: str) -> datasets.Dataset:
    def norm(row: dict, idx: int) -> dict:
        text = row["text"] or ""
        return {"example_id": f"{split}-{idx:05d}", "text": text, "words": text.split(),
                "label": row["label_text"], "root": row["label_text"].split(".")[0]}

    return ds.map(norm, with_indices=True, remove_columns=ds.column_names)


def load_newsgroups(split: str, data_dir: Path | None) -> datasets.Dataset:
    """All parts of a split, in order. Texts empty after header removal are kept (see tasks/20ng-20.yaml)."""
    if data_dir is None:
        return _normalize_newsgroups(_hub("SetFit/20_newsgroups", None, split), split)
    folder = data_dir / "20newsgroups" / "setfit_style"
    parts = sorted(folder.glob(f"{split}.part*.jsonl"))
    if not parts:
        raise GridError(f"no {split}.part*.jsonl files in {folder}")
    return _normalize_newsgroups(read_jsonl(parts, ("text", "label", "label_text")), split)


# --- financial sets (merge study) ----------------------------------------------------------


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


def load_phrasebank(
    split: str, data_dir: Path | None, agree: str = "50Agree", split_seed: int = 42,
    test_fraction: float = 0.2,
) -> datasets.Dataset:
    if data_dir is None:
        ds = _hub("takala/financial_phrasebank", f"sentences_{agree.lower()}", "train")
        names = ds.features["label"].names
        ds = ds.map(lambda r, i: {"id": i, "label_text": names[r["label"]]}, with_indices=True)
    else:
        path = data_dir / "financial_phrasebank" / "normalized" / f"Sentences_{agree}.jsonl"
        ds = read_jsonl([path], ("id", "sentence", "label_text"))
    ds = ds.map(
        lambda r: {"example_id": str(r["id"]), "text": r["sentence"], "words": r["sentence"].split(),
                   "sentiment": r["label_text"]},
        remove_columns=ds.column_names,
    )
    return _stratified_split(ds, "sentiment", split_seed, test_fraction, split)


def load_fomc(split: str, data_dir: Path | None, split_id: int = 5768) -> datasets.Dataset:
    if data_dir is None:
        raise GridError("fomc: no hub copy is wired; pass --data DIR (see ../shared/data/README.md)")
    path = data_dir / "fomc_hawkish_dovish" / "normalized" / f"lab-manual-combine-{split}-{split_id}.jsonl"
    ds = read_jsonl([path], ("index", "sentence", "label_text"))
    return ds.map(
        lambda r: {"example_id": str(r["index"]), "text": r["sentence"],
                   "words": r["sentence"].split(), "stance": r["label_text"]},
        remove_columns=ds.column_names,
    )


LOADERS: dict[str, Callable[..., datasets.Dataset]] = {
    "massive": load_massive,
    "newsgroups": load_newsgroups,
    "phrasebank": load_phrasebank,
    "fomc": load_fomc,
}


# --- the task view -------------------------------------------------------------------------


@cache
def _load_cached(task: TaskDef, split: str, data_dir: Path | None) -> datasets.Dataset:
    if task.dataset not in LOADERS:
        raise GridError(f"task {task.name}: field dataset: unknown loader {task.dataset!r}")
    real_split = getattr(task.splits, split)
    ds = LOADERS[task.dataset](real_split, data_dir, **task.dataset_options)
    for sub in task.subtasks:
        if sub.field not in ds.column_names:
            raise GridError(f"task {task.name}: gold field {sub.field!r} is not in dataset {task.dataset}")
    return ds


def load_split(task: TaskDef, split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """The normalized rows of a task's `train` or `test` split."""
    if split not in ("train", "test"):
        raise GridError(f"unknown split {split!r}; use train or test")
    return _load_cached(task, split, resolve_data_dir(data_dir))


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


def label_sets(task: TaskDef, data_dir: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """Each sub-task's label set, in prompt order. Word tags end with "Other"."""
    return _label_sets(task, resolve_data_dir(data_dir))


@cache
def _fingerprint(task: TaskDef, data_dir: Path | None) -> str:
    digest = hashlib.sha256()
    for split in ("train", "test"):
        table: pa.Table = _load_cached(task, split, data_dir).data.table
        cols = ["example_id", "text"] + [s.field for s in task.subtasks]
        # Content only: the schema's metadata holds HF's own fingerprint, which follows the
        # files' paths and modification times, and a fresh copy of the same data must resume.
        rows = table.select(cols).combine_chunks().replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()[:16]


def data_fingerprint(task: TaskDef, data_dir: str | Path | None = None) -> str:
    """A hash of the rows a task reads (ids, texts, gold), so changed data makes new cells."""
    return _fingerprint(task, resolve_data_dir(data_dir))
