"""Declared comparisons: what a study is about, written in its grid before it runs.

    comparisons:
      - name: lora-vs-untuned
        question: Does a LoRA fine-tune beat the untuned model on 20NG?
        a: {model: smollm2, finetune: lora}
        b: {model: smollm2, finetune: none}
        metrics: [accuracy, macro_f1]
        family: primary          # primary (Holm) or secondary (Benjamini-Hochberg)

A and B are selectors over inference cells: each key a cell field (SELECTOR_KEYS), each value
one value or a list of them ("any of"); a decoding is named as tables name it (`constrained`,
`constrained+pmi`). A cell of A is paired with the cell of B that equals it on every field the
selectors do not name differently (a key named alike on both sides only narrows both, e.g.
`task: [20ng-7, 20ng-20]`), and always on the seed: seed s of A against seed s of B, never across
seeds, so a selector cannot name a seed. Naming `family` or `backend` differently frees `model`
too (they are the model's), and naming `finetune` or `task` differently frees `trained_on`.

A pair must be scored on the same examples: the same test rows of the same data, so A and B may
name two tasks only where both read one source (`a: {task: 20ng-multi}`, `b: {task: 20ng-20}`:
the consolidated model against the dual one, on a sub-task both have, `label/accuracy`). Metrics
are a sub-task's (`accuracy`, `macro_f1`, `balanced_accuracy`, `gold_logprob` (the gold label's
mean log-prob, in nats: constrained score decoding), `slot_f1`, `rouge1`, `rouge2`, `rougeL`;
`exact_match` of a whole multi-task), unqualified for every sub-task it applies to, or
`intent/accuracy` for one.

Everything here is plain data over cell dicts (a plan's cells, or the `cell` of each cell.json),
so the grid's load (`check_comparisons`, before any work) and the report pair cells alike. The
tests themselves are grid.significance's, run by grid.report.comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from grid.errors import GridError

SELECTOR_KEYS = ("model", "family", "backend", "task", "shots", "finetune", "decoding", "trained_on")
KNOWN_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "gold_logprob", "slot_f1", "rouge1", "rouge2",
                 "rougeL", "exact_match")
SUBTASK_METRICS = {"label": ("accuracy", "macro_f1", "balanced_accuracy", "gold_logprob"), "word_tags": ("slot_f1",),
                   "text": ("rouge1", "rouge2", "rougeL")}


class ComparisonSpec(BaseModel):
    """One declared comparison of A against B (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    question: str = Field(min_length=1, description="what the comparison asks, in words")
    a: dict[str, Any] = Field(min_length=1)
    b: dict[str, Any] = Field(min_length=1)
    metrics: tuple[str, ...] = Field(min_length=1)
    family: Literal["primary", "secondary"] = "primary"

    @field_validator("a", "b")
    @classmethod
    def _known_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "seed" in value:
            raise ValueError("a selector cannot name a seed: seed s of A is always paired with seed s of B")
        unknown = sorted(set(value) - set(SELECTOR_KEYS))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; use {', '.join(SELECTOR_KEYS)}")
        return value

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for m in value:
            if m.rpartition("/")[2] not in KNOWN_METRICS:
                raise ValueError(f"unknown metric {m!r}; use {', '.join(KNOWN_METRICS)}, optionally as sub-task/metric")
        return value


def cell_fields(cell: dict[str, Any]) -> dict[str, Any]:
    """The fields a selector reads from a cell dict (a plan's cell or a cell.json's `cell`)."""
    from grid.config import decoding_name  # grid.config holds the specs: imported when used

    lineage = cell.get("lineage") or {}
    return {"model": cell["model"], "family": cell.get("family"), "backend": cell.get("backend"),
            "task": cell["task"], "shots": int(cell["shots"]), "finetune": cell["finetune"],
            "decoding": decoding_name(cell.get("decoding")), "trained_on": lineage.get("trained_on") or "",
            "seed": int(cell.get("seed", 0))}


def matches(selector: dict[str, Any], fields: dict[str, Any]) -> bool:
    for key, want in selector.items():
        options = want if isinstance(want, list) else [want]
        if fields[key] not in options and str(fields[key]) not in [str(o) for o in options]:
            return False
    return True


def free_keys(spec: ComparisonSpec) -> set[str]:
    """The fields A and B may differ on: those the selectors name differently (a key both name
    alike only filters, e.g. `task: [20ng-7, 20ng-20]` on both sides; family and backend free the
    model; the fine-tune mode frees the task a fine-tune was trained on, which an untuned cell lacks,
    and so does the task: each side's fine-tune is its own task's)."""
    named = {k for k in set(spec.a) | set(spec.b) if spec.a.get(k) != spec.b.get(k)}
    if named & {"finetune", "task"}:
        named.add("trained_on")
    if named & {"family", "backend"}:
        named.add("model")
    if "model" in named:
        named |= {"family", "backend"}
    return named


@dataclass(frozen=True)
class Pair:
    """One cell of A and its cell of B (same seed, same examples)."""

    seed: int
    a: dict[str, Any]  # cell dicts, with "id"
    b: dict[str, Any]


@dataclass
class Group:
    """The pairs of one comparison that differ only in seed: one test, pooled over its seeds."""

    spec: ComparisonSpec
    pairs: list[Pair]

    @property
    def task(self) -> str:
        return self.pairs[0].a["task"]

    @property
    def task_b(self) -> str:
        """B's task: A's, or another task on the same rows (a multi-task against its single task)."""
        return self.pairs[0].b["task"]


def pair_cells(spec: ComparisonSpec, cells: list[dict[str, Any]], where: str) -> list[Group]:
    """The comparison's groups of pairs among inference `cells` (each with "id"); a GridError
    names `where` (e.g. `grids/x.yaml: field comparisons.0`) when a selector matches no cell,
    pairs none, is ambiguous, or pairs cells scored on different examples."""
    infer = [c for c in cells if c.get("kind", "infer") == "infer"]
    fields = [(c, cell_fields(c)) for c in infer]
    side = {"a": [(c, f) for c, f in fields if matches(spec.a, f)],
            "b": [(c, f) for c, f in fields if matches(spec.b, f)]}
    for name, found in side.items():
        if not found:
            raise GridError(f"{where}.{name}: {_show(getattr(spec, name))} matches no inference cell of the grid")
    keep = [k for k in (*SELECTOR_KEYS, "seed") if k not in free_keys(spec)]
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for c, f in side["b"]:
        by_key.setdefault(tuple(f[k] for k in keep), []).append(c)
    groups: dict[tuple, list[Pair]] = {}
    for c, f in side["a"]:
        partners = by_key.get(tuple(f[k] for k in keep), [])
        if len(partners) > 1:
            differ = sorted(k for k in SELECTOR_KEYS
                            if len({cell_fields(p)[k] for p in partners}) > 1 and k not in spec.b)
            raise GridError(f"{where}.b: {len(partners)} cells of B pair with one cell of A "
                            f"({_describe(f)}); name {', '.join(differ) or 'more fields'} in b")
        if not partners:
            continue
        other = partners[0]
        _same_examples(c, other, f"{where}")
        group_key = tuple(f[k] for k in SELECTOR_KEYS) + tuple(cell_fields(other)[k] for k in SELECTOR_KEYS)
        groups.setdefault(group_key, []).append(Pair(f["seed"], c, other))
    if not groups:
        raise GridError(f"{where}: no cell of A has a cell of B with the same {', '.join(keep)}; "
                        f"name the fields A and B differ on in both selectors")
    return [Group(spec, sorted(p, key=lambda x: x.seed)) for _, p in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _same_examples(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    """Cells of a pair must be scored on the same examples: the same task's rows (or two tasks that
    read the same data, e.g. 20ng-multi against 20ng-20), the same test sample and text budget."""
    from grid.tasks import get_task

    if a["task"] != b["task"]:
        if get_task(a["task"]).data != get_task(b["task"]).data:
            raise GridError(f"{where}.a/b: pairs cells scored on different examples (task {a['task']} vs "
                            f"{b['task']}, which read different data)")
    elif a.get("data_fp") != b.get("data_fp"):
        raise GridError(f"{where}.a/b: pairs cells scored on different examples (data_fp {a.get('data_fp')} "
                        f"vs {b.get('data_fp')}, task {a['task']})")
    for key in ("limits", "text_budget"):
        va, vb = a.get(key), b.get(key)
        if key == "limits":  # the test sample: its size, seed and stratification (train rows do not count)
            va, vb = ({k: v for k, v in (x or {}).items() if k != "train"} for x in (va, vb))
        if va != vb:
            raise GridError(f"{where}.a/b: pairs cells scored on different examples ({key} {va} vs {vb}, "
                            f"task {a['task']})")


def pair_metric_columns(metric: str, task_a: str, task_b: str, where: str) -> list[tuple[str, str]]:
    """`metric_columns` on both sides of a pair: one list, the same (sub-task, metric) on A's task
    and on B's, else a GridError asking for the sub-task to be named."""
    columns = metric_columns(metric, task_a, where)
    if task_b != task_a:
        other = metric_columns(metric, task_b, where)
        if sorted(other) != sorted(columns):
            show = ", ".join(f"{sub}/{name}" for sub, name in other)
            raise GridError(f"{where}.metrics: {metric} means {', '.join(f'{s}/{n}' for s, n in columns)} on "
                            f"{task_a} but {show} on {task_b}; name one sub-task both have, e.g. "
                            f"{other[0][0]}/{other[0][1]}")
    return columns


def metric_columns(metric: str, task_name: str, where: str) -> list[tuple[str, str]]:
    """(sub-task, metric) pairs a declared metric means on a task: `accuracy` on every label
    sub-task, `intent/accuracy` on one, `exact_match` on the whole task ("*")."""
    from grid.tasks import get_task

    task = get_task(task_name)
    sub_name, _, name = metric.rpartition("/")
    if name == "exact_match":
        if not task.is_multi:
            raise GridError(f"{where}.metrics: exact_match is a multi-task's metric; {task_name} has one sub-task")
        return [("*", "exact_match")]
    subs = [s for s in task.subtasks if not sub_name or s.name == sub_name]
    if sub_name and not subs:
        raise GridError(f"{where}.metrics: {task_name} has no sub-task {sub_name!r}")
    out = [(s.name, name) for s in subs if name in SUBTASK_METRICS[s.type]]
    if not out:
        kinds = {s.name: SUBTASK_METRICS[s.type] for s in subs}
        raise GridError(f"{where}.metrics: {metric} does not apply to {task_name} ("
                        + "; ".join(f"sub-task {k}: {', '.join(v)}" for k, v in kinds.items()) + ")")
    return out


def check_comparisons(specs: tuple[ComparisonSpec, ...], cells: list[dict[str, Any]], source: str) -> None:
    """Every declared comparison pairs cells of the plan, like with like, on metrics its tasks
    have; else one GridError naming the file, the comparison and the field. Run when a grid loads."""
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):
        where = f"{source}: field comparisons.{i} ({spec.name})"
        if spec.name in names[:i]:
            raise GridError(f"{where}.name: {spec.name!r} names two comparisons")
        for group in pair_cells(spec, cells, where):
            for metric in spec.metrics:
                pair_metric_columns(metric, group.task, group.task_b, where)


def _show(selector: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in selector.items()) + "}"


def _describe(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fields[k]}" for k in ("model", "task", "shots", "finetune", "decoding", "seed"))


def check_plan(config: Any, plan: Any, source: str) -> None:
    """`check_comparisons` on a plan's cells (a no-op for a grid that declares none)."""
    if config.comparisons:
        check_comparisons(config.comparisons, [{**c.model_dump(), "id": c.id} for c in plan.cells], source)
