"""Every committed grid's cell ids, pinned: a refactor of the planner, the configs or the cell
identity must leave them as they are (results dirs resume by id, and the committed studies'
results are found by id). A grid edited on purpose gets new ids: pin them again with

    python tests/test_grid_ids.py --write

and say in the commit message which ids moved and why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINNED = ROOT / "tests" / "data" / "grid_cell_ids.json"
GRIDS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "grids").glob("*.yaml"))


def cell_ids(grid: str) -> dict[str, str]:
    """id -> a line a reader can check (kind, model, task, shots, fine-tune, seed, decoding)."""
    from grid.config import load_config
    from grid.plan import build_plan

    return {c.id: c.label() for c in sorted(build_plan(load_config(ROOT / grid)).cells, key=lambda c: c.id)}


def test_every_grid_is_pinned():
    pinned = json.loads(PINNED.read_text())
    assert sorted(pinned) == GRIDS, "a grid was added or removed: pin again (module docstring)"


@pytest.mark.parametrize("grid", GRIDS)
def test_the_cell_ids_are_the_pinned_ones(grid):
    pinned = json.loads(PINNED.read_text()).get(grid, {})
    now = cell_ids(grid)
    gone = {i: pinned[i] for i in sorted(set(pinned) - set(now))}
    new = {i: now[i] for i in sorted(set(now) - set(pinned))}
    assert not gone and not new, f"{grid}: {len(gone)} pinned cell ids gone {list(gone.items())[:3]}, " \
                                 f"{len(new)} new {list(new.items())[:3]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text(json.dumps({g: cell_ids(g) for g in GRIDS}, indent=1, sort_keys=True) + "\n")
    print(f"pinned {sum(len(v) for v in json.loads(PINNED.read_text()).values())} cell ids of {len(GRIDS)} grids")
