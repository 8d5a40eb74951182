"""Claim: a grid killed at any moment, and rerun, ends with the predictions of a run never killed,
no finished cell run twice, and no corrupt parquet.

A small grid with inference, fine-tune and merge cells (the tiny Llama, four tasks, a LoRA
fine-tune checkpointed every 2 steps, a task-arithmetic merge of it) runs once uninterrupted
into one results dir. Into a second, the driver is started and, after a seeded random delay,
SIGKILLed with everything it started (its process group: the local Ray too), or one of its Ray
worker processes is SIGKILLed (a fine-tune worker, an inference actor; the driver, where no
worker is up at that moment; after a worker kill the driver goes on, and the next kill's delay
runs from there); a killed or ended driver is started again, until `--kills` kills have landed;
then the grid is run to the end. A run that finishes the grid before its kill ends the kills early: the
figures then say how many landed, and the claim is missed (a bigger grid is needed: more
`--tasks` or `--test-rows`). Each run's own log says which cells it finished; a cell finished
before a run started must not be finished again in it.

    python benchmarks/kill_at_random.py [--kills 20] [--seed 0] [--max-delay 30] [--out kills.json]
        [--tasks fpb-sentiment fomc-stance sst2 gold-headline] [--test-rows 48]

Prints one line per kill, then the figures: kills, of the driver and of a worker (which kind:
a Ray Train worker or an inference actor), runs, cells, cells run twice (goal 0), corrupt parquet
files (goal 0), cells never finished (goal 0), predictions equal (goal true). `--out` writes them
to a file of your choice; without it they go to `reports/benchmarks/kill_at_random.json` with the
commit, machine and load (the committed figures).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = ("fpb-sentiment", "fomc-stance", "sst2", "gold-headline")
GRID = """\
name: kills
models:
  - {name: base, source: "tiny:llama", family: decoder, prompt_format: chat}
tasks: [fpb-sentiment, fomc-stance, sst2, gold-headline]
shots: [0]
finetune: [none, lora]
decoding: {mode: constrained}
limits: {test: TEST_ROWS, train: 64}
text_budget: 48
inference: {batch_size: 4}
recipes:
  decoder/lora:
    hparams: {max_steps: 10, batch_size: 4, lr: 0.01, checkpoint_every_steps: 2, log_every_steps: 0}
merges:
  - {name: half, method: task_arithmetic, base: {model: base},
     models: [{model: base, task: fpb-sentiment, finetune: lora, weight: 0.5}]}
"""


def start(config: Path, results: Path, log: Path) -> subprocess.Popen:
    """A driver in its own process group (so that a kill takes its local Ray with it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "grid/run.py", str(config), "--results", str(results), "--num-cpus", "2"],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def done_before(results: Path) -> set[str]:
    out = set()
    for path in results.glob("cells/*/cell.json"):
        record = json.loads(path.read_text())
        if record.get("status") == "done":
            out.add(record["cell_id"])
    return out


def labels_by_id(results: Path) -> dict[str, str]:
    """Each finished cell's label as the progress lines print it."""
    from grid.plan import Cell

    out = {}
    for path in results.glob("cells/*/cell.json"):
        record = json.loads(path.read_text())
        cell = Cell.model_validate({k: v for k, v in record["cell"].items() if k in Cell.model_fields})
        out[record["cell_id"]] = cell.label()
    return out


WORKER_KINDS = {"ray::RayTrainWorker": "fine-tune worker", "ray::MapWorker": "inference actor",
                "ray::_MapWorker": "inference actor"}


def ray_workers(root_pid: int) -> list[tuple[int, str]]:
    """Ray worker processes (a trainer, an actor) started by the driver, each with its kind."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    picked = []
    for p in children:
        try:
            name = p.cmdline()[0] if p.cmdline() else ""
        except psutil.Error:
            continue
        kind = next((k for prefix, k in WORKER_KINDS.items() if name.startswith(prefix)), None)
        if kind:
            picked.append((p.pid, kind))
    return picked


def finished_in(label: str, log_text: str) -> bool:
    """Did this run's progress log a cell with this label as finished?"""
    return re.search(r"\] (?:done|failed) " + re.escape(label) + r"(?: |$)", log_text, re.M) is not None


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(kills: int, seed: int, max_delay: float, work: Path, tasks: tuple[str, ...] = TASKS,
        test_rows: int = 48) -> dict:
    import pyarrow.parquet as pq

    from grid.compare import compare

    if "fpb-sentiment" not in tasks:  # the merge's input is the fpb-sentiment LoRA
        raise SystemExit(f"--tasks {' '.join(tasks)}: fpb-sentiment must be among them (the merge reads its LoRA)")
    config = work / "grid.yaml"
    config.write_text(GRID.replace(f"tasks: [{', '.join(TASKS)}]", f"tasks: [{', '.join(tasks)}]")
                      .replace("TEST_ROWS", str(test_rows)))
    clean, killed = work / "clean", work / "killed"
    t0 = time.perf_counter()
    proc = start(config, clean, work / "clean.log")
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: see {work / 'clean.log'}")
    clean_s = time.perf_counter() - t0
    rng = random.Random(seed)
    runs, twice, events = 0, [], []
    logs: list[tuple[set[str], Path]] = []
    proc: subprocess.Popen | None = None
    after_last = 0  # runs started after the last kill (a worker kill's failed cells need one more)
    while True:
        if proc is None or proc.poll() is not None:
            if proc is not None and proc.returncode == 0:  # the grid is done
                break
            if len(events) == kills:
                if after_last == 3:
                    raise SystemExit(f"the grid still fails after {after_last} runs past the last kill: "
                                     f"see {logs[-1][1]}")
                after_last += 1
            before = done_before(killed) if killed.exists() else set()
            log = work / f"run{runs}.log"
            proc = start(config, killed, log)
            runs += 1
            logs.append((before, log))
        if len(events) == kills:  # the runs after the last kill go to the end
            proc.wait()
            continue
        delay = rng.uniform(2.0, max_delay)
        target = "driver" if rng.random() < 0.6 else "worker"
        deadline = time.time() + delay
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:  # ended first: the next run starts, unless the grid is done
            if proc.returncode == 0:
                print(f"run {runs} finished the grid before its kill at {delay:.1f} s: "
                      f"{len(events)} of {kills} kills landed", flush=True)
            elif not events or events[-1]["run"] != runs:  # no kill of ours in it: the grid fails by itself
                raise SystemExit(f"run {runs} failed with no kill: see {logs[-1][1]}")
            continue
        k = len(events) + 1
        if target == "worker" and (workers := ray_workers(proc.pid)):
            victim, kind = rng.choice(workers)
            os.kill(victim, signal.SIGKILL)  # the driver goes on, and the next kill comes to it
            print(f"kill {k}: a Ray {kind} (pid {victim}) at {delay:.1f} s; the driver goes on", flush=True)
            events.append({"kill": k, "run": runs, "after_s": round(delay, 1), "target": "worker", "worker": kind})
        else:
            kill_group(proc)
            why = "" if target == "driver" else " (no Ray worker was running to pick)"
            print(f"kill {k}: the driver and its Ray at {delay:.1f} s{why}", flush=True)
            events.append({"kill": k, "run": runs, "after_s": round(delay, 1), "target": "driver",
                           **({"drawn": "worker"} if why else {})})
    labels = labels_by_id(killed)
    for before, log in logs:
        text = log.read_text()
        twice += [labels[c] for c in before if c in labels and finished_in(labels[c], text)]
    corrupt = []
    for path in killed.glob("cells/*/predictions.parquet"):
        try:
            pq.read_table(path)
        except Exception:  # noqa: BLE001 - any unreadable file counts
            corrupt.append(str(path))
    diff = compare(clean, killed)
    statuses = [json.loads(p.read_text())["status"] for p in killed.glob("cells/*/cell.json")]
    return {"kills_asked": kills, "kills": len(events), "driver_kills": sum(e["target"] == "driver" for e in events),
            "worker_kills": sum(e["target"] == "worker" for e in events), "runs": runs,
            "cells": len(labels), "all_done": set(statuses) == {"done"},
            "cells_not_done": sum(s != "done" for s in statuses), "cells_run_twice": len(twice),
            "run_twice": twice, "corrupt_parquet": corrupt, "predictions_equal": diff.equal,
            "difference": {"answers": diff.answers, "metrics": {k: {m: list(v) for m, v in ms.items()}
                                                                 for k, ms in diff.metrics.items()},
                           "only_clean": diff.only_a, "only_killed": diff.only_b},
            "uninterrupted_s": round(clean_s, 1), "events": events}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=30.0, help="seconds; kills fall in [2, max-delay]")
    p.add_argument("--work", default=None, help="folder for the two results dirs (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the figures as JSON")
    p.add_argument("--tasks", nargs="+", default=list(TASKS),
                   help="the grid's tasks (fpb-sentiment among them; the test's short form runs it alone)")
    p.add_argument("--test-rows", type=int, default=48, help="test rows per task (the grid's size)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="kills-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    figures = run(args.kills, args.seed, args.max_delay, work, tuple(args.tasks), args.test_rows)
    print(f"kills {figures['kills']} of {figures['kills_asked']} ({figures['driver_kills']} of the driver, "
          f"{figures['worker_kills']} of a "
          f"worker), runs {figures['runs']}, cells {figures['cells']}, all done {figures['all_done']}, "
          f"cells run twice {figures['cells_run_twice']}, corrupt parquet {len(figures['corrupt_parquet'])}, "
          f"predictions equal to the uninterrupted run: {figures['predictions_equal']}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    else:
        from benchmarks.common import claim, write_figures

        kinds = f"{figures['driver_kills']} of the driver, {figures['worker_kills']} of a worker"
        figures["claims"] = [
            claim("SIGKILLs that landed mid-run", figures["kills"], "kills", f"{figures['kills_asked']}",
                  figures["kills"] == figures["kills_asked"], f"{kinds}; the grid's uninterrupted run "
                  f"{figures['uninterrupted_s']:.0f} s"),
            claim(f"cells run twice after {figures['kills']} SIGKILLs ({kinds})", figures["cells_run_twice"],
                  "cells", "0", figures["cells_run_twice"] == 0, f"{figures['cells']} cells, {figures['runs']} runs"),
            claim("corrupt predictions.parquet after the kills", len(figures["corrupt_parquet"]), "files", "0",
                  not figures["corrupt_parquet"], f"every predictions file of {figures['cells']} cells read"),
            claim("cells not finished after the last run", figures["cells_not_done"], "cells", "0",
                  figures["cells_not_done"] == 0, f"{figures['cells']} cells"),
            claim("predictions and metrics equal to the uninterrupted run", float(figures["predictions_equal"]),
                  "(1 = equal)", "1", figures["predictions_equal"], "an uninterrupted run of the same grid")]
        write_figures("kill_at_random", figures, started)
    ok = figures["kills"] == figures["kills_asked"] and figures["all_done"] and not figures["cells_run_twice"] \
        and not figures["corrupt_parquet"] and figures["predictions_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
