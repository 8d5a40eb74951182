"""The report as Markdown (table3.md): Table 3, the paired tests, the forgetting rows, the
merge study and the results across seeds, each a function of the model's numbers."""

from __future__ import annotations

from typing import Any

from grid.provenance import provenance_markdown
from grid.report import seeds
from grid.report.comparisons import Comparison, significance_note
from grid.report.formatting import (
    SUMMARY_HEADER,
    adjusted_p_text,
    delta_text,
    diff_text,
    mde_text,
    p_star,
    p_text,
    pct,
    raw_p_text,
    reference_text,
    seeds_text,
    skill_delta_text,
    summary_cells,
    test_text,
    with_ci,
)
from grid.report.merge_study import N_BOOT
from grid.report.model import ReportModel
from grid.report.table import LEGEND, Table


def render(model: ReportModel) -> str:
    md = ["# Table 3 reproduced\n", model.summary + "\n", *provenance_markdown(model.provenance), "",
          table_markdown(model.table), "", LEGEND, "",
          "## Paired significance tests\n", significance_note(model.n_boot, model.seed) + "\n",
          comparisons_markdown(model.comparisons, model.families)]
    if model.forgetting:
        md += ["", "## Merged models: seen / unseen tasks\n"] + forgetting_markdown(model.forgetting)
    if model.merge_study:
        md += [""] + merge_study_markdown(model.merge_study)
    if model.seeds:
        md += [""] + seeds_markdown(model.seeds)
    return "\n".join(md) + "\n"


def _md_table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows])


def seeds_markdown(numbers: dict[str, Any]) -> list[str]:
    """The across-seeds section: each variant's metric per seed, mean and SD; the paired tests."""
    md = ["## Across seeds\n", seeds.SEEDS_NOTE + "\n"]
    md += _md_table(seeds.SEED_HEADER, [seeds.row_cells(r) for r in numbers["rows"]])
    if numbers["tests"]:
        md += [""] + _md_table(seeds.TEST_HEADER, [seeds.test_cells(t) for t in numbers["tests"]])
    return md


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    cols = table.used_columns()
    head = ["Model"] + [f"{c.group} {c.setup}<br>{c.head}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [_escape(table.label(r))]
        for c in cols:
            e = table.entries.get((r, c.key))
            cells.append(_escape(e.text()) if e else "–")
        lines.append("| " + " | ".join(cells) + " |")
    majority = [table.majority(c) for c in cols]
    if any(m is not None for m in majority):
        lines.append("| majority-class rate | "
                     + " | ".join("–" if m is None else f"{100 * m:.1f}" for m in majority) + " |")
    return "\n".join(lines)


def comparisons_markdown(comps: list[Comparison], families: list[tuple[str, int, str]]) -> str:
    if not comps:
        return "No pair of cells to compare."
    lines = ["Tests per family: " + "; ".join(f"{f} {n} ({how})" for f, n, how in families) + ".", ""]
    asked = {(c.name, c.family): c.question for c in comps if c.question}
    lines += [f"- **{name}** ({family}): {_escape(q)}" for (name, family), q in asked.items()]
    lines += [""] if asked else []
    lines += ["| Family | Comparison | Column | A | B | Seeds | A - B [95% CI] | MDE | Test | p | p adj |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        names = (f"| {c.family} | {_escape(c.name)} | {_escape(c.column)} | {_escape(c.a_label)} | "
                 f"{_escape(c.b_label)} | {_escape(seeds_text(c))} |")
        if c.result is None:
            lines.append(f"{names} – | – | – | {_escape(c.error or '')} | – |")
            continue
        r = c.result
        lines.append(f"{names} {diff_text(r)} | {mde_text(r)} | {test_text(r, long_names=False)}, n={r['n']} | "
                     f"{raw_p_text(r)} | {adjusted_p_text(r)} |")
    return "\n".join(lines)


def forgetting_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Difference = score minus the reference's; beside it the same for macro-F1 and balanced accuracy "
             "(points) and the gold label's mean log-prob (nats), which move when a model's skill changes "
             "while it answers the same default label (– where a cell has no label scores).", "",
             "| Merged model | Column | Seen | Score | Shots | Reference | Difference | Δ macro-F1 | Δ balanced acc. "
             "| Δ gold log-prob |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['column']} | {'seen' if r['seen'] else 'unseen'} | "
                     f"{100 * r['score']:.1f} | {r['shots']} | {reference_text(r)} | {delta_text(r)} | "
                     f"{skill_delta_text(r, 'macro_f1')} | {skill_delta_text(r, 'balanced_accuracy')} | "
                     f"{skill_delta_text(r, 'gold_logprob')} |")
    return lines


def merge_study_markdown(numbers: dict[str, Any]) -> list[str]:
    """The merge-study section: summary, what merging brought back, per-task scores, merge tests."""
    held = ", ".join(numbers["held_out"]) or "none"
    md = ["## Merge study: seen, unseen, held-out tasks\n",
          f"Reference: {numbers['reference']}. Held-out tasks (seen by no model): {held}. Means over "
          f"tasks of accuracy (%) with a 95% CI; differences from the reference in points, with a paired "
          f"bootstrap CI stratified by task ({N_BOOT} resamples).\n",
          "| " + " | ".join(SUMMARY_HEADER) + " |", "|---" * len(SUMMARY_HEADER) + "|"]
    md += ["| " + " | ".join(summary_cells(s)) + " |" for s in numbers["summary"]]
    recovered = [s for s in numbers["summary"] if "held_out_vs_parent" in s]
    if recovered:
        md += ["", "### What merging brought back, on the held-out tasks\n",
               "Mean held-out accuracy of each merge minus that of the fine-tune it came from, and minus "
               "that of the multi-task model (points, task-stratified paired bootstrap 95% CI).\n",
               "| Merged | Held-out | − its fine-tune | − multi-task |", "|---|---|---|---|"]
        md += [f"| {s['variant']} | {with_ci(s.get('held_out'))} | {with_ci(s['held_out_vs_parent'], True)} | "
               f"{with_ci(s.get('held_out_vs_multi'), True)} |" for s in recovered]
    md += ["", "### Per task\n",
           "Accuracy [95% CI] and macro-F1 (mF1; the majority-class rate of the rows in the last row), and the "
           "difference from the reference "
           "[paired bootstrap CI], exact McNemar p, then p adjusted by Benjamini-Hochberg over the study's "
           f"{numbers.get('n_tests', 0)} tests (* adjusted p < 0.05). Seen tasks are in bold.\n"]
    md += _per_task_table(numbers)
    md += ["", "### Merged vs the fine-tune it came from, and vs the reference\n",
           "Exact McNemar on the same rows; n10 = merged right where the other is wrong, n01 the reverse.\n",
           "| Merged | vs | Task | Seen | Merged | Other | Diff | n10 / n01 | p | p adj |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {m['merge']} | {m['other']} | {m['task']} | {'seen' if m['seen'] else 'unseen'} | "
           f"{pct(m['merged'])} | {pct(m['other_accuracy'])} | {100 * m['diff']:+.1f} | "
           f"{m['n10']} / {m['n01']} | {p_text(m['p_value'])} | {p_star(m['p_adjusted'])} |"
           for m in numbers["merges"]]
    return md


def _per_task_table(numbers: dict[str, Any]) -> list[str]:
    """A row per variant, a column per task: accuracy [CI], and the difference from the reference."""
    tasks = numbers["tasks"]
    lines = ["| Model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for r in numbers["per_task"]:
        rows.setdefault(r["variant"], {})[r["task"]] = r
    for name, cells in rows.items():
        texts = []
        for t in tasks:
            r = cells.get(t)
            if r is None:
                texts.append("–")
                continue
            text = f"{pct(r['accuracy'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}]"
            if r.get("macro_f1") is not None:
                text += f" mF1 {pct(r['macro_f1'])}"
            if "delta" in r:
                text += (f"<br>{100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}] "
                         f"p={p_text(r['p_vs_reference'])}, adj {p_star(r['p_vs_reference_adjusted'])}")
            texts.append(f"**{text}**" if r["seen"] else text)
        lines.append(f"| {name} | " + " | ".join(texts) + " |")
    majority = {r["task"]: r["majority_rate"] for r in numbers["per_task"] if r["majority_rate"] is not None}
    lines.append("| majority rate | " + " | ".join(pct(majority.get(t)) for t in tasks) + " |")
    return lines
