"""`python -m grid COMMAND`: tasks, prompt, score, run, status, compare, publish (and report).

Every bad input ends in one line `error: ...` naming the file, row or field, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from grid.errors import GridError


def cmd_tasks(args: argparse.Namespace) -> int:
    import polars as pl

    from grid.data import label_sets, load_split, warn_unseen_test_labels
    from grid.tasks import TASKS_DIR, catalog, get_task
    from grid.terminal import print_table

    # Named tasks; else a --tasks DIR's own tasks (the catalog's read other data); else the catalog.
    names = args.names or [n for n, t in catalog().items()
                           if not args.tasks or n not in catalog((TASKS_DIR,))]
    rows = []
    for name in names:
        task = get_task(name)
        labels = label_sets(task, args.data)
        warn_unseen_test_labels(task, args.data)
        rows.append({
            "task": name, "kind": "multi (JSON)" if task.is_multi else task.subtasks[0].type,
            "subtasks": ", ".join(f"{s.name}:{s.type}" for s in task.subtasks),
            "labels": ", ".join(str(len(labels[s.name])) for s in task.subtasks),
            "train": len(load_split(task, "train", args.data)), "test": len(load_split(task, "test", args.data)),
            "validation": len(load_split(task, "validation", args.data)) if task.data.has_validation else None,
        })
    print_table(pl.DataFrame(rows), f"{len(rows)} tasks")
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    from grid.data import label_sets, load_split
    from grid.prompting import PromptBuilder
    from grid.tasks import get_task

    if args.text_budget is not None and args.text_budget < 1:
        raise GridError(f"--text-budget {args.text_budget}: a budget is at least 1 word (leave it out for no cut)")
    task = get_task(args.task)
    test = load_split(task, args.split, args.data)
    if not 0 <= args.index < len(test):
        raise GridError(f"--index {args.index} is outside the {args.split} split (0..{len(test) - 1})")
    builder = PromptBuilder(task, label_sets(task, args.data), load_split(task, "train", args.data).to_list(),
                            args.text_budget, args.sampler)
    prompt = builder.build(test[args.index], args.shots, args.seed)
    print(prompt.as_text(args.format) if args.format != "chat" else json.dumps(prompt.messages(), indent=1))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from grid.scoring import score_parquet

    print(json.dumps(score_parquet(args.predictions, args.task, args.data, args.split), indent=1))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from grid.store import Store
    from grid.terminal import print_table, search_table, status_table

    store = Store.open(args.results, create=False)
    records = store.records()
    print_table(*status_table(records))
    trials, line = search_table(records)
    if line:
        print()
        print_table(trials, line)
    if store.unreadable:  # left out of the table; a rerun runs these cells again
        print(f"\n{len(store.unreadable)} cell records could not be read (their cells count as not run):")
        for reason in store.unreadable.values():
            print(f"  {reason}")
    if damaged := store.damaged_predictions(records):
        print(f"\n{len(damaged)} finished cells have a damaged predictions file (reports leave them out; "
              "the next run does them again):")
        for reason in damaged.values():
            print(f"  {reason}")
    if edited := store.non_numeric_metrics(records):
        print(f"\n{len(edited)} finished cells have a metric that is not a number (reports leave them out; "
              "delete the cell.json to run the cell again):")
        for reason in edited.values():
            print(f"  {reason}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from grid import run

    argv = [args.config, "--results", args.results] + (["--data", args.data] if args.data else [])
    argv += ["--tasks", args.tasks] if args.tasks else []
    argv += ["--num-cpus", str(args.num_cpus)] if args.num_cpus is not None else []
    return run.main(argv + (["--dry-run"] if args.dry_run else []))


def cmd_report(args: argparse.Namespace) -> int:
    from grid.report import report_from_args

    for path in report_from_args(args):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grid", description="clfgrid: the classification grid")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tasks", help="every task, its kind, label count and split sizes")
    t.add_argument("names", nargs="*", help="tasks to list (default: all; with --tasks, that folder's)")
    t.add_argument("--data", default=None)
    t.add_argument("--tasks", default=None, help="a folder of more task YAML files")
    t.set_defaults(fn=cmd_tasks)

    pr = sub.add_parser("prompt", help="the exact prompt of one example")
    pr.add_argument("task")
    pr.add_argument("--shots", type=int, choices=[0, 5], default=0)
    pr.add_argument("--index", type=int, required=True, help="row of the split")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--split", choices=["test", "train"], default="test")
    pr.add_argument("--format", choices=["plain", "inst", "chat"], default="plain",
                    help="plain text, the paper's [INST] form, or chat messages as JSON")
    pr.add_argument("--text-budget", type=int, default=None)
    pr.add_argument("--sampler", choices=["random", "stratified"], default="random")
    pr.add_argument("--data", default=None)
    pr.add_argument("--tasks", default=None, help="a folder of more task YAML files")
    pr.set_defaults(fn=cmd_prompt)

    s = sub.add_parser("score", help="metrics of a predictions parquet (example_id, prediction)")
    s.add_argument("predictions")
    s.add_argument("--task", required=True)
    s.add_argument("--split", choices=["test", "train"], default="test")
    s.add_argument("--data", default=None)
    s.add_argument("--tasks", default=None, help="a folder of more task YAML files")
    s.set_defaults(fn=cmd_score)

    st = sub.add_parser("status", help="the cells of a results dir with their metrics")
    st.add_argument("results")
    st.set_defaults(fn=cmd_status)

    c = sub.add_parser("compare", help="two results dirs: the same cells, answers and metrics? (exit 1 if not)")
    c.add_argument("a")
    c.add_argument("b")
    c.set_defaults(fn=cmd_compare)

    r = sub.add_parser("run", help="run a grid (same as python grid/run.py)")
    r.add_argument("config")
    r.add_argument("--results", required=True)
    r.add_argument("--data", default=None)
    r.add_argument("--tasks", default=None, help="a folder of more task YAML files")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    r.set_defaults(fn=cmd_run)

    pub = sub.add_parser("publish", help="copy what a report needs (cell.json, predictions, runs) to commit beside it")
    pub.add_argument("results")
    pub.add_argument("dest", help="an empty folder, e.g. reports/<study>/results")
    pub.set_defaults(fn=cmd_publish)

    from grid.report import add_arguments as report_arguments

    rep = sub.add_parser("report", help="Table 3, plots and significance tests from a results dir")
    report_arguments(rep)
    rep.set_defaults(fn=cmd_report)
    return p


def cmd_publish(args: argparse.Namespace) -> int:
    from grid.publish import publish

    cells, size = publish(args.results, args.dest)
    print(f"{cells} cells ({size / 2**20:.2f} MB) in {args.dest}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from grid.compare import compare, describe

    diff = compare(args.a, args.b)
    print(describe(diff, args.a, args.b))
    return 0 if diff.equal else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from grid.tasks import use_tasks_dir

        use_tasks_dir(getattr(args, "tasks", None))
        return args.fn(args)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
