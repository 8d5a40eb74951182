"""The report as one self-contained HTML page (report.html), rendered from the Jinja template
grid/templates/report.html.j2: inline CSS, plots as base64 PNG, nothing linked outside."""

from __future__ import annotations

import time
from pathlib import Path

import jinja2

from grid.provenance import provenance_markdown
from grid.report import formatting, seeds
from grid.report.comparisons import significance_note
from grid.report.model import ReportModel
from grid.report.table import LEGEND, Column

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def render(model: ReportModel, plots: dict[str, str | None] | None) -> str:
    """`plots`: draw_plots' PNGs, or None without matplotlib (the page then says how to get them)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(fmt=formatting, seeds=seeds)
    columns = model.table.used_columns()
    return env.get_template("report.html.j2").render(
        m=model, table=model.table, columns=columns, groups=column_groups(columns), legend=LEGEND,
        significance_note=significance_note(model.n_boot, model.seed), plots=plots or {},
        provenance=provenance_markdown(model.provenance),
        no_matplotlib="" if plots is not None else " (matplotlib is not installed: pip install matplotlib)",
        written=time.strftime("%Y-%m-%d %H:%M:%S"))


def column_groups(columns: list[Column]) -> list[tuple[str, int]]:
    """The table's first header row: each dataset and setup, with how many columns it spans."""
    groups: list[tuple[str, int]] = []
    for c in columns:
        name = f"{c.group} {c.setup} model" if c.setup in ("dual", "consolidated") else c.group
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1] + 1)
        else:
            groups.append((name, 1))
    return groups
