"""Polars views of a results dir: cells, their metrics, and every prediction.

    import polars as pl
    from grid.query import cells, forgetting, metrics, predictions
    metrics("results/").filter(pl.col("metric") == "intent/accuracy").collect()
    forgetting("results/").filter(~pl.col("seen")).collect()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from grid.config import decoding_name
from grid.forgetting import forgetting_frame
from grid.store import Store

CELL_COLUMNS = ["cell_id", "status", "kind", "model", "family", "backend", "task", "shots", "finetune",
                "seed", "decoding", "prompt_format", "depends_on", "seconds", "n_examples", "error"]
USAGE = {"n_prompt_tokens": pl.Int64, "n_output_tokens": pl.Int64, "cost_usd": pl.Float64,
         "spent_usd": pl.Float64, "n_cached": pl.Int64}  # see grid.execute.cell_usage


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    cell = record["cell"]
    return {
        "cell_id": record["cell_id"], "status": record["status"], "kind": cell["kind"],
        "model": cell["model"], "family": cell["family"], "backend": cell["backend"],
        "task": cell["task"], "shots": cell["shots"], "finetune": cell["finetune"], "seed": cell["seed"],
        "decoding": decoding_name(cell["decoding"]) if cell.get("decoding") else None,
        "prompt_format": cell["prompt_format"],
        "depends_on": cell.get("depends_on"), "seconds": record.get("seconds"),
        "n_examples": record.get("n_examples"), "error": record.get("error"),
    }


def _usage(record: dict[str, Any]) -> dict[str, Any]:
    usage = record.get("usage") or {}
    return {key: usage.get(key) for key in USAGE}


def _records(results: str | Path | Store) -> list[dict[str, Any]]:
    store = results if isinstance(results, Store) else Store.open(results, create=False)
    return store.records()


def cells(results: str | Path | Store) -> pl.LazyFrame:
    """One row per cell in the store: its axes, status, timings, error, tokens and cost."""
    rows = [_flat(r) | _usage(r) for r in _records(results)]
    schema = dict.fromkeys(CELL_COLUMNS, pl.Utf8) | {"shots": pl.Int64, "seed": pl.Int64,
                                                    "seconds": pl.Float64, "n_examples": pl.Int64} | USAGE
    return pl.DataFrame(rows, schema=schema).lazy()


def metrics(results: str | Path | Store) -> pl.LazyFrame:
    """Long form: one row per (cell, metric), with the cell's axes, for finished cells."""
    rows = []
    for r in _records(results):
        flat = _flat(r)
        for name, value in (r.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                rows.append({**flat, "metric": name, "value": float(value)})
    schema = dict.fromkeys(CELL_COLUMNS, pl.Utf8) | {"shots": pl.Int64, "seed": pl.Int64,
                                                    "seconds": pl.Float64, "n_examples": pl.Int64,
                                                    "metric": pl.Utf8, "value": pl.Float64}
    return pl.DataFrame(rows, schema=schema).lazy()


def forgetting(results: str | Path | Store) -> pl.LazyFrame:
    """Per finished inference cell and sub-task: its score, whether its weights saw the task, the
    reference model's score and the difference (grid.forgetting has the rule)."""
    return forgetting_frame(_records(results)).lazy()


def predictions(results: str | Path | Store) -> pl.LazyFrame:
    """Every prediction of every finished inference cell (join with `cells` on cell_id).

    Files written before column `label_logprobs` existed read it as null, so a results dir that
    holds cells of both ages scans as one frame."""
    store = results if isinstance(results, Store) else Store.open(results, create=False)
    paths = [store.predictions_path(r["cell_id"]) for r in store.records()
             if r["status"] == "done" and r["cell"]["kind"] == "infer"]
    if not paths:
        return pl.LazyFrame(schema={"cell_id": pl.Utf8, "example_id": pl.Utf8, "raw_output": pl.Utf8,
                                    "prediction": pl.Utf8, "gold": pl.Utf8, "valid": pl.Boolean,
                                    "label_logprobs": pl.Utf8})
    prefix = "" if store.is_local else store.uri.split("://")[0] + "://"
    uris = [prefix + p for p in paths]
    schema = dict(pl.scan_parquet(uris[0]).collect_schema())
    schema.setdefault("label_logprobs", pl.Utf8)
    return pl.scan_parquet(uris, schema=schema, missing_columns="insert")
