"""Prompts: the templates under `prompts/` rendered for one example, reproducibly.

A prompt is a pure function of (task, shots, seed, example_id, text budget, sampler): the five
examples are drawn from the train split by a generator seeded with those values, never the
example itself (nor a train row with the same text), and long texts are cut to a budget counted
in whitespace tokens so that the cut does not depend on any model's tokenizer.

Three formats put the rendered text in front of a model: `chat` (the tokenizer's chat template;
the template's `system` block, if any, as the system message), `inst` (the paper's raw
`[INST] ... [/INST]` form) and `plain` (the text as is, for base models).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jinja2

from grid.errors import GridError
from grid.parsing import format_answer
from grid.tasks import TaskDef

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
PromptFormat = Literal["chat", "inst", "plain"]
Sampler = Literal["random", "stratified"]
# What a cell records of its sampler: the strategy and the version of its algorithm. A new
# version gets a new id, so cells whose shots were drawn the old way are not taken for new ones.
# stratified/2: labels in shuffled rounds until the shots are drawn (version 1 drew one example
# per label, so 3 shots on a 3-label task whose cell said 5).
SAMPLER_IDS = {"random": "random", "stratified": "stratified/2"}

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROMPTS_DIR),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=False,
)
_ENV.filters["pylist"] = lambda labels: str(list(labels))  # the paper's ['a', 'b'] form
_ENV.filters["jsonlist"] = lambda labels: json.dumps(list(labels))  # its ["a", "b"] form

_TOKEN = re.compile(r"\S+")


def cut_text(text: str, budget: int | None, tokenizer: Any = None) -> str:
    """The text up to the end of its `budget`-th whitespace word, original spacing kept; with a
    (fast) `tokenizer`, up to the end of its `budget`-th token of that model."""
    if budget is None:
        return text
    if tokenizer is not None:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text if len(offsets) <= budget else text[: offsets[budget - 1][1]]
    for i, match in enumerate(_TOKEN.finditer(text), 1):
        if i == budget:
            return text[: match.end()]
    return text


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt before any model-specific wrapping."""

    system: str | None
    user: str

    def as_text(self, fmt: PromptFormat, tokenizer: Any = None) -> str:
        """The string a model sees; `chat` needs the model's tokenizer."""
        if fmt == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise GridError("prompt format 'chat' needs a tokenizer with a chat template")
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": self.user}
            ]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        body = f"{self.system}\n{self.user}" if self.system else self.user
        if fmt == "inst":
            return f"[INST]{body} [/INST]"
        return body

    def answer_cue(self) -> Prompt:
        """The domain premise of PMI calibration: the user message's last line alone (`Label:`),
        without instruction, label list, examples or input, so that the log-prob of a label after
        it is the label's prior in this answer slot (Holtzman et al. 2021)."""
        return Prompt(system=None, user=self.user.splitlines()[-1])

    def messages(self) -> list[dict[str, str]]:
        """The OpenAI-style messages for chat APIs."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": self.user}
        ]


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def _template(name: str) -> jinja2.Template:
    try:
        return _ENV.get_template(f"{name}.jinja")
    except jinja2.TemplateNotFound:
        raise GridError(f"prompt template prompts/{name}.jinja does not exist") from None


@cache
def template_source_hash(task: TaskDef) -> str:
    """A hash of what a task's prompt reads: its template file, the examples macro, and the task
    fields a template fills in (a generic template is filled from the task file), so an edited
    prompt, description or label list makes new cells."""
    digest = hashlib.sha256()
    for file in (f"{task.prompt_name}.jinja", "_examples.jinja"):
        path = PROMPTS_DIR / file
        if not path.is_file():
            raise GridError(f"task {task.name}: prompt template prompts/{file} does not exist")
        digest.update(path.read_bytes())
    digest.update(json.dumps(_task_context(task), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _task_context(task: TaskDef) -> dict[str, Any]:
    """The task fields a template may read as `task`."""
    return {"name": task.name, "description": task.description, "input_name": task.input_name,
            "subtasks": [s.model_dump(mode="json") for s in task.subtasks]}


def render(
    task: TaskDef, labels: dict[str, tuple[str, ...]], text: str, examples: Sequence[dict[str, str]]
) -> Prompt:
    """Render the task's template; `examples` are dicts with `text` and `answer`."""
    template = _template(task.prompt_name)
    ctx = template.new_context({"labels": labels, "text": text, "examples": list(examples), "task": _task_context(task),
                                "examples_block": _template("_examples").module.examples_block})
    system = "".join(template.blocks["system"](ctx)).strip() if "system" in template.blocks else None
    user = "".join(template.blocks["query"](ctx)).strip()
    return Prompt(system=system or None, user=user)


class FewShotSampler:
    """Draws the five-shot examples of each test example from the train split, reproducibly."""

    def __init__(self, task: TaskDef, train_rows: Sequence[dict[str, Any]], sampler: str = "random"):
        self.task = task
        self.train = train_rows
        self.sampler = sampler.split("/")[0]  # a strategy, or a cell's sampler id (SAMPLER_IDS)
        key_field = task.subtasks[0].field
        self.by_label: dict[str, list[int]] = defaultdict(list)
        if task.subtasks[0].type == "label":
            for i, row in enumerate(train_rows):
                self.by_label[row[key_field]].append(i)

    def draw(self, example_id: str, text: str, shots: int, seed: int) -> list[int]:
        """Indices into the train rows; never the example itself or a row with the same text.
        Bounded: when the train split has fewer than `shots` such rows, a GridError says how many
        it found (a loop that waited for them would never end)."""
        if shots == 0:
            return []
        rng = random.Random(f"{self.task.name}|{seed}|{example_id}")

        def allowed(i: int) -> bool:
            row = self.train[i]
            return row["example_id"] != example_id and row["text"] != text

        if self.sampler == "stratified" and self.by_label:
            # every label once (in a shuffled order) before any twice, until `shots` are drawn
            labels = sorted(self.by_label)
            picked: list[int] = []
            while len(picked) < shots:
                before = len(picked)
                for label in rng.sample(labels, len(labels)):
                    pool = [i for i in self.by_label[label] if allowed(i) and i not in picked]
                    if pool and len(picked) < shots:
                        picked.append(rng.choice(pool))
                if len(picked) == before:  # every label's rows used up
                    raise self._too_few(shots, len(picked))
            return picked
        picked = []
        misses = 0
        while len(picked) < shots:
            i = rng.randrange(len(self.train))
            if i not in picked and allowed(i):
                picked.append(i)
            elif (misses := misses + 1) > 20 * shots + 200:  # so many misses: count what there is
                pool = [j for j in range(len(self.train)) if j not in picked and allowed(j)]
                if len(pool) < shots - len(picked):
                    raise self._too_few(shots, len(picked) + len(pool))
                picked += rng.sample(pool, shots - len(picked))
        return picked

    def _too_few(self, shots: int, found: int) -> GridError:
        return GridError(f"task {self.task.name}: {shots}-shot prompts need {shots} train rows other than the "
                         f"example (and rows of the same text); its train split has {found}")


def check_shots(plan: Any, data_dir: str | Path | None, source: str | Path) -> None:
    """Before any work: every task prompted with k shots has at least k train rows besides the
    rows that share the commonest text (an example's own text is never a shot of it), so that no
    cell fails on a sampler that cannot fill its prompt."""
    from collections import Counter

    from grid.data import load_split
    from grid.tasks import get_task

    shots: dict[str, int] = {}
    for cell in plan.cells:
        if cell.kind == "infer" and cell.shots:
            shots[cell.task] = max(shots.get(cell.task, 0), cell.shots)
    for name, k in sorted(shots.items()):
        texts = load_split(get_task(name), "train", data_dir)["text"]
        usable = len(texts) - max(Counter(texts).values(), default=0)
        if usable < k:
            raise GridError(f"{source}: field shots: {k}-shot prompts of task {name} need {k} train rows of "
                            f"other texts than the example's; its train split has {usable} "
                            f"({len(texts)} rows, {len(set(texts))} distinct texts)")


def gold_of(task: TaskDef, row: dict[str, Any]) -> dict[str, Any]:
    """The gold value of each sub-task for a normalized row."""
    return {sub.name: row[sub.field] for sub in task.subtasks}


CONTENT_FREE_INPUTS = ("N/A", "[MASK]", "")  # contextual calibration's inputs (Zhao et al. 2021)


class PromptBuilder:
    """Builds the prompt of any test example of one task; holds the train rows once."""

    def __init__(
        self,
        task: TaskDef,
        labels: dict[str, tuple[str, ...]],
        train_rows: Sequence[dict[str, Any]],
        text_budget: int | None = None,
        sampler: str = "random",
        budget_tokenizer: Any = None,
    ):
        """`budget_tokenizer`: count `text_budget` in this model's tokens, not in words."""
        self.task = task
        self.labels = labels
        self.train = train_rows
        self.budget = text_budget if text_budget is not None else task.text_budget
        self.budget_tokenizer = budget_tokenizer
        self.sampler = FewShotSampler(task, train_rows, sampler)

    def build(self, row: dict[str, Any], shots: int, seed: int, text: str | None = None) -> Prompt:
        """The example's prompt; with `text`, that text in place of the example's, after the same
        examples (they are drawn for the example, so calibration sees the demos it corrects)."""
        picks = self.sampler.draw(row["example_id"], row["text"], shots, seed)
        examples = [
            {"text": cut_text(self.train[i]["text"], self.budget, self.budget_tokenizer),
             "answer": format_answer(self.task, gold_of(self.task, self.train[i]))}
            for i in picks
        ]
        query = row["text"] if text is None else text
        return render(self.task, self.labels, cut_text(query, self.budget, self.budget_tokenizer), examples)

    def calibration_prompts(self, row: dict[str, Any], shots: int, seed: int, method: str) -> list[Prompt]:
        """The prompts whose label scores correct this example's (see workers.constrained.calibrate):
        `contextual`, its prompt with each content-free input in place of its text; `pmi`, the
        answer cue alone."""
        if method == "contextual":
            return [self.build(row, shots, seed, text=cf) for cf in CONTENT_FREE_INPUTS]
        if method == "pmi":
            return [self.build(row, shots, seed).answer_cue()]
        raise ValueError(f"unknown calibration {method!r}")
