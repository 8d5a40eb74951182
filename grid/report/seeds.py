"""Results across seeds (numbers only; the views show them): each metric per seed with its CI, the mean and spread across seeds, and
paired tests of a multi-task model against single-task ones that use every seed (seed 003 asks
for significance across random seeds; its own numbers are one run each).

A variant is a model under one fine-tune mode, shot count and decoding, on one task; its seeds
are its cells that differ only in `seed` (each seed its own fine-tune: train rows, initial weights
and batch order; for untuned models, the few-shot draw). Per seed, the metric's mean over test
examples has a 95% bootstrap CI. Across seeds: the mean of the per-seed values and their sample
standard deviation.

Two paired tests, on the seeds both variants have (every seed scores the same test rows):
- pooled: per-example differences A - B of every seed pooled; the difference is the mean over
  seeds of each seed's mean difference, its CI a bootstrap that resamples each seed's examples
  apart (the same draws for A and B), and its p-value a sign-flip permutation test (under "no
  difference" each example's A and B are exchangeable). It uses every example of every seed, so
  it sees small differences; it treats the seeds as fixed.
- across seeds: a paired t-test on the per-seed mean differences (n = seeds, n - 1 degrees of
  freedom). Seeds are the unit: it asks whether the difference holds for a new seed, and with 3
  seeds it is weak (a t of 4.3 is needed for p < 0.05).
Both are given: a difference that the pooled test finds and the seed test does not is one that
the seeds do not reliably reproduce.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grid.config import decoding_name
from grid.metrics.bootstrap import mean_ci
from grid.store import Store

N_BOOT = 2000

SEED_HEADER = ("variant", "task", "metric", "per seed [95% CI]", "mean", "SD")
TEST_HEADER = ("A", "B", "task", "metric", "seeds", "A - B [95% CI]", "p pooled", "per-seed A - B", "p seeds")


@dataclass
class Variant:
    model: str
    finetune: str
    shots: int
    decoding: str
    task: str
    seen_tasks: tuple[str, ...]
    cells: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> record

    @property
    def name(self) -> str:
        tuned = f" ft={self.finetune}" if self.finetune != "none" else ""
        return f"{self.model}{tuned} {self.shots}-shot {self.decoding}"


def collect(records: list[dict[str, Any]]) -> list[Variant]:
    """Every inference variant of the finished cells, its cells by seed."""
    variants: dict[tuple, Variant] = {}
    for r in records:
        c = r["cell"]
        if c["kind"] != "infer" or r["status"] != "done":
            continue
        key = (c["model"], c["finetune"], c["shots"], decoding_name(c["decoding"]), c["task"])
        seen = tuple((c.get("lineage") or {}).get("seen_tasks") or ())
        v = variants.setdefault(key, Variant(*key, seen_tasks=seen))
        v.cells[c["seed"]] = r
    return sorted(variants.values(), key=lambda v: (v.task, v.model, v.finetune, v.shots, v.decoding))


# --- per-example scores -------------------------------------------------------------------------


class Scores:
    """Per-example scores of cells, read once from their predictions parquet: accuracy (1/0) for a
    single-label task, ROUGE-1/2/L F-measure for a text task."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[str, dict[str, tuple[list[str], np.ndarray]]] = {}

    def of(self, record: dict[str, Any]) -> dict[str, tuple[list[str], np.ndarray]]:
        cell_id = record["cell_id"]
        if cell_id not in self._cache:
            self._cache[cell_id] = self._read(record)
        return self._cache[cell_id]

    def _read(self, record: dict[str, Any]) -> dict[str, tuple[list[str], np.ndarray]]:
        import pyarrow.parquet as pq

        from grid.metrics.rouge import rouge_per_example
        from grid.significance import outcomes_from_rows
        from grid.tasks import get_task

        task = get_task(record["cell"]["task"])
        with self.store.fs.open_input_file(self.store.predictions_path(record["cell_id"])) as fh:
            rows = pq.read_table(fh, columns=["example_id", "prediction", "gold", "invalid_reason"]).to_pylist()
        sub = task.subtasks[0]
        if task.is_multi or sub.type not in ("label", "text"):
            return {}
        if sub.type == "label":
            out = outcomes_from_rows(rows, task.name, sub.name)
            return {"accuracy": (out.example_ids, out.values.astype(float))}
        ids = [str(r["example_id"]) for r in rows]
        preds = [(json.loads(r["prediction"]) or {}).get(sub.name) if r["prediction"] else None for r in rows]
        golds = [json.loads(r["gold"])[sub.name] for r in rows]
        return {name: (ids, values) for name, values in rouge_per_example(golds, preds).items()}


def _aligned(a: tuple[list[str], np.ndarray], b: tuple[list[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if a[0] == b[0]:
        return a[1], b[1]
    pos = {e: i for i, e in enumerate(b[0])}
    common = [(i, pos[e]) for i, e in enumerate(a[0]) if e in pos]
    return a[1][[i for i, _ in common]], b[1][[j for _, j in common]]


# --- statistics ---------------------------------------------------------------------------------


def pooled_test(pairs: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> dict[str, float]:
    """Mean over seeds of the per-seed mean difference, its stratified bootstrap CI, and the
    sign-flip permutation p-value of the pooled per-example differences (see the module doc)."""
    rng = np.random.default_rng(seed)
    diff = float(np.mean([(a - b).mean() for a, b in pairs]))
    draws = np.zeros(N_BOOT)
    for a, b in pairs:
        idx = rng.integers(0, len(a), size=(N_BOOT, len(a)))
        draws += (a[idx] - b[idx]).mean(axis=1)
    draws /= len(pairs)
    low, high = np.percentile(draws, [2.5, 97.5])
    flipped = np.zeros(N_BOOT)
    for a, b in pairs:
        d = a - b
        signs = rng.choice([-1.0, 1.0], size=(N_BOOT, len(d)))
        flipped += (signs * d).mean(axis=1)
    flipped /= len(pairs)
    p = (1 + int(np.sum(np.abs(flipped) >= abs(diff) - 1e-12))) / (1 + N_BOOT)
    return {"diff": diff, "ci_low": float(low), "ci_high": float(high), "p_pooled": min(1.0, p)}


def seed_t_test(per_seed_diffs: list[float]) -> float | None:
    """Two-sided p of a one-sample t-test of the per-seed differences against 0 (None under 2 seeds)."""
    from scipy import stats

    n = len(per_seed_diffs)
    if n < 2:
        return None
    sd = float(np.std(per_seed_diffs, ddof=1))
    if sd == 0:
        return 0.0 if np.mean(per_seed_diffs) != 0 else 1.0
    t = float(np.mean(per_seed_diffs)) / (sd / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), df=n - 1))


# --- the numbers a report shows ---------------------------------------------------------------


def seed_numbers(store: Store, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per variant and metric: per-seed values with CIs, mean and spread; the paired tests of each
    multi-task model against the single-task model of the same task (and against the other
    variants that were fine-tuned on that task). None when no variant has two seeds."""
    variants = collect(records)
    if not any(len(v.cells) > 1 for v in variants):
        return None
    scores = Scores(store)
    rows = []
    for v in variants:
        metrics = scores.of(next(iter(v.cells.values())))
        for metric in metrics:
            per_seed = []
            for seed, record in sorted(v.cells.items()):
                per_example = scores.of(record)[metric][1]
                low, high = mean_ci(per_example, N_BOOT, seed)  # the CI every cell's metrics carry
                value = float(per_example.mean())
                per_seed.append({"seed": seed, "value": value, "ci_low": low, "ci_high": high})
            values = [s["value"] for s in per_seed]
            rows.append({"variant": v.name, "model": v.model, "task": v.task, "metric": metric,
                         "seen_tasks": list(v.seen_tasks), "seeds": per_seed, "mean": float(np.mean(values)),
                         "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None})
    tests = []
    for a, b in comparisons(variants):
        seeds = sorted(set(a.cells) & set(b.cells))
        for metric in scores.of(a.cells[seeds[0]]):
            pairs = [_aligned(scores.of(a.cells[s])[metric], scores.of(b.cells[s])[metric]) for s in seeds]
            result = pooled_test(pairs)
            per_seed = [float((x - y).mean()) for x, y in pairs]
            tests.append({"a": a.name, "b": b.name, "task": a.task, "metric": metric, "seeds": seeds,
                          "n_per_seed": len(pairs[0][0]), "per_seed_diff": per_seed, **result,
                          "p_seeds": seed_t_test(per_seed)})
    return {"rows": rows, "tests": tests}


def comparisons(variants: list[Variant]) -> list[tuple[Variant, Variant]]:
    """(multi-task variant, other variant) on the same task and seeds: each model tuned on several
    tasks against each model tuned on this task alone, then against every other variant of the
    task that has those seeds (the untuned model, the encoder)."""
    out = []
    for a in variants:
        if len(a.seen_tasks) < 2 or a.task not in a.seen_tasks:
            continue
        others = [b for b in variants if b.task == a.task and b is not a and set(a.cells) & set(b.cells)]
        singles = [b for b in others if list(b.seen_tasks) == [a.task]]
        out += [(a, b) for b in singles + [b for b in others if b not in singles]]
    return out


# --- the texts both views show ------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def row_cells(r: dict[str, Any]) -> list[str]:
    """One variant's cells under SEED_HEADER (metrics x 100)."""
    seeds = "; ".join(f"s{s['seed']}: {_pct(s['value'])} [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]" for s in r["seeds"])
    return [r["variant"], r["task"], r["metric"], seeds, _pct(r["mean"]), _pct(r["sd"])]


def test_cells(t: dict[str, Any]) -> list[str]:
    """One paired test's cells under TEST_HEADER (differences x 100)."""
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in t["per_seed_diff"])
    p_seeds = "–" if t["p_seeds"] is None else f"{t['p_seeds']:.3g}"
    return [t["a"], t["b"], t["task"], t["metric"], str(len(t["seeds"])),
            f"{100 * t['diff']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}]",
            f"{t['p_pooled']:.3g}", per_seed, p_seeds]


SEEDS_NOTE = ("Each metric x 100: per seed with its 95% bootstrap CI, then the mean and the sample SD across "
              "seeds. Paired tests (A - B x 100, on the seeds both have): pooled over seeds (bootstrap CI "
              "stratified by seed, sign-flip permutation p) and across seeds (t-test of the per-seed "
              "differences, seeds as the unit).")
