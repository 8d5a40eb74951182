"""The paper's Table 3 from any results dir, as Markdown and one self-contained HTML page.

    python -m grid report DIR [--out reports/]
    python -m grid.report DIR [--out reports/] [--pairs A:B,...] [--confusion-cell ID[:subtask]]

Rows: model x shots x fine-tune (x decoding, x seed when these vary in the results). Columns:
the seed paper's (20NG dual 20-class / 7-class, 20NG consolidated 20-class / 7-class, MASSIVE
dual intent / slot filling, MASSIVE consolidated intent / slot filling), then any other task
found in the results. Each entry is the cell's own metric from its cell.json (the numbers
`python -m grid status` prints), in percent, with its 95% bootstrap CI and its invalid rate:
`86.5 [85.7, 87.3] inv 0.2%` (the sub-task's invalid rate for consolidated cells).

Significance (grid.significance, seeded): by default, for every column and model, fine-tuned vs
not (same shots), 5-shot vs 0-shot (same fine-tune), consolidated vs dual (same shots and
fine-tune), calibrated vs raw (a calibrated decoding, e.g. `constrained+pmi`, vs `constrained`,
all else equal), and LLM vs encoder (every decoder or API row vs each fine-tuned encoder row);
plus any `--pairs A:B` of cell ids. Accuracy: exact McNemar on per-example
correctness; slot F1: paired bootstrap.

Plots (matplotlib, as inline base64 PNG; the page links nothing outside itself): score by
shots, fine-tuned vs not, a confusion matrix of one cell (the one with the most examples and a
label sub-task, or --confusion-cell), and seen / unseen forgetting of merged models when cells
carry seen tasks (`cell.seen_tasks` or `cell.lineage.seen_tasks`): a merged model's score minus
the grid's reference model (`lineage.reference`) on the same column, shots and seed, as
`grid status` computes forgetting; see `forgetting_rows`.

Files written to OUT: table3.md, report.html, report.json (every number, test and choice).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import posixpath
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from grid.config import decoding_name
from grid.errors import GridError
from grid.forgetting import forgetting_frame
from grid.merge_view import html_section as merge_html
from grid.merge_view import markdown as merge_markdown
from grid.merge_view import plot_sweep, study_numbers
from grid.store import Store

# --- columns ---------------------------------------------------------------------------------


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


# --- reading ----------------------------------------------------------------------------------


def tuned_or_merged_models(forgetting: pl.DataFrame) -> set[str]:
    """Models whose weights were tuned or merged before their inference cells (grid.forgetting's
    kinds made and merge): their not-fine-tuned rows are labelled "(merged)"."""
    return set(forgetting.filter(pl.col("kind").is_in(["made", "merge"]))["model"])


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

    def label(self, show_decoding: bool, show_seed: bool) -> str:
        ft = "w/ FT" if self.finetune != "none" else "w/o FT"
        if self.finetune not in ("none", "full"):
            ft = f"w/ FT ({self.finetune})"
        if self.trained_on:
            ft += f" on {self.trained_on}"
        shots = "five-shot" if self.shots == 5 else "zero-shot" if self.shots == 0 else f"{self.shots}-shot"
        parts = [self.model, shots if self.family != "encoder" else "", ft]
        if show_decoding:
            parts.append(self.decoding)
        if show_seed:
            parts.append(f"seed {self.seed}")
        return " ".join(p for p in parts if p)


FAMILY_ORDER = {"encoder": 0, "decoder": 1, "api": 2}


def row_key(cell: dict[str, Any]) -> RowKey:
    trained_on = (cell.get("lineage") or {}).get("trained_on") or ""
    return RowKey(cell["model"], cell.get("family", ""), int(cell["shots"]), str(cell["finetune"]),
                  decoding_name(cell.get("decoding")), int(cell.get("seed", 0)),
                  trained_on if cell["finetune"] != "none" and trained_on != cell["task"] else "")


def _sort_key(k: RowKey) -> tuple:
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

    def text(self) -> str:
        if self.status != "done":
            return self.status
        if self.value is None:
            return "n/a"
        out = f"{100 * self.value:.1f}"
        if self.ci_low is not None and self.ci_high is not None and not math.isnan(self.ci_low):
            out += f" [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}]"
        if self.invalid_rate is not None:
            out += f" inv {100 * self.invalid_rate:.1f}%"
        return out


def entry_of(record: dict[str, Any], col: Column) -> Entry:
    m = record.get("metrics") or {}
    key = f"{col.subtask}/{col.metric}"
    value = m.get(key)
    inv = m.get(f"{col.subtask}/invalid_rate", m.get("invalid_rate"))
    n = m.get("n", record.get("n_examples"))
    return Entry(cell_id=record["cell_id"], status=record["status"],
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

    made: set[str] = field(default_factory=set)  # merged / chained models

    def label(self, row: RowKey) -> str:
        text = row.label(self.show_decoding, self.show_seed)
        return f"{text} (merged)" if row.model in self.made and row.finetune == "none" else text

    def used_columns(self) -> list[Column]:
        """The paper's columns always; other columns only when some cell fills them."""
        paper = set(PAPER_COLUMNS)
        return [c for c in self.columns
                if c in paper or any((r, c.key) in self.entries for r in self.rows)]


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
    return Table(columns=cols, rows=sorted(rows, key=_sort_key), entries=entries,
                 show_decoding=len(decodings) > 1, show_seed=len(seeds) > 1, records=by_id,
                 made=tuned_or_merged_models(forgetting_frame(records)))


# --- significance -------------------------------------------------------------------------------


@dataclass
class Comparison:
    kind: str  # a default pair's kind (run_comparisons' order), or "requested"
    column: str  # column title (for the metric)
    a: str  # cell ids
    b: str
    a_label: str
    b_label: str
    result: dict[str, Any] | None = None
    error: str | None = None


class OutcomeCache:
    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[tuple[str, str], Any] = {}

    def get(self, record: dict[str, Any], subtask: str):
        import pyarrow.parquet as pq

        from grid.significance import outcomes_from_rows

        key = (record["cell_id"], subtask)
        if key not in self._cache:
            path = self.store.predictions_path(record["cell_id"])
            cols = ["example_id", "prediction", "gold", "invalid_reason"]
            with self.store.fs.open_input_file(path) as fh:
                table = pq.read_table(fh)
            table = table.select([c for c in cols if c in table.column_names])
            self._cache[key] = outcomes_from_rows(table.to_pylist(), record["cell"]["task"], subtask)
        return self._cache[key]


def default_pairs(table: Table) -> list[tuple[str, Column, Column, RowKey, RowKey]]:
    """(kind, column of A, column of B, row of A, row of B) for the default comparisons."""
    from dataclasses import replace

    rows = set(table.rows)
    out = []
    done = {k for k, e in table.entries.items() if e.status == "done" and e.value is not None}
    encoders = [r for r in table.rows if r.family == "encoder" and r.finetune != "none" and r.shots == 0]
    for col in table.used_columns():
        for row in table.rows:
            if (row, col.key) not in done:
                continue
            if row.finetune != "none":
                base = replace(row, finetune="none")
                if base in rows and (base, col.key) in done:
                    out.append(("fine-tuned vs not", col, col, row, base))
            if row.shots == 5:
                zero = replace(row, shots=0)
                if zero in rows and (zero, col.key) in done:
                    out.append(("5-shot vs 0-shot", col, col, row, zero))
            if col.setup == "consolidated":
                dual = next((d for d in table.columns if d.setup == "dual" and d.group == col.group
                             and d.head == col.head and d.metric == col.metric), None)
                if dual is not None and (row, dual.key) in done:
                    out.append(("consolidated vs dual", col, dual, row, row))
            if "+" in row.decoding:  # a calibrated decoding, e.g. constrained+pmi
                raw = replace(row, decoding=row.decoding.split("+")[0])
                if raw in rows and (raw, col.key) in done:
                    out.append(("calibrated vs raw", col, col, row, raw))
            if row.family != "encoder":
                out += [("LLM vs encoder", col, col, row, enc) for enc in encoders if (enc, col.key) in done]
    return out


def shared_columns(table: Table, a: dict[str, Any], b: dict[str, Any]) -> list[tuple[Column, Column]]:
    """Columns to compare two requested cells on: same task, or sub-tasks of the same name."""
    ca = [c for c in table.columns if c.task == a["cell"]["task"]]
    cb = [c for c in table.columns if c.task == b["cell"]["task"]]
    return [(x, y) for x in ca for y in cb if x.subtask == y.subtask and x.metric == y.metric]


def run_comparisons(store: Store, table: Table, pairs: list[tuple[str, str]] | None,
                    n_boot: int = 1000, seed: int = 0, include_default: bool = True) -> list[Comparison]:
    from grid.significance import compare

    cache = OutcomeCache(store)
    todo: list[tuple[str, Column, Column, str, str]] = []
    if include_default:
        order = {"fine-tuned vs not": 0, "5-shot vs 0-shot": 1, "consolidated vs dual": 2, "calibrated vs raw": 3,
                 "LLM vs encoder": 4}
        cols = {c.key: i for i, c in enumerate(table.columns)}
        ranked = sorted(default_pairs(table), key=lambda p: (order[p[0]], cols[p[1].key], _sort_key(p[3])))
        for kind, ca, cb, ra, rb in ranked:
            todo.append((kind, ca, cb, table.entries[(ra, ca.key)].cell_id, table.entries[(rb, cb.key)].cell_id))
    for a_id, b_id in pairs or []:
        ra, rb = table.records.get(a_id), table.records.get(b_id)
        if ra is None or rb is None:
            missing = a_id if ra is None else b_id
            raise GridError(f"--pairs: cell {missing} is not in the results dir")
        cols = shared_columns(table, ra, rb)
        if not cols:
            raise GridError(f"--pairs {a_id}:{b_id}: the cells share no sub-task "
                            f"({ra['cell']['task']} vs {rb['cell']['task']})")
        for ca, cb in cols:
            todo.append(("requested", ca, cb, a_id, b_id))
    out = []
    for kind, ca, cb, a_id, b_id in todo:
        ra, rb = table.records[a_id], table.records[b_id]
        title = ca.title if ca == cb else f"{ca.title} vs {cb.title}"
        comp = Comparison(kind, title, a_id, b_id, _cell_label(ra), _cell_label(rb))
        try:
            if ra["status"] != "done" or rb["status"] != "done":
                raise GridError("both cells must be done")
            res = compare(cache.get(ra, ca.subtask), cache.get(rb, cb.subtask), n_boot=n_boot, seed=seed)
            if res.n == 0:
                raise GridError("the cells share no example")
            comp.result = res.as_dict()
        except (GridError, OSError, ValueError, KeyError) as exc:
            comp.error = str(exc)
        out.append(comp)
    return out


def _cell_label(record: dict[str, Any]) -> str:
    c = record["cell"]
    return f"{row_key(c).label(True, False)} [{c['task']}]"


# --- plots ------------------------------------------------------------------------------------


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _grid_axes(plt, n: int, width: float = 4.0, height: float = 3.0):
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat


def plot_by_shots(plt, table: Table) -> str | None:
    cols = [c for c in table.used_columns()
            if len({r.shots for r in table.rows if (r, c.key) in table.entries
                    and table.entries[(r, c.key)].value is not None}) > 1]
    if not cols:
        return None
    fig, axes = _grid_axes(plt, len(cols))
    for ax, col in zip(axes, cols):
        series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        for r in table.rows:
            e = table.entries.get((r, col.key))
            if e is not None and e.value is not None:
                series[(r.model, r.finetune, r.decoding, r.seed)].append((r.shots, 100 * e.value))
        for (model, ft, dec, seed), pts in sorted(series.items()):
            pts.sort()
            label = f"{model}{' FT' if ft != 'none' else ''}" + (f" {dec}" if table.show_decoding else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(col.title, fontsize=9)
        ax.set_xlabel("shots")
        ax.set_ylabel(col.metric + " (%)")
        ax.set_xticks(sorted({r.shots for r in table.rows}))
        ax.set_ylim(-2, 102)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle("Score by number of shots")
    return _png(fig)


def plot_finetune(plt, table: Table) -> str | None:
    from dataclasses import replace

    cols, data = [], {}
    for col in table.used_columns():
        pts = []
        for r in table.rows:
            if r.finetune == "none":
                continue
            e_ft = table.entries.get((r, col.key))
            e_no = table.entries.get((replace(r, finetune="none"), col.key))
            if e_ft and e_no and e_ft.value is not None and e_no.value is not None:
                pts.append((f"{r.model}\n{r.shots}-shot", 100 * e_no.value, 100 * e_ft.value))
        if pts:
            cols.append(col)
            data[col.key] = pts
    if not cols:
        return None
    fig, axes = _grid_axes(plt, len(cols), width=4.5)
    for ax, col in zip(axes, cols):
        pts = data[col.key]
        xs = range(len(pts))
        ax.bar([x - 0.2 for x in xs], [p[1] for p in pts], width=0.4, label="w/o FT", color="#bbb")
        ax.bar([x + 0.2 for x in xs], [p[2] for p in pts], width=0.4, label="w/ FT", color="#2a6fb0")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([p[0] for p in pts], fontsize=7, rotation=30, ha="right")
        ax.set_title(col.title, fontsize=9)
        ax.set_ylim(0, 102)
        ax.set_ylabel(col.metric + " (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fine-tuned vs not")
    return _png(fig)


INVALID = "(invalid)"


def confusion_data(store: Store, record: dict[str, Any], subtask: str) -> tuple[list[str], list[str], list[list[int]]]:
    """(gold labels, predicted labels incl. "(invalid)", counts[gold][pred]) of one label sub-task."""
    import pyarrow.parquet as pq

    from grid.significance import subtask_valid

    with store.fs.open_input_file(store.predictions_path(record["cell_id"])) as fh:
        rows = pq.read_table(fh).to_pylist()
    pairs = []
    for r in rows:
        gold = json.loads(r["gold"])
        pred = json.loads(r["prediction"]) if r.get("prediction") else {}
        g = str(gold.get(subtask))
        p = pred.get(subtask)
        valid = subtask_valid(r.get("invalid_reason"), subtask) and isinstance(p, str)
        pairs.append((g, p if valid else INVALID))
    golds = sorted({g for g, _ in pairs})
    preds = golds + sorted({p for _, p in pairs if p not in golds and p != INVALID}) + [INVALID]
    gi = {g: i for i, g in enumerate(golds)}
    pi = {p: i for i, p in enumerate(preds)}
    counts = [[0] * len(preds) for _ in golds]
    for g, p in pairs:
        counts[gi[g]][pi[p]] += 1
    return golds, preds, counts


def choose_confusion(table: Table, wanted: str | None) -> tuple[dict[str, Any], str] | None:
    """The cell and label sub-task to draw: `ID` or `ID:subtask`, else the label cell with most examples."""
    from grid.tasks import get_task

    if wanted:
        cid, _, sub = wanted.partition(":")
        rec = table.records.get(cid)
        if rec is None:
            raise GridError(f"--confusion-cell: cell {cid} is not in the results dir")
        if rec["status"] != "done" or rec["cell"]["kind"] != "infer":
            raise GridError(f"--confusion-cell: cell {cid} is not a finished inference cell")
        labels = [s.name for s in get_task(rec["cell"]["task"]).subtasks if s.type == "label"]
        if not labels:
            raise GridError(f"--confusion-cell: task {rec['cell']['task']} has no label sub-task")
        if sub and sub not in labels:
            raise GridError(f"--confusion-cell: {sub!r} is not a label sub-task of {rec['cell']['task']}")
        return rec, sub or labels[0]
    best = None
    for rec in table.records.values():
        c = rec["cell"]
        if rec["status"] != "done" or c.get("kind") != "infer":
            continue
        try:
            labels = [s.name for s in get_task(c["task"]).subtasks if s.type == "label"]
        except GridError:
            continue
        if not labels:
            continue
        m = rec.get("metrics") or {}
        score = (m.get("n", rec.get("n_examples")) or 0, m.get(f"{labels[0]}/accuracy") or 0, rec["cell_id"])
        if best is None or score > best[0]:
            best = (score, rec, labels[0])
    return (best[1], best[2]) if best else None


def plot_confusion(plt, golds: list[str], preds: list[str], counts: list[list[int]], title: str) -> str:
    import numpy as np

    mat = np.array(counts, dtype=float)
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    size = max(4.0, min(14.0, 0.28 * len(preds) + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size * len(golds) / max(len(preds), 1) + 1))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fs = 8 if len(preds) <= 25 else 5
    ax.set_xticks(range(len(preds)))
    ax.set_xticklabels(preds, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(golds)))
    ax.set_yticklabels(golds, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="share of gold row")
    return _png(fig)


def forgetting_rows(table: Table) -> list[dict[str, Any]]:
    """Per cell of a tuned or merged model (see `tuned_or_merged_models`) and column: whether its
    weights saw the task, its score, the reference's on the same column, shots, seed and decoding,
    and the difference (on an unseen task the forgetting; on a seen one, the gain). The rule is
    grid.forgetting's, the one `grid status` uses."""
    titles = pl.DataFrame([{"task": c.task, "subtask": c.subtask, "metric": c.metric, "column": c.title}
                           for c in table.used_columns()],
                          schema={"task": pl.String, "subtask": pl.String, "metric": pl.String, "column": pl.String})
    found = pl.col("reference_cell").is_not_null()
    rows = (forgetting_frame(list(table.records.values()))
            .filter(pl.col("kind").is_in(["made", "merge"]))
            .join(titles, on=["task", "subtask", "metric"], maintain_order="left")
            .select("cell_id", "model", "column", "task", "shots", "seen", "score", "reference_cell",
                    pl.when(found).then(pl.col("reference")).alias("reference_model"),
                    pl.when(found).then(pl.lit("declared reference")).alias("reference_kind"),  # report.json's field
                    pl.col("reference_score").alias("reference"), "delta")
            .sort("model", "shots", ~pl.col("seen"), "column", maintain_order=True))
    return rows.to_dicts()


def plot_forgetting(plt, rows: list[dict[str, Any]]) -> str | None:
    rows = [r for r in rows if r["delta"] is not None]
    if not rows:
        return None
    models = sorted({r["model"] for r in rows})
    fig, axes = _grid_axes(plt, len(models), width=5.0)
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        colors = ["#2a6fb0" if r["seen"] else "#d9822b" for r in mine]
        ax.bar(range(len(mine)), [100 * r["delta"] for r in mine], color=colors)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r["column"] for r in mine], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("merged - reference (points)")
        ax.set_title(f"{model} (blue: seen, orange: unseen)", fontsize=9)
    fig.suptitle("Forgetting of merged models on seen and unseen tasks")
    return _png(fig)


# --- rendering --------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    cols = table.used_columns()
    head = ["Model"] + [f"{c.group} {c.setup}<br>{c.head}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [_md_escape(table.label(r))]
        for c in cols:
            e = table.entries.get((r, c.key))
            cells.append(_md_escape(e.text()) if e else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_text(result: dict) -> str:
    """A - B in points, with its CI when the test gives one (both the Markdown and HTML tables)."""
    diff = f"{100 * result['diff']:+.1f}"
    if result.get("ci_low") is not None:
        diff += f" [{100 * result['ci_low']:+.1f}, {100 * result['ci_high']:+.1f}]"
    return diff


def comparisons_markdown(comps: list[Comparison]) -> str:
    if not comps:
        return "No pair of cells to compare."
    lines = ["| Comparison | Column | A | B | A - B | Test | p | |", "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        if c.result is None:
            lines.append(f"| {c.kind} | {_md_escape(c.column)} | {_md_escape(c.a_label)} | "
                         f"{_md_escape(c.b_label)} | – | – | – | {_md_escape(c.error or '')} |")
            continue
        r = c.result
        diff = _diff_text(r)
        test = r["test"] + (f" (n10={r['n10']}, n01={r['n01']})" if r["test"] == "mcnemar-exact" else
                            f" (B={r['n_boot']}, seed {r['seed']})")
        lines.append(f"| {c.kind} | {_md_escape(c.column)} | {_md_escape(c.a_label)} | {_md_escape(c.b_label)} | "
                     f"{diff} | {test}, n={r['n']} | {_fmt_p(r['p_value'])} | {'*' if r['significant'] else ''} |")
    return "\n".join(lines)


def _fmt_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;text-align:center}td.row{text-align:left;font-weight:600}
td.failed{color:#b00}td.missing{color:#999;text-align:center}
tr:nth-child(even) td{background:#fafafa}
td.sig{color:#060;font-weight:600}
#significance td:nth-child(-n+4){text-align:left}
.note{color:#555;font-size:12px;max-width:1100px}
img{max-width:100%;border:1px solid #eee;margin:8px 0}
"""


def table_html(table: Table) -> str:
    cols = table.used_columns()
    groups: list[tuple[str, int]] = []
    for c in cols:
        name = f"{c.group} {c.setup} model" if c.setup in ("dual", "consolidated") else c.group
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1] + 1)
        else:
            groups.append((name, 1))
    h = ['<table id="table3"><thead><tr><th rowspan="2">Model</th>']
    h += [f'<th colspan="{n}">{html.escape(g)}</th>' for g, n in groups]
    h.append("</tr><tr>")
    h += [f'<th data-column="{html.escape(c.key)}">{html.escape(c.head)}</th>' for c in cols]
    h.append("</tr></thead><tbody>")
    for r in table.rows:
        label = table.label(r)
        h.append(f'<tr data-row="{html.escape(label)}"><td class="row">{html.escape(label)}</td>')
        for c in cols:
            e = table.entries.get((r, c.key))
            if e is None:
                h.append('<td class="missing">–</td>')
                continue
            cls = "failed" if e.status != "done" else "num"
            title = e.error if e.status != "done" else f"cell {e.cell_id}, n={e.n}"
            h.append(f'<td class="{cls}" data-cell-id="{e.cell_id}" data-column="{html.escape(c.key)}" '
                     f'data-value="{"" if e.value is None else repr(e.value)}" title="{html.escape(title or "")}">'
                     f"{html.escape(e.text())}</td>")
        h.append("</tr>")
    h.append("</tbody></table>")
    return "".join(h)


def comparisons_html(comps: list[Comparison]) -> str:
    if not comps:
        return "<p>No pair of cells to compare.</p>"
    h = ['<table id="significance"><thead><tr><th>Comparison</th><th>Column</th><th>A</th><th>B</th>'
         "<th>A - B (points)</th><th>Test</th><th>n</th><th>p</th></tr></thead><tbody>"]
    for c in comps:
        attrs = f'data-a="{c.a}" data-b="{c.b}"'
        if c.result is None:
            h.append(f"<tr {attrs}><td>{html.escape(c.kind)}</td><td>{html.escape(c.column)}</td>"
                     f"<td>{html.escape(c.a_label)}</td><td>{html.escape(c.b_label)}</td>"
                     f'<td colspan="4" class="failed">{html.escape(c.error or "")}</td></tr>')
            continue
        r = c.result
        diff = _diff_text(r)
        test = (f"exact McNemar (n10={r['n10']}, n01={r['n01']})" if r["test"] == "mcnemar-exact"
                else f"paired bootstrap (B={r['n_boot']}, seed {r['seed']})")
        sig = ' class="sig"' if r["significant"] else ""
        h.append(f"<tr {attrs}><td>{html.escape(c.kind)}</td><td>{html.escape(c.column)}</td>"
                 f"<td>{html.escape(c.a_label)}</td><td>{html.escape(c.b_label)}</td><td>{diff}</td>"
                 f"<td>{test}</td><td>{r['n']}</td><td{sig}>{_fmt_p(r['p_value'])}</td></tr>")
    h.append("</tbody></table>")
    return "".join(h)


def forgetting_html(rows: list[dict[str, Any]]) -> str:
    h = ['<table id="forgetting"><thead><tr><th>Merged model</th><th>Column</th><th>Seen</th><th>Score</th>'
         "<th>Shots</th><th>Reference</th><th>Difference</th></tr></thead><tbody>"]
    for r in rows:
        ref = "–" if r["reference"] is None else f"{100 * r['reference']:.1f} ({html.escape(str(r['reference_model']))})"
        delta = "–" if r["delta"] is None else f"{100 * r['delta']:+.1f}"
        h.append(f'<tr data-cell-id="{r["cell_id"]}"><td>{html.escape(str(r["model"]))}</td>'
                 f"<td>{html.escape(r['column'])}</td><td>{'seen' if r['seen'] else 'unseen'}</td>"
                 f"<td>{100 * r['score']:.1f}</td><td>{r['shots']}</td><td>{ref}</td><td>{delta}</td></tr>")
    h.append("</tbody></table>")
    return "".join(h)


def _img(b64: str | None, alt: str, missing: str) -> str:
    if b64 is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


# --- entry point --------------------------------------------------------------------------------


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition(":")
        if not sep or not a or not b:
            raise GridError(f"--pairs: {part!r} is not A:B (two cell ids)")
        out.append((a, b))
    return out


def write_report(results: str | Path, out: str | Path = "reports", *, pairs: list[tuple[str, str]] | str | None = None,
                 confusion_cell: str | None = None, n_boot: int = 1000, seed: int = 0,
                 default_pairs_on: bool = True) -> list[str]:
    """Write table3.md, report.html and report.json under `out`; return their paths."""
    import time

    results_text = str(results)
    store = Store.open(results, create=False)
    records = store.records()
    if isinstance(pairs, str):
        pairs = parse_pairs(pairs)
    table = build_table(records)
    comps = run_comparisons(store, table, pairs, n_boot=n_boot, seed=seed, include_default=default_pairs_on)
    plt = _matplotlib()
    plots: dict[str, str | None] = {}
    confusion_choice = choose_confusion(table, confusion_cell)
    forgetting = forgetting_rows(table)
    merge_study = study_numbers(store, records)
    conf_info = None
    if confusion_choice:
        rec, sub = confusion_choice
        golds, preds, counts = confusion_data(store, rec, sub)
        conf_info = {"cell_id": rec["cell_id"], "subtask": sub, "label": _cell_label(rec),
                     "gold_labels": golds, "predicted_labels": preds, "counts": counts}
    if plt is not None:
        plots["by_shots"] = plot_by_shots(plt, table)
        plots["finetune"] = plot_finetune(plt, table)
        plots["confusion"] = (plot_confusion(plt, conf_info["gold_labels"], conf_info["predicted_labels"],
                                             conf_info["counts"], f"{conf_info['label']} - {conf_info['subtask']}")
                              if conf_info else None)
        plots["forgetting"] = plot_forgetting(plt, forgetting)
        plots["merge_sweep"] = plot_sweep(plt, merge_study) if merge_study else None
    no_mpl = "" if plt is not None else " (matplotlib is not installed: pip install matplotlib)"

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(r["status"] for r in records)
    summary = (f"{len(records)} cells in {results_text}: {counts.get('done', 0)} done, "
               f"{counts.get('failed', 0)} failed; {sum(1 for r in records if r['cell']['kind'] == 'infer')} inference cells")
    legend = ("Each entry: the cell's metric in percent (accuracy; F1 for slot filling) from its cell.json, "
              "[95% percentile bootstrap CI], and inv = share of invalid answers (for consolidated cells, of "
              "that sub-task). – : no such cell; failed: the cell failed (hover for the error). "
              "Dual = one single-task cell per column; consolidated = one multi-task cell answering both.")
    sig_note = (f"Paired on example_id. Accuracy: exact two-sided McNemar test on per-example correctness; "
                f"slot F1: paired bootstrap ({n_boot} resamples, seed {seed}), difference CI and p from the "
                f"null-shifted bootstrap distribution. * / green: p < 0.05 (no correction for multiple tests).")

    md = [f"# Table 3 reproduced\n", summary + "\n", table_markdown(table), "", legend, "",
          "## Paired significance tests\n", sig_note + "\n", comparisons_markdown(comps)]
    if forgetting:
        md += ["", "## Merged models: seen / unseen tasks\n",
               "| Merged model | Column | Seen | Score | Shots | Reference | Difference |", "|---|---|---|---|---|---|---|"]
        for r in forgetting:
            ref = "–" if r["reference"] is None else f"{100 * r['reference']:.1f} ({r['reference_model']})"
            delta = "–" if r["delta"] is None else f"{100 * r['delta']:+.1f}"
            md.append(f"| {r['model']} | {r['column']} | {'seen' if r['seen'] else 'unseen'} | "
                      f"{100 * r['score']:.1f} | {r['shots']} | {ref} | {delta} |")
    if merge_study:
        md += [""] + merge_markdown(merge_study)
    md_path = out / "table3.md"
    md_path.write_text("\n".join(md) + "\n")

    page = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>clfgrid report: Table 3</title>", f"<style>{CSS}</style></head><body>",
        "<h1>Table 3 reproduced</h1>", f'<p class="note" id="summary">{html.escape(summary)}</p>',
        table_html(table), f'<p class="note">{html.escape(legend)}</p>',
        "<h2>Paired significance tests</h2>", f'<p class="note">{html.escape(sig_note)}</p>',
        comparisons_html(comps),
        "<h2>Score by shots</h2>",
        _img(plots.get("by_shots"), "score by shots", "No column has cells at several shot counts." + no_mpl),
        "<h2>Fine-tuned vs not</h2>",
        _img(plots.get("finetune"), "fine-tuned vs not",
             "No model has both a fine-tuned and a not fine-tuned cell on one column." + no_mpl),
        "<h2>Confusion matrix</h2>",
    ]
    if conf_info:
        page.append(f'<p class="note" id="confusion-cell" data-cell-id="{conf_info["cell_id"]}">'
                    f'Cell {conf_info["cell_id"]}: {html.escape(conf_info["label"])}, sub-task '
                    f'{html.escape(conf_info["subtask"])}; rows: gold, columns: predicted (normalized per gold row).</p>')
    page.append(_img(plots.get("confusion"), "confusion matrix", "No finished cell with a label sub-task." + no_mpl))
    page.append("<h2>Merged models: seen / unseen tasks</h2>")
    if forgetting:
        page += [forgetting_html(forgetting),
                 _img(plots.get("forgetting"), "forgetting", "No merge cell has a single-task reference." + no_mpl)]
    else:
        page.append('<p class="note">No merge cells (inference cells of merged models, carrying '
                    '<code>seen_tasks</code>) in these results.</p>')
    if merge_study:
        page.append(merge_html(merge_study, plots.get("merge_sweep")))
    page.append(f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M:%S")} by python -m grid report.</p>')
    page.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(page))

    data = {
        "results": results_text, "summary": summary,
        "columns": [c.__dict__ | {"key": c.key, "title": c.title} for c in table.used_columns()],
        "rows": [{"label": table.label(r), **r.__dict__,
                  "entries": {c.key: table.entries[(r, c.key)].__dict__ | {"text": table.entries[(r, c.key)].text()}
                              for c in table.used_columns() if (r, c.key) in table.entries}}
                 for r in table.rows],
        "comparisons": [c.__dict__ for c in comps],
        "confusion": conf_info, "forgetting": forgetting, "merge_study": merge_study,
        "plots": {k: v is not None for k, v in plots.items()}, "n_boot": n_boot, "seed": seed,
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    return [str(md_path), str(html_path), str(json_path)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results dir")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.add_argument("--pairs", default=None, help="extra comparisons A:B,... by cell id")
    p.add_argument("--no-default-pairs", action="store_true", help="test only the --pairs")
    p.add_argument("--confusion-cell", default=None, help="cell id (ID or ID:subtask) for the confusion matrix")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)


def report_from_args(args: argparse.Namespace) -> list[str]:
    return write_report(args.results, args.out, pairs=getattr(args, "pairs", None),
                        confusion_cell=getattr(args, "confusion_cell", None),
                        n_boot=getattr(args, "n_boot", 1000), seed=getattr(args, "seed", 0),
                        default_pairs_on=not getattr(args, "no_default_pairs", False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grid.report", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        for path in report_from_args(args):
            print(path)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
