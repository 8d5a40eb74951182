"""Seen and unseen tasks, and forgetting: the one rule that `grid status`, the report, the
merge-study view and `grid.query.forgetting` share.

`forgetting_frame(records)` has one row per finished inference cell and sub-task it scores: was
the cell's model tuned on this task, and how does its score compare with the reference model's?

Seen tasks. A cell's weights saw the tasks its lineage names (`cell.lineage.seen_tasks`, written
by grid.plan): the task of each fine-tune that led to these weights (a fine-tune of this cell's
own chain, a `finetuned_from` chain, every task of a mixture), for a merge the union of its
inputs' seen tasks, and the tasks a model declares as `seen_tasks`. The reference's own seen
tasks are taken out: what an instruct stand-in was declared tuned on is its general ability, so
such a task counts as unseen for every model and forgetting is measured on it too. A fine-tune
evaluated on another task (`finetuned_eval: all`) is a cross-task row: that task is unseen.

Reference. The model the grid declares for the cell's model (`cell.lineage.reference`, from the
grid's `reference:`): its finished, not fine-tuned cell on the same task, shots, seed and decoding
(the smallest cell id if there are several). Without a declared reference, or without that cell,
a row has no reference score and no difference: nothing else stands in for the reference.

Numbers. `score`: the sub-task's headline metric (accuracy; slot F1 for slot filling; ROUGE-L for
text). `delta` = score - reference score on every task (on a seen task it is the gain);
`forgetting` = delta on unseen tasks only. `headline` marks the one score per cell that a
per-model summary averages (`grid status`): its first accuracy, else slot F1, else ROUGE-L.

Skill under the argmax. When an untuned model answers one label for (almost) every row, its
accuracy only says which label that is: a tuned model that moves its default from one label to
another moves accuracy by the two labels' shares, whatever it learned or forgot (the merge
study's fincausal, 95% one label). So each row also carries the sub-task's SKILL_METRICS where
the cell has them: macro-F1 and balanced accuracy (a constant answer gets 1/K of each class
whichever label it is) and the mean log-prob of the gold label (which moves under a fixed
argmax; constrained score decoding only), with `<metric>_delta` (minus the reference cell's, null
when either lacks it) and `<metric>_forgetting` (that delta on unseen tasks).

Kind of weights (`kind`): merge (the cell depends on a merge cell), fine-tune (fine-tuned in its
own chain: finetune is not none), made (not fine-tuned in its own chain, yet its weights saw
tasks: a `finetuned_from` model, or one declared with `seen_tasks`), reference (the model is its
own reference), model (any other).

Built with polars joins: one pass over the records, then the reference found by a join on
(reference model, task, sub-task, metric, shots, seed, decoding).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from grid.config import decoding_name

# Headline metrics of a sub-task, in the order a cell's one summary score is chosen.
HEADLINE_METRICS = ("accuracy", "slot_f1", "rougeL")
# Metrics of a sub-task whose difference from the reference shows skill a default answer hides.
SKILL_METRICS = ("macro_f1", "balanced_accuracy", "gold_logprob")

SCHEMA: dict[str, Any] = {
    "cell_id": pl.String, "weights": pl.String, "kind": pl.String, "model": pl.String, "finetune": pl.String,
    "trained_on": pl.String, "task": pl.String, "subtask": pl.String, "metric": pl.String, "shots": pl.Int64,
    "seed": pl.Int64, "decoding": pl.String, "seen_tasks": pl.List(pl.String), "seen": pl.Boolean,
    "score": pl.Float64, "headline": pl.Boolean, "reference": pl.String,
    **dict.fromkeys(SKILL_METRICS, pl.Float64),
}
REFERENCE_KEYS = ["reference", "task", "subtask", "metric", "shots", "seed", "decoding"]


def lineage_seen_tasks(cell: dict[str, Any]) -> list[str]:
    """The tasks a cell's weights were tuned on, as its lineage records them (before the
    reference's own tasks are taken out)."""
    return list((cell.get("lineage") or {}).get("seen_tasks") or [])


def headline_scores(metrics: dict[str, Any] | None) -> list[tuple[str, str, float, bool]]:
    """(sub-task, metric, score, is the cell's headline) for each sub-task with a headline metric,
    in the order of the metrics dict."""
    best: dict[str, tuple[int, int, str, float]] = {}  # sub-task -> (metric rank, position, metric, value)
    for position, (key, value) in enumerate((metrics or {}).items()):
        subtask, _, metric = key.partition("/")
        if metric not in HEADLINE_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rank = HEADLINE_METRICS.index(metric)
        if subtask not in best or rank < best[subtask][0]:
            best[subtask] = (rank, position, metric, float(value))
    if not best:
        return []
    headline = min(best, key=lambda s: best[s][:2])
    rows = sorted(best.items(), key=lambda item: item[1][1])
    return [(sub, metric, value, sub == headline) for sub, (_, _, metric, value) in rows]


def _weights_kind(cell: dict[str, Any], seen: list[str], depends_on_kind: str | None) -> str:
    if depends_on_kind == "merge":
        return "merge"
    if cell["finetune"] != "none":
        return "fine-tune"
    if seen:
        return "made"
    return "reference" if cell["model"] == (cell.get("lineage") or {}).get("reference") else "model"


def _reference_seen_tasks(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per model, the tasks its not-fine-tuned cells' lineage says its weights saw."""
    out: dict[str, set[str]] = {}
    for r in records:
        c = r["cell"]
        if c["kind"] == "infer" and c["finetune"] == "none":
            out.setdefault(c["model"], set()).update(lineage_seen_tasks(c))
    return out


def forgetting_frame(records: list[dict[str, Any]], reference: str | None = None) -> pl.DataFrame:
    """One row per finished inference cell and scored sub-task, in the records' order, with the
    columns of SCHEMA and reference_cell, reference_score, delta, forgetting, and per skill metric
    `<metric>_delta` and `<metric>_forgetting` (see the module's docstring for the rule).
    `reference` names one reference model for every cell instead of the one each cell's lineage
    declares."""
    kind_of = {r["cell_id"]: r["cell"]["kind"] for r in records}
    model_seen = _reference_seen_tasks(records)
    rows = []
    for r in records:
        c = r["cell"]
        if c["kind"] != "infer" or r["status"] != "done":
            continue
        lineage = c.get("lineage") or {}
        ref_name = reference or lineage.get("reference")
        seen = [t for t in lineage_seen_tasks(c) if t not in model_seen.get(ref_name, set())]
        trained_on = lineage.get("trained_on")
        cell = {"cell_id": r["cell_id"],
                "weights": f"{c['model']} {c['finetune']}:{trained_on}" if trained_on else c["model"],
                "kind": _weights_kind(c, seen, kind_of.get(c.get("depends_on") or "")),
                "model": c["model"], "finetune": c["finetune"], "trained_on": trained_on, "task": c["task"],
                "shots": c["shots"], "seed": c["seed"], "decoding": decoding_name(c.get("decoding")),
                "seen_tasks": seen, "seen": c["task"] in seen, "reference": ref_name}
        metrics = r.get("metrics") or {}
        for subtask, metric, score, headline in headline_scores(metrics):
            skill = {m: _number(metrics.get(f"{subtask}/{m}")) for m in SKILL_METRICS}
            rows.append(cell | {"subtask": subtask, "metric": metric, "score": score, "headline": headline} | skill)
    frame = pl.DataFrame(rows, schema=SCHEMA)
    references = (frame.filter(pl.col("finetune") == "none")
                  .select(pl.col("model").alias("reference"), *REFERENCE_KEYS[1:],
                          pl.col("cell_id").alias("reference_cell"), pl.col("score").alias("reference_score"),
                          *[pl.col(m).alias(f"reference_{m}") for m in SKILL_METRICS])
                  .sort("reference_cell")
                  .unique(REFERENCE_KEYS, keep="first", maintain_order=True))
    deltas = [(pl.col(m) - pl.col(f"reference_{m}")).alias(f"{m}_delta") for m in SKILL_METRICS]
    return (frame.join(references, on=REFERENCE_KEYS, how="left", maintain_order="left")
            .with_columns((pl.col("score") - pl.col("reference_score")).alias("delta"), *deltas)
            .with_columns(pl.when(~pl.col("seen")).then(pl.col("delta")).alias("forgetting"),
                          *[pl.when(~pl.col("seen")).then(pl.col(f"{m}_delta")).alias(f"{m}_forgetting")
                            for m in SKILL_METRICS])
            .drop([f"reference_{m}" for m in SKILL_METRICS]))


def _number(value: Any) -> float | None:
    """A metric's value, None when the cell has none (or it is not a number)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
