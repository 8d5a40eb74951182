"""The paper's Table 3 from any results dir, as Markdown and one self-contained HTML page.

    python -m grid report DIR [--out reports/]
    python -m grid.report DIR [--out reports/] [--pairs A:B,...] [--confusion-cell ID[:subtask]]

Rows: model x shots x fine-tune (x decoding, x seed when these vary in the results). Columns:
the seed paper's (20NG dual 20-class / 7-class, 20NG consolidated 20-class / 7-class, MASSIVE
dual intent / slot filling, MASSIVE consolidated intent / slot filling), then any other task
found in the results. Each entry is the cell's own metric from its cell.json (the numbers
`python -m grid status` prints), in percent, with its 95% bootstrap CI and its invalid rate:
`86.5 [85.7, 87.3] inv 0.2%` (the sub-task's invalid rate for consolidated cells).

Significance (grid.significance, seeded): by default, for every column and model, fine-tuned vs
not (same shots), 5-shot vs 0-shot (same fine-tune), consolidated vs dual (same shots and
fine-tune), calibrated vs raw (a calibrated decoding, e.g. `constrained+pmi`, vs `constrained`,
all else equal), and LLM vs encoder (every decoder or API row vs each fine-tuned encoder row);
plus any `--pairs A:B` of cell ids. Accuracy: exact McNemar on per-example
correctness; slot F1: paired bootstrap.

Plots (matplotlib, as inline base64 PNG; the page links nothing outside itself): score by
shots, fine-tuned vs not, a confusion matrix of one cell (the one with the most examples and a
label sub-task, or --confusion-cell), and seen / unseen tasks of merged and grid-made models:
score minus the grid's reference model on the same column, shots, seed and decoding, by
grid.forgetting's rule (the one `grid status` uses). Grids with merges get the merge study's
section (grid.report.merge_study).

The package: `model` computes every number (table, comparisons, merge_study, forgetting rows,
confusion, plot data); `markdown`, `page` (the Jinja template grid/templates/report.html.j2) and
`plots` only show them. Files written to OUT: table3.md, report.html, report.json (every number,
test and choice).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grid.errors import GridError


def write_report(results: str | Path, out: str | Path = "reports", *, pairs: list[tuple[str, str]] | str | None = None,
                 confusion_cell: str | None = None, n_boot: int = 1000, seed: int = 0,
                 default_pairs_on: bool = True, grid: str | Path | None = None) -> list[str]:
    """Write table3.md, report.html and report.json under `out` (a folder, or an object-store URI
    such as the results bucket's); return their paths."""
    # Imported here, not at the top: `python -m grid` builds every subcommand's arguments from
    # add_arguments below, and these modules pull in matplotlib, scipy, nltk and scikit-learn
    # (2 to 12 s, measured with python -X importtime), which `grid status` has no use for.
    from grid import uris
    from grid.report import markdown, page
    from grid.report.comparisons import parse_pairs
    from grid.report.model import build_model, to_json
    from grid.report.plots import draw_plots
    from grid.store import Store

    store = Store.open(results, create=False)
    if not uris.is_remote(str(out)):  # before the work, and writing nothing: a file in the way
        blocking = next((q for q in (Path(out).resolve(), *Path(out).resolve().parents) if q.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise GridError(f"--out {out}: {blocking} is a file, not a folder")
    model = build_model(store, str(results), parse_pairs(pairs) if isinstance(pairs, str) else pairs,
                        confusion_cell, n_boot=n_boot, seed=seed, default_pairs_on=default_pairs_on,
                        declared=declared_comparisons(store, grid))
    plots = draw_plots(model)
    texts = {"table3.md": markdown.render(model), "report.html": page.render(model, plots),
             "report.json": json.dumps(to_json(model, plots), indent=1, default=str)}
    paths = []
    for name, text in texts.items():
        paths.append(uris.join(str(out), name))
        try:
            uris.write_text(paths[-1], text)
        except OSError as exc:
            raise GridError(f"--out {out}: cannot write {name}: {exc.strerror or exc}") from None
    return paths


def declared_comparisons(store, grid: str | Path | None):
    """The grid's declared comparisons: from `grid` (a grid YAML) when given, else from the grid
    text of the results dir's latest run record (grid/provenance.py); none without either."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from grid.comparisons import ComparisonSpec
    from grid.errors import first_error, read_yaml_mapping

    if grid is not None:
        raw, source = read_yaml_mapping(Path(grid), "a grid config"), str(grid)
    else:
        runs = store.runs()
        text = runs[-1].get("grid_text") if runs else None
        if not text:
            return ()
        raw, source = yaml.safe_load(text), f"the grid of {runs[-1].get('grid_path') or 'the latest run'}"
    try:
        return TypeAdapter(tuple[ComparisonSpec, ...]).validate_python((raw or {}).get("comparisons") or ())
    except ValidationError as exc:
        raise GridError(f"{source}: field comparisons.{first_error(exc)}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results dir")
    p.add_argument("--out", default="reports", help="output folder or object-store URI (default reports/)")
    p.add_argument("--pairs", default=None, help="extra comparisons A:B,... by cell id")
    p.add_argument("--no-default-pairs", action="store_true", help="test only the --pairs (and declared comparisons)")
    p.add_argument("--grid", default=None, help="grid YAML whose `comparisons:` to test (default: the grid of the "
                   "results dir's latest run)")
    p.add_argument("--confusion-cell", default=None, help="cell id (ID or ID:subtask) for the confusion matrix")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)


def report_from_args(args: argparse.Namespace) -> list[str]:
    return write_report(args.results, args.out, pairs=args.pairs, confusion_cell=args.confusion_cell,
                        n_boot=args.n_boot, seed=args.seed, default_pairs_on=not args.no_default_pairs,
                        grid=args.grid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grid.report", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        for path in report_from_args(args):
            print(path)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
