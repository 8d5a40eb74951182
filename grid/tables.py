"""The tables people read in a terminal: the plan before a run, and the status of a results dir."""

from __future__ import annotations

from collections import Counter
from typing import Any

import polars as pl

from grid.plan import Plan

HEADLINE_SUFFIXES = ("/accuracy", "/slot_f1", "/rouge_l", "exact_match", "invalid_rate")


def headline(metrics: dict[str, Any] | None) -> str:
    """The few numbers worth a column: accuracy / slot F1 per sub-task, exact match, invalid rate."""
    if not metrics:
        return ""
    parts = []
    for key, value in metrics.items():
        if key.endswith(HEADLINE_SUFFIXES) and key.count("/") <= 1 and isinstance(value, (int, float)):
            parts.append(f"{key}={value:.3f}")
    return " ".join(parts)


def summary_line(statuses: list[str]) -> str:
    counts = Counter(statuses)
    todo = counts.get("to do", 0)
    return (f"cells: {len(statuses)} in all, {counts.get('done', 0)} done, {todo} to do, "
            f"{counts.get('failed', 0)} failed")


def plan_table(plan: Plan, statuses: dict[str, str]) -> tuple[pl.DataFrame, str]:
    rows = []
    for c in plan.cells:
        status = statuses.get(c.id, "to do")
        status = "to do" if status not in ("done", "failed") else status
        rows.append({"cell_id": c.id, "kind": c.kind, "model": c.model, "task": c.task, "shots": c.shots,
                     "finetune": c.finetune, "seed": c.seed,
                     "decoding": (c.decoding or {}).get("mode", "-"), "status": status})
    line = summary_line([r["status"] for r in rows])
    if plan.skipped:
        line += f" ({plan.skipped} combinations skipped by rules)"
    return pl.DataFrame(rows), line


def status_table(records: list[dict[str, Any]]) -> tuple[pl.DataFrame, str]:
    rows = []
    for r in sorted(records, key=lambda r: (r["cell"]["kind"], r["cell"]["model"], r["cell"]["task"],
                                             r["cell"]["shots"], r["cell"]["finetune"], r["cell"]["seed"])):
        c = r["cell"]
        rows.append({"cell_id": r["cell_id"], "kind": c["kind"], "model": c["model"], "task": c["task"],
                     "shots": c["shots"], "finetune": c["finetune"], "seed": c["seed"],
                     "decoding": (c.get("decoding") or {}).get("mode", "-"), "status": r["status"],
                     "metrics": headline(r.get("metrics")) if r["status"] == "done" else (r.get("error") or "")})
    return pl.DataFrame(rows), summary_line([r["status"] for r in rows])


def print_table(df: pl.DataFrame, line: str) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200, tbl_width_chars=250,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_formatting="ASCII_MARKDOWN"):
        if len(df):
            print(df)
    print(line)
