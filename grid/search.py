"""A fine-tune recipe's hyper-parameter search: the typed spec, its budget, and the plan's check.

A recipe may give `search:` beside its fixed `hparams`; its fine-tune cell then runs a Ray Tune
experiment (workers/search.py) instead of one Ray Train job. The spec is part of the recipe, and so
of the cell id, only when it is set (Recipe's serializer leaves it out otherwise): every grid
written before it keeps its cells.

    recipes:
      encoder/full:
        hparams: {batch_size: 32, max_length: 64}
        search:
          space: {lr: {loguniform: [1.0e-5, 3.0e-4]}, epochs: {choice: [4, 8, 12]}}
          trials: 6
          metric: val_accuracy                       # or val_loss
          validation: {fraction: 0.1, seed: 0}       # carved from train (the task's own validation
                                                     # split where it declares one); never the test split
          scheduler: {asha: {grace_period: 2, reduction_factor: 2}}
          seed: 0                                    # which points of the space are drawn

The trial budget of a search is trials x the steps of its longest trial (every trial run to the
largest `epochs` the space allows): what a search costs at most, since ASHA only ever stops trials
earlier. A grid's `search_budget` caps the sum over its searches, in optimizer steps or GPU-hours;
`check_budget` refuses a plan over it, before any work.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grid.errors import GridError
from grid.jobs import Validation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogUniform(_Strict):
    """A float drawn uniformly in log space (learning rates)."""

    loguniform: tuple[float, float]

    @model_validator(mode="after")
    def _bounds(self) -> LogUniform:
        low, high = self.loguniform
        if not 0 < low < high:
            raise ValueError(f"loguniform needs 0 < low < high, got {list(self.loguniform)}")
        return self


class Uniform(_Strict):
    """A float drawn uniformly between two bounds."""

    uniform: tuple[float, float]

    @model_validator(mode="after")
    def _bounds(self) -> Uniform:
        if not self.uniform[0] < self.uniform[1]:
            raise ValueError(f"uniform needs low < high, got {list(self.uniform)}")
        return self


class Choice(_Strict):
    """One of the listed values (epochs, LoRA rank, batch size)."""

    choice: tuple[Any, ...] = Field(min_length=1)


class RandInt(_Strict):
    """An integer between two bounds, both included."""

    randint: tuple[int, int]

    @model_validator(mode="after")
    def _bounds(self) -> RandInt:
        if not self.randint[0] <= self.randint[1]:
            raise ValueError(f"randint needs low <= high, got {list(self.randint)}")
        return self


Dimension = LogUniform | Uniform | Choice | RandInt


def largest(dimension: Dimension) -> Any:
    """The largest value a dimension can draw (for the budget: the longest trial)."""
    if isinstance(dimension, Choice):
        return max(dimension.choice)
    if isinstance(dimension, RandInt):
        return dimension.randint[1]
    return (dimension.loguniform if isinstance(dimension, LogUniform) else dimension.uniform)[1]


class Asha(_Strict):
    """Asynchronous successive halving (Li et al. 2020): at each rung (grace_period epochs, then x
    reduction_factor) a trial goes on only if it is in the top 1/reduction_factor of the trials
    that reached that rung."""

    grace_period: int = Field(default=1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(default=2, gt=1)


class Scheduler(_Strict):
    asha: Asha | None = Field(default_factory=Asha, description="null: no early stopping, every trial runs out")


Metric = Literal["val_accuracy", "val_loss"]


class SearchSpec(_Strict):
    """A hyper-parameter search: where to look, how many trials, what to compare them on."""

    space: dict[str, Dimension] = Field(min_length=1, description="hparams drawn per trial, over the recipe's")
    trials: int = Field(gt=0, description="points of the space tried")
    metric: Metric = Field(default="val_accuracy", description="reported on the validation rows at every epoch end")
    validation: Validation = Validation()
    scheduler: Scheduler = Scheduler()
    seed: int = Field(default=0, description="the seed of the draws from the space")
    concurrent: int = Field(default=1, gt=0, description="trials at once (Ray queues what does not fit)")

    @model_validator(mode="after")
    def _integer_epochs(self) -> SearchSpec:
        """Epochs count whole passes (ASHA's rungs are epochs): only a choice of integers or a randint."""
        epochs = self.space.get("epochs")
        if epochs is not None and not (isinstance(epochs, RandInt) or (
                isinstance(epochs, Choice) and all(isinstance(v, int) and v > 0 for v in epochs.choice))):
            raise ValueError("space.epochs: epochs are searched as {choice: [positive integers]} "
                             "or {randint: [low, high]}")
        return self

    @property
    def mode(self) -> Literal["max", "min"]:
        return "min" if self.metric == "val_loss" else "max"

    def longest_trial_epochs(self, hparams: dict[str, Any], task_epochs: int) -> int:
        """The epochs of the longest trial: the space's largest, else the recipe's (or the task's)."""
        if "epochs" in self.space:
            return int(largest(self.space["epochs"]))
        return int(hparams.get("epochs") or task_epochs)


class SearchBudget(_Strict):
    """What a grid's searches may spend at most, summed over them (either cap, or both)."""

    trial_steps: int | None = Field(default=None, gt=0, description="optimizer steps of every trial run out")
    gpu_hours: float | None = Field(default=None, gt=0, description="the dry run's GPU-hour estimate, x trials")


# --- what a search costs --------------------------------------------------------------------


def trial_budget(cell: Any, n_train: int) -> dict[str, Any]:
    """A search cell's trials, the steps of its longest trial and their product (every trial run
    out: the most the search can cost). `n_train` is the train rows before the validation cut."""
    from grid.tasks import get_task

    recipe = cell.recipe or {}
    spec = SearchSpec.model_validate(recipe["search"])
    hparams = recipe.get("hparams") or {}
    task = get_task(cell.task)
    epochs = spec.longest_trial_epochs(hparams, task.encoder_epochs or 1)
    batch = (int(largest(spec.space["batch_size"])) if "batch_size" in spec.space
             else int(hparams.get("batch_size") or 32))
    # a declared validation split leaves every train row to fit on
    fit_rows = n_train if task.data.has_validation else n_train - validation_rows(n_train, spec.validation.fraction)
    steps_per_epoch = max(1, math.ceil(fit_rows / batch))
    if hparams.get("max_steps"):
        steps = int(hparams["max_steps"])
    else:
        steps = epochs * steps_per_epoch
    return {"trials": spec.trials, "epochs": epochs, "steps_per_trial": steps, "trial_steps": spec.trials * steps}


def validation_rows(n_train: int, fraction: float) -> int:
    """How many of a job's train rows are held out to compare trials on (at least one)."""
    return max(1, round(n_train * fraction))


def check_budget(budgets: list[dict[str, Any]], cap: SearchBudget | None, source: str) -> None:
    """Refuse a plan whose searches could cost more than the grid's `search_budget`."""
    if cap is None or not budgets:
        return
    steps = sum(b["trial_steps"] for b in budgets)
    if cap.trial_steps is not None and steps > cap.trial_steps:
        raise GridError(f"{source}: field search_budget.trial_steps: the plan's searches need up to {steps:,} "
                        f"optimizer steps (trials x steps of the longest trial), over the budget of "
                        f"{cap.trial_steps:,}; lower trials, epochs or train_limit, or raise the budget")
    hours = [b.get("gpu_hours") for b in budgets]
    if cap.gpu_hours is not None:
        if any(h is None for h in hours):
            raise GridError(f"{source}: field search_budget.gpu_hours: a searched model's parameter count is "
                            "unknown, so its GPU-hours cannot be estimated; cap trial_steps instead")
        if sum(hours) > cap.gpu_hours:
            raise GridError(f"{source}: field search_budget.gpu_hours: the plan's searches need up to "
                            f"{sum(hours):,.2f} GPU-hours, over the budget of {cap.gpu_hours:,.2f}")
