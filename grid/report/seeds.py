"""Results across seeds (numbers only; the views show them): each metric per seed with its CI, the
mean and spread across seeds, and
paired tests of a multi-task model against single-task ones that use every seed (seed 003 asks
for significance across random seeds; its own numbers are one run each).

A variant is a model under one fine-tune mode, shot count and decoding, on one task; its seeds
are its cells that differ only in `seed` (each seed its own fine-tune: train rows, initial weights
and batch order; for untuned models, the few-shot draw). Per seed, the metric's mean over test
examples has the cell's own 95% CI (cell.json). Across seeds: the mean of the per-seed values and their sample
standard deviation.

Two paired tests, on the seeds both variants have (seed s against seed s; every seed scores the
same test rows), both grid.significance's (the one implementation the report's comparisons and
the merge study use):
- pooled: the metric's test stratified by seed (exact McNemar on the discordant pairs summed
  within seeds for accuracy; a paired permutation test for ROUGE), the difference the mean over
  seeds of each seed's difference, its CI a bootstrap that resamples each seed's examples apart.
  It uses every example of every seed, so it sees small differences; it treats the seeds as fixed.
- across seeds: a one-sample t-test on the per-seed differences (n = seeds). Seeds are the unit:
  it asks whether the difference holds for a new seed, and with 3 seeds it is weak (a t of 4.3 is
  needed for p < 0.05).
Both are given: a difference that the pooled test finds and the seed test does not is one that
the seeds do not reliably reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grid.config import decoding_name
from grid.report.comparisons import OutcomeCache
from grid.significance import adjust_results, compare_strata, pair_by_seed, per_seed_differences
from grid.store import Store

N_BOOT = 2000

SEED_HEADER = ("variant", "task", "metric", "per seed [95% CI]", "mean", "SD")
TEST_HEADER = ("A", "B", "task", "metric", "seeds", "A - B [95% CI]", "test", "p pooled", "p pooled adj",
               "per-seed A - B", "p seeds")


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


# --- the numbers a report shows ---------------------------------------------------------------


def metrics_of(record: dict[str, Any]) -> tuple[str, list[str]]:
    """The sub-task and the metrics this section reads of a cell: accuracy for a single-label
    task, ROUGE-1/2/L for a text task; none for the rest (multi-task and tagging cells)."""
    from grid.tasks import get_task

    task = get_task(record["cell"]["task"])
    sub = task.subtasks[0]
    if task.is_multi or sub.type not in ("label", "text"):
        return sub.name, []
    return sub.name, ["accuracy"] if sub.type == "label" else ["rouge1", "rouge2", "rougeL"]


def seed_numbers(store: Store, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per variant and metric: per-seed values with the cell's own CI, mean and spread; the paired
    tests of each multi-task model against the single-task model of the same task (and against
    the other variants of that task), seed s against seed s, Benjamini-Hochberg adjusted as one
    exploratory family. None when no variant has two seeds."""
    variants = collect(records)
    if not any(len(v.cells) > 1 for v in variants):
        return None
    rows = []
    for v in variants:
        sub, metrics = metrics_of(next(iter(v.cells.values())))
        for metric in metrics:
            per_seed = []
            for seed, record in sorted(v.cells.items()):
                m = record.get("metrics") or {}
                key = f"{sub}/{metric}"
                per_seed.append({"seed": seed, "value": m.get(key), "ci_low": m.get(f"{key}_ci_low"),
                                 "ci_high": m.get(f"{key}_ci_high")})
            values = [s["value"] for s in per_seed if s["value"] is not None]
            rows.append({"variant": v.name, "model": v.model, "task": v.task, "metric": metric,
                         "seen_tasks": list(v.seen_tasks), "seeds": per_seed,
                         "mean": float(np.mean(values)) if values else None,
                         "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None})
    cache = OutcomeCache(store)
    tests, results = [], []
    for a, b in comparisons(variants):
        pairs = pair_by_seed(a.cells, b.cells)
        sub, metrics = metrics_of(pairs[0][1])
        outcomes = [(cache.get(ra, sub), cache.get(rb, sub)) for _, ra, rb in pairs]
        for metric in metrics:
            result = compare_strata(outcomes, metric, N_BOOT, seed=0)
            per_seed, p_seeds = per_seed_differences(outcomes, metric)
            results.append(result)
            tests.append({"a": a.name, "b": b.name, "task": a.task, "metric": metric, "seeds": [s for s, _, _ in pairs],
                          "n_per_seed": result.n // len(pairs), "per_seed_diff": per_seed, "test": result.test,
                          "diff": result.diff, "ci_low": result.ci_low, "ci_high": result.ci_high,
                          "p_pooled": result.p_value, "p_floor": result.p_floor, "n_resamples": result.n_resamples,
                          "p_seeds": p_seeds})
    for t, r in zip(tests, adjust_results(results, "exploratory")):
        t["p_pooled_adjusted"] = r.p_adjusted
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
    seeds = "; ".join(f"s{s['seed']}: {_pct(s['value'])} [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]"
                      for s in r["seeds"])
    return [r["variant"], r["task"], r["metric"], seeds, _pct(r["mean"]), _pct(r["sd"])]


def test_cells(t: dict[str, Any]) -> list[str]:
    """One paired test's cells under TEST_HEADER (differences x 100)."""
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in t["per_seed_diff"])
    p_seeds = "–" if t["p_seeds"] is None else f"{t['p_seeds']:.3g}"
    pooled = f"< 1/{t['n_resamples']}" if t.get("p_floor") else f"{t['p_pooled']:.3g}"
    adjusted = t["p_pooled_adjusted"]
    return [t["a"], t["b"], t["task"], t["metric"], str(len(t["seeds"])),
            f"{100 * t['diff']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}]", t["test"],
            pooled, f"{adjusted:.3g}" + ("*" if adjusted < 0.05 else ""), per_seed, p_seeds]


SEEDS_NOTE = ("Each metric x 100: per seed with the cell's own 95% CI, then the mean and the sample SD across "
              "seeds. Paired tests (A - B x 100, seed s of A against seed s of B, on the seeds both have): "
              "pooled over seeds (exact McNemar on the discordant pairs summed within seeds for accuracy, a "
              "paired permutation test stratified by seed for ROUGE; bootstrap CI stratified by seed), p "
              "adjusted by Benjamini-Hochberg over this section's tests (* adjusted p < 0.05); and across seeds "
              "(t-test of the per-seed differences, seeds as the unit).")
