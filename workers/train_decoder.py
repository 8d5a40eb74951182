"""Decoder fine-tuning (full or LoRA) as a Ray Train job: the paper's recipe, top to bottom.

Each training example is the prompt exactly as inference builds it (same template, shots, seed,
text budget and prompt format), then the canonical answer and EOS. The loss is the cross-entropy
of the answer tokens only (paper sec. 5.5: "compared to the ground truth label after the
post-query template"); every prompt token has label -100. Optimizer: AdamW (sec. 5.7).

Batches are length-grouped: each epoch shuffles the examples, sorts windows of
`batch_size * group_batches` examples by length and cuts them into batches, so a batch pads to a
length its rows nearly share. Logits are computed only where an answer token is predicted
(`logits_to_keep`), which skips the vocabulary projection of the whole prompt.

Placement comes from `job.resources`: Ray Train workers with DDP (deepspeed_stage 0) or
DeepSpeed ZeRO-2/3 (workers/deepspeed.py). Checkpoints go to `output_dir/checkpoints` every
`checkpoint_every_steps` and at the last step; a rerun on the same `output_dir` resumes from the
newest (weights, optimizer, scheduler, step; the step fixes the data position, since each
epoch's batch order is a function of seed and epoch). The final model (LoRA: merged) and its
tokenizer go to `output_dir/model`, a LoRA adapter also to `output_dir/adapter`.

`output_dir` must be a path every worker can write (a shared filesystem on a cluster): the rank 0
worker writes the final model there directly.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid.errors import GridError
from workers.batching import length_grouped_batches
from workers.jobs import DECODER_HPARAMS, FinetuneJob, unknown_hparams



def hparams_of(job: FinetuneJob) -> dict[str, Any]:
    problem = unknown_hparams("decoder", job.hparams)
    if problem:
        raise GridError(f"decoder fine-tune: {problem}")
    return {**DECODER_HPARAMS, **job.hparams}


# --- examples ------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens, the token id on answer tokens (answer + EOS)


def answer_text(prompt_text: str, prompt: Any, answer: str, fmt: str, tokenizer: Any) -> str:
    """What follows the prompt in a training example.

    `chat`: the tokenizer's own rendering of the assistant turn (for the tiny [INST] template,
    " answer</s>"; for ChatML, "answer<|im_end|>"). `inst` / `plain`: a space then the answer, as Llama-2's template writes it.
    """
    if fmt == "chat":
        full = tokenizer.apply_chat_template(
            prompt.messages() + [{"role": "assistant", "content": answer}], tokenize=False
        )
        if full.startswith(prompt_text):  # the line break a template writes after EOS is not an answer
            return full[len(prompt_text):].rstrip()
    return " " + answer


def encode_example(prompt_text: str, answer: str, tokenizer: Any, fmt: str) -> Example:
    """Prompt tokens (as inference tokenizes them) + answer tokens + EOS; labels only on the answer.

    Prompt and answer are tokenized apart, so the prompt's tokens are exactly those a model sees
    at inference. The chat template already writes BOS into the text, so no special tokens are
    added there; `inst` and `plain` get the tokenizer's usual ones.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=(fmt != "chat")).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return Example(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)


def train_rows_of(job: FinetuneJob, task_name: str | None = None):
    """A task's definition (default: the job's), its full train split, and the indices of the rows
    to train on (seeded subsample)."""
    from grid.data import load_split
    from grid.tasks import get_task

    task = get_task(task_name or job.task)
    train = load_split(task, "train", job.data_dir)
    indices = list(range(len(train)))
    if job.train_limit is not None and job.train_limit < len(train):
        indices = sorted(random.Random(job.seed).sample(indices, job.train_limit))
    return task, train, indices


def build_examples(job: FinetuneJob, tokenizer: Any, max_length: int | None = None) -> tuple[list[Example], int]:
    """The training examples of a job (of its task, then of each `mix_with` task: the batches
    shuffle them together), and how many were dropped for exceeding `max_length`."""
    from grid.data import label_sets
    from grid.parsing import format_answer
    from grid.prompting import PromptBuilder, gold_of

    examples, dropped = [], 0
    for task_name in (job.task, *job.mix_with):
        task, train, indices = train_rows_of(job, task_name)
        # The few-shot examples come from the whole train split, as at inference.
        builder = PromptBuilder(task, label_sets(task, job.data_dir), train, job.text_budget, job.sampler)
        for i in indices:
            row = train[i]
            prompt = builder.build(row, job.shots, job.seed)
            text = prompt.as_text(job.prompt_format, tokenizer)
            answer = answer_text(text, prompt, format_answer(task, gold_of(task, row)), job.prompt_format, tokenizer)
            example = encode_example(text, answer, tokenizer, job.prompt_format)
            if max_length is not None and len(example.input_ids) > max_length:
                dropped += 1
                continue
            examples.append(example)
    if not examples:
        names = "+".join((job.task, *job.mix_with))
        raise GridError(f"decoder fine-tune on {names}: no example fits max_length={max_length}")
    return examples, dropped


# --- batches -------------------------------------------------------------------------------


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_batches: int) -> list[list[int]]:
    """One epoch's batches (example indices), length-grouped; a function of (seed, epoch) only."""
    return length_grouped_batches(lengths, batch_size, f"{seed}|epoch{epoch}", group_batches)


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors and `targets`: targets[t] is the token predicted at t (labels shifted)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[r, :n] = torch.tensor(e.input_ids)
        attention_mask[r, :n] = 1
        targets[r, : n - 1] = torch.tensor(e.labels[1:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def answer_loss(model: Any, batch: dict[str, Any]):
    """Mean cross-entropy over the answer tokens; logits only where an answer token is predicted."""
    import torch.nn.functional as F

    keep = batch["targets"] != -100
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        logits_to_keep=keep, use_cache=False,
    ).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["targets"][keep])


def train_step(model: Any, batch: dict[str, Any], optimizer: Any, scheduler: Any, trainable: list[Any],
               max_grad_norm: float, bf16: bool):
    """One optimizer step on the answer-only loss: forward (bf16 autocast on a GPU), backward,
    clip, step, schedule. Plain PyTorch, so that the GPU check (benchmarks/gpu_check.py) times the
    very step that Ray Train's workers run. Returns the loss tensor."""
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = answer_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# --- model ---------------------------------------------------------------------------------


def lora_config(hp: dict[str, Any], model: Any):
    """peft's LoRA config; with `lora_layers`, only the last N layers get adapters (peft wants
    module names then, so "all-linear" becomes the names of the layers' linear modules)."""
    import torch
    from peft import LoraConfig

    targets, last = hp["lora_target_modules"], hp["lora_layers"]
    layers = None
    if last is not None:
        num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if not 0 < last <= num_layers:
            raise GridError(f"decoder fine-tune: lora_layers {last} must be between 1 and the model's {num_layers} layers")
        layers = list(range(num_layers - last, num_layers))
        if targets == "all-linear":
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    return LoraConfig(
        r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
        target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers,
    )


def load_model(job: FinetuneJob, hp: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32)
    if job.mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(hp, model))
    return model


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def save_final(model: Any, tokenizer: Any, job: FinetuneJob) -> None:
    """Write output_dir/model (and for LoRA output_dir/adapter); each folder appears whole or not at all."""
    out = Path(job.output_dir)

    def write(folder: str, save) -> None:
        tmp = out / f"{folder}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        shutil.rmtree(out / folder, ignore_errors=True)
        tmp.rename(out / folder)

    if job.mode == "lora":
        write("adapter", model.save_pretrained)  # a PeftModel saves its adapter only
        model = model.merge_and_unload()
    write("model", lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))


# --- the per-worker training loop ----------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    job = FinetuneJob.model_validate(config["job"])
    hp = config["hp"]
    stage = job.resources.deepspeed_stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    tokenizer = AutoTokenizer.from_pretrained(job.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples, dropped = ray.get(config["examples"])  # built once, by the driver
    lengths = [len(e.input_ids) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / hp["batch_size"]) // world
    if steps_per_epoch == 0:
        raise GridError(f"{len(examples)} examples are too few for {world} workers of batch {hp['batch_size']}")
    total_steps = hp["max_steps"] or hp["epochs"] * steps_per_epoch

    ds_config = None
    if stage:
        from workers.deepspeed import zero_config

        ds_config = zero_config(stage, micro_batch_size=hp["batch_size"], world_size=world,
                                gradient_clipping=hp["max_grad_norm"], on_gpu=on_gpu,
                                offload=job.resources.zero_offload)
    model = load_model(job, hp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if job.resources.zero_offload != "none":
        from workers.deepspeed import offload_optimizer

        optimizer = offload_optimizer(trainable, lr=hp["lr"], weight_decay=hp["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(trainable, lr=hp["lr"], weight_decay=hp["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp["warmup_steps"], total_steps))

    # Resume: Ray Train hands back the newest checkpoint of this run (same output_dir).
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and not stage:
        with checkpoint.as_directory() as d:
            start_step = json.loads((Path(d) / "progress.json").read_text())["step"]
            state = torch.load(Path(d) / "state.pt", map_location="cpu")
            model.load_state_dict(state["model"], strict=False)  # the trainable weights only
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])

    if stage:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        if checkpoint:
            with checkpoint.as_directory() as d:
                start_step = json.loads((Path(d) / "progress.json").read_text())["step"]
                engine.load_checkpoint(d, tag="ds")
        forward_model = engine
    else:
        forward_model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to device
    if checkpoint:  # the schedule's length may have changed (a rerun with more steps): its lr now
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * scheduler.lr_lambdas[0](start_step)

    def save_checkpoint(step: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if stage:  # every rank writes its ZeRO partition; Ray merges the folders
                engine.save_checkpoint(tmp, tag="ds")
            elif rank == 0:
                trainable_state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
                torch.save({"model": trainable_state, "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, Path(tmp) / "state.pt")
            if rank == 0:
                (Path(tmp) / "progress.json").write_text(json.dumps({"step": step}))
            has_files = stage or rank == 0
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
                             checkpoint_dir_name=f"step_{step:07d}")

    torch.manual_seed(job.seed * 1000 + rank + start_step)  # LoRA dropout
    losses: list[float] = []
    nonpad = padded = 0
    compute_seconds = 0.0
    loop_start = time.perf_counter()
    epoch_cache: dict[int, list[list[int]]] = {}
    forward_model.train()
    for step in range(start_step, total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: epoch_batches(lengths, hp["batch_size"], job.seed, epoch, hp["group_batches"])}
        batch_ids = epoch_cache[epoch][position * world + rank]
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids], pad_id).items()}
        if stage:
            loss = answer_loss(engine, batch)
            engine.backward(loss)
            engine.step()  # clips, steps the optimizer and the scheduler, zeroes the gradients
        else:
            loss = train_step(forward_model, batch, optimizer, scheduler, trainable, hp["max_grad_norm"], on_gpu)
        compute_seconds += time.perf_counter() - t0
        losses.append(loss.item())
        real = int(batch["attention_mask"].sum())
        nonpad += real
        padded += batch["attention_mask"].numel() - real
        done = step + 1
        if rank == 0 and hp["log_every_steps"] and done % hp["log_every_steps"] == 0:
            print(f"step {done}/{total_steps} epoch {epoch} loss {sum(losses[-10:]) / len(losses[-10:]):.4f}", flush=True)
        every = hp["checkpoint_every_steps"]
        if done < total_steps and every and done % every == 0:
            save_checkpoint(done, {"step": done, "loss": losses[-1]})
    train_seconds = time.perf_counter() - loop_start

    # Throughput over all workers: tokens summed, time of the slowest.
    counts = torch.tensor([nonpad, padded, compute_seconds], dtype=torch.float64)
    if dist.is_initialized() and world > 1:
        totals = counts.clone()
        dist.all_reduce(totals[:2], op=dist.ReduceOp.SUM)
        slowest = counts[2:].clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        counts = torch.cat([totals[:2], slowest])
    nonpad, padded, compute_seconds = int(counts[0]), int(counts[1]), float(counts[2])
    window = max(1, min(10, len(losses) // 2))
    metrics = {
        "train_loss": sum(losses[-window:]) / window if losses else float("nan"),
        "first_loss": sum(losses[:window]) / window if losses else float("nan"),
        "steps": total_steps,
        "steps_run": total_steps - start_step,
        "epochs_run": (total_steps - start_step) / steps_per_epoch,
        "train_examples": len(examples),
        "dropped_examples": dropped,
        "train_seconds": train_seconds,
        "nonpad_tokens_per_s": nonpad / compute_seconds if compute_seconds else 0.0,
        "padding_share": padded / (nonpad + padded) if nonpad + padded else 0.0,
        "nonpad_tokens": nonpad,
        "resumed_from_step": start_step,
        "world_size": world,
        # what DeepSpeed actually did with the optimizer (ZeRO-Offload steps it on the CPU)
        "optimizer_offloaded": bool(stage and engine.zero_cpu_offload()),
    }

    # The final model: ZeRO-3 gathers the partitions on rank 0; otherwise rank 0 has the weights.
    if stage == 3:
        from workers.deepspeed import full_state_dict

        state = full_state_dict(engine)
        if rank == 0:
            final = load_model(job, hp)
            final.load_state_dict(state)
    else:
        final = engine.module if stage else model
    if rank == 0:
        save_final(final.to("cpu").float(), tokenizer, job)
    if total_steps > start_step:
        save_checkpoint(total_steps, metrics)  # the last step is always resumable
    else:
        ray.train.report(metrics)


# --- the job -------------------------------------------------------------------------------


def run(job: FinetuneJob) -> dict[str, Any]:
    """Fine-tune `job.model` on `job.task` with Ray Train; returns the training metrics."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if job.family != "decoder":
        raise GridError(f"train_decoder runs decoder jobs, not {job.family!r}")
    hp = hparams_of(job)
    if not ray.is_initialized():
        ray.init()
    out = Path(job.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job = job.model_copy(update={"output_dir": str(out)})
    res = job.resources
    from transformers import AutoTokenizer

    examples = build_examples(job, AutoTokenizer.from_pretrained(job.model), hp["max_length"])
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job.model_dump(), "hp": hp, "examples": ray.put(examples)},
        scaling_config=res.scaling_config(),
        # Same storage path and name on a rerun: Ray Train restores this run's newest checkpoint.
        run_config=RunConfig(name="checkpoints", storage_path=str(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    return {k: v for k, v in result.metrics.items() if k not in ("step", "loss")}
