"""The report's Table 3: columns (the paper's, then any other task's sub-tasks), rows (model x
shots x fine-tune, x decoding and x seed when these vary) and one entry per (row, column): the
cell's own metric from its cell.json, the number `grid status` prints."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from grid.config import decoding_name
from grid.errors import GridError
from grid.forgetting import forgetting_frame

LEGEND = ("Each entry: the cell's metric in percent (accuracy; F1 for slot filling; ROUGE-L for summaries) "
          "from its cell.json with its 95% CI (exact Clopper-Pearson for accuracy, percentile bootstrap "
          "otherwise); mF1 = macro-F1 over the gold labels (a model that answers one label for every row "
          "has accuracy = that label's share and a low mF1); inv = share of invalid answers (for "
          "consolidated cells, of that sub-task). The last row: the majority-class rate of each "
          "column's rows, the accuracy of always answering the commonest label. – : no such cell; "
          "failed: the cell failed (hover for the error). Dual = one single-task cell per column; "
          "consolidated = one multi-task cell answering both.")


@dataclass(frozen=True)
class Column:
    group: str  # dataset, e.g. "20NG"
    setup: str  # "dual" (single-task cell) or "consolidated" (multi-task cell)
    head: str  # e.g. "20-class"
    task: str
    subtask: str
    metric: str  # accuracy, slot_f1, rougeL, ...

    @property
    def key(self) -> str:
        return f"{self.task}/{self.subtask}/{self.metric}"

    @property
    def title(self) -> str:
        return f"{self.group} {self.setup}: {self.head}"


PAPER_COLUMNS: tuple[Column, ...] = (
    Column("20NG", "dual", "20-class", "20ng-20", "label", "accuracy"),
    Column("20NG", "dual", "7-class", "20ng-7", "root", "accuracy"),
    Column("20NG", "consolidated", "20-class", "20ng-multi", "label", "accuracy"),
    Column("20NG", "consolidated", "7-class", "20ng-multi", "root", "accuracy"),
    Column("MASSIVE", "dual", "Intent", "massive-intent", "intent", "accuracy"),
    Column("MASSIVE", "dual", "Slot filling", "massive-slots", "slots", "slot_f1"),
    Column("MASSIVE", "consolidated", "Intent", "massive-multi", "intent", "accuracy"),
    Column("MASSIVE", "consolidated", "Slot filling", "massive-multi", "slots", "slot_f1"),
)
HEADLINE = {"label": "accuracy", "word_tags": "slot_f1", "text": "rougeL"}


def columns_for(tasks: set[str]) -> list[Column]:
    """The paper's columns, then one per sub-task of any other task in the results."""
    from grid.tasks import get_task

    cols = list(PAPER_COLUMNS)
    for name in sorted(tasks - {c.task for c in PAPER_COLUMNS}):
        try:
            task = get_task(name)
        except GridError:
            continue
        for sub in task.subtasks:
            cols.append(Column(task.name, "consolidated" if task.is_multi else "dual", sub.name, name,
                               sub.name, HEADLINE[sub.type]))
    return cols


@dataclass(frozen=True)
class RowKey:
    model: str
    family: str
    shots: int
    finetune: str
    decoding: str  # grid.config.decoding_name: free, constrained, constrained+pmi, ...; - for encoders
    seed: int
    # a fine-tune evaluated on another task (finetuned_eval: all): the task it was tuned on, so
    # each fine-tune's transfer has its own row; "" for a fine-tune on its own column (Table 3)
    trained_on: str = ""

    # where a row's weights came from when its fine-tune mode is "none" and still they were tuned
    # (a model the grid made, a merge, a model declared with seen_tasks): named for its lineage, so
    # no tuned, headed or merged model reads as "w/o FT"; "" for an untuned model
    origin: str = ""

    def label(self, show_decoding: bool, show_seed: bool) -> str:
        ft = "w/ FT" if self.finetune != "none" else self.origin or "w/o FT"
        if self.finetune not in ("none", "full"):
            ft = f"w/ FT ({self.finetune})"
        if self.trained_on:
            ft += f" on {self.trained_on}"
        shots = "five-shot" if self.shots == 5 else "zero-shot" if self.shots == 0 else f"{self.shots}-shot"
        parts = [self.model, shots if self.family != "encoder" else "", ft]
        if show_decoding and self.decoding != "-":  # an encoder has no decoding to name
            parts.append(self.decoding)
        if show_seed:
            parts.append(f"seed {self.seed}")
        return " ".join(p for p in parts if p)


FAMILY_ORDER = {"encoder": 0, "decoder": 1, "api": 2}


def row_key(cell: dict[str, Any]) -> RowKey:
    trained_on = (cell.get("lineage") or {}).get("trained_on") or ""
    return RowKey(cell["model"], cell.get("family", ""), int(cell["shots"]), str(cell["finetune"]),
                  decoding_name(cell.get("decoding")), int(cell.get("seed", 0)),
                  trained_on if cell["finetune"] != "none" and trained_on != cell["task"] else "", origin(cell))


def origin(cell: dict[str, Any]) -> str:
    """What a cell's weights are when its fine-tune mode is "none" but they saw tasks: "merged
    (inputs tuned on a, b)" (a merge: grid.config names its source `merge:<name>`), "tuned on a, b"
    (a model the grid made, or one declared with seen_tasks), else ""."""
    if cell["finetune"] != "none":
        return ""
    lineage = cell.get("lineage") or {}
    seen = ", ".join(lineage.get("seen_tasks") or ())
    if str(cell.get("source", "")).startswith("merge:"):
        return "merged" + (f" (inputs tuned on {seen})" if seen else "")
    return f"tuned on {seen}" if seen else ""


def sort_key(k: RowKey) -> tuple:
    return (FAMILY_ORDER.get(k.family, 9), k.model, k.finetune != "none", k.finetune, k.trained_on, -k.shots,
            k.decoding, k.seed)


@dataclass
class Entry:
    """One number of the table: a column's metric of one cell, from its cell.json."""

    cell_id: str
    status: str
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    invalid_rate: float | None = None
    n: int | None = None
    error: str | None = None
    macro_f1: float | None = None  # accuracy columns: the cell's macro-F1 (skill beside a default answer)

    def text(self) -> str:
        if self.status != "done":
            return self.status
        if self.value is None:
            return "n/a"
        out = f"{100 * self.value:.1f}"
        if self.ci_low is not None and self.ci_high is not None and not math.isnan(self.ci_low):
            out += f" [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}]"
        if self.macro_f1 is not None:
            out += f" mF1 {100 * self.macro_f1:.1f}"
        if self.invalid_rate is not None:
            out += f" inv {100 * self.invalid_rate:.1f}%"
        return out


def entry_of(record: dict[str, Any], col: Column) -> Entry:
    m = record.get("metrics") or {}
    key = f"{col.subtask}/{col.metric}"
    value = m.get(key)
    inv = m.get(f"{col.subtask}/invalid_rate", m.get("invalid_rate"))
    n = m.get("n", record.get("n_examples"))
    f1 = m.get(f"{col.subtask}/macro_f1") if col.metric == "accuracy" else None
    return Entry(cell_id=record["cell_id"], status=record["status"],
                 macro_f1=f1 if isinstance(f1, (int, float)) else None,
                 value=float(value) if isinstance(value, (int, float)) else None,
                 ci_low=m.get(f"{key}_ci_low"), ci_high=m.get(f"{key}_ci_high"),
                 invalid_rate=float(inv) if isinstance(inv, (int, float)) else None,
                 n=int(n) if isinstance(n, (int, float)) else None, error=record.get("error"))


@dataclass
class Table:
    columns: list[Column]
    rows: list[RowKey]
    entries: dict[tuple[RowKey, str], Entry]  # (row, column key) -> entry
    show_decoding: bool
    show_seed: bool
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell_id -> record
    forgetting: pl.DataFrame = field(default_factory=pl.DataFrame)  # grid.forgetting's frame of the records

    def label(self, row: RowKey) -> str:
        return row.label(self.show_decoding, self.show_seed)

    def majority(self, col: Column) -> float | None:
        """The column's majority-class rate (accuracy columns): the same rows for every cell of a
        task, so any done cell's record gives it."""
        if col.metric != "accuracy":
            return None
        for (_, key), e in self.entries.items():
            rate = (self.records.get(e.cell_id) or {}).get("metrics", {}).get(f"{col.subtask}/majority_rate")
            if key == col.key and e.status == "done" and isinstance(rate, (int, float)):
                return float(rate)
        return None

    def used_columns(self) -> list[Column]:
        """The columns some cell fills (the paper's first): a column without a cell is not shown."""
        filled = {key for _, key in self.entries}
        return [c for c in self.columns if c.key in filled]


def build_table(records: list[dict[str, Any]]) -> Table:
    by_id = {r["cell_id"]: r for r in records}
    infer = [r for r in records if r.get("cell", {}).get("kind") == "infer"]
    cols = columns_for({r["cell"]["task"] for r in infer})
    by_task: dict[str, list[Column]] = defaultdict(list)
    for c in cols:
        by_task[c.task].append(c)
    entries: dict[tuple[RowKey, str], Entry] = {}
    rows: set[RowKey] = set()
    for r in sorted(infer, key=lambda r: (r["status"] != "done", r["cell_id"])):
        key = row_key(r["cell"])
        rows.add(key)
        for c in by_task.get(r["cell"]["task"], []):
            # a done cell wins over a failed one of the same row (reruns with another id)
            entries.setdefault((key, c.key), entry_of(r, c))
    decodings = {k.decoding for k in rows if k.family != "encoder"}
    seeds = {k.seed for k in rows}
    forgetting = forgetting_frame(records)
    return Table(columns=cols, rows=sorted(rows, key=sort_key), entries=entries,
                 show_decoding=len(decodings) > 1, show_seed=len(seeds) > 1, records=by_id,
                 forgetting=forgetting)


def cell_label(record: dict[str, Any]) -> str:
    """A cell as the significance table names it: its row label (with decoding) and its task."""
    c = record["cell"]
    return f"{row_key(c).label(True, False)} [{c['task']}]"
