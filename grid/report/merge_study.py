"""The merge study's numbers (seed 004): forgetting, and what merging brings back.

Every evaluated model of a grid with merges is a *variant*: the reference (the untuned instruct
model the grid names as `reference`), a fine-tune of it on one task, a model the grid made (a
mixed multi-task fine-tune), or a merge. For each variant and label task: its accuracy with the
cell's 95% CI, and its difference from the reference on the same rows, with a paired bootstrap
CI and the exact McNemar p. Per variant, the mean over its seen tasks, over its unseen tasks, and
over the *held-out* tasks (seen by no variant: the only tasks on which single-task merges and the
multi-task model can be compared fairly), each difference from the reference with a CI from a
paired bootstrap stratified by task (each task's rows are resampled apart, the same draws for
both models). Each merge is also tested against the fine-tune it was made from. The views
(grid.report.markdown, the page template, grid.report.plots' weight sweep) show these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grid.config import decoding_name
from grid.forgetting import forgetting_frame
from grid.metrics.classification import mean_statistic
from grid.report.comparisons import OutcomeCache
from grid.significance import Outcomes, adjust, bootstrap_diff_ci, mcnemar_exact
from grid.store import Store

N_BOOT = 2000


@dataclass
class Variant:
    """One evaluated model: its label-task outcomes and where its weights came from."""

    name: str
    kind: str  # grid.forgetting's kind of weights: reference, model, fine-tune, made or merge
    seen: list[str]
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> inference record
    method: str | None = None  # merges: mergekit's method
    weight: float | None = None  # merges: the fine-tune's task-vector weight
    density: float | None = None
    parent: str | None = None  # merges: the fine-tune variant it merges back


def _variant_name(cell: dict[str, Any]) -> str:
    trained = (cell.get("lineage") or {}).get("trained_on")
    return cell["model"] if cell["finetune"] == "none" else f"{cell['model']} {cell['finetune']} {trained}"


def collect_variants(records: list[dict[str, Any]]) -> tuple[list[Variant], str | None]:
    """The variants of the results' zero-shot label cells (first seed, each task's first decoding),
    and the name of the reference variant (None when the grid names none)."""
    from grid.tasks import get_task

    by_id = {r["cell_id"]: r for r in records}
    infers = [r for r in records if r["status"] == "done" and r["cell"]["kind"] == "infer"
              and r["cell"]["shots"] == 0 and _single_label(get_task, r["cell"]["task"])]
    if not infers:
        return [], None
    seed = min(r["cell"]["seed"] for r in infers)
    # one decoding per task (a grid may score held-out tasks calibrated and seen ones raw): its first
    decoding: dict[str, str] = {}
    for r in infers:
        name = decoding_name(r["cell"]["decoding"])
        decoding[r["cell"]["task"]] = min(name, decoding.get(r["cell"]["task"], name))
    infers = [r for r in infers if r["cell"]["seed"] == seed
              and decoding_name(r["cell"]["decoding"]) == decoding[r["cell"]["task"]]]
    # kind of weights, seen tasks and reference: grid.forgetting's rule, as status and the report use it
    lineage = {r["cell_id"]: r for r in forgetting_frame(records).select("cell_id", "kind", "seen_tasks", "reference")
               .unique("cell_id", maintain_order=True).to_dicts()}
    infers = [r for r in infers if r["cell_id"] in lineage]  # a cell without a score has no facts
    reference = next((lineage[r["cell_id"]]["reference"] for r in infers if lineage[r["cell_id"]]["reference"]), None)
    variants: dict[str, Variant] = {}
    ft_variant: dict[str, str] = {}  # fine-tune cell id -> the variant its model is
    for r in infers:
        cell, facts = r["cell"], lineage[r["cell_id"]]
        name = _variant_name(cell)
        v = variants.setdefault(name, Variant(name, facts["kind"], facts["seen_tasks"]))
        v.cells[cell["task"]] = r
        dep = by_id.get(cell.get("depends_on") or "")
        if dep is not None and dep["cell"]["kind"] == "finetune":
            ft_variant[dep["cell_id"]] = name
        if dep is not None and dep["cell"]["kind"] == "merge":
            _merge_details(v, dep["cell"])
    for v in variants.values():
        if v.kind == "merge":
            inputs = by_id[next(iter(v.cells.values()))["cell"]["depends_on"]]["cell"]["recipe"]["inputs"]
            parents = [ft_variant[ref["cell"]] for ref in inputs.values() if ref.get("cell") in ft_variant]
            v.parent = parents[0] if len(parents) == 1 else None
    order = {"reference": 0, "model": 1, "fine-tune": 2, "made": 3, "merge": 4}
    methods = {"task_arithmetic": 0, "ties": 1, "dare_ties": 2, "linear": 3}
    return sorted(variants.values(), key=lambda v: (order[v.kind], v.parent or "", methods.get(v.method or "", 9),
                                                    v.weight or 0, v.name)), reference


def _single_label(get_task, name: str) -> bool:
    task = get_task(name)
    return not task.is_multi and task.subtasks[0].type == "label"


def _merge_details(v: Variant, merge_cell: dict[str, Any]) -> None:
    """Method, and the weight and density of its one grid fine-tune input (when it has one)."""
    mk = merge_cell["recipe"]["mergekit"]
    v.method = mk.get("merge_method")
    params = [m.get("parameters") or {} for m in mk.get("models", [])]
    if len(params) == 1:
        v.weight, v.density = params[0].get("weight"), params[0].get("density")


# --- numbers ------------------------------------------------------------------------------------


def _outcomes(cache: OutcomeCache, record: dict[str, Any]) -> Outcomes:
    """A label cell's right/wrong array, read once from its predictions parquet."""
    from grid.tasks import get_task

    return cache.get(record, get_task(record["cell"]["task"]).subtasks[0].name)


def stratified_diff(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = N_BOOT, seed: int = 0
                    ) -> tuple[float, float, float]:
    """Mean over tasks of (accuracy A - accuracy B), and its 95% CI from grid.significance's paired
    bootstrap stratified by task (each task's rows resampled apart, the same draws for A and B).
    With B all-False it is the mean accuracy of A and its CI."""
    strata = [([a.astype(float)], [b.astype(float)]) for a, b in pairs]
    observed = float(np.mean([a.mean() - b.mean() for a, b in pairs]))
    low, high = bootstrap_diff_ci(mean_statistic, strata, n_boot, seed)
    return observed, low, high


def _aligned(a: Outcomes, b: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    """Both cells' right/wrong on the examples they share, in one order."""
    ia, ib = a.positions(b)
    return a.correct[ia], b.correct[ib]


def _pairs(outs: OutcomeCache, a: Variant, b: Variant | None, tasks: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for t in tasks:
        oa = _outcomes(outs, a.cells[t])
        if b is None:
            out.append((oa.correct, np.zeros_like(oa.correct)))
        else:
            out.append(_aligned(oa, _outcomes(outs, b.cells[t])))
    return out


def study_numbers(store: Store, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Everything the merge-study section shows, as plain data (report.json carries it)."""
    variants, reference = collect_variants(records)
    if not any(v.kind == "merge" for v in variants):
        return None
    ref = next((v for v in variants if v.name == reference), None)
    tasks = sorted({t for v in variants for t in v.cells})
    seen_any = {t for v in variants for t in v.seen}
    held_out = [t for t in tasks if t not in seen_any]
    outs = OutcomeCache(store)
    by_name = {v.name: v for v in variants}
    per_task, summary, merges = [], [], []
    made = [v for v in variants if v.kind == "made"]
    multi = made[0] if len(made) == 1 else None
    for v in variants:
        for t in tasks:
            rec = v.cells.get(t)
            if rec is None:
                continue
            m = rec.get("metrics") or {}
            sub = next(k for k in m if k.endswith("/accuracy") and k.count("/") == 1)
            row = {"variant": v.name, "task": t, "seen": t in v.seen, "cell_id": rec["cell_id"],
                   "accuracy": m[sub], "ci_low": m.get(f"{sub}_ci_low"), "ci_high": m.get(f"{sub}_ci_high"),
                   "majority_rate": m.get(sub.replace("/accuracy", "/majority_rate")),
                   "macro_f1": m.get(sub.replace("/accuracy", "/macro_f1"))}
            if ref is not None and v is not ref and t in ref.cells:
                a, b = _aligned(_outcomes(outs, rec), _outcomes(outs, ref.cells[t]))
                diff, low, high = stratified_diff([(a, b)])
                row |= {"delta": diff, "delta_low": low, "delta_high": high,
                        "p_vs_reference": mcnemar_exact(a, b).p_value}
            per_task.append(row)
        groups = {"seen": [t for t in v.seen if t in v.cells],
                  "unseen": [t for t in tasks if t not in v.seen and t in v.cells],
                  "held_out": [t for t in held_out if t in v.cells]}
        srow: dict[str, Any] = {"variant": v.name, "kind": v.kind, "method": v.method, "weight": v.weight,
                                "density": v.density, "parent": v.parent, "seen_tasks": v.seen}
        for g, ts in groups.items():
            if not ts:
                continue
            srow[g] = stratified_diff(_pairs(outs, v, None, ts))
            if ref is not None and all(t in ref.cells for t in ts):
                srow[f"{g}_delta"] = stratified_diff(_pairs(outs, v, ref, ts))
        # a merge's held-out score against the fine-tune it came from (what merging brought back)
        # and against the multi-task model (the alternative to single-task merges)
        others = {"parent": by_name.get(v.parent or ""), "multi": multi}
        for key, other in others.items():
            if v.kind == "merge" and other is not None and groups["held_out"] and \
                    all(t in other.cells for t in groups["held_out"]):
                srow[f"held_out_vs_{key}"] = stratified_diff(_pairs(outs, v, other, groups["held_out"]))
        summary.append(srow)
        if v.kind == "merge":
            parent = by_name.get(v.parent or "")
            for t in tasks:
                if t not in v.cells:
                    continue
                for other, label in ((parent, "fine-tune"), (ref, "reference")):
                    if other is None or t not in other.cells:
                        continue
                    res = mcnemar_exact(*_aligned(_outcomes(outs, v.cells[t]), _outcomes(outs, other.cells[t])))
                    merges.append({"merge": v.name, "against": label, "other": other.name, "task": t,
                                   "seen": t in v.seen, "merged": res.a, "other_accuracy": res.b,
                                   "diff": res.diff, "n10": res.n10, "n01": res.n01, "p_value": res.p_value})
    _adjust_study(per_task, merges)
    return {"reference": reference, "tasks": tasks, "held_out": held_out, "per_task": per_task,
            "summary": summary, "merges": merges, "n_tests": sum("p_vs_reference" in r for r in per_task) + len(merges)}


def _adjust_study(per_task: list[dict[str, Any]], merges: list[dict[str, Any]]) -> None:
    """The study's McNemar tests (each variant against the reference per task, each merge against
    its fine-tune and the reference) as one exploratory family: Benjamini-Hochberg adjusted p."""
    tested = [r for r in per_task if "p_vs_reference" in r]
    adjusted = adjust([r["p_vs_reference"] for r in tested] + [m["p_value"] for m in merges], "fdr_bh")
    for r, p in zip(tested, adjusted):
        r["p_vs_reference_adjusted"] = p
    for m, p in zip(merges, adjusted[len(tested):]):
        m["p_adjusted"] = p
