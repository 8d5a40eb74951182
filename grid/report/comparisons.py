"""Paired significance tests between cells of the table (grid.significance, seeded): the default
pairs (fine-tuned vs not, 5-shot vs 0-shot, consolidated vs dual, calibrated vs raw, LLM vs
encoder) and any requested `A:B` pair of cell ids."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from grid.errors import GridError
from grid.report.table import Column, RowKey, Table, cell_label, sort_key
from grid.store import Store


def significance_note(n_boot: int, seed: int) -> str:
    """How the tests were run, under the significance table of both views."""
    return (f"Paired on example_id. Accuracy: exact two-sided McNemar test on per-example correctness; "
            f"slot F1: paired bootstrap ({n_boot} resamples, seed {seed}), difference CI and p from the "
            f"null-shifted bootstrap distribution. * / green: p < 0.05 (no correction for multiple tests).")


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
        ranked = sorted(default_pairs(table), key=lambda p: (order[p[0]], cols[p[1].key], sort_key(p[3])))
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
        comp = Comparison(kind, title, a_id, b_id, cell_label(ra), cell_label(rb))
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
