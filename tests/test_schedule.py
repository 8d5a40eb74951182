"""The scheduler on plain functions (grid/schedule.py): ordering, overlap, failure propagation and
another driver's model, without Ray, each case in milliseconds. The real runners are wired in
grid/execute.py and run end to end in tests/test_grid_engine.py and tests/test_claims.py."""

from __future__ import annotations

import threading

import pytest

from grid.plan import Cell, Plan
from grid.schedule import Unit, plan_units, schedule


def cell(kind: str, model: str, depends_on: str | None = None, task: str = "t", inputs: tuple[str, ...] = ()) -> Cell:
    recipe = {"inputs": {f"m{i}": {"cell": c} for i, c in enumerate(inputs)}} if kind == "merge" else None
    return Cell(kind=kind, model=model, source=model, weights="w", family="decoder", backend="transformers",
                prompt_format="chat", task=task, data_fp="d", template_fp=None, shots=0,
                finetune="none" if kind != "finetune" else "lora", seed=0, decoding=None, text_budget=None,
                sampler="random", limits={}, recipe=recipe, depends_on=depends_on)


class Recorder:
    """A fake runner: records what ran and what failed; producers named in `broken` fail."""

    def __init__(self, broken: tuple[str, ...] = ()):
        self.ran: list[str] = []
        self.failed: dict[str, str] = {}
        self.broken = set(broken)
        self.lock = threading.Lock()

    def run(self, unit: Unit) -> bool:
        with self.lock:
            self.ran.extend(c.model for c in unit.cells())
        if unit.producer is not None and unit.producer.model in self.broken:
            self.fail(unit.group, "producer failed")
            return False
        return True

    def fail(self, cells: list[Cell], error: str) -> None:
        with self.lock:
            self.failed.update({c.model: error for c in cells})


def test_units_put_base_models_first_then_each_producer_before_its_readers():
    ft = cell("finetune", "ft")
    ft_infer = cell("infer", "ft-infer", depends_on=ft.id)
    merge = cell("merge", "merged", inputs=(ft.id,))
    merge_infer = cell("infer", "merged-infer", depends_on=merge.id)
    base = cell("infer", "base")
    plan = Plan([ft, ft_infer, merge, merge_infer, base])
    units = plan_units(plan, plan.cells)
    assert [[c.model for c in u.cells()] for u in units] == [["base"], ["ft", "ft-infer"], ["merged", "merged-infer"]]
    assert units[2].inputs == [ft.id]
    # a producer done earlier: its readers form a unit that waits on it, with no producer
    later = plan_units(plan, [ft_infer, merge, merge_infer])
    assert [(u.producer.model if u.producer else None, u.inputs) for u in later] == \
        [(None, [ft.id]), ("merged", [ft.id])]


def test_one_at_a_time_in_the_given_order():
    ft = cell("finetune", "ft")
    plan = Plan([ft, cell("infer", "ft-infer", depends_on=ft.id), cell("infer", "base")])
    runner = Recorder()
    done: set[str] = set()
    schedule(plan_units(plan, plan.cells), run=runner.run, fail=runner.fail, done=done)
    assert runner.ran == ["base", "ft", "ft-infer"]
    assert done == {ft.id} and not runner.failed


def test_a_failed_producer_fails_every_reader_down_the_chain_and_the_rest_runs():
    ft = cell("finetune", "ft")
    child = cell("finetune", "child", depends_on=ft.id)
    merge = cell("merge", "merged", inputs=(child.id,))
    other = cell("finetune", "other")
    plan = Plan([ft, cell("infer", "ft-infer", depends_on=ft.id),
                 child, cell("infer", "child-infer", depends_on=child.id),
                 merge, cell("infer", "merged-infer", depends_on=merge.id),
                 other, cell("infer", "other-infer", depends_on=other.id)])
    runner = Recorder(broken=("ft",))
    schedule(plan_units(plan, plan.cells), run=runner.run, fail=runner.fail, done=set())
    assert runner.ran == ["ft", "ft-infer", "other", "other-infer"]
    assert runner.failed == {"ft-infer": "producer failed", "child": f"input cell {ft.id} is not done",
                             "child-infer": f"input cell {ft.id} is not done",
                             "merged": f"input cell {child.id} is not done",
                             "merged-infer": f"input cell {child.id} is not done"}


def test_parallel_units_overlap():
    """Two independent units are running at the same moment: each waits for the other to start."""
    both = threading.Barrier(2, timeout=5)
    ran = []

    def run(unit: Unit) -> bool:
        both.wait()  # raises BrokenBarrierError (and the test fails) if the units ran one after another
        ran.append(unit.group[0].model)
        return True

    units = [Unit(None, [], [cell("infer", "a")]), Unit(None, [], [cell("infer", "b")])]
    schedule(units, run=run, fail=lambda cells, error: None, done=set(), parallel=2)
    assert sorted(ran) == ["a", "b"]


def test_a_unit_waits_for_its_producer_while_the_other_runs():
    """With room for two, a reader does not start before its producer is done."""
    ft = cell("finetune", "ft")
    plan = Plan([ft, cell("finetune", "child", depends_on=ft.id), cell("infer", "base")])
    order = []
    lock = threading.Lock()

    def run(unit: Unit) -> bool:
        with lock:
            order.append(unit.cells()[0].model)
        return True

    schedule(plan_units(plan, plan.cells), run=run, fail=lambda cells, error: None, done=set(), parallel=2)
    assert order.index("ft") < order.index("child") and sorted(order) == ["base", "child", "ft"]


def test_an_input_that_no_one_makes_fails_its_readers_instead_of_hanging():
    unit = Unit(None, ["gone"], [cell("infer", "reader")])
    runner = Recorder()
    schedule([unit], run=runner.run, fail=runner.fail, done=set())
    assert runner.failed == {"reader": "input cell gone is not done"} and not runner.ran


def test_an_engine_bug_in_a_unit_stops_the_run():
    def run(unit: Unit) -> bool:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        schedule([Unit(None, [], [cell("infer", "a")])], run=run, fail=lambda cells, error: None, done=set())


class OtherDriver:
    """Another driver holding `holds` (a producer it makes) until `polls` refreshes have passed;
    then it has finished it (`outcome` "done") or failed it."""

    def __init__(self, holds: str, polls: int, outcome: str = "done"):
        self.holds, self.polls, self.outcome = holds, polls, outcome
        self.refreshes = 0

    def claim(self, unit: Unit, done: set[str]) -> Unit | None:
        if unit.producer is not None and unit.producer.id == self.holds:
            if self.refreshes < self.polls:
                return None
            if self.outcome == "failed":  # its claim is released: this driver takes the work over
                return unit
            done.add(unit.producer.id)
            return Unit(None, [unit.producer.id], unit.group) if unit.group else None
        return unit

    def making(self, cell_id: str) -> bool:
        return cell_id == self.holds and self.refreshes < self.polls

    def refresh(self, done: set[str], failed: set[str], made_here: set[str]) -> None:
        self.refreshes += 1
        if self.refreshes >= self.polls:
            if self.outcome == "done":
                done.add(self.holds)
            elif self.holds not in made_here:
                failed.add(self.holds)


def test_a_model_another_driver_makes_is_waited_for_then_read():
    ft = cell("finetune", "ft")
    child = cell("finetune", "child", depends_on=ft.id)
    plan = Plan([ft, child, cell("infer", "child-infer", depends_on=child.id)])
    runner = Recorder()
    other = OtherDriver(holds=ft.id, polls=3)
    sleeps = []
    schedule(plan_units(plan, plan.cells), run=runner.run, fail=runner.fail, done=set(), others=other,
             poll_s=0.5, sleep=sleeps.append)
    assert runner.ran == ["child", "child-infer"] and not runner.failed  # "ft" is the other driver's
    assert other.refreshes == 3 and sleeps == [0.5, 0.5, 0.5]


def test_a_model_another_driver_failed_is_made_here():
    ft = cell("finetune", "ft")
    plan = Plan([ft, cell("finetune", "child", depends_on=ft.id)])
    runner = Recorder()
    schedule(plan_units(plan, plan.cells), run=runner.run, fail=runner.fail, done=set(),
             others=OtherDriver(holds=ft.id, polls=2, outcome="failed"), poll_s=0, sleep=lambda s: None)
    assert runner.ran == ["ft", "child"] and not runner.failed


def test_an_input_another_driver_failed_and_no_unit_here_makes_fails_its_readers():
    runner = Recorder()
    schedule([Unit(None, ["x"], [cell("infer", "reader")])], run=runner.run, fail=runner.fail, done=set(),
             others=OtherDriver(holds="x", polls=2, outcome="failed"), poll_s=0, sleep=lambda s: None)
    assert runner.failed == {"reader": "input cell x is not done"} and not runner.ran
