"""The merge study's view of a results dir (seed 004): forgetting, and what merging brings back.

Every evaluated model of a grid with merges is a *variant*: the reference (the untuned instruct
model the grid names as `reference`), a fine-tune of it on one task, a model the grid made (a
mixed multi-task fine-tune), or a merge. For each variant and label task: its accuracy with the
cell's 95% CI, and its difference from the reference on the same rows, with a paired bootstrap
CI and the exact McNemar p. Per variant, the mean over its seen tasks, over its unseen tasks, and
over the *held-out* tasks (seen by no variant: the only tasks on which single-task merges and the
multi-task model can be compared fairly), each difference from the reference with a CI from a
paired bootstrap stratified by task (each task's rows are resampled apart, the same draws for
both models). Each merge is also tested against the fine-tune it was made from. The sweep plot
puts each fine-tune's task-arithmetic weights on one line: score on the seen task against mean
held-out score, from w = 0 (the reference) to w = 1 (the fine-tune).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grid.config import decoding_name
from grid.forgetting import forgetting_frame
from grid.significance import Outcomes, mcnemar_exact
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
    """The variants of the results' zero-shot label cells (first seed and decoding), and the name
    of the reference variant (None when the grid names none)."""
    from grid.tasks import get_task

    by_id = {r["cell_id"]: r for r in records}
    infers = [r for r in records if r["status"] == "done" and r["cell"]["kind"] == "infer"
              and r["cell"]["shots"] == 0 and _single_label(get_task, r["cell"]["task"])]
    if not infers:
        return [], None
    seed = min(r["cell"]["seed"] for r in infers)
    decodings = sorted({decoding_name(r["cell"]["decoding"]) for r in infers})
    infers = [r for r in infers if r["cell"]["seed"] == seed and decoding_name(r["cell"]["decoding"]) == decodings[0]]
    # kind of weights, seen tasks and reference: grid.forgetting's rule, as status and the report use it
    lineage = {r["cell_id"]: r for r in forgetting_frame(records).select("cell_id", "kind", "seen_tasks", "reference")
               .unique("cell_id", maintain_order=True).to_dicts()}
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


def _outcomes(cache: Any, record: dict[str, Any]) -> Outcomes:
    """A label cell's right/wrong array, read once from its predictions parquet (report.OutcomeCache)."""
    from grid.tasks import get_task

    return cache.get(record, get_task(record["cell"]["task"]).subtasks[0].name)


def stratified_diff(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = N_BOOT, seed: int = 0
                    ) -> tuple[float, float, float]:
    """Mean over tasks of (accuracy A - accuracy B), and its 95% CI from a paired bootstrap that
    resamples each task's rows apart (the same draws for A and B). With B all-False it is the
    mean accuracy of A and its CI."""
    rng = np.random.default_rng(seed)
    observed = float(np.mean([a.mean() - b.mean() for a, b in pairs]))
    draws = np.zeros(n_boot)
    for a, b in pairs:
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        draws += (a[idx].mean(axis=1) - b[idx].mean(axis=1))
    draws /= len(pairs)
    low, high = np.percentile(draws, [2.5, 97.5])
    return observed, float(low), float(high)


def _pairs(outs: Any, a: Variant, b: Variant | None, tasks: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for t in tasks:
        oa = _outcomes(outs, a.cells[t])
        if b is None:
            out.append((oa.values, np.zeros_like(oa.values)))
        else:
            out.append(oa.align(_outcomes(outs, b.cells[t])))
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
    from grid.report import OutcomeCache

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
                   "majority_rate": m.get(sub.replace("/accuracy", "/majority_rate"))}
            if ref is not None and v is not ref and t in ref.cells:
                a, b = _outcomes(outs, rec).align(_outcomes(outs, ref.cells[t]))
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
                    res = mcnemar_exact(*_outcomes(outs, v.cells[t]).align(_outcomes(outs, other.cells[t])))
                    merges.append({"merge": v.name, "against": label, "other": other.name, "task": t,
                                   "seen": t in v.seen, "merged": res.a, "other_accuracy": res.b,
                                   "diff": res.diff, "n10": res.n10, "n01": res.n01, "p_value": res.p_value})
    return {"reference": reference, "tasks": tasks, "held_out": held_out, "per_task": per_task,
            "summary": summary, "merges": merges}


# --- rendering ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _with_ci(t: tuple[float, float, float] | None, signed: bool = False) -> str:
    if t is None:
        return "–"
    v, lo, hi = (100 * x for x in t)
    return (f"{v:+.1f} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{v:.1f} [{lo:.1f}, {hi:.1f}]")


def _p(p: float) -> str:
    return f"{p:.2g}" + ("*" if p < 0.05 else "")


def _describe(s: dict[str, Any]) -> str:
    if s["kind"] == "merge":
        how = s["method"] + (f" w={s['weight']:g}" if s["weight"] is not None else "")
        how += f" d={s['density']:g}" if s["density"] is not None else ""
        return f"merge: {how} of {s['parent']}"
    if s["kind"] == "made":
        return "fine-tune on the mixture of " + ", ".join(s["seen_tasks"])
    return {"reference": "the reference (untuned)", "fine-tune": "fine-tune on " + ", ".join(s["seen_tasks"]),
            "model": "a model of the grid"}[s["kind"]]


SUMMARY_HEADER = ("Model", "What it is", "Seen", "Seen − ref", "Unseen", "Unseen − ref", "Held-out", "Held-out − ref")


def _summary_cells(s: dict[str, Any]) -> list[str]:
    """One summary row's texts, for the Markdown and the HTML table alike."""
    return [s["variant"], _describe(s), _with_ci(s.get("seen")), _with_ci(s.get("seen_delta"), True),
            _with_ci(s.get("unseen")), _with_ci(s.get("unseen_delta"), True), _with_ci(s.get("held_out")),
            _with_ci(s.get("held_out_delta"), True)]


def markdown(numbers: dict[str, Any]) -> list[str]:
    """The section's Markdown: summary, per-task scores and differences, merge tests."""
    held = ", ".join(numbers["held_out"]) or "none"
    md = ["## Merge study: seen, unseen, held-out tasks\n",
          f"Reference: {numbers['reference']}. Held-out tasks (seen by no model): {held}. Means over "
          f"tasks of accuracy (%) with a 95% CI; differences from the reference in points, with a paired "
          f"bootstrap CI stratified by task ({N_BOOT} resamples).\n",
          "| " + " | ".join(SUMMARY_HEADER) + " |", "|---" * len(SUMMARY_HEADER) + "|"]
    for s in numbers["summary"]:
        md.append("| " + " | ".join(_summary_cells(s)) + " |")
    rec = [s for s in numbers["summary"] if "held_out_vs_parent" in s]
    if rec:
        md += ["", "### What merging brought back, on the held-out tasks\n",
               "Mean held-out accuracy of each merge minus that of the fine-tune it came from, and minus "
               "that of the multi-task model (points, task-stratified paired bootstrap 95% CI).\n",
               "| Merged | Held-out | − its fine-tune | − multi-task |", "|---|---|---|---|"]
        for s in rec:
            md.append(f"| {s['variant']} | {_with_ci(s.get('held_out'))} | {_with_ci(s['held_out_vs_parent'], True)} | "
                      f"{_with_ci(s.get('held_out_vs_multi'), True)} |")
    md += ["", "### Per task\n",
           "Accuracy [95% CI] (majority-class rate of the rows), and the difference from the reference "
           "[paired bootstrap CI], exact McNemar p (* p < 0.05). Seen tasks are in bold.\n",
           "| Model | " + " | ".join(numbers["tasks"]) + " |", "|---|" + "---|" * len(numbers["tasks"])]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for r in numbers["per_task"]:
        rows.setdefault(r["variant"], {})[r["task"]] = r
    for name, cells in rows.items():
        texts = []
        for t in numbers["tasks"]:
            r = cells.get(t)
            if r is None:
                texts.append("–")
                continue
            text = f"{_pct(r['accuracy'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"
            if "delta" in r:
                text += f"<br>{100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}] p={_p(r['p_vs_reference'])}"
            texts.append(f"**{text}**" if r["seen"] else text)
        md.append(f"| {name} | " + " | ".join(texts) + " |")
    majority = {r["task"]: r["majority_rate"] for r in numbers["per_task"] if r["majority_rate"] is not None}
    md.append("| majority rate | " + " | ".join(_pct(majority.get(t)) for t in numbers["tasks"]) + " |")
    md += ["", "### Merged vs the fine-tune it came from, and vs the reference\n",
           "Exact McNemar on the same rows; n10 = merged right where the other is wrong, n01 the reverse.\n",
           "| Merged | vs | Task | Seen | Merged | Other | Diff | n10 / n01 | p |", "|---|---|---|---|---|---|---|---|---|"]
    for m in numbers["merges"]:
        md.append(f"| {m['merge']} | {m['other']} | {m['task']} | {'seen' if m['seen'] else 'unseen'} | "
                  f"{_pct(m['merged'])} | {_pct(m['other_accuracy'])} | {100 * m['diff']:+.1f} | "
                  f"{m['n10']} / {m['n01']} | {_p(m['p_value'])} |")
    return md


def html_section(numbers: dict[str, Any], plot: str | None) -> str:
    """The same section for report.html (tables from the Markdown's numbers, and the sweep plot)."""
    parts = ['<h2 id="merge-study">Merge study: seen, unseen, held-out tasks</h2>',
             f'<p class="note">Reference: {html.escape(str(numbers["reference"]))}; held-out tasks: '
             f'{html.escape(", ".join(numbers["held_out"]) or "none")}.</p>',
             '<table id="merge-summary"><thead><tr>' + "".join(f"<th>{h}</th>" for h in SUMMARY_HEADER)
             + "</tr></thead><tbody>"]
    for s in numbers["summary"]:
        parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _summary_cells(s)) + "</tr>")
    parts.append("</tbody></table>")
    if plot:
        parts.append(f'<img alt="merge weight sweep" src="data:image/png;base64,{plot}">')
    return "\n".join(parts)


def plot_sweep(plt, numbers: dict[str, Any]) -> str | None:
    """One panel per fine-tuned task: score on that task (x) against mean held-out score (y) for
    the reference (w = 0), the task-arithmetic merges (by weight), the fine-tune (w = 1), and the
    TIES / DARE merges and the multi-task model as single points."""
    from grid.report import _grid_axes, _png

    summary = {s["variant"]: s for s in numbers["summary"]}
    acc = {(r["variant"], r["task"]): r["accuracy"] for r in numbers["per_task"]}
    fts = [s for s in numbers["summary"] if s["kind"] == "fine-tune" and len(s["seen_tasks"]) == 1]
    if not fts or not numbers["held_out"] or numbers["reference"] not in summary:
        return None
    fig, axes = _grid_axes(plt, len(fts), width=4.2, height=3.4)
    ref = summary[numbers["reference"]]
    for ax, ft in zip(axes, fts):
        task = ft["seen_tasks"][0]
        line = [(0.0, ref)] + sorted(((s["weight"], s) for s in summary.values() if s["parent"] == ft["variant"]
                                      and s["method"] == "task_arithmetic" and s["weight"] is not None),
                                     key=lambda p: p[0]) + [(1.0, ft)]
        xs = [100 * acc[(s["variant"], task)] for _, s in line]
        ys = [100 * s["held_out"][0] for _, s in line]
        ax.plot(xs, ys, "-o", color="#2a6fb0", label="task arithmetic, w = 0 ... 1")
        for (w, _), x, y in zip(line, xs, ys):
            ax.annotate(f"w={w:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for s in summary.values():
            if s["parent"] == ft["variant"] and s["method"] in ("ties", "dare_ties"):
                ax.plot(100 * acc[(s["variant"], task)], 100 * s["held_out"][0],
                        "^" if s["method"] == "ties" else "s", label=s["method"].replace("_", "-").upper())
            if s["kind"] == "made" and task in s["seen_tasks"] and (s["variant"], task) in acc:
                ax.plot(100 * acc[(s["variant"], task)], 100 * s["held_out"][0], "*", markersize=11,
                        color="#d9822b", label="multi-task fine-tune")
        ax.set_xlabel(f"{task} accuracy (%)")
        ax.set_ylabel("mean held-out accuracy (%)")
        ax.set_title(f"fine-tuned on {task}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Merge weight sweep: seen task against held-out tasks")
    return _png(fig)
