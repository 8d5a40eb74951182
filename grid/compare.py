"""Two results dirs, cell by cell: the same cells, the same answers, the same numbers?

    python -m grid compare results/before results/after

For a refactor, an upgrade of a library, or another machine: which cell ids only one side has,
which cells' statuses differ, and, for the cells both finished, each example whose raw output or
parsed prediction differs and each metric that moved. Exit status 0 when everything is equal, 1
when something differs (so a script can gate on it). Timing fields are not compared.

Metrics are equal within a relative 1e-5 or an absolute 1e-6 (`same_number`): the ones read
from label log-probs (gold log-prob, Brier) move in their last digits with how examples shared a padded batch (up to
1e-6 nats per label on the tiny Llama), which a killed and rerun grid, or another Ray schedule,
changes without changing any answer. A fine-tune resumed from another step than its counterpart
is compared without the figures of the steps each run executed (RUN_STATS): its model is checked
through its inference cells' answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid.store import Store


@dataclass
class Difference:
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    status: dict[str, tuple[str, str]] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)   # cell -> examples whose answer differs
    metrics: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)  # cell -> metric -> (a, b)

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.status or self.answers or self.metrics)


def _answers(store: Store, cell_id: str) -> dict[str, tuple[Any, Any]]:
    rows = store.read_predictions(cell_id, ["example_id", "raw_output", "prediction"]).to_pylist()
    return {r["example_id"]: (r["raw_output"], r["prediction"]) for r in rows}


# A fine-tune's figures of the steps one run executed: after a kill the rerun resumes from a
# checkpoint and runs (and averages over) fewer steps, though its model is the same.
RUN_STATS = frozenset({"resumed_from_step", "steps_run", "first_loss", "train_loss", "epoch_losses",
                       "nonpad_tokens", "padding_share"})


def same_number(a: Any, b: Any) -> bool:
    """Equal, or two floats within a relative 1e-5 or an absolute 1e-6 (module docstring)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


# Where a fine-tune saved its model: a path inside its own results dir, so two results dirs
# always differ there.
LOCATIONS = frozenset({"model_dir"})


def _numbers(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics that are results, not timings, throughput or locations."""
    skip = ("seconds", "_per_s")
    return {k: v for k, v in (metrics or {}).items() if k not in LOCATIONS and not any(k.endswith(s) for s in skip)}


def compare(a: str | Path, b: str | Path) -> Difference:
    sa, sb = Store.open(a, create=False), Store.open(b, create=False)
    ra = {r["cell_id"]: r for r in sa.records()}
    rb = {r["cell_id"]: r for r in sb.records()}
    diff = Difference(only_a=sorted(set(ra) - set(rb)), only_b=sorted(set(rb) - set(ra)))
    for cid in sorted(set(ra) & set(rb)):
        x, y = ra[cid], rb[cid]
        if x["status"] != y["status"]:
            diff.status[cid] = (x["status"], y["status"])
            continue
        if x["status"] != "done":
            continue
        if x["cell"]["kind"] == "infer":
            ax, ay = _answers(sa, cid), _answers(sb, cid)
            changed = sum(1 for e in set(ax) | set(ay) if ax.get(e) != ay.get(e))
            if changed:
                diff.answers[cid] = changed
        mx, my = _numbers(x.get("metrics")), _numbers(y.get("metrics"))
        if mx.get("resumed_from_step") != my.get("resumed_from_step"):  # the same model, other steps run
            mx, my = ({k: v for k, v in m.items() if k not in RUN_STATS} for m in (mx, my))
        moved = {k: (mx.get(k), my.get(k)) for k in set(mx) | set(my) if not same_number(mx.get(k), my.get(k))}
        if moved:
            diff.metrics[cid] = moved
    return diff


def describe(diff: Difference, a: str, b: str) -> str:
    """The comparison as lines a person reads."""
    if diff.equal:
        return f"{a} and {b}: the same cells, answers and metrics"
    lines = [f"{a} vs {b}:"]
    lines += [f"  only in {a}: {cid}" for cid in diff.only_a] + [f"  only in {b}: {cid}" for cid in diff.only_b]
    lines += [f"  {cid}: status {s[0]} vs {s[1]}" for cid, s in diff.status.items()]
    lines += [f"  {cid}: {n} examples answered differently" for cid, n in diff.answers.items()]
    for cid, moved in diff.metrics.items():
        shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(moved.items())[:6])
        lines.append(f"  {cid}: {shown}" + (" ..." if len(moved) > 6 else ""))
    return "\n".join(lines)
