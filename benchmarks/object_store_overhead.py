"""What a cell costs in extra time when the results dir is an S3 bucket instead of a local dir.

The same tiny grid (tests/test_object_store.py's: a 4-step full fine-tune of the tiny Llama and
its inference cell on 8 MASSIVE examples) runs `--reps` times on each, alternating, each a fresh
`grid/run.py` with its own local Ray; the S3 side is a real S3 server on loopback (moto, from
the `test` extra), so the figure is the cost of the S3 protocol and of the extra copies
(checkpoints and the model uploaded, the model downloaded into the node cache), not of a
network. Prints each run's wall time, the medians, the extra seconds per cell, and the seconds the
S3 runs spent publishing and fetching models (workers/artifacts.py's log lines; Ray Train's own
checkpoint uploads are not in them). Figures go to reports/benchmarks/object_store_overhead.json.

Run:  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/object_store_overhead.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import claim, write_figures  # noqa: E402
from tests.s3server import start_s3  # noqa: E402
from tests.test_object_store import FINETUNE_GRID  # noqa: E402

CELLS = 2  # the fine-tune cell and its inference cell


def run(config: Path, results: str, env: dict[str, str]) -> tuple[float, float]:
    """The run's wall seconds, and the seconds its model uploads and downloads took."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "grid/run.py", str(config), "--results", results, "--num-cpus", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    copies = sum(float(m) for m in re.findall(r"artifacts: (?:published|fetched) .* in ([0-9.]+)s", proc.stderr))
    return time.perf_counter() - start, copies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    started = time.time()
    s3 = start_s3()
    env = {**os.environ, **s3.env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    times: dict[str, list[float]] = {"local": [], "s3": []}
    copies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "grid.yaml"
        config.write_text(yaml.safe_dump(FINETUNE_GRID))
        for rep in range(args.reps):
            times["local"].append(run(config, f"{tmp}/local{rep}", env)[0])
            seconds, copied = run(config, s3.uri(f"bench{rep}"), env)
            times["s3"].append(seconds)
            copies.append(copied)
            print(f"rep {rep + 1}: local {times['local'][-1]:.1f}s, s3 {seconds:.1f}s "
                  f"(of which model uploads and downloads {copied:.2f}s)", flush=True)
    s3.stop()
    local, remote = statistics.median(times["local"]), statistics.median(times["s3"])
    print(f"median of {args.reps}: local {local:.1f}s, s3 {remote:.1f}s ({CELLS} cells); "
          f"extra per cell on S3: {(remote - local) / CELLS:+.1f}s ({remote / local:.2f}x the local run)")
    runs = f"{args.reps} alternating runs each, {CELLS} cells, a fresh grid/run.py and local Ray per run"
    write_figures("object_store_overhead", {
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "model_copies_s": [round(x, 2) for x in copies],
        "claims": [claim("extra wall time per cell with results on S3 (moto on loopback) instead of a local dir",
                         (remote - local) / CELLS, "s", "printed (no goal)", None,
                         f"local runs {min(times['local']):.1f}-{max(times['local']):.1f} s, S3 runs "
                         f"{min(times['s3']):.1f}-{max(times['s3']):.1f} s; {runs}"),
                   claim("S3 run's wall time over the local run's", remote / local, "x", "printed (no goal)", None,
                         f"medians {remote:.1f} s and {local:.1f} s; model uploads and downloads "
                         f"{statistics.median(copies):.2f} s of the S3 run")]}, started)


if __name__ == "__main__":
    main()
