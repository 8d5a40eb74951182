"""What a plan asks of a cluster: Ray placement groups, actor requests, and a GPU-hours estimate.

    from grid.resources import estimate, print_resources
    print_resources(plan, config)          # `grid/run.py GRID --dry-run` prints this

Placement groups. Each fine-tune cell is one Ray Train run: `ScalingConfig(num_workers=W,
resources_per_worker={"CPU": c, "GPU": g}, placement_strategy=S)`, i.e. a placement group of W
bundles {CPU: c, GPU: g}. S is STRICT_PACK when the W*g GPUs fit on one node (DeepSpeed ZeRO-3
all-gathers every layer's parameters at every step: keep it on NVLink, never across the network),
else PACK (the group spans nodes, as few as possible); CPU-only groups are PACK. For the paper's
recipe that is 8 bundles {GPU: 1, CPU: 10} on one 8-GPU node, ZeRO-3 sharding weights, gradients
and optimizer state 8 ways. Inference actors are not placement groups: each Ray Data actor asks
for `inference.num_cpus` / `inference.num_gpus`, `inference.concurrency` of them per model (a
model's own `inference` overrides the grid's).

GPU-hours, a stated simple model (not a measurement):

    FLOPs  = 6 * N * T   (training: forward + backward)      = 2 * N * T   (inference)
    GPU-s  = FLOPs / (peak bf16 FLOP/s of the GPU * MFU)
    N      = parameters, from the model id ("70b" -> 70e9; RoBERTa base 125M, large 355M)
    T      = tokens processed:
             encoder fine-tune  epochs * train rows * text tokens (cut at max_length)
             decoder fine-tune  max_steps * global batch * training-prompt tokens (cut at max_length)
                                (or epochs * train rows * prompt tokens without max_steps)
             inference          test rows * (prompt tokens + max_new_tokens)
    tokens = 1.35 per whitespace word of the task's texts (cut at the text budget); a prompt is
             instructions + label list (~100 + 4 per label) + (shots + 1) texts + shots answers.
    A100: 312 TFLOP/s bf16 dense; MFU 0.35 for training, 0.15 for batched vLLM generation.

A searched fine-tune cell (grid/search.py) costs its trials x its longest trial, every trial run
out (ASHA only stops trials sooner): T is trials x the longest trial's tokens. Its search's row
also gives CPU core-hours, at the rate measured for MiniLM here (encoder-massive.yaml's 12-epoch
intent fine-tune, 16 min on 2 cores: 8.5e10 training FLOP/s per core).

Training state per GPU, the ZeRO paper's accounting for bf16 mixed-precision Adam (activations,
the CUDA context and fragmentation not counted, so a group is flagged above 80% of the GPU's
memory): a trained parameter costs 2 (bf16 weight) + 2 (gradient) + 12 (fp32 master, Adam m, v)
bytes, a frozen one (LoRA's base) 2. Over W data-parallel workers ZeRO-2 splits the gradients
and optimizer states (2 + 14/W), ZeRO-3 everything (16/W); offloading the optimizer keeps its
12 bytes in CPU memory, offloading all keeps the weights there too.

Inference GPU-hours are the reserved ones: an actor that reserves more GPUs than its model's
tensor-parallel degree (`options.tensor_parallel_size`, default 1) pays for the idle ones too.
API models use no GPU (their cost is in the cells' `usage`). The estimate is a sizing aid, good
to a factor of about two; the run's real seconds are in each cell.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from grid.config import GridConfig
from grid.jobs import placement_strategy
from grid.plan import Cell, Plan
from grid.registry import FAMILIES
from grid.search import trial_budget

GPU_TYPES = {
    "A100": {"bf16_flops": 312e12, "memory_gb": 80},
    "A100-40GB": {"bf16_flops": 312e12, "memory_gb": 40},
    "H100": {"bf16_flops": 989e12, "memory_gb": 80},
}
TRAIN_MFU = 0.35
INFER_MFU = 0.15
TOKENS_PER_WORD = 1.35
PROMPT_OVERHEAD = 100  # instruction tokens
TOKENS_PER_LABEL = 4
NODE_GPUS = 8  # GPUs of one worker node (p4d/p4de.24xlarge); cluster.yaml's worker type
CPU_TRAIN_FLOPS_PER_CORE = 8.5e10  # measured: MiniLM fine-tune, fp32, 2 cores (module docstring)

KNOWN_PARAMS = {"roberta-base": 125e6, "roberta-large": 355e6, "all-minilm-l6-v2": 22e6,
                "phi-3-mini": 3.8e9, "phi3-mini": 3.8e9}  # ids that do not say their size


def model_params(source: str, name: str = "") -> float | None:
    """Parameter count from a model id or name, None when it cannot be told."""
    for text in (source, name):
        low = text.lower()
        for key, n in KNOWN_PARAMS.items():
            if key in low:
                return n
        m = re.search(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", low.replace("_", "-"))
        if m:
            return float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)
    if source.startswith("tiny:"):
        return 1e5
    return None


@dataclass(frozen=True)
class TaskSize:
    n_train: int
    n_test: int
    text_tokens: float  # mean tokens of one (cut) text
    answer_tokens: float  # mean tokens of one gold answer
    n_labels: int


@cache
def _task_size(task_name: str, text_budget: int | None, data_dir: str | None) -> TaskSize:
    from grid.data import label_sets, load_split
    from grid.tasks import get_task

    task = get_task(task_name)
    train = load_split(task, "train", data_dir)
    test = load_split(task, "test", data_dir)
    sample = test.select(range(min(len(test), 2000)))
    words = [len(w) for w in sample["words"]] if "words" in sample.column_names else \
        [len(t.split()) for t in sample["text"]]
    cut = [min(w, text_budget) if text_budget else w for w in words]
    mean_words = sum(cut) / max(len(cut), 1)
    answer = 0.0
    for sub in task.subtasks:
        answer += (mean_words * 3 if sub.type == "word_tags" else 6)  # a tag list: ~3 tokens a word
    labels = label_sets(task, data_dir)
    n_labels = sum(len(v) for v in labels.values())
    return TaskSize(len(train), len(test), TOKENS_PER_WORD * mean_words, answer, n_labels)


def task_size(cell: Cell, data_dir: str | None = None) -> TaskSize:
    budget = cell.text_budget
    if budget and cell.budget_unit == "tokens":  # a budget in the model's tokens, as words
        budget = max(1, int(budget / TOKENS_PER_WORD))
    size = _task_size(cell.task, budget, data_dir)
    limits = cell.limits or {}
    n_test = min(size.n_test, limits.get("test") or size.n_test)
    n_train = min(size.n_train, limits.get("train") or size.n_train)
    return TaskSize(n_train, n_test, size.text_tokens, size.answer_tokens, size.n_labels)


def prompt_tokens(cell: Cell, size: TaskSize) -> float:
    """Tokens of one prompt: instructions, label list, the shots' texts and answers, the input."""
    if not FAMILIES[cell.family].prompted:  # an encoder reads the bare text
        return size.text_tokens
    return (PROMPT_OVERHEAD + TOKENS_PER_LABEL * size.n_labels
            + (cell.shots + 1) * size.text_tokens + cell.shots * size.answer_tokens)


@dataclass
class PlacementGroup:
    cell_id: str
    model: str
    label: str
    bundles: list[dict[str, float]]
    strategy: str
    deepspeed_stage: int
    tokens: float
    gpu_hours: float | None
    state_gb_per_gpu: float | None = None  # training state (module docstring); None: CPU or unknown size
    search: dict | None = None  # a searched cell's trial budget (grid.search.trial_budget), with its costs

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)

    def describe(self) -> str:
        b = self.bundles[0] if self.bundles else {}
        return f"{len(self.bundles)} x {{GPU: {b.get('GPU', 0):g}, CPU: {b.get('CPU', 0):g}}} {self.strategy}"


@dataclass
class InferenceGroup:
    model: str
    family: str
    backend: str
    actors: int
    per_actor: dict[str, float]
    cells: int = 0
    examples: int = 0
    tokens: float = 0.0
    gpu_hours: float | None = 0.0


@dataclass
class Estimate:
    gpu: str
    placement_groups: list[PlacementGroup] = field(default_factory=list)
    inference: list[InferenceGroup] = field(default_factory=list)
    unknown_params: list[str] = field(default_factory=list)
    other_cells: dict[str, int] = field(default_factory=dict)  # kind -> count (merge cells: CPU only)

    @property
    def finetune_gpu_hours(self) -> float:
        return sum(p.gpu_hours or 0 for p in self.placement_groups)

    @property
    def inference_gpu_hours(self) -> float:
        return sum(g.gpu_hours or 0 for g in self.inference)

    @property
    def total_gpu_hours(self) -> float:
        return self.finetune_gpu_hours + self.inference_gpu_hours

    @property
    def max_group_gpus(self) -> float:
        return max((p.gpus for p in self.placement_groups), default=0)


def training_state_bytes(n_params: float, mode: str, stage: int, offload: str, workers: int) -> float:
    """Bytes of weights, gradients and optimizer state per GPU (module docstring)."""
    if mode == "lora":  # the adapter's own state is a rounding error
        return 0.0 if offload == "all" else 2 * n_params / (workers if stage == 3 else 1)
    optimizer = 0 if offload != "none" else 12
    if stage == 3:
        return (0 if offload == "all" else 4 + optimizer) * n_params / workers
    if stage == 2:
        return (2 + (2 + optimizer) / workers) * n_params
    return 16 * n_params


def _gpu_seconds(flops: float, gpu: str, mfu: float) -> float:
    return flops / (GPU_TYPES[gpu]["bf16_flops"] * mfu)


def estimate(plan: Plan, config: GridConfig, data_dir: str | None = None, gpu: str = "A100",
             node_gpus: int = NODE_GPUS) -> Estimate:
    """Placement groups of the fine-tune cells and GPU-hours of every cell (module docstring)."""
    if gpu not in GPU_TYPES:
        raise ValueError(f"unknown GPU type {gpu!r}; known: {', '.join(GPU_TYPES)}")
    specs = {m.name: m for m in config.models}
    est = Estimate(gpu=gpu)
    unknown: set[str] = set()
    groups: dict[str, InferenceGroup] = {}
    for cell in plan.cells:
        if cell.kind not in ("finetune", "infer"):  # merges run mergekit on CPU: no GPU, no placement group
            est.other_cells[cell.kind] = est.other_cells.get(cell.kind, 0) + 1
            continue
        spec = specs.get(cell.model)
        n_params = model_params(cell.source, cell.model)
        if n_params is None and FAMILIES[cell.family].local_weights:
            unknown.add(cell.model)
        size = task_size(cell, data_dir)
        if cell.kind == "finetune":
            recipe = cell.recipe or {}
            res = recipe.get("resources") or {}
            hp = recipe.get("hparams") or {}
            workers = int(res.get("num_workers", 1))
            gpw = float(res.get("gpus_per_worker", 0))
            cpw = float(res.get("cpus_per_worker", 1))
            max_len = hp.get("max_length") or 512
            n_train = min(size.n_train, recipe.get("train_limit") or size.n_train)
            search = trial_budget(cell, n_train) if recipe.get("search") else None
            if not FAMILIES[cell.family].prompted:  # an encoder: epochs over the bare texts
                epochs = search["epochs"] if search else hp.get("epochs") or _paper_epochs(cell.task)
                tokens = epochs * n_train * min(size.text_tokens, max_len)
            else:
                per_example = min(prompt_tokens(cell, size) + size.answer_tokens, max_len)
                global_batch = int(hp.get("batch_size") or 8) * workers
                if hp.get("max_steps"):
                    tokens = hp["max_steps"] * global_batch * per_example
                else:
                    tokens = (hp.get("epochs") or 1) * n_train * per_example
            tokens *= search["trials"] if search else 1
            hours = (_gpu_seconds(6 * n_params * tokens, gpu, TRAIN_MFU) / 3600) if n_params and gpw > 0 else (
                0.0 if gpw <= 0 else None)
            if search:
                search |= {"gpu_hours": hours, "cpu_core_hours": 6 * n_params * tokens / CPU_TRAIN_FLOPS_PER_CORE / 3600
                           if n_params else None}
            stage, offload = int(res.get("deepspeed_stage", 0)), res.get("zero_offload", "none")
            state = (training_state_bytes(n_params, cell.finetune, stage, offload, workers) / 1e9
                     if n_params and gpw > 0 else None)
            est.placement_groups.append(PlacementGroup(
                cell_id=cell.id, model=cell.model,
                label=f"{cell.model} {cell.task} {cell.shots}-shot ft={cell.finetune}",
                bundles=[{"CPU": cpw, "GPU": gpw} for _ in range(workers)],
                strategy=placement_strategy(workers, gpw, node_gpus), deepspeed_stage=stage,
                tokens=tokens, gpu_hours=hours, state_gb_per_gpu=state, search=search))
            continue
        g = groups.get(cell.model)
        if g is None:
            inf = config.inference_for(config.model(cell.model))
            per_actor = {"CPU": inf.num_cpus, "GPU": inf.num_gpus if FAMILIES[cell.family].local_weights else 0}
            g = groups[cell.model] = InferenceGroup(cell.model, cell.family, cell.backend,
                                                   inf.concurrency, per_actor)
        g.cells += 1
        g.examples += size.n_test
        out_tokens = (cell.decoding or {}).get("max_new_tokens", 0) if FAMILIES[cell.family].prompted else 0
        tokens = size.n_test * (prompt_tokens(cell, size) + out_tokens)
        g.tokens += tokens
        if not FAMILIES[cell.family].local_weights or g.per_actor["GPU"] <= 0:
            continue
        if n_params is None:
            g.gpu_hours = None
            continue
        tp = int(((spec.options if spec else {}) or {}).get("tensor_parallel_size", 1) or 1)
        idle = max(1.0, g.per_actor["GPU"] / tp)
        if g.gpu_hours is not None:
            g.gpu_hours += idle * _gpu_seconds(2 * n_params * tokens, gpu, INFER_MFU) / 3600
    est.inference = list(groups.values())
    est.unknown_params = sorted(unknown)
    return est


def _paper_epochs(task_name: str) -> int:
    try:
        from grid.tasks import get_task

        return get_task(task_name).encoder_epochs
    except Exception:  # noqa: BLE001 - the estimate falls back to 10 epochs
        return 10


ASSUMPTIONS = (f"GPU-hours = 6*N*T (training) or 2*N*T (inference) FLOPs / ({{peak}} TFLOP/s bf16 x MFU "
               f"{TRAIN_MFU} train, {INFER_MFU} inference); T from the task's texts at {TOKENS_PER_WORD} "
               "tokens/word, max_steps x global batch for decoder fine-tunes; an estimate, see grid/resources.py")


def fits(request: dict[str, float], node_resources: dict[str, float]) -> bool:
    return all(node_resources.get(k, 0) >= v for k, v in request.items() if v)


def memory_problems(est: Estimate) -> list[str]:
    """Models whose fine-tunes hold more training state per GPU than 80% of its memory (module
    docstring), one line per model and size."""
    memory = GPU_TYPES[est.gpu]["memory_gb"]
    over: dict[tuple[str, float], int] = {}
    for pg in est.placement_groups:
        if (pg.state_gb_per_gpu or 0) > 0.8 * memory:
            key = (pg.model, round(pg.state_gb_per_gpu))
            over[key] = over.get(key, 0) + 1
    return [f"{model}: {n} fine-tune cells hold {gb:.0f} GB of training state per GPU, more than 80% of an "
            f"{est.gpu}'s {memory} GB: set its resources.zero_offload (optimizer, or all with ZeRO-3) or add workers"
            for (model, gb), n in over.items()]


def check_fits(est: Estimate, node_types: dict[str, dict[str, float]]) -> list[str]:
    """Problems: training state a GPU cannot hold, a bundle or actor no node type can hold, or
    a STRICT_PACK group larger than every node."""
    problems = memory_problems(est)
    for pg in est.placement_groups:
        if not any(fits(b, r) for b in pg.bundles[:1] for r in node_types.values()):
            problems.append(f"fine-tune {pg.label}: bundle {pg.bundles[0]} fits no node type")
        if pg.strategy == "STRICT_PACK":
            total = {"CPU": sum(b["CPU"] for b in pg.bundles), "GPU": pg.gpus}
            if not any(fits(total, r) for r in node_types.values()):
                problems.append(f"fine-tune {pg.label}: STRICT_PACK group {total} fits on no single node")
    for g in est.inference:
        if not any(fits(g.per_actor, r) for r in node_types.values()):
            problems.append(f"inference {g.model}: actor {g.per_actor} fits no node type")
    return problems


def node_types_from_cluster(path: str | Path) -> dict[str, dict[str, float]]:
    """`available_node_types` name -> resources of a Ray cluster launcher YAML."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    return {name: dict(t.get("resources") or {}) for name, t in (raw.get("available_node_types") or {}).items()}


def _fmt_hours(h: float | None) -> str:
    return "unknown" if h is None else f"{h:,.1f}"


def resources_tables(est: Estimate):
    """(placement groups, inference actors) as polars frames, and a summary line."""
    import polars as pl

    pgs = pl.DataFrame([{"cell_id": p.cell_id, "fine-tune": p.label, "placement group": p.describe(),
                         "zero": p.deepspeed_stage,
                         "state GB/GPU": "-" if p.state_gb_per_gpu is None else f"{p.state_gb_per_gpu:.1f}",
                         "Mtokens": round(p.tokens / 1e6, 1),
                         "GPU-hours": _fmt_hours(p.gpu_hours)} for p in est.placement_groups])
    inf = pl.DataFrame([{"model": g.model, "backend": g.backend, "actors": g.actors,
                         "per actor": f"{{GPU: {g.per_actor['GPU']:g}, CPU: {g.per_actor['CPU']:g}}}",
                         "cells": g.cells, "examples": g.examples, "Mtokens": round(g.tokens / 1e6, 1),
                         "GPU-hours": _fmt_hours(g.gpu_hours) if FAMILIES[g.family].local_weights else "0 (API)"}
                        for g in est.inference])
    line = (f"GPU-hours ({est.gpu}): fine-tune {est.finetune_gpu_hours:,.1f} in {len(est.placement_groups)} "
            f"placement groups (largest {est.max_group_gpus:g} GPUs), inference {est.inference_gpu_hours:,.1f}, "
            f"total {est.total_gpu_hours:,.1f}")
    if est.other_cells:
        line += "; not counted: " + ", ".join(f"{n} {k} cells (CPU)" for k, n in sorted(est.other_cells.items()))
    if est.unknown_params:
        line += f"; parameter count unknown for {', '.join(est.unknown_params)} (not counted)"
    return pgs, inf, line


def search_table(est: Estimate):
    """Each search's trial budget and estimated cost, or None when the plan has no search."""
    import polars as pl

    rows = [{"cell_id": p.cell_id, "searched fine-tune": p.label, "trials": p.search["trials"],
             "longest trial (epochs)": p.search["epochs"], "steps per trial": p.search["steps_per_trial"],
             "trial steps": p.search["trial_steps"], "GPU-hours": _fmt_hours(p.search["gpu_hours"]),
             "CPU core-hours": "unknown" if p.search["cpu_core_hours"] is None else f"{p.search['cpu_core_hours']:.2f}"}
            for p in est.placement_groups if p.search]
    if not rows:
        return None
    return pl.DataFrame(rows), (f"searches: {len(rows)}, at most {sum(r['trial steps'] for r in rows):,} optimizer "
                                "steps (every trial run out; ASHA stops some sooner)")


def search_budgets(plan: Plan, config: GridConfig, data_dir: str | None = None) -> list[dict]:
    """The trial budget and costs of each searched fine-tune cell of the plan."""
    if not any(c.kind == "finetune" and (c.recipe or {}).get("search") for c in plan.cells):
        return []
    return [p.search for p in estimate(plan, config, data_dir).placement_groups if p.search]


def print_resources(plan: Plan, config: GridConfig, data_dir: str | None = None, gpu: str = "A100") -> Estimate:
    from grid.terminal import print_table

    est = estimate(plan, config, data_dir, gpu)
    pgs, inf, line = resources_tables(est)
    print()
    print_table(pgs, f"placement groups: {len(est.placement_groups)} (one Ray Train run per fine-tune cell)")
    print()
    print_table(inf, f"inference actors: {len(est.inference)} models")
    print(line)
    if searches := search_table(est):
        print()
        print_table(*searches)
    for problem in memory_problems(est):
        print(f"warning: {problem}")
    print(ASSUMPTIONS.replace("{peak}", f"{GPU_TYPES[gpu]['bf16_flops'] / 1e12:g}"))
    return est


__all__ = [
    "Estimate",
    "InferenceGroup",
    "PlacementGroup",
    "check_fits",
    "estimate",
    "memory_problems",
    "model_params",
    "node_types_from_cluster",
    "print_resources",
    "training_state_bytes",
]
