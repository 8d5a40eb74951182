"""Claim: planning a 10,000-cell grid and scanning a results dir to resume it take < 2 s.

Builds a real grid config (the tiny model, the eight catalog tasks, 0/5 shots, none/full/lora,
as many seeds as it takes to pass 10,000 cells), plans it, writes a finished cell.json for every
cell into a fresh results dir, then times what a resumed run does before any work: plan + scan
the store + find the cells left to do. Prints each figure and its ratio to the 2 s target.

    python benchmarks/plan_and_resume.py [--cells 10000]
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

from grid.config import GridConfig  # noqa: E402
from grid.execute import cell_record  # noqa: E402
from grid.plan import build_plan  # noqa: E402
from grid.store import Store  # noqa: E402
from grid.tasks import catalog  # noqa: E402

TARGET_S = 2.0


def config_with(seeds: int) -> GridConfig:
    return GridConfig.model_validate({
        "name": "bench",
        "models": [{"name": "tiny", "source": "tiny:llama", "family": "decoder"}],
        "tasks": sorted(catalog()),
        "shots": [0, 5],
        "finetune": ["none", "full", "lora"],
        "seeds": list(range(seeds)),
        "decoding": [{"mode": "free"}, {"mode": "constrained"}],
    })


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--cells", type=int, default=10_000)
    n_cells = args.parse_args().cells
    per_seed = len(build_plan(config_with(1)).cells)  # warms the data fingerprints' cache too
    config = config_with(-(-n_cells // per_seed))

    start = time.perf_counter()
    plan = build_plan(config)
    plan_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        for cell in plan.cells:
            store.write_cell(cell.id, cell_record(cell, "done", metrics={"x/accuracy": 0.5}, seconds=1.0))
        start = time.perf_counter()
        plan2 = build_plan(config)
        statuses = store.statuses()
        todo = [c for c in plan2.cells if statuses.get(c.id) != "done"]
        resume_s = time.perf_counter() - start
    assert not todo, "every cell was written as done"

    print(f"cells planned: {len(plan.cells)}")
    print(f"plan:                 {plan_s:.3f} s  ({plan_s / TARGET_S:.2f}x the {TARGET_S:.0f} s target)")
    print(f"plan + resume scan:   {resume_s:.3f} s  ({resume_s / TARGET_S:.2f}x the {TARGET_S:.0f} s target)")
    print(f"per cell:             {1e6 * resume_s / len(plan.cells):.0f} us")


if __name__ == "__main__":
    main()
