"""Everything the report shows, as numbers: the table, the tests, the forgetting rows, the
confusion matrix, the merge study and the plots' data. The views (markdown, page, plots) only
format what `build_model` computed; report.json is `to_json` of the same model."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any

import polars as pl

from grid.comparisons import ComparisonSpec
from grid.errors import GridError
from grid.forgetting import SKILL_METRICS
from grid.provenance import report_provenance
from grid.report.comparisons import Comparison, family_counts, run_comparisons
from grid.report.merge_study import study_numbers
from grid.report.seeds import seed_numbers
from grid.report.table import Column, RowKey, Table, build_table, cell_label, sort_key
from grid.store import Store

log = logging.getLogger(__name__)

INVALID = "(invalid)"


@dataclass
class Confusion:
    """Counts of gold (rows) against predicted (columns, "(invalid)" last) labels of one sub-task."""

    cell_id: str
    subtask: str
    label: str
    gold_labels: list[str]
    predicted_labels: list[str]
    counts: list[list[int]]


@dataclass
class ShotsPanel:
    """One column's scores by number of shots: a line per model, fine-tune, decoding and seed."""

    column: Column
    series: list[tuple[str, list[tuple[int, float]]]]  # legend label, (shots, score in %) points
    shots: list[int]  # every shot count of the table, the x ticks


@dataclass
class FinetunePanel:
    """One column's not fine-tuned and fine-tuned scores (%), side by side per model and shots."""

    column: Column
    bars: list[tuple[str, float, float]]  # label, without, with fine-tune


@dataclass
class ReportModel:
    """The report's numbers, in the order the views show them."""

    results: str
    summary: str
    table: Table
    comparisons: list[Comparison]
    families: list[tuple[str, int, str]]  # (family, tests, correction): grid.report.comparisons.family_counts
    forgetting: list[dict[str, Any]]
    confusion: Confusion | None
    merge_study: dict[str, Any] | None
    seeds: dict[str, Any] | None  # grid.report.seeds: every variant with two or more seeds
    shots_panels: list[ShotsPanel]
    finetune_panels: list[FinetunePanel]
    n_boot: int
    seed: int
    provenance: dict[str, Any]  # grid.provenance.report_provenance: the runs that wrote the results, cell times


def build_model(store: Store, results: str, pairs: list[tuple[str, str]] | None = None,
                confusion_cell: str | None = None, n_boot: int = 1000, seed: int = 0,
                default_pairs_on: bool = True, declared: tuple[ComparisonSpec, ...] = ()) -> ReportModel:
    records = store.records()
    # a finished cell whose predictions file or metrics were damaged after it was written: left
    # out, and said
    damaged = store.damaged_predictions(records) | store.non_numeric_metrics(records)
    for reason in damaged.values():
        log.warning("left out of the report: %s", reason)
    records = [r for r in records if r["cell_id"] not in damaged]
    table = build_table(records)
    comparisons = run_comparisons(store, table, pairs, n_boot=n_boot, seed=seed, include_default=default_pairs_on,
                                  declared=declared)
    choice = choose_confusion(table, confusion_cell)
    summary = summary_line(records, results) + (
        f"; {len(damaged)} finished cells left out, their predictions file or metrics damaged" if damaged else "")
    return ReportModel(results=results, summary=summary, table=table,
                       comparisons=comparisons, families=family_counts(comparisons),
                       forgetting=forgetting_rows(table),
                       confusion=confusion_of(store, *choice) if choice else None,
                       merge_study=study_numbers(store, records), seeds=seed_numbers(store, records),
                       shots_panels=shots_panels(table),
                       finetune_panels=finetune_panels(table), n_boot=n_boot, seed=seed,
                       provenance=report_provenance(store, records))


def summary_line(records: list[dict[str, Any]], results: str) -> str:
    counts = Counter(r["status"] for r in records)
    n_infer = sum(1 for r in records if r["cell"]["kind"] == "infer")
    return (f"{len(records)} cells in {results}: {counts.get('done', 0)} done, "
            f"{counts.get('failed', 0)} failed; {n_infer} inference cells")


def to_json(model: ReportModel, plots: dict[str, str | None] | None) -> dict[str, Any]:
    """report.json: every number, test and choice; `plots` says which plots were drawn."""
    table = model.table
    cols = table.used_columns()
    return {
        "results": model.results, "summary": model.summary,
        "columns": [c.__dict__ | {"key": c.key, "title": c.title} for c in cols],
        "rows": [{"label": table.label(r), **r.__dict__,
                  "entries": {c.key: table.entries[(r, c.key)].__dict__ | {"text": table.entries[(r, c.key)].text()}
                              for c in cols if (r, c.key) in table.entries}}
                 for r in table.rows],
        "comparisons": [c.__dict__ for c in model.comparisons],
        "families": [{"family": f, "tests": n, "correction": how} for f, n, how in model.families],
        "confusion": model.confusion.__dict__ if model.confusion else None, "forgetting": model.forgetting,
        "merge_study": model.merge_study, **({"seeds": model.seeds} if model.seeds else {}),
        "plots": {k: v is not None for k, v in (plots or {}).items()},
        "n_boot": model.n_boot, "seed": model.seed, "provenance": model.provenance,
    }


# --- forgetting ----------------------------------------------------------------------------------


def forgetting_rows(table: Table) -> list[dict[str, Any]]:
    """Per cell of a tuned or merged model (table.made) and column: whether its weights saw the
    task, its score, the reference's on the same column, shots, seed and decoding, and the
    difference (on an unseen task the forgetting; on a seen one, the gain). The rule is
    grid.forgetting's, the one `grid status` uses."""
    titles = pl.DataFrame([{"task": c.task, "subtask": c.subtask, "metric": c.metric, "column": c.title}
                           for c in table.used_columns()],
                          schema={"task": pl.String, "subtask": pl.String, "metric": pl.String, "column": pl.String})
    found = pl.col("reference_cell").is_not_null()
    rows = (table.forgetting
            .filter(pl.col("kind").is_in(["made", "merge"]))
            .join(titles, on=["task", "subtask", "metric"], maintain_order="left")
            .select("cell_id", "model", "column", "task", "shots", "seen", "score", "reference_cell",
                    pl.when(found).then(pl.col("reference")).alias("reference_model"),
                    pl.when(found).then(pl.lit("declared reference")).alias("reference_kind"),  # report.json's field
                    pl.col("reference_score").alias("reference"), "delta",
                    *[f"{m}_delta" for m in SKILL_METRICS])
            .sort("model", "shots", ~pl.col("seen"), "column", maintain_order=True))
    return rows.to_dicts()


# --- confusion matrix ----------------------------------------------------------------------------


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


def confusion_of(store: Store, record: dict[str, Any], subtask: str) -> Confusion:
    """The confusion counts of one label sub-task, from the cell's predictions parquet."""
    from grid.significance import subtask_valid

    rows = store.read_predictions(record["cell_id"]).to_pylist()
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
    return Confusion(record["cell_id"], subtask, cell_label(record), golds, preds, counts)


# --- plot data -----------------------------------------------------------------------------------


def shots_panels(table: Table) -> list[ShotsPanel]:
    """Columns with cells at several shot counts, each with its lines of (shots, score %)."""
    shots = sorted({r.shots for r in table.rows})
    panels = []
    for col in table.used_columns():
        series: dict[RowKey, list[tuple[int, float]]] = defaultdict(list)
        for r in table.rows:
            e = table.entries.get((r, col.key))
            if e is not None and e.value is not None:
                series[replace(r, shots=0)].append((r.shots, 100 * e.value))
        if len({s for pts in series.values() for s, _ in pts}) < 2:
            continue
        # one legend entry per (model, fine-tune, decoding) and seed: the row's own label, less its shots
        lines = [(legend_label(key, table.show_seed), sorted(pts))
                 for key, pts in sorted(series.items(), key=lambda kv: sort_key(kv[0]))]
        panels.append(ShotsPanel(col, lines, shots))
    return panels


def legend_label(row: RowKey, show_seed: bool) -> str:
    """A plot line's name: model, fine-tune (or lineage) and decoding, and the seed when seeds vary."""
    label = replace(row, shots=0).label(show_decoding=row.family != "encoder", show_seed=show_seed)
    return label.replace(" zero-shot", "", 1)


def finetune_panels(table: Table) -> list[FinetunePanel]:
    """Columns where a fine-tuned row has its not fine-tuned twin, with both scores (%)."""
    panels = []
    for col in table.used_columns():
        bars = []
        for r in table.rows:
            if r.finetune == "none":
                continue
            e_ft = table.entries.get((r, col.key))
            e_no = table.entries.get((replace(r, finetune="none"), col.key))
            if e_ft and e_no and e_ft.value is not None and e_no.value is not None:
                bars.append((f"{legend_label(r, table.show_seed)}\n{r.shots}-shot", 100 * e_no.value, 100 * e_ft.value))
        if bars:
            panels.append(FinetunePanel(col, bars))
    return panels
