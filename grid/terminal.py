"""The tables people read in a terminal: the plan before a run, and the status of a results dir."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import polars as pl

from grid.config import decoding_name
from grid.forgetting import forgetting_frame

if TYPE_CHECKING:  # grid.plan imports the data readers (HF datasets, 5 s): `grid status` needs none
    from grid.plan import Plan

HEADLINE_SUFFIXES = ("/accuracy", "/slot_f1", "/rougeL", "exact_match", "invalid_rate")


def headline(metrics: dict[str, Any] | None) -> str:
    """The few numbers worth a column: accuracy / slot F1 per sub-task with its 95% CI (and an
    accuracy's majority-class rate, the floor it must clear), exact match, invalid rate."""
    if not metrics:
        return ""
    parts = []
    for key, value in metrics.items():
        if key.endswith(HEADLINE_SUFFIXES) and key.count("/") <= 1 and isinstance(value, (int, float)):
            text = f"{key}={value:.3f}"
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            if low is not None and high is not None:
                text += f" [{low:.3f}, {high:.3f}]"
            majority = metrics.get(key.replace("/accuracy", "/majority_rate")) if key.endswith("/accuracy") else None
            if majority is not None:
                text += f" (majority {majority:.3f})"
            parts.append(text)
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
                     "decoding": decoding_name(c.decoding), "status": status})
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
                     "decoding": decoding_name(c.get("decoding")), "status": r["status"],
                     "metrics": _lineage_text(c) if c["kind"] == "merge" and r["status"] == "done"
                     else headline(r.get("metrics")) if r["status"] == "done" else (r.get("error") or "")})
    return pl.DataFrame(rows), summary_line([r["status"] for r in rows]) + _forgetting_text(records)


def search_table(records: list[dict[str, Any]]) -> tuple[pl.DataFrame, str]:
    """Every trial of the searched fine-tune cells (grid/search.py): its drawn hparams, whether it
    ran out, was stopped early or failed, its epochs, the metric at each epoch (its curve), and a
    line per search naming the chosen values."""
    rows, lines = [], []
    for r in records:
        search = (r.get("metrics") or {}).get("search") if r["status"] == "done" else None
        if not search:
            continue
        metric = search["metric"]
        for t in search["trials"]:
            curve = " ".join(f"{p[metric]:.3f}" for p in t["curve"] if metric in p)
            rows.append({"cell_id": r["cell_id"], "trial": t["trial_id"],
                         "hparams": ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in t["config"].items()),
                         "status": t["status"] + (" (chosen)" if t["trial_id"] == search["best_trial"] else ""),
                         "epochs": round(t["epochs_run"], 2), f"{metric} by epoch": curve})
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in search["chosen"].items())
        lines.append(f"search {r['cell_id']} ({r['cell']['model']} {r['cell']['task']}): chose {chosen}, "
                     f"{metric} {search['best_value']:.4f}; {search['stopped_early']} of {len(search['trials'])} "
                     "trials stopped early")
    return pl.DataFrame(rows), "\n".join(lines)


def print_table(df: pl.DataFrame, line: str) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200, tbl_width_chars=250,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_formatting="ASCII_MARKDOWN"):
        if len(df):
            print(df)
    print(line)


# --- seen and unseen tasks, forgetting (merge study, 004) -----------------------------------


def forgetting_table(records: list[dict[str, Any]], reference: str | None = None) -> tuple[pl.DataFrame, str]:
    """Per set of weights (a model, a fine-tune of it on a task, a merge): mean score on the seen
    tasks, on the unseen tasks, and mean forgetting, over each cell's headline score (the rule is
    grid.forgetting's)."""
    df = (forgetting_frame(records, reference).filter(pl.col("headline"))
          .sort("weights", "task", "shots", "seed", maintain_order=True))
    if df.is_empty() or (df["reference"].is_null().all() and reference is None):
        return pl.DataFrame(), ""
    table = (df.group_by("weights", "shots", "decoding", maintain_order=True)
               .agg(pl.col("task").filter(pl.col("seen")).unique().sort().str.join(",").alias("seen_tasks"),
                    pl.col("score").filter(pl.col("seen")).mean().round(3).alias("seen_score"),
                    pl.col("score").filter(~pl.col("seen")).mean().round(3).alias("unseen_score"),
                    pl.col("forgetting").mean().round(3).alias("forgetting"),
                    pl.len().alias("cells")))
    names = sorted(set(df["reference"].drop_nulls()))
    name = reference or (names[0] if len(names) == 1 else "each model's reference (" + ", ".join(names) + ")")
    return table, (f"forgetting = unseen-task score minus {name}'s on the same task (mean over tasks); "
                   f"score = each task's first accuracy")


def _forgetting_text(records: list[dict[str, Any]]) -> str:
    """The seen / unseen / forgetting table as text under the status line (grids with a reference)."""
    table, line = forgetting_table(records)
    if not line:
        return ""
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200, tbl_width_chars=250,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_formatting="ASCII_MARKDOWN"):
        return f"\n\n{table}\n{line}"


def _lineage_text(cell: dict[str, Any]) -> str:
    """A merge cell's lineage in one cell of the table: method(placeholder=input, ...)."""
    lineage = cell.get("lineage") or {}
    inputs = ", ".join(f"{k}={v}" for k, v in (lineage.get("inputs") or {}).items())
    return f"{lineage.get('method')}({inputs})"
