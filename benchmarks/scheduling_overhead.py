"""Claim: the engine's overhead per inference cell on a local Ray is < 50 ms.

Runs two grids of one-example cells (the tiny model, one new token) through the real engine on
one local Ray: a small one and one with 10x the cells. Both pay the same fixed costs (Ray Data
pipeline start, model load); the difference in wall time per extra cell, less the model's own
time per cell (measured latency), is the engine's overhead: prompt building, chunking, Ray Data
scheduling, parsing, scoring with bootstrap CIs, and the atomic parquet + cell.json writes.

    python benchmarks/scheduling_overhead.py [--small 4] [--large 200] [--repeats 3]

Each grid runs `--repeats` times and the fastest run counts, so a stray stall of the fixed costs
(Ray Data start-up, actor scheduling) does not pass for per-cell overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import polars as pl  # noqa: E402

from grid.config import GridConfig  # noqa: E402
from grid.execute import connect_ray, execute  # noqa: E402
from grid.plan import build_plan  # noqa: E402
from grid.query import predictions  # noqa: E402
from grid.store import Store  # noqa: E402

TARGET_MS = 50.0


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


def timed_run(n_cells: int) -> tuple[float, float, int]:
    config = grid(n_cells)
    plan = build_plan(config)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        start = time.perf_counter()
        summary = execute(plan, config, store, None)
        wall = time.perf_counter() - start
        model_s = predictions(tmp).select(pl.col("latency_s").sum()).collect().item()
    assert not summary.failed and len(summary.ran) == len(plan.cells)
    return wall, model_s, len(plan.cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=4)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    connect_ray()
    timed_run(2)  # warm: Ray workers, the tiny model's build, data caches
    small_wall, small_model, n_small = min(timed_run(args.small) for _ in range(args.repeats))
    large_wall, large_model, n_large = min(timed_run(args.large) for _ in range(args.repeats))
    per_cell = ((large_wall - small_wall) - (large_model - small_model)) / (n_large - n_small)
    print(f"{n_small} cells: {small_wall:.2f} s wall ({small_model:.2f} s in the model)")
    print(f"{n_large} cells: {large_wall:.2f} s wall ({large_model:.2f} s in the model)")
    print(f"engine overhead per cell: {1000 * per_cell:.1f} ms  ({1000 * per_cell / TARGET_MS:.2f}x the "
          f"{TARGET_MS:.0f} ms target)")


if __name__ == "__main__":
    main()
