"""The report's paired tests (grid.significance, seeded), in families corrected for multiplicity.

- **Declared** (the grid's `comparisons:`, grid/comparisons.py): the primary family (Holm) and
  the secondary family (Benjamini-Hochberg). Each declared comparison is one test per group of
  pairs that differ only in seed and per (sub-task, metric): pooled over its seeds (seed s of A
  against seed s of B), with the per-seed differences and their t-test beside it.
- **Exploratory** (Benjamini-Hochberg): without declarations, the default pairs of the table
  (fine-tuned vs not, 5-shot vs 0-shot, consolidated vs dual, calibrated vs raw, LLM vs encoder
  on the same seed), one test per pair of rows on the column's headline metric; and any
  `--pairs A:B` of cell ids.

The test follows the metric: exact McNemar for right/wrong metrics, a paired permutation test
for every other (ROUGE, slot F1, macro-F1); the significance stars follow the adjusted p.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from grid.comparisons import ComparisonSpec, Group, pair_cells, pair_metric_columns
from grid.errors import GridError
from grid.report.table import Column, RowKey, Table, cell_label, sort_key
from grid.significance import FAMILY_METHOD, METHOD_NAME, Outcomes, adjust_results, compare_strata, per_seed_differences
from grid.store import Store

FAMILIES = ("primary", "secondary", "exploratory")
DEFAULT_ORDER = ("fine-tuned vs not", "5-shot vs 0-shot", "consolidated vs dual", "calibrated vs raw",
                 "LLM vs encoder")


def significance_note(n_boot: int, seed: int) -> str:
    """How the tests were run, under the significance table of both views."""
    return (f"Paired on example_id, seed s of A against seed s of B. Accuracy and exact match: exact "
            f"two-sided McNemar test; every other metric (ROUGE, slot F1, macro-F1): paired permutation test "
            f"({n_boot} permutations, the metric recomputed on each; p at its floor prints as < 1/{n_boot}). "
            f"A - B with a 95% paired bootstrap CI ({n_boot} resamples, seed {seed}). Several seeds: one "
            f"test pooled over seeds (stratified by seed), and a t-test of the per-seed differences. "
            f"MDE: the smallest |A - B| (points) the test detects at alpha 0.05 (two-sided) with 80% power "
            f"(McNemar: exact, at the observed discordance; otherwise 2.80 x the bootstrap SE). "
            f"p adj: Holm within the primary family, Benjamini-Hochberg within each other family; "
            f"* / green: p adj < 0.05.")


@dataclass
class Comparison:
    family: str  # primary, secondary, exploratory
    name: str  # the declared name, a default pair's kind, or "requested"
    column: str  # column title (sub-task and metric)
    a: str  # the first seed's cell ids (every seed's in a_cells / b_cells)
    b: str
    a_label: str
    b_label: str
    metric: str = ""
    question: str | None = None
    a_cells: list[str] = field(default_factory=list)
    b_cells: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    per_seed_diff: list[float] = field(default_factory=list)
    p_seeds: float | None = None  # t-test of the per-seed differences (two or more seeds)
    result: dict[str, Any] | None = None
    error: str | None = None


class OutcomeCache:
    """Per-example outcomes of (cell, sub-task), each predictions parquet read once."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[tuple[str, str], Outcomes] = {}

    def get(self, record: dict[str, Any], subtask: str) -> Outcomes:
        from grid.significance import outcomes_from_rows

        key = (record["cell_id"], subtask)
        if key not in self._cache:
            cols = ["example_id", "prediction", "gold", "invalid_reason", "label_logprobs"]
            table = self.store.read_predictions(record["cell_id"], cols)
            self._cache[key] = outcomes_from_rows(table.to_pylist(), record["cell"]["task"], subtask)
        return self._cache[key]


# --- which pairs ----------------------------------------------------------------------------------


def default_pairs(table: Table) -> list[tuple[str, Column, Column, RowKey, RowKey]]:
    """(kind, column of A, column of B, row of A, row of B) for the default comparisons; a pair of
    rows is always on one seed."""
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
                out += [("LLM vs encoder", col, col, row, enc) for enc in encoders
                        if enc.seed == row.seed and (enc, col.key) in done]
    return out


def shared_columns(table: Table, a: dict[str, Any], b: dict[str, Any]) -> list[tuple[Column, Column]]:
    """Columns to compare two requested cells on: same task, or sub-tasks of the same name."""
    ca = [c for c in table.columns if c.task == a["cell"]["task"]]
    cb = [c for c in table.columns if c.task == b["cell"]["task"]]
    return [(x, y) for x in ca for y in cb if x.subtask == y.subtask and x.metric == y.metric]


# --- running them --------------------------------------------------------------------------------


def run_comparisons(store: Store, table: Table, pairs: list[tuple[str, str]] | None, n_boot: int = 1000,
                    seed: int = 0, include_default: bool = True,
                    declared: tuple[ComparisonSpec, ...] = ()) -> list[Comparison]:
    """Every comparison of the report, tested, with each family's adjusted p (module docstring).
    With declared comparisons the default pairs are left out unless `include_default` asks."""
    cache = OutcomeCache(store)
    out = [c for spec in declared for c in _declared(store, table, cache, spec, n_boot, seed)]
    if include_default and not declared:
        out += _defaults(table, cache, n_boot, seed)
    out += _requested(table, cache, pairs or [], n_boot, seed)
    return _adjusted(out)


def _test(comp: Comparison, records: list[tuple[dict[str, Any], dict[str, Any]]], subtask: str,
          subtask_b: str, cache: OutcomeCache, n_boot: int, seed: int) -> Comparison:
    """Run the metric's test on the (A, B) records of each seed, pooled over seeds; errors are
    kept on the comparison, not raised (one bad pair does not stop the report)."""
    try:
        if any(r["status"] != "done" for pair in records for r in pair):
            raise GridError("both cells must be done")
        outcomes = [(cache.get(a, subtask), cache.get(b, subtask_b)) for a, b in records]
        result = compare_strata(outcomes, comp.metric, n_resamples=n_boot, seed=seed)
        if result.n == 0:
            raise GridError("the cells share no example")
        if len(records) > 1:
            comp.per_seed_diff, comp.p_seeds = per_seed_differences(outcomes, comp.metric)
        comp.result = result.as_dict()
    except (GridError, OSError, ValueError, KeyError) as exc:
        comp.error = str(exc)
    return comp


def _declared(store: Store, table: Table, cache: OutcomeCache, spec: ComparisonSpec, n_boot: int,
              seed: int) -> list[Comparison]:
    cells = [{**r["cell"], "id": r["cell_id"]} for r in table.records.values()
             if r["status"] == "done" and r["cell"].get("kind") == "infer"]
    try:
        groups = pair_cells(spec, cells, f"comparison {spec.name}")
    except GridError as exc:
        return [Comparison(spec.family, spec.name, "–", "", "", "–", "–", question=spec.question, error=str(exc))]
    out = []
    for group in groups:
        for metric in spec.metrics:
            try:
                columns = pair_metric_columns(metric, group.task, group.task_b, f"comparison {spec.name}")
            except GridError as exc:
                out.append(_group_comparison(spec, group, metric, exc))
                continue
            for subtask, name in columns:
                comp = _group_comparison(spec, group, name, None, subtask)
                records = [(table.records[p.a["id"]], table.records[p.b["id"]]) for p in group.pairs]
                out.append(_test(comp, records, subtask, subtask, cache, n_boot, seed))
    return out


def _group_comparison(spec: ComparisonSpec, group: Group, metric: str, error: Exception | None,
                      subtask: str = "") -> Comparison:
    first = group.pairs[0]
    task = group.task if group.task_b == group.task else f"{group.task} vs {group.task_b}"
    column = f"{task} {subtask}/{metric}" if subtask and subtask != "*" else f"{task} {metric}"
    return Comparison(spec.family, spec.name, column, first.a["id"], first.b["id"], _label(first.a),
                      _label(first.b), metric=metric, question=spec.question,
                      a_cells=[p.a["id"] for p in group.pairs], b_cells=[p.b["id"] for p in group.pairs],
                      seeds=[p.seed for p in group.pairs], error=str(error) if error else None)


def _label(cell: dict[str, Any]) -> str:
    """A group's side as the table names its row, without the seed (every seed is in the test)."""
    return cell_label({"cell": cell})


def _defaults(table: Table, cache: OutcomeCache, n_boot: int, seed: int) -> list[Comparison]:
    cols = {c.key: i for i, c in enumerate(table.columns)}
    ranked = sorted(default_pairs(table), key=lambda p: (DEFAULT_ORDER.index(p[0]), cols[p[1].key], sort_key(p[3])))
    out = []
    for kind, ca, cb, ra, rb in ranked:
        a_id, b_id = table.entries[(ra, ca.key)].cell_id, table.entries[(rb, cb.key)].cell_id
        out.append(_pair_comparison(table, cache, "exploratory", kind, ca, cb, a_id, b_id, n_boot, seed))
    return out


def _pair_comparison(table: Table, cache: OutcomeCache, family: str, name: str, ca: Column, cb: Column,
                     a_id: str, b_id: str, n_boot: int, seed: int) -> Comparison:
    ra, rb = table.records[a_id], table.records[b_id]
    title = ca.title if ca == cb else f"{ca.title} vs {cb.title}"
    comp = Comparison(family, name, title, a_id, b_id, cell_label(ra), cell_label(rb), metric=ca.metric,
                      a_cells=[a_id], b_cells=[b_id],
                      seeds=sorted({ra["cell"].get("seed", 0), rb["cell"].get("seed", 0)}))
    return _test(comp, [(ra, rb)], ca.subtask, cb.subtask, cache, n_boot, seed)


def _requested(table: Table, cache: OutcomeCache, pairs: list[tuple[str, str]], n_boot: int,
               seed: int) -> list[Comparison]:
    out = []
    for a_id, b_id in pairs:
        ra, rb = table.records.get(a_id), table.records.get(b_id)
        if ra is None or rb is None:
            raise GridError(f"--pairs: cell {a_id if ra is None else b_id} is not in the results dir")
        cols = shared_columns(table, ra, rb)
        if not cols:
            raise GridError(f"--pairs {a_id}:{b_id}: the cells share no sub-task "
                            f"({ra['cell']['task']} vs {rb['cell']['task']})")
        out += [_pair_comparison(table, cache, "exploratory", "requested", ca, cb, a_id, b_id, n_boot, seed)
                for ca, cb in cols]
    return out


def _adjusted(comparisons: list[Comparison]) -> list[Comparison]:
    """Each family's p-values adjusted together (Holm for primary, Benjamini-Hochberg else)."""
    from grid.significance import TestResult

    for family in FAMILIES:
        tested = [c for c in comparisons if c.family == family and c.result is not None]
        results = [TestResult(**{k: v for k, v in c.result.items() if k != "significant"}) for c in tested]
        for comp, res in zip(tested, adjust_results(results, family)):
            comp.result = res.as_dict()
    return comparisons


def family_counts(comparisons: list[Comparison]) -> list[tuple[str, int, str]]:
    """(family, tests in it, its correction) for every family that holds a test."""
    out = []
    for family in FAMILIES:
        n = sum(1 for c in comparisons if c.family == family and c.result is not None)
        if n:
            out.append((family, n, METHOD_NAME[FAMILY_METHOD[family]]))
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
