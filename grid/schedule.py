"""The order a driver runs its work in, apart from what running it means.

A *unit* is what one driver thread runs: a fine-tune or merge cell (its *producer*), then the
inference cells that read its model; or a base model's inference cells alone. `schedule` starts
each unit once the cells it reads are done, up to `parallel` at once, and fails a unit whose
input failed instead of running it. What a unit's run does (Ray Train, Ray Data, mergekit), how a
failure is written, and how other drivers on the same results dir are kept apart come in as
arguments (grid/execute.py wires the real ones), so the ordering, the overlap, the failure
propagation and the waiting on another driver's model are tested with plain functions, without
Ray (tests/test_schedule.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from grid.plan import Cell, Plan


@dataclass
class Unit:
    """A producer cell (None when there is none, or it is done already), the cells whose models
    it reads (or, without a producer, that its group reads), and the inference cells of its model."""

    producer: Cell | None
    inputs: list[str]
    group: list[Cell]

    def cells(self) -> list[Cell]:
        return [self.producer, *self.group] if self.producer else list(self.group)


def plan_units(plan: Plan, todo: list[Cell]) -> list[Unit]:
    """The units of the cells to do: base models' groups first (no training, results soonest),
    then every fine-tune or merge cell in plan order (each input before what reads it)."""
    todo_ids = {c.id for c in todo}
    groups: dict[str, list[Cell]] = defaultdict(list)
    for c in todo:
        if c.kind == "infer":
            groups[c.depends_on or f"model:{c.model}"].append(c)
    units = [Unit(None, [], cells) for key, cells in groups.items() if key.startswith("model:")]
    for cell in plan.cells:
        if cell.kind not in ("finetune", "merge"):
            continue
        if cell.id in todo_ids:
            units.append(Unit(cell, [i for i in cell.inputs() if i], groups.get(cell.id, [])))
        elif cell.id in groups:  # trained earlier; its inference cells are still to do
            units.append(Unit(None, [cell.id], groups[cell.id]))
    return units


class Others(Protocol):
    """Other drivers on the same results dir, as the scheduler sees them (grid/claims.py)."""

    def claim(self, unit: Unit, done: set[str]) -> Unit | None:
        """The part of `unit` this driver runs, its cells claimed; None when another driver holds
        its producer or every cell of it. A producer found done since is added to `done`."""

    def making(self, cell_id: str) -> bool:
        """Whether another driver is making this cell now."""

    def refresh(self, done: set[str], failed: set[str], made_here: set[str]) -> None:
        """Add what other drivers finished to `done`, and to `failed` an input no one makes any more."""


class Alone:
    """No other driver: every cell is this driver's."""

    def claim(self, unit: Unit, done: set[str]) -> Unit | None:
        return unit

    def making(self, cell_id: str) -> bool:
        return False

    def refresh(self, done: set[str], failed: set[str], made_here: set[str]) -> None:
        return None


def schedule(
    units: list[Unit], *, run: Callable[[Unit], bool], fail: Callable[[list[Cell], str], None],
    done: set[str], parallel: int = 1, others: Others | None = None, poll_s: float = 3.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run `units`, each in a thread once every cell it reads is in `done`.

    `run(unit)` returns False when the unit's producer failed (it has written the failure of its
    own cells); a unit reading a failed cell is not run, and `fail(cells, error)` records why.
    With `parallel: 1` units run one after another, in the order given. An input that no unit
    here and no other driver makes fails its readers instead of leaving the run waiting; an input
    another driver makes is waited for, every `poll_s` seconds. An exception from `run` is a bug
    of the engine itself, and stops the run.
    """
    others = others or Alone()
    pending = list(units)
    failed: set[str] = set()
    running: dict[Future, Unit] = {}
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="unit") as pool:
        while pending or running:
            waiting = False
            for unit in list(pending):
                if len(running) >= parallel:
                    break
                broken = [i for i in unit.inputs if i in failed]
                missing = [i for i in unit.inputs if i not in done]
                if broken:
                    pending.remove(unit)
                    fail(unit.cells(), f"input cell {broken[0]} is not done")
                    if unit.producer:
                        failed.add(unit.producer.id)
                    continue
                if missing:
                    waiting = waiting or any(others.making(i) for i in missing)
                    continue  # an input is still being made
                mine = others.claim(unit, done)
                if mine is None and unit.producer is not None and unit.producer.id not in done:
                    waiting = True  # another driver is making its model
                    continue
                pending.remove(unit)
                if mine is not None:
                    running[pool.submit(run, mine)] = mine
            if waiting and len(running) < parallel:
                made_here = {u.producer.id for u in [*pending, *running.values()] if u.producer is not None}
                others.refresh(done, failed, made_here)
            if not running:
                if pending and not waiting:  # an input that no unit makes: fail instead of waiting forever
                    failed.add(next(i for i in pending[0].inputs if i not in done))
                elif pending:
                    sleep(poll_s)
                continue
            finished, _ = wait(running, timeout=poll_s if waiting else None, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                ok = future.result()
                if unit.producer is not None:
                    (done if ok else failed).add(unit.producer.id)
