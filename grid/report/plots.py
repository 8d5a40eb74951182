"""The report's plots, drawn with matplotlib from the model's numbers, as base64 PNG (the page
inlines them and links nothing outside itself). Without matplotlib there are no plots and the
page says so."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from grid.report.model import Confusion, FinetunePanel, ReportModel, ShotsPanel


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def draw_plots(model: ReportModel) -> dict[str, str | None] | None:
    """Each plot's PNG (None where there is nothing to draw); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    return {"by_shots": plot_by_shots(plt, model.shots_panels, model.table.show_decoding),
            "finetune": plot_finetune(plt, model.finetune_panels),
            "confusion": plot_confusion(plt, model.confusion) if model.confusion else None,
            "forgetting": plot_forgetting(plt, model.forgetting),
            "merge_sweep": plot_sweep(plt, model.merge_study) if model.merge_study else None}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _grid_axes(plt: Any, n: int, width: float = 4.0, height: float = 3.0) -> tuple[Any, list[Any]]:
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat


def plot_by_shots(plt: Any, panels: list[ShotsPanel], show_decoding: bool) -> str | None:
    if not panels:
        return None
    fig, axes = _grid_axes(plt, len(panels))
    for ax, panel in zip(axes, panels):
        for label, pts in panel.series:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(panel.column.title, fontsize=9)
        ax.set_xlabel("shots")
        ax.set_ylabel(panel.column.metric + " (%)")
        ax.set_xticks(panel.shots)
        ax.set_ylim(-2, 102)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle("Score by number of shots")
    return _png(fig)


def plot_finetune(plt: Any, panels: list[FinetunePanel]) -> str | None:
    if not panels:
        return None
    fig, axes = _grid_axes(plt, len(panels), width=4.5)
    for ax, panel in zip(axes, panels):
        bars = panel.bars
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], width=0.4, label="w/o FT", color="#bbb")
        ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], width=0.4, label="w/ FT", color="#2a6fb0")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([b[0] for b in bars], fontsize=7, rotation=30, ha="right")
        ax.set_title(panel.column.title, fontsize=9)
        ax.set_ylim(0, 102)
        ax.set_ylabel(panel.column.metric + " (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fine-tuned vs not")
    return _png(fig)


def plot_confusion(plt: Any, confusion: Confusion) -> str:
    import numpy as np

    golds, preds = confusion.gold_labels, confusion.predicted_labels
    mat = np.array(confusion.counts, dtype=float)
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    size = max(4.0, min(14.0, 0.28 * len(preds) + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size * len(golds) / max(len(preds), 1) + 1))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fs = 8 if len(preds) <= 25 else 5
    ax.set_xticks(range(len(preds)))
    ax.set_xticklabels(preds, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(golds)))
    ax.set_yticklabels(golds, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{confusion.label} - {confusion.subtask}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="share of gold row")
    return _png(fig)


def plot_forgetting(plt: Any, rows: list[dict[str, Any]]) -> str | None:
    rows = [r for r in rows if r["delta"] is not None]
    if not rows:
        return None
    models = sorted({r["model"] for r in rows})
    fig, axes = _grid_axes(plt, len(models), width=5.0)
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        colors = ["#2a6fb0" if r["seen"] else "#d9822b" for r in mine]
        ax.bar(range(len(mine)), [100 * r["delta"] for r in mine], color=colors)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r["column"] for r in mine], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("merged - reference (points)")
        ax.set_title(f"{model} (blue: seen, orange: unseen)", fontsize=9)
    fig.suptitle("Forgetting of merged models on seen and unseen tasks")
    return _png(fig)


def plot_sweep(plt: Any, numbers: dict[str, Any]) -> str | None:
    """One panel per fine-tuned task: score on that task (x) against mean held-out score (y) for
    the reference (w = 0), the task-arithmetic merges (by weight), the fine-tune (w = 1), and the
    TIES / DARE merges and the multi-task model as single points."""
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
