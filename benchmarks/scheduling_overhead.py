"""Claim: the engine's overhead per inference cell on a local Ray, marginal and total.

Runs grids of one-example cells (the tiny model, one new token) through the real engine
(grid.execute.execute, as `grid/run.py` calls it) on one local Ray, at two sizes (10 and 1,000
cells by default), each size `--repeats` times, interleaved so that a change in the machine's load
hits both sizes alike. For each run:

- total overhead per cell = (wall of the run - the model's own time) / cells: everything the
  engine adds, the fixed costs (Ray Data pipeline start, actor start, model load) spread over
  the cells, plus the per-cell work;
- marginal overhead per cell = the difference in (wall - model time) between a large and a small
  run over the difference in cells: the fixed costs cancel, leaving what one more cell costs
  (prompt building, chunking, Ray Data scheduling, parsing, scoring with bootstrap CIs, and the
  atomic parquet + cell.json writes).

The model's own time is the sum of the predictions' `latency_s` (the worker's time in the model).
Median and spread (min-max) over the runs.

    python benchmarks/scheduling_overhead.py [--small 10] [--large 1000] [--repeats 3] [--profile]

`--profile` runs one large grid under cProfile in the driver and prints where its time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import polars as pl

from benchmarks.common import claim, write_figures
from grid.config import GridConfig
from grid.execute import connect_ray, execute
from grid.plan import build_plan
from grid.query import predictions
from grid.store import Store

TARGET_MS = 50.0  # marginal overhead per cell


def grid(n_cells: int) -> GridConfig:
    return GridConfig.model_validate({
        "name": "overhead",
        "models": [{"name": "tiny", "source": "tiny:llama", "family": "decoder", "prompt_format": "plain"}],
        "tasks": ["massive-intent", "fpb-sentiment"],
        "seeds": list(range(n_cells // 2)),
        "decoding": {"mode": "free", "max_new_tokens": 1},
        "limits": {"test": 1},
        "inference": {"batch_size": 1},
    })


def timed_run(n_cells: int) -> tuple[float, float]:
    """One fresh run of an `n_cells` grid: (wall seconds, seconds in the model)."""
    config = grid(n_cells)
    plan = build_plan(config)
    assert len(plan.cells) == n_cells, f"{len(plan.cells)} cells planned, not {n_cells}"
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        start = time.perf_counter()
        summary = execute(plan, config, store, None)
        wall = time.perf_counter() - start
        model_s = predictions(tmp).select(pl.col("latency_s").sum()).collect().item()
    assert not summary.failed and len(summary.ran) == n_cells, summary.failed
    return wall, model_s


def spread_ms(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "runs_ms": [round(v, 2) for v in ms]}


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile one large run (driver side)")
    args = parser.parse_args()
    connect_ray()
    warm_start = time.perf_counter()
    timed_run(2)  # warm: Ray workers, the tiny model's build, data caches
    warm_s = time.perf_counter() - warm_start
    print(f"warm-up run (2 cells, Ray workers and the tiny model's first build): {warm_s:.1f} s")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(timed_run, args.large)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        return

    runs: dict[int, list[tuple[float, float]]] = {args.small: [], args.large: []}
    for i in range(args.repeats):
        for n in (args.small, args.large):
            wall, model_s = timed_run(n)
            runs[n].append((wall, model_s))
            print(f"run {i + 1}, {n} cells: {wall:.2f} s wall, {model_s:.2f} s in the model, "
                  f"{1000 * (wall - model_s) / n:.1f} ms overhead per cell", flush=True)

    total = {n: [(wall - model_s) / n for wall, model_s in rs] for n, rs in runs.items()}
    marginal = [((wl - ws) - (ml - ms)) / (args.large - args.small)
                for (ws, ms), (wl, ml) in zip(runs[args.small], runs[args.large])]
    figures = {"cells": [args.small, args.large], "warm_up_s": round(warm_s, 2),
               "runs": {str(n): [{"wall_s": round(w, 3), "model_s": round(m, 3)} for w, m in rs]
                        for n, rs in runs.items()},
               "total_overhead_per_cell": {str(n): spread_ms(v) for n, v in total.items()},
               "marginal_overhead_per_cell": spread_ms(marginal)}
    for n, v in total.items():
        s = spread_ms(v)
        print(f"total overhead per cell, {n} cells: {s['median_ms']:.1f} ms (runs {s['min_ms']:.1f}-{s['max_ms']:.1f})")
    m = spread_ms(marginal)
    print(f"marginal overhead per cell: {m['median_ms']:.1f} ms (runs {m['min_ms']:.1f}-{m['max_ms']:.1f}), "
          f"{m['median_ms'] / TARGET_MS:.2f}x the {TARGET_MS:.0f} ms target")
    claims = [claim(f"marginal scheduling overhead per cell ({args.small} -> {args.large} cells)",
                    m["median_ms"], "ms", f"< {TARGET_MS:.0f} ms", m["median_ms"] < TARGET_MS,
                    f"runs {m['min_ms']:.1f}-{m['max_ms']:.1f} ms")]
    for n, v in total.items():
        s = spread_ms(v)
        claims.append(claim(f"total scheduling overhead per cell, {n} cells", s["median_ms"], "ms",
                            "printed (no goal)", None,
                            f"wall minus model time over cells; runs {s['min_ms']:.1f}-{s['max_ms']:.1f} ms"))
    figures["claims"] = claims
    write_figures("scheduling_overhead", figures, started)


if __name__ == "__main__":
    main()
