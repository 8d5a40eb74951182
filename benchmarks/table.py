"""Rewrite the figures table in benchmarks/README.md from reports/benchmarks/*.json.

    python benchmarks/table.py

The table sits between the README's `<!-- figures -->` and `<!-- /figures -->` lines; everything
else in the README is left as written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import FIGURES_DIR, ROOT

README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- figures -->", "<!-- /figures -->"
MET = {True: "yes", False: "**no**", None: "-"}  # None: a figure printed without a goal


def table() -> str:
    lines = ["| benchmark | claim | figure | goal | met | baseline (same run) | commit | date | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(FIGURES_DIR.glob("*.json")):
        rec = json.loads(path.read_text())
        for c in rec.get("claims", []):
            lines.append(f"| [{rec['benchmark']}](../reports/benchmarks/{path.name}) | {c['claim']} | "
                         f"{c['value']:.3g} {c['unit']} | {c['goal']} | {MET[c['met']]} | "
                         f"{c['baseline']} | {rec['commit']} | {rec['date']} | "
                         f"{rec['load_average_at_end'][0]:.1f} |")
    return "\n".join(lines)


def main() -> int:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README}: no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
    print(f"{README.relative_to(ROOT)}: {table().count(chr(10)) - 1} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
