"""Run a grid: `python grid/run.py GRID.yaml --results DIR [--data DIR] [--tasks DIR] [--dry-run]`.

`--tasks DIR` adds the task YAML files in DIR (outside the repo) to the catalog; the grid's
`tasks:` may name them. `--data DIR` is where their (and every task's) files are read from.

Without RAY_ADDRESS it starts a local Ray (the embedded default); with one (as `ray job submit`
sets it), it runs on that cluster. A rerun does only the cells not yet done.

A run that runs cells leaves a record in the results dir, DIR/runs/<started>-<pid>.json: the commit,
command, grid file, machine and versions it ran with, its wall time and the cells it ran
(grid/provenance.py); a report reads them back.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grid.errors import GridError

if TYPE_CHECKING:
    from grid.execute import RunSummary
    from grid.store import Store


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grid/run.py", description=__doc__.splitlines()[0])
    p.add_argument("config", help="grid YAML, e.g. grids/smoke.yaml")
    p.add_argument("--results", required=True, help="results dir (local path or pyarrow URI)")
    p.add_argument("--data", default=None, help="local data folder (default: ../shared/data, else the hub)")
    p.add_argument("--tasks", default=None, help="a folder of more task YAML files (default: tasks/ only)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    try:
        return _run(args, argv)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _scanning(results: str):
    """The results dir a grid has run in before, its scan of cell states started; None if none."""
    from grid.store import Store

    try:
        store = Store.open(results, create=False)
    except GridError:  # a first run: nothing to scan, and the dir is made once the plan holds
        return None
    store.prefetch_states()
    return store


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from grid.config import load_config

    if args.num_cpus is not None and args.num_cpus < 1:  # Ray would wait forever for a CPU (0) or fail (< 0)
        raise GridError(f"--num-cpus {args.num_cpus}: the local Ray needs at least 1 CPU")
    from grid.data import data_dir_arg
    from grid.plan import build_plan, validate_references
    from grid.store import Store
    from grid.tasks import use_tasks_dir
    from grid.terminal import plan_table, print_table, search_table, status_table

    use_tasks_dir(args.tasks)  # before the config: its task names are checked against the catalog
    config = load_config(args.config)
    if config.merges:  # mergekit's own parse of each merge, before any work
        from merge.config import check_merges

        check_merges(config)
    validate_references(config, args.config, hub_cache=not args.dry_run)
    data_dir = data_dir_arg(args.data)
    # A rerun on a results dir starts its resume scan now, to read beside the planning.
    store = None if args.dry_run else _scanning(args.results)
    plan = build_plan(config, data_dir)
    from grid.comparisons import check_plan

    check_plan(config, plan, args.config)  # declared comparisons pair cells of this plan, or fail now
    from grid.prompting import check_shots

    check_shots(plan, data_dir, args.config)  # every k-shot prompt can be filled, or fail now
    from grid.resources import search_budgets
    from grid.search import check_budget

    check_budget(search_budgets(plan, config, data_dir), config.search_budget, args.config)  # before any work
    if args.dry_run:  # reads the results dir, if there is one, and writes nothing
        try:
            statuses = Store.open(args.results, create=False).statuses()
        except GridError as exc:
            print(f"note: {exc}; planned as if no cell had run", file=sys.stderr)
            statuses = {}
        print_table(*plan_table(plan, statuses))
        from grid.resources import print_resources  # placement groups and a GPU-hours estimate

        print_resources(plan, config, data_dir)
        return 0
    from grid.execute import execute  # Ray Data, the workers' code: only once there is work

    if store is None:
        store = Store.open(args.results)
    else:  # a results dir run in before: can it still be written to?
        store.check_writable()
    run, name, clock = _start_record(store, argv, args.config)
    try:
        summary = execute(plan, config, store, data_dir, args.num_cpus)
    except GridError:  # execute refuses before its first cell (a search on an object store): no run
        store.delete_run(name)
        raise
    except BaseException as exc:  # a crash or Ctrl-C: the record says how the run ended
        from grid.execute import one_line
        from grid.provenance import finish

        store.write_run(name, finish(run, clock, error=one_line(exc)))
        raise
    cell_ids = {c.id for c in plan.cells}  # this grid's cells and their metrics, as `grid status` shows them
    records = [r for r in store.records() if r["cell_id"] in cell_ids]
    _finish_record(store, run, name, clock, summary, records)
    print_table(*status_table(records))
    trials, searches = search_table(records)
    if searches:
        print_table(trials, searches)
    print(f"ran {len(summary.ran)} cells ({summary.already_done} already done), {len(summary.failed)} failed")
    if summary.rescored:
        print(f"{len(summary.rescored)} finished cells scored again: their task's metrics changed")
    if summary.elsewhere:
        owners = sorted({f"{o.get('host')}:{o.get('pid')}" for o in summary.elsewhere.values()})
        print(f"{len(summary.elsewhere)} cells were claimed by another driver on this results dir "
              f"({', '.join(owners)})")
    return 1 if summary.failed else 0


def _start_record(store: Store, argv: list[str], config: str) -> tuple[dict[str, Any], str, float]:
    """The run's provenance record, written before any cell runs (a killed run keeps it, with no end)."""
    from grid.provenance import capture, run_name

    record = capture(["python", "grid/run.py", *argv], Path(config))
    name = run_name(record)
    store.write_run(name, record)
    return record, name, time.perf_counter()


def _finish_record(store: Store, record: dict[str, Any], name: str, clock: float, summary: RunSummary,
                   records: list[dict[str, Any]]) -> None:
    """The record completed with the run's wall time and its cells: those it ran (`failed` among
    them), those done before it, those of them scored again, and those another driver ran meanwhile.
    A run that changed nothing (every cell done already) drops its record: a rerun leaves no trace."""
    from grid.provenance import finish

    if not (summary.ran or summary.rescored or summary.elsewhere):
        store.delete_run(name)
        return
    touched = set(summary.ran) | set(summary.elsewhere)
    already = sorted(r["cell_id"] for r in records if r["status"] == "done" and r["cell_id"] not in touched)
    store.write_run(name, finish(record, clock, ran=sorted(summary.ran), failed=sorted(summary.failed),
                                 already_done=already, rescored=sorted(summary.rescored),
                                 elsewhere=sorted(summary.elsewhere)))


if __name__ == "__main__":
    sys.exit(main())
