"""What every benchmark shares: repeated timing, the machine it ran on, and its JSON figures.

A figure a skeptic accepts names its baseline, measured in the same run the same way (wall clock
from the same point, after model load), over several runs (median and spread), on a named machine
at a named commit. `Timings` holds the repeats of one method; `write_figures` writes
`reports/benchmarks/<name>.json` with the machine, commit, command and load average, which
`benchmarks/table.py` turns into the table in `benchmarks/README.md`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIGURES_DIR = ROOT / "reports" / "benchmarks"


@dataclass
class Timings:
    """The wall-clock seconds of each run of one method, and what each run processed."""

    name: str
    seconds: list[float] = field(default_factory=list)
    work: list[float] = field(default_factory=list)  # examples, tokens, cells, ... per run

    def time(self, fn: Callable[[], Any], work: float | Callable[[Any], float]) -> Any:
        """Run `fn` once, timed; `work` is how much it did (or a function of its result)."""
        start = time.perf_counter()
        out = fn()
        self.seconds.append(time.perf_counter() - start)
        self.work.append(work(out) if callable(work) else work)
        return out

    @property
    def rates(self) -> list[float]:
        return [w / s for w, s in zip(self.work, self.seconds)]

    def summary(self) -> dict[str, Any]:
        """Median rate and seconds, the spread (min, max) of the rate, and every run."""
        rates = self.rates
        return {"runs": len(rates), "rate_median": statistics.median(rates), "rate_min": min(rates),
                "rate_max": max(rates), "seconds_median": statistics.median(self.seconds),
                "seconds": [round(s, 3) for s in self.seconds], "work": self.work}


def ratio(ours: Timings, baseline: Timings) -> float:
    """Median rate over median rate."""
    return statistics.median(ours.rates) / statistics.median(baseline.rates)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "os": platform.platform()}


def commit() -> str:
    """The commit, with `+dirty` when the tree has uncommitted changes to tracked files."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_figures(name: str, figures: dict[str, Any], started: float) -> Path:
    """Write `reports/benchmarks/<name>.json`: the figures plus how, where and when they were made.

    The load average is part of the record because this machine is small and shared: a figure
    taken while other work ran says so."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.time() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
        **figures,
    }
    path = FIGURES_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"figures: {path.relative_to(ROOT)}")
    return path


def claim(what: str, value: float, unit: str, goal: str, met: bool | None, baseline: str = "") -> dict[str, Any]:
    """One line of the README table: a figure, the baseline it was measured against, its goal.
    `met` is None for a figure the issue asks to print without a goal (it is neither met nor missed)."""
    mark = "    " if met is None else "MET " if met else "MISS"
    print(f"{mark} {what}: {value:.3g} {unit} (goal {goal}){'; vs ' + baseline if baseline else ''}")
    return {"claim": what, "value": value, "unit": unit, "goal": goal, "met": met, "baseline": baseline}


def engine_answers(backend: Any, prepared: Any, batch_size: int) -> list[str]:
    """A prepared cell's answers the engine's way (grid.execute.chunk_rows: length-grouped chunks
    of `batch_size`, each through the backend), put back in test order: the path a benchmark
    times against its baseline. Each call pays for its own shared prompt prefix, as a new cell
    would."""
    from grid.execute import chunk_rows, in_cell_order
    from workers import constrained

    constrained._PREFIXES.clear()
    chunks, indices = {}, {}
    for row in chunk_rows([prepared], batch_size):
        chunks[row["chunk"]] = backend.generate(json.loads(row["items"]))
        indices[row["chunk"]] = json.loads(row["index"])
    return [a["raw_output"] for a in in_cell_order(chunks, indices)]
