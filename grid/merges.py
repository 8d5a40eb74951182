"""Merges as a grid names them, typed: what a grid's `merges:` entry says, and the checks of it
that need neither mergekit nor any weights (the grid loads and plans with these; merge/ runs the
merge with mergekit and adds the checks that need it: merge/config.py).

A merge is a mergekit configuration (mergekit's own YAML schema) whose model paths are
placeholders, `${name}`, bound to models of the grid or to hub ids / local paths. It is written
either inline in the grid (method, base, models with weight / density, parameters) or as a recipe
file in merge/ (a mergekit YAML a person reads top to bottom) with a `bind:` map. Both become the
same template: a mergekit dict with placeholders, plus what each placeholder names.

Every problem is one MergeError line naming the field: a method this project does not merge with,
a parameter the method rejects (density outside (0, 1], density for task_arithmetic, lambda for
linear), an unknown placeholder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grid.errors import GridError, read_yaml_mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = PROJECT_ROOT / "merge"

MergeMethod = Literal["task_arithmetic", "ties", "dare_ties", "linear"]
METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties", "linear")
# Parameters each method takes, per input (`weight`, `density`) and for the whole merge (shared).
NEEDS_BASE = {"task_arithmetic", "ties", "dare_ties"}
PER_INPUT = {"task_arithmetic": {"weight"}, "ties": {"weight", "density"},
             "dare_ties": {"weight", "density"}, "linear": {"weight"}}
SHARED = {"task_arithmetic": {"lambda", "normalize", "rescale", "int8_mask"},
          "ties": {"lambda", "normalize", "rescale", "int8_mask"},
          "dare_ties": {"lambda", "normalize", "rescale", "int8_mask"},
          "linear": {"normalize"}}
PLACEHOLDER = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class MergeError(GridError):
    """A merge config that cannot run, in one line naming the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Strict):
    """A model a merge reads: a model of the grid, one of its fine-tune cells, or a hub id / path.

    `{model: tiny-base}` is the grid's model as declared; `{model: tiny-base, task: fpb-sentiment,
    finetune: lora}` is the fine-tune cell of that model on that task (its saved, merged model);
    `{source: org/name}` or `{source: /abs/path}` is a model outside the grid (a LoRA adapter folder
    is merged into its base with peft first).
    """

    model: str | None = Field(default=None, description="a model name of the grid")
    task: str | None = Field(default=None, description="with finetune: that model's fine-tune cell")
    finetune: Literal["full", "lora"] | None = None
    shots: int = Field(default=0, description="training prompt shots of the fine-tune cell")
    seed: int | None = Field(default=None, description="of the fine-tune cell; default the grid's first")
    source: str | None = Field(default=None, description="hub id or local path, outside the grid")
    revision: str | None = None
    weight: float | None = Field(default=None, description="task-vector / linear weight")
    density: float | None = Field(default=None, gt=0, le=1, description="share of each delta kept (ties, dare_ties)")

    @model_validator(mode="after")
    def _one_kind(self) -> ModelRef:
        if (self.model is None) == (self.source is None):
            raise ValueError("name exactly one of model (a grid model) or source (hub id or path)")
        if (self.task is None) != (self.finetune is None):
            raise ValueError("task and finetune go together: they name a fine-tune cell")
        if self.source is not None and self.task is not None:
            raise ValueError("task/finetune name a fine-tune cell of a grid model, not of a source")
        if self.weight is not None and not math.isfinite(self.weight):
            raise ValueError("weight must be a finite number")
        return self

    def describe(self) -> str:
        if self.source:
            return self.source
        return f"{self.model}" + (f" ft={self.finetune} on {self.task}" if self.task else "")


class MergeSpec(Strict):
    """One merge of a grid; the merged model becomes a model of the grid named `name`.

    Inline: `method`, `base` (the model task vectors are taken against), `models` (with weight,
    density), `parameters` (lambda, normalize, ...). Or a recipe: `recipe: merge/x.yaml` (mergekit
    schema with `${name}` placeholders) and `bind: {name: ModelRef}`.
    """

    name: str = Field(description="the merged model's name in the grid's tables")
    method: MergeMethod | None = None
    base: ModelRef | None = None
    models: tuple[ModelRef, ...] = ()
    parameters: dict[str, float | bool] = Field(default_factory=dict, description="shared: lambda, normalize, ...")
    recipe: str | None = Field(default=None, description="a mergekit YAML in merge/ with ${name} placeholders")
    bind: dict[str, ModelRef] = Field(default_factory=dict, description="placeholder -> model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prompt_format: Literal["chat", "inst", "plain"] | None = Field(
        default=None, description="default: that of the first grid model it merges")
    random_seed: int = Field(default=0, ge=0, description="the seed of DARE's random drop masks (mergekit's "
                             "random_seed); one merge per seed shows how much the masks move a result")

    @model_validator(mode="after")
    def _seeded_only_when_random(self) -> MergeSpec:
        if not self.random_seed:
            return self
        try:
            method = self.method or (load_recipe(self.recipe).get("merge_method") if self.recipe else None)
        except GridError as exc:  # a ValueError, so that the error names the grid file and the field
            raise ValueError(str(exc)) from None
        if method != "dare_ties":
            raise ValueError(f"random_seed: {method} draws no random mask; only dare_ties takes a seed")
        return self

    @model_validator(mode="after")
    def _shape(self) -> MergeSpec:
        if self.recipe is not None:
            if self.method or self.base or self.models or self.parameters:
                raise ValueError("a recipe merge takes recipe and bind only (method, weights, ... are in the recipe)")
            if not self.bind:
                raise ValueError("a recipe merge needs bind: {placeholder: model}")
            try:  # a ValueError, so that the error names the grid file and the merge's field
                template = load_recipe(self.recipe)
                check_template(template, where=f"recipe {self.recipe}")
            except GridError as exc:
                raise ValueError(str(exc)) from None
            names = placeholders(template)
            if set(names) != set(self.bind):
                missing, extra = sorted(set(names) - set(self.bind)), sorted(set(self.bind) - set(names))
                what = f"no binding for {missing}" if missing else f"{extra} not used by the recipe"
                raise ValueError(f"bind: {what} (the recipe's placeholders: {names})")
            for key, ref in self.bind.items():
                if ref.weight is not None or ref.density is not None:
                    raise ValueError(f"bind.{key}: weights and densities belong in the recipe")
            return self
        if self.method is None:
            raise ValueError("give method (task_arithmetic, ties, dare_ties, linear) or recipe")
        if not self.models:
            raise ValueError("models: a merge needs at least one model")
        if self.method in NEEDS_BASE and self.base is None:
            raise ValueError(f"base: {self.method} takes task vectors against a base model; name one")
        if self.method == "linear" and self.base is not None:
            raise ValueError("base: linear averages the models and takes no base")
        if self.base is not None and (self.base.weight is not None or self.base.density is not None):
            raise ValueError("base: the base model takes no weight or density")
        for i, ref in enumerate(self.models):
            if ref.weight is None:
                raise ValueError(f"models.{i}.weight: {self.method} needs a weight for every model")
            if ref.density is not None and "density" not in PER_INPUT[self.method]:
                raise ValueError(f"models.{i}.density: {self.method} does not sparsify; "
                                 "density is for ties and dare_ties")
        for key in self.parameters:
            if key not in SHARED[self.method]:
                raise ValueError(f"parameters.{key}: {self.method} takes {', '.join(sorted(SHARED[self.method]))}")
        return self

    def template(self) -> tuple[dict[str, Any], dict[str, ModelRef]]:
        """The mergekit config with `${name}` placeholders, and what each placeholder names."""
        if self.recipe is not None:
            return load_recipe(self.recipe), dict(self.bind)
        bind: dict[str, ModelRef] = {}
        cfg: dict[str, Any] = {"merge_method": self.method, "dtype": self.dtype}
        if self.base is not None:
            bind["base"] = self.base
            cfg["base_model"] = "${base}"
        models = []
        for i, ref in enumerate(self.models):
            bind[f"model_{i}"] = ref
            params = {k: v for k, v in (("weight", ref.weight), ("density", ref.density)) if v is not None}
            models.append({"model": f"${{model_{i}}}", "parameters": params})
        cfg["models"] = models
        if self.parameters:
            cfg["parameters"] = dict(self.parameters)
        return cfg, bind


# --- recipes and placeholders ----------------------------------------------------------------


def recipe_path(name: str) -> Path:
    """`merge/x.yaml`, `x.yaml` or `x` (in merge/), or any path to a YAML file."""
    for candidate in (Path(name), PROJECT_ROOT / name, RECIPE_DIR / name, RECIPE_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise MergeError(f"merge recipe {name} not found (looked in {RECIPE_DIR})")


def load_recipe(name: str) -> dict[str, Any]:
    return read_yaml_mapping(recipe_path(name), "a merge recipe (mergekit's schema)")


def model_fields(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field path, value) of every model reference of a mergekit config (models-style configs)."""
    out = []
    if "base_model" in cfg and cfg["base_model"] is not None:
        out.append(("base_model", cfg["base_model"]))
    for i, entry in enumerate(cfg.get("models") or []):
        if isinstance(entry, dict):
            out.append((f"models.{i}.model", entry.get("model")))
    ts = cfg.get("tokenizer_source")
    if isinstance(ts, str) and ts not in ("base", "union"):
        out.append(("tokenizer_source", ts))
    return out


def placeholders(cfg: dict[str, Any]) -> list[str]:
    names = []
    for _, value in model_fields(cfg):
        m = PLACEHOLDER.match(str(value))
        if m and m.group(1) not in names:
            names.append(m.group(1))
    return names


def substitute(cfg: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """A copy of `cfg` with each `${name}` model field replaced by values[name]."""
    out = json.loads(json.dumps(cfg))

    def sub(value: Any, field: str) -> Any:
        m = PLACEHOLDER.match(str(value))
        if not m:
            return value
        if m.group(1) not in values:
            raise MergeError(f"field {field}: placeholder ${{{m.group(1)}}} has no binding")
        return values[m.group(1)]

    if out.get("base_model") is not None:
        out["base_model"] = sub(out["base_model"], "base_model")
    for i, entry in enumerate(out.get("models") or []):
        entry["model"] = sub(entry.get("model"), f"models.{i}.model")
    if isinstance(out.get("tokenizer_source"), str):
        out["tokenizer_source"] = sub(out["tokenizer_source"], "tokenizer_source")
    return out


# --- checks -----------------------------------------------------------------------------------


def fail(where: str, field: str, message: str) -> MergeError:
    prefix = f"{where}: " if where else ""
    return MergeError(f"{prefix}field {field}: {message}")


def check_template(cfg: dict[str, Any], where: str = "merge config") -> None:
    """Method and parameters of a mergekit config (placeholders or paths): no file is read."""
    method = cfg.get("merge_method")
    if method not in METHODS:
        raise fail(where, "merge_method", f"{method!r} is not one of {', '.join(METHODS)}")
    for key in ("slices", "modules"):
        if cfg.get(key):
            raise fail(where, key, "only `models:` merges are supported here (no slices or modules)")
    models = cfg.get("models")
    if not isinstance(models, list) or not models:
        raise fail(where, "models", "a merge needs a non-empty list of models")
    if method in NEEDS_BASE and not cfg.get("base_model"):
        raise fail(where, "base_model", f"{method} takes task vectors against a base model; name one")

    def check_value(field: str, key: str, value: Any) -> None:
        if key in ("weight", "density", "lambda") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise fail(where, field, f"{value!r} is not a number")
        if key == "density" and not 0 < value <= 1:
            raise fail(where, field, f"{value} is outside (0, 1]")

    for key, value in (cfg.get("parameters") or {}).items():
        allowed = SHARED[method] | PER_INPUT[method]
        if key not in allowed:
            raise fail(where, f"parameters.{key}", f"{method} takes {', '.join(sorted(allowed))}")
        check_value(f"parameters.{key}", key, value)
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise fail(where, f"models.{i}", "each entry is {model: ..., parameters: {...}}")
        params = entry.get("parameters") or {}
        for key, value in params.items():
            if key not in PER_INPUT[method]:
                extra = "; density is for ties and dare_ties" if key == "density" else ""
                raise fail(where, f"models.{i}.parameters.{key}",
                            f"{method} takes {', '.join(sorted(PER_INPUT[method]))} per model{extra}")
            check_value(f"models.{i}.parameters.{key}", key, value)
        if "weight" not in params and "weight" not in (cfg.get("parameters") or {}):
            raise fail(where, f"models.{i}.parameters.weight", f"{method} needs a weight for every model")
