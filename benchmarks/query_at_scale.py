"""Claim: a results dir of 1,000 cells x 1,000 predictions answers each query in < 2 s.

Writes a results dir the way a run does: a grid of 1,000 zero-shot inference cells (the tiny
model, MASSIVE intents and gold headlines, 1,000 test examples each, 500 seeds), each finished
by `grid.execute.finish_cell` (the function a run calls when a cell's last answer is back: parse,
score with bootstrap CIs, write predictions.parquet then cell.json) on synthetic answers: a
seeded draw of the task's labels, one answer in ten off the label set (invalid). Then it times
three queries, `--repeats` times each:

- `python -m grid status DIR`: the CLI as a user runs it (a fresh interpreter; its start-up and
  the status path's imports, pyarrow, polars and pydantic among them, measured apart in a
  process that only imports them, are part of the figure);
- a metrics pivot through `grid.query.metrics`: intent/sentiment accuracy per task and seed;
- a filtered predictions join through `grid.query`: the invalid answers of one task, joined with
  their cells' axes (`predictions` joined with `cells` on cell_id).

    python benchmarks/query_at_scale.py [--cells 1000] [--examples 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import polars as pl

from benchmarks.common import ROOT, Timings, claim, write_figures
from grid.config import GridConfig
from grid.execute import PreparedCell, finish_cell, prepare_cell
from grid.plan import build_plan
from grid.query import cells, metrics, predictions
from grid.store import Store

GOAL_S = 2.0
TASKS = ["massive-intent", "gold-headline"]  # label tasks with at least 1,000 test examples


def grid(n_cells: int, n_examples: int) -> GridConfig:
    return GridConfig.model_validate({
        "name": "query-at-scale",
        "models": [{"name": "tiny", "source": "tiny:llama", "family": "decoder", "prompt_format": "plain"}],
        "tasks": TASKS,
        "seeds": list(range(n_cells // len(TASKS))),
        "decoding": {"mode": "constrained"},
        "limits": {"test": n_examples},
    })


def answers(prepared: PreparedCell, rng: random.Random) -> list[dict[str, Any]]:
    """What the inference workers hand back for each example (workers/predict.py's keys)."""
    (labels,) = prepared.labels.values()
    return [{"raw_output": rng.choice(labels) if rng.random() > 0.1 else "I cannot tell",
             "n_prompt_tokens": rng.randint(80, 400), "n_output_tokens": 3, "latency_s": rng.uniform(0.01, 0.05),
             "cost_usd": None, "cached": False} for _ in prepared.items]


def fill(results: str, config: GridConfig) -> int:
    """Every cell of the grid finished into `results` as a run finishes it; returns the cells."""
    plan = build_plan(config)
    store = Store.open(results)
    # A zero-shot prompt does not depend on the seed: each task's requests are built once.
    prepared: dict[str, PreparedCell] = {}
    rng = random.Random(0)
    start = time.perf_counter()
    for i, cell in enumerate(plan.cells, 1):
        if cell.task not in prepared:
            prepared[cell.task] = prepare_cell(cell, None, None)
        this = dataclasses.replace(prepared[cell.task], cell=cell)
        finish_cell(store, this, answers(this, rng), started_at=time.time())
        if i % 100 == 0 or i == len(plan.cells):
            print(f"  finished {i}/{len(plan.cells)} cells ({time.perf_counter() - start:.0f} s)", flush=True)
    return len(plan.cells)


def cli_status(results: str) -> None:
    subprocess.run([sys.executable, "-m", "grid", "status", results], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def cli_startup() -> None:
    """A process that starts and imports what `grid status` imports, and does nothing else."""
    subprocess.run([sys.executable, "-c", "import grid.__main__, grid.store, grid.terminal, grid.tasks"], check=True,
                   cwd=ROOT)


def metrics_pivot(results: str) -> pl.DataFrame:
    """Accuracy per seed (rows) and task (columns)."""
    return (metrics(results).filter(pl.col("metric").str.ends_with("/accuracy")).collect()
            .pivot(on="task", index="seed", values="value", aggregate_function="first").sort("seed"))


def invalid_answers(results: str, task: str) -> pl.DataFrame:
    """The invalid answers of one task, each with its cell's axes."""
    return (predictions(results).filter(~pl.col("valid"))
            .join(cells(results).filter(pl.col("task") == task), on="cell_id")
            .select("cell_id", "task", "seed", "example_id", "raw_output", "invalid_reason").collect())


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as results:
        start = time.perf_counter()
        n_cells = fill(results, grid(args.cells, args.examples))
        n_predictions = pl.scan_parquet(f"{results}/cells/*/predictions.parquet").select(pl.len()).collect().item()
        print(f"results dir: {n_cells} cells, {n_predictions:,} predictions, written in "
              f"{time.perf_counter() - start:.0f} s (not timed)")

        startup = Timings("start-up: interpreter and the status path's imports")
        status, pivot, join = Timings("grid status"), Timings("metrics pivot"), Timings("predictions join")
        for i in range(args.repeats):
            startup.time(cli_startup, 1)
            status.time(lambda: cli_status(results), n_cells)
            table = pivot.time(lambda: metrics_pivot(results), lambda df: df.height)
            rows = join.time(lambda: invalid_answers(results, TASKS[0]), lambda df: df.height)
            print(f"run {i + 1}: status {status.seconds[-1]:.2f} s (start-up {startup.seconds[-1]:.2f} s), "
                  f"pivot {pivot.seconds[-1]:.2f} s ({table.shape[0]}x{table.shape[1]}), "
                  f"join {join.seconds[-1]:.2f} s ({rows.height:,} rows)", flush=True)

    claims = []
    for t, what in ((status, "`python -m grid status`, a fresh process"),
                    (pivot, "metrics pivot (grid.query.metrics)"),
                    (join, "filtered predictions join (grid.query.predictions + cells)")):
        median = statistics.median(t.seconds)
        spread = f"runs {min(t.seconds):.2f}-{max(t.seconds):.2f} s; {median / GOAL_S:.2f}x the goal"
        if t is status:
            spread += f"; start-up and imports {statistics.median(startup.seconds):.2f} s of it"
        claims.append(claim(f"{what}, {n_cells:,} cells x {args.examples:,} predictions", median, "s",
                            f"< {GOAL_S:.0f} s", median < GOAL_S, spread))
    write_figures("query_at_scale", {
        "cells": n_cells, "predictions": n_predictions,
        "status": status.summary(), "status_startup": startup.summary(),
        "metrics_pivot": pivot.summary(), "predictions_join": join.summary(),
        "claims": claims,
    }, started)


if __name__ == "__main__":
    main()
