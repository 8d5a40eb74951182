"""The training core that both trainers use, so that they cannot drift apart.

torchtune's shape: each trainer (workers/train_encoder.py, workers/train_decoder.py) reads top to
bottom and keeps only what is its own (the model and its heads, the collation, the loss); what
they share lives here, once:

- `resolve_hparams`: one schema per family (grid/jobs.py), checked the same way at plan time
  and in the worker, with the same error;
- `train_indices`: which train rows a `train_limit` keeps (a seeded sample, in file order);
- `epoch_batches`: length-grouped global batches, a pure function of (seed, epoch), each worker
  taking its slice, so the step count does not depend on the number of workers;
- `linear_schedule`: linear warm-up (`warmup_steps`, or `warmup_ratio` of the steps), then
  linear decay to 0;
- `train`: the step loop, with resume from Ray Train's newest checkpoint, checkpoints every
  `checkpoint_every_steps`, at each epoch end and at the last step, per-head loss logging, and
  throughput (non-pad tokens summed over workers, divided by the slowest worker's step time);
- `fit`: the Ray Train job around a trainer's worker loop; its metrics come back in a file
  (Ray's `Result.metrics` holds the newest checkpoint's metrics, not the last report's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid import uris
from grid.errors import GridError
from grid.jobs import FinetuneJob, Validation, hparams_schema, unknown_hparams
from workers import artifacts
from workers.batching import length_grouped_batches

METRICS_FILE = "train_metrics.json"


# --- what to train on, in what order --------------------------------------------------------


def resolve_hparams(job: FinetuneJob, task_epochs: int | None = None) -> dict[str, Any]:
    """The job's hyper-parameters over its family's defaults; `epochs: None` is the task's own
    (the paper's per-dataset epochs, for encoders)."""
    if problem := unknown_hparams(job.family, job.hparams):
        raise GridError(f"{job.family} fine-tune of {job.task}: {problem}")
    hp = {**hparams_schema(job.family), **job.hparams}
    if hp["epochs"] is None:
        hp["epochs"] = task_epochs or 1
    return hp


def train_indices(num_rows: int, limit: int | None, seed: int) -> list[int]:
    """The train rows a job uses: all, or a seeded sample of `limit` of them in file order."""
    if limit is None or limit >= num_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), limit))


def split_validation(rows: Any, validation: Validation | None, declared: Any = None
                     ) -> tuple[Any, Any, dict[str, Any] | None]:
    """(rows to train on, held-out rows, what was held out) of a job's train rows (a datasets
    Dataset, after `train_limit`). The task's own validation split where it declares one
    (`declared`: its rows, all of them; every train row is trained on), else a seeded sample of
    `validation.fraction` of the train rows, never trained on. The record keeps where the rows
    came from, their number and a hash of their example ids."""
    if validation is None:
        return rows, None, None
    if declared is not None:
        return rows, declared, {"split": "validation", "rows": len(declared), "train_rows": len(rows),
                                "example_ids_sha256": _ids_hash(declared)}
    from grid.search import validation_rows

    held = set(random.Random(validation.seed).sample(range(len(rows)), validation_rows(len(rows), validation.fraction)))
    if len(held) == len(rows):
        raise GridError(f"{len(rows)} train rows are too few to hold {validation.fraction:g} of them "
                        "out for validation")
    held_out = rows.select(sorted(held))
    return rows.select([i for i in range(len(rows)) if i not in held]), held_out, {
        "fraction": validation.fraction, "seed": validation.seed, "rows": len(held_out),
        "train_rows": len(rows) - len(held),
        "example_ids_sha256": _ids_hash(held_out)}


def _ids_hash(rows: Any) -> str:
    return hashlib.sha256("\n".join(str(i) for i in rows["example_id"]).encode()).hexdigest()[:16]


def epoch_batches(lengths: list[int], hp: dict[str, Any], seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> list[list[int]]:
    """This worker's slice of each global batch of an epoch (a batch too small to give every
    worker a row is dropped); the same on every rerun, so a resumed run sees the same batches."""
    batches = length_grouped_batches(lengths, hp["batch_size"], f"{seed}|epoch{epoch}", hp["group_batches"])
    return [b[rank::world] for b in batches if len(b) >= world]


def linear_schedule(optimizer: Any, hp: dict[str, Any], total_steps: int):
    """Linear warm-up, then linear decay to 0 at `total_steps` (transformers' linear schedule)."""
    import torch

    warmup = hp["warmup_steps"] or math.ceil(hp["warmup_ratio"] * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps_of(hp: dict[str, Any], steps_per_epoch: int) -> int:
    """`max_steps` when set (counted over resumed runs too), else epochs x steps per epoch."""
    return hp["max_steps"] or hp["epochs"] * steps_per_epoch


# --- the loop -------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimizer step reports: the loss, each head's loss, real and padded tokens."""

    loss: float
    tokens: int
    pads: int
    head_losses: dict[str, float] = field(default_factory=dict)


@dataclass
class Hooks:
    """What a trainer hands the loop: one optimizer step on a batch of example indices, and the
    state a checkpoint keeps (written into / read from a folder, by this worker)."""

    step: Callable[[list[int]], StepResult]
    save_state: Callable[[Path, int], None]   # (folder, rank): rank 0 writes, or each its shard
    load_state: Callable[[Path], None]
    scheduler: Any  # its lr is set again after a resume: a rerun with more steps has a longer schedule
    # The held-out rows' metrics (val_loss, val_accuracy), reported at every epoch end when the job
    # has a validation split: a search compares and stops its trials on them.
    evaluate: Callable[[], dict[str, float]] | None = None


def train(hooks: Hooks, lengths: list[int], hp: dict[str, Any], seed: int) -> dict[str, Any]:
    """Run the optimizer steps left (after resuming from Ray Train's newest checkpoint) and return
    the run's metrics (every worker returns the same, reduced across workers)."""
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    steps_per_epoch = len(epoch_batches(lengths, hp, seed, 0, rank, world))
    if steps_per_epoch == 0:
        raise GridError(f"{len(lengths)} examples are too few for {world} workers")
    total = total_steps_of(hp, steps_per_epoch)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = _restore(Path(d), rank, hooks)
    else:
        torch.manual_seed(seed * 1000 + rank)  # dropout: each worker its own stream

    val_curve: list[dict[str, float]] = []

    def save_checkpoint(step: int, loss: float) -> None:
        report = {"step": step, "loss": loss, "epoch": step / steps_per_epoch}
        if hooks.evaluate is not None and (step % steps_per_epoch == 0 or step == total):
            report |= hooks.evaluate()
            val_curve.append(report)
        name = f"step_{step:08d}"
        with _checkpoint_folder(name) as (folder, checkpoint):
            hooks.save_state(folder, rank)
            (folder / "rng").mkdir(exist_ok=True)  # every worker saves its RNG state in the one folder
            torch.save(torch.get_rng_state(), folder / "rng" / f"rank{rank}.pt")
            if rank == 0:
                (folder / "progress.json").write_text(json.dumps({"step": step}))
            ray.train.report(report, checkpoint_dir_name=name, **checkpoint)

    log = LossLog()
    tokens = pads = 0
    step_seconds = 0.0
    t_start = time.perf_counter()
    batches: list[list[int]] = []
    for step in range(start, total):
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0 or not batches:
            batches = epoch_batches(lengths, hp, seed, epoch, rank, world)
        t0 = time.perf_counter()
        result = hooks.step(batches[position])
        step_seconds += time.perf_counter() - t0
        tokens, pads = tokens + result.tokens, pads + result.pads
        log.add(epoch, result)
        done = step + 1
        if rank == 0 and hp["log_every_steps"] and done % hp["log_every_steps"] == 0:
            print(f"step {done}/{total} epoch {epoch + 1} {log.recent()} "
                  f"{result.tokens * world / max(time.perf_counter() - t0, 1e-9):.0f} tokens/s", flush=True)
        every = hp["checkpoint_every_steps"]
        if done == total or done % steps_per_epoch == 0 or (every and done % every == 0):
            save_checkpoint(done, result.loss)

    tokens, pads, step_seconds = _reduce(tokens, pads, step_seconds, world)
    return {
        **log.metrics(),
        "steps": total,
        "steps_run": total - start,
        "steps_per_epoch": steps_per_epoch,
        "epochs": total / steps_per_epoch,
        "train_examples": len(lengths),
        "train_seconds": time.perf_counter() - t_start,
        "nonpad_tokens_per_s": tokens / step_seconds if step_seconds else 0.0,
        "padding_share": pads / (tokens + pads) if tokens + pads else 0.0,
        "nonpad_tokens": tokens,
        "resumed_from_step": start,
        "world_size": world,
    } | ({"val_curve": val_curve} if hooks.evaluate is not None else {})


@contextlib.contextmanager
def _checkpoint_folder(name: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Where a checkpoint is written, and how `ray.train.report` takes it. When Ray Train's run
    folder is on this machine's filesystem (the output dir is a local path, or a shared mount),
    straight into it, reported with upload mode NO_UPLOAD: no copy of a state that is 270 MB
    for MiniLM with Adam and 1.6 GB for a full 135M decoder. Else (an object store) a temporary
    folder that Ray Train uploads. A folder written but never reported (a kill between the two)
    is not a checkpoint to Ray Train: a resume starts from the newest reported one."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        folder = Path(storage.build_checkpoint_path_from_name(name))
        folder.mkdir(parents=True, exist_ok=True)
        yield folder, {"checkpoint": ray.train.Checkpoint(str(folder), filesystem=storage.storage_filesystem),
                       "checkpoint_upload_mode": ray.train.CheckpointUploadMode.NO_UPLOAD}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp), {"checkpoint": ray.train.Checkpoint.from_directory(tmp)}


def _restore(folder: Path, rank: int, hooks: Hooks) -> int:
    """Load a checkpoint's state and this worker's RNG; the step to go on from."""
    import torch

    progress = folder / "progress.json"
    if not progress.is_file():
        raise GridError(f"{folder}: a checkpoint without progress.json (written by an older clfgrid); "
                        "delete the fine-tune's checkpoints/ folder to start it again")
    hooks.load_state(folder)
    step = json.loads(progress.read_text())["step"]
    for group, base_lr, factor in zip(hooks.scheduler.optimizer.param_groups, hooks.scheduler.base_lrs,
                                      hooks.scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    rng = folder / "rng" / f"rank{rank}.pt"
    if rng.is_file():  # absent when the number of workers grew
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return step


def _reduce(tokens: int, pads: int, seconds: float, world: int) -> tuple[int, int, float]:
    """Tokens summed over workers; the time of the slowest worker."""
    import torch
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return tokens, pads, seconds
    counts = torch.tensor([tokens, pads], dtype=torch.float64)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return int(counts[0]), int(counts[1]), float(slowest[0])


class LossLog:
    """Losses of this run: per step, per epoch, and per head (a multi-head model logs each)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.epochs: dict[int, list[StepResult]] = {}

    def add(self, epoch: int, result: StepResult) -> None:
        self.losses.append(result.loss)
        self.epochs.setdefault(epoch, []).append(result)

    def recent(self) -> str:
        last = self.losses[-10:]
        steps = self.epochs[max(self.epochs)][-10:]
        per_head = " ".join(f"{name} {_head_mean(steps, name):.4f}" for name in self.heads())
        return f"loss {sum(last) / len(last):.4f}" + (f" ({per_head})" if per_head else "")

    def heads(self) -> list[str]:
        return list(dict.fromkeys(name for rs in self.epochs.values() for r in rs for name in r.head_losses))

    def metrics(self) -> dict[str, Any]:
        window = max(1, min(10, len(self.losses) // 2))
        epochs = [results for _, results in sorted(self.epochs.items())]
        heads = self.heads()
        first, last = {}, {}
        for name in heads:  # over the first and the last steps that had rows of the head's task
            having = [r for rs in epochs for r in rs if name in r.head_losses]
            w = max(1, min(10, len(having) // 2))
            first[name], last[name] = _head_mean(having[:w], name), _head_mean(having[-w:], name)
        return {
            "train_loss": _mean(self.losses[-window:]),
            "first_loss": _mean(self.losses[:window]),
            "epoch_losses": [_mean([r.loss for r in rs]) for rs in epochs],
            "head_epoch_losses": {name: [_head_mean(rs, name) for rs in epochs] for name in heads},
            "head_losses": {name: {"first": first[name], "last": last[name]} for name in heads},
        }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _head_mean(steps: list[StepResult], name: str) -> float:
    """A head's mean loss over the steps whose batch had rows of its task."""
    return _mean([r.head_losses[name] for r in steps if name in r.head_losses])


# --- the Ray Train job ----------------------------------------------------------------------


def fit(worker_loop: Callable[[dict[str, Any]], None], config: dict[str, Any], job: FinetuneJob,
        checkpoints_to_keep: int, callbacks: tuple = ()) -> dict[str, Any]:
    """Run `worker_loop` as a Ray Train job on `job.resources`, with checkpoints under
    `output_dir/checkpoints` (the same name on a rerun, so Ray Train resumes from the newest);
    returns the metrics rank 0 wrote to `output_dir/train_metrics.json`. `output_dir` may be on
    an object store: Ray Train then persists the checkpoints there through pyarrow. `callbacks`:
    Ray Train callbacks, e.g. a search trial's TuneReportCallback (workers/search.py)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    metrics_uri = uris.join(job.output_dir, METRICS_FILE)
    artifacts.remove(metrics_uri)
    storage_fs, storage_path = uris.filesystem(job.output_dir)
    TorchTrainer(
        worker_loop,
        train_loop_config=config,
        scaling_config=job.resources.scaling_config(),
        run_config=RunConfig(name="checkpoints", storage_path=storage_path,
                             storage_filesystem=storage_fs if uris.is_remote(job.output_dir) else None,
                             checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
                             callbacks=list(callbacks)),
    ).fit()
    return json.loads(uris.read_text(metrics_uri))


def write_metrics(job: FinetuneJob, metrics: dict[str, Any]) -> None:
    """Rank 0's metrics, for `fit` to return (the driver may be on another node)."""
    uris.write_text(uris.join(job.output_dir, METRICS_FILE), json.dumps(metrics, indent=1))
