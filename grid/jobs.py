"""What the grid hands a worker: plain, typed job descriptions that travel to Ray workers.

The grid engine (grid/execute.py) builds these from cells; workers never read the grid config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from grid.registry import FAMILIES

Family = Literal[tuple(FAMILIES)]  # the families of grid/registry.py
PromptFormat = Literal["chat", "inst", "plain"]


# Every knob of a fine-tune recipe and its default, overridable through `hparams` (a recipe's, a
# model's, a finetuned_from's). Here, not in the trainers, so a grid config is checked against
# them when it is loaded, before any work, without importing torch. The loop's knobs are shared
# (workers/training.py runs both trainers' loops); each family has its own defaults and extras.
TRAINING_HPARAMS: dict[str, Any] = {  # workers/training.py
    "lr": 1e-4,                   # AdamW learning rate
    "epochs": 1,                  # passes over the train rows (when max_steps is None)
    "max_steps": None,            # optimizer steps in all, counting resumed ones; overrides epochs
    "batch_size": 8,              # examples per optimizer step, split across workers
    "max_length": 2048,           # tokens per example
    "weight_decay": 0.0,          # 0: plain Adam, as in the paper
    "warmup_steps": 0,            # linear warm-up over this many steps ...
    "warmup_ratio": 0.0,          # ... or this share of the steps (when warmup_steps is 0); then linear decay to 0
    "max_grad_norm": 1.0,
    "checkpoint_every_steps": 500,  # also checkpoint every N steps (epoch ends and the last step always are)
    "checkpoints_to_keep": 2,
    "group_batches": 50,          # length-grouping window, in batches
    "log_every_steps": 50,        # 0: no progress lines
}

DECODER_HPARAMS: dict[str, Any] = TRAINING_HPARAMS | {  # workers/train_decoder.py
    "lr": 1e-4,                   # the paper's 1e-6 is for 8B models
    "batch_size": 8,              # the paper: 8
    "max_length": 2048,           # examples longer than this (prompt + answer) are dropped, counted
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",  # or a list of module names, e.g. ["q_proj", "v_proj"]
    "lora_layers": None,          # adapt only the last N transformer layers: the backward pass
                                  # stops at the lowest adapted one (about 2x faster on a CPU)
    "heads": [],                  # tasks classified by a linear head on the prompt's last token
                                  # instead of answered in text (seed 003's shared body)
    "loss_weights": {},           # with heads: each task's weight in the loss (default 1)
    "head_norm": "none",          # standardize: each head reads its features standardized by the
                                  # untuned body's mean and std on its train rows (LabelHead);
                                  # fixed, so a body lr that moves the states by more than their
                                  # spread across rows throws the head off (metrics: head_features)
    "head_lr": None,              # the heads' learning rate (default lr)
    "head_init": "random",        # probe: each head starts as a logistic regression fitted on the
                                  # untuned body's states (what it reads) on its train rows, then
                                  # trains with the body (linear probing, then fine-tuning: LP-FT)
}

ENCODER_HPARAMS: dict[str, Any] = TRAINING_HPARAMS | {  # workers/train_encoder.py
    "epochs": None,               # None: the task's encoder_epochs (the paper's, by dataset)
    "batch_size": 32,             # the paper's
    "lr": 1e-5,                   # the paper's
    "max_length": 512,            # tokens per text, truncated
    "checkpoint_every_steps": 0,
}


def hparams_schema(family: str) -> dict[str, Any]:
    """The knobs a family's trainer takes, with their defaults."""
    return DECODER_HPARAMS if family == "decoder" else ENCODER_HPARAMS


def unknown_hparams(family: str, hparams: dict[str, Any]) -> str | None:
    """None, or a sentence naming the keys `family`'s trainer does not take, and the known ones."""
    known = hparams_schema(family)
    unknown = sorted(set(hparams) - set(known))
    if not unknown:
        return None
    return f"unknown {family} hparams {', '.join(unknown)}; known: {', '.join(known)}"


def placement_strategy(num_workers: int, gpus_per_worker: float, node_gpus: float) -> str:
    """STRICT_PACK when the group's GPUs fit on one node (DeepSpeed ZeRO-3 all-gathers every
    layer's parameters at every step: keep it on NVLink, never across the network), else PACK (as
    few nodes as possible); CPU-only groups are PACK."""
    if gpus_per_worker <= 0:
        return "PACK"
    return "STRICT_PACK" if num_workers * gpus_per_worker <= node_gpus else "PACK"


class Resources(BaseModel):
    """How a training job is placed: Ray Train workers, each with its CPUs and GPUs."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    deepspeed_stage: Literal[0, 2, 3] = Field(
        default=0, description="0: plain DDP; 2/3: DeepSpeed ZeRO (bf16 on GPU, fp32 on CPU)"
    )
    zero_offload: Literal["none", "optimizer", "all"] = Field(
        default="none", description="ZeRO CPU offload: the optimizer states (stage 2 or 3), or "
        "also the weights (stage 3), for models whose training state does not fit the GPUs "
        "(a 70B full fine-tune on 8 x 80 GB); `grid/run.py --dry-run` prints the GiB per GPU")
    custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each worker needs, to pin training to "
        "the nodes that declare them (`ray start --resources`, cluster.yaml's node types)")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> Resources:
        if self.zero_offload != "none" and self.deepspeed_stage == 0:
            raise ValueError("zero_offload needs deepspeed_stage 2 or 3")
        if self.zero_offload == "all" and self.deepspeed_stage != 3:
            raise ValueError("zero_offload 'all' (the weights too) needs deepspeed_stage 3")
        return self

    def scaling_config(self, node_gpus: float | None = None):
        """Ray Train's ScalingConfig for these resources, with the placement strategy the dry run
        prints (`placement_strategy`); `node_gpus` defaults to the largest live node's GPUs."""
        from ray.train import ScalingConfig

        if node_gpus is None:
            import ray

            node_gpus = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        use_gpu = self.gpus_per_worker > 0
        return ScalingConfig(
            num_workers=self.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker} if use_gpu else {})
            | self.custom_resources,
            placement_strategy=placement_strategy(self.num_workers, self.gpus_per_worker, node_gpus))

    @model_serializer(mode="wrap")
    def _omit_no_offload(self, handler: Any) -> dict[str, Any]:
        """Without offload (or custom resources) the field is left out, so the cell ids of recipes
        written before it existed stay the same (a cell id hashes its recipe; custom resources,
        a placement, never enter it: grid/plan.py)."""
        data = handler(self)
        if self.zero_offload == "none":
            data.pop("zero_offload", None)
        if not self.custom_resources:
            data.pop("custom_resources", None)
        return data


class Validation(BaseModel):
    """Train rows held out to compare a search's trials on: a seeded sample of the job's train rows
    (after `train_limit`), never trained on; the test split is never read for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = Field(default=0.1, gt=0, le=0.5, description="share of the train rows held out")
    seed: int = Field(default=0, description="which rows")


class FinetuneJob(BaseModel):
    """One fine-tune cell: train `model` on `task` and save the result under `output_dir`.

    `output_dir/model/` is the final artifact (loadable with from_pretrained, or the encoder's
    own format for encoder heads); `output_dir/checkpoints/` holds resumable checkpoints; the
    job resumes from the newest one there instead of starting at step 0.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local path of the resolved model (workers.models.resolve), or a grid-made "
                       "model's folder or URI (each worker fetches it: workers/artifacts.py)")
    family: Family
    task: str = Field(description="catalog task name; its sub-tasks decide the heads or the answer")
    mode: Literal["full", "lora"]
    shots: int = 0
    prompt_format: PromptFormat = "plain"
    text_budget: int | None = None
    text_budget_unit: Literal["words", "tokens"] = "words"
    sampler: str = Field(default="random", description="the cell's few-shot sampler id (grid.prompting.SAMPLER_IDS)")
    seed: int = 0
    train_limit: int | None = Field(default=None, description="seeded subsample of the train split")
    mix_with: tuple[str, ...] = Field(
        default=(), description="decoders: tasks trained together with `task` (one shuffled union, "
        "train_limit rows of each, each row under its own task's prompt)")
    hparams: dict[str, Any] = Field(default_factory=dict)
    data_dir: str | None = None
    output_dir: str = Field(description="the cell's folder: a local or shared path, or an object-store URI")
    resources: Resources = Resources()
    validation: Validation | None = Field(
        default=None, description="hold out these train rows and report val_loss / val_accuracy at "
        "every epoch end (a search's trials are compared on them)")
