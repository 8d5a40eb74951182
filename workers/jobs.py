"""What the grid hands a worker: plain, typed job descriptions that travel to Ray workers.

The grid engine (grid/execute.py) builds these from cells; workers never read the grid config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

Family = Literal["encoder", "decoder", "api"]
PromptFormat = Literal["chat", "inst", "plain"]


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

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "Resources":
        if self.zero_offload != "none" and self.deepspeed_stage == 0:
            raise ValueError("zero_offload needs deepspeed_stage 2 or 3")
        if self.zero_offload == "all" and self.deepspeed_stage != 3:
            raise ValueError("zero_offload 'all' (the weights too) needs deepspeed_stage 3")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_offload(self, handler: Any) -> dict[str, Any]:
        """Without offload the field is left out, so the cell ids of recipes written before it
        existed stay the same (a cell id hashes its recipe)."""
        data = handler(self)
        if self.zero_offload == "none":
            data.pop("zero_offload", None)
        return data


class FinetuneJob(BaseModel):
    """One fine-tune cell: train `model` on `task` and save the result under `output_dir`.

    `output_dir/model/` is the final artifact (loadable with from_pretrained, or the encoder's
    own format for encoder heads); `output_dir/checkpoints/` holds resumable checkpoints; the
    job resumes from the newest one there instead of starting at step 0.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local path of the resolved model (workers.models.resolve)")
    family: Family
    task: str = Field(description="catalog task name; its sub-tasks decide the heads or the answer")
    mode: Literal["full", "lora"]
    shots: int = 0
    prompt_format: PromptFormat = "plain"
    text_budget: int | None = None
    sampler: Literal["random", "stratified"] = "random"
    seed: int = 0
    train_limit: int | None = Field(default=None, description="seeded subsample of the train split")
    mix_with: tuple[str, ...] = Field(
        default=(), description="decoders: tasks trained together with `task` (one shuffled union, "
        "train_limit rows of each, each row under its own task's prompt)")
    hparams: dict[str, Any] = Field(default_factory=dict)
    data_dir: str | None = None
    output_dir: str
    resources: Resources = Resources()
