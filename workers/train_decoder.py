"""Decoder fine-tuning (full or LoRA) as a Ray Train job: the paper's recipe, top to bottom.

Each training example is the prompt exactly as inference builds it (same template, shots, seed,
text budget and prompt format), then the canonical answer and EOS. The loss is the cross-entropy
of the answer tokens only (paper sec. 5.5: "compared to the ground truth label after the
post-query template"); every prompt token has label -100. Optimizer: AdamW (sec. 5.7). The LM
head runs only where an answer token is predicted, which skips the vocabulary projection of the
whole prompt.

Classification heads (seed 003's shared body): a task named in `heads` is not answered in text
but classified by a linear head on the hidden state of its prompt's last token; its loss is the
head's cross-entropy. A job that mixes head tasks and text tasks (`mix_with`) trains one body on
the weighted sum of each task's mean loss (`loss_weights`, default 1 each); each is logged apart.

What is the decoder's own is here: the examples, the model and its heads, the loss, DeepSpeed.
The rest (train rows, length-grouped batches, schedule, checkpoints and resume, throughput) is
the training core's (workers/training.py). Placement comes from `job.resources`: Ray Train
workers with DDP (deepspeed_stage 0) or DeepSpeed ZeRO-2/3 (workers/deepspeed.py). The final
model (LoRA: merged) and its tokenizer go to `output_dir/model` (with `heads.pt` and
`heads.json` when it has heads), a LoRA adapter also to `output_dir/adapter`. `output_dir` is a
local or shared folder, or an object-store URI (workers/artifacts.py publishes the folders there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grid import uris
from grid.errors import GridError
from grid.jobs import FinetuneJob
from workers import artifacts, training
from workers.decoder_heads import HEADS_FILE, HEADS_META, LabelHead

IGNORE = -100


# --- examples ------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens, the token id on answer tokens (answer + EOS)
    task: int = 0      # index of its task in the job's (task, *mix_with)
    class_id: int = IGNORE  # a head task's gold label index; its labels are all -100


def answer_text(prompt_text: str, prompt: Any, answer: str, fmt: str, tokenizer: Any) -> str:
    """What follows the prompt in a training example.

    `chat`: the tokenizer's own rendering of the assistant turn (for the tiny [INST] template,
    " answer</s>"; for ChatML, "answer<|im_end|>"). `inst` / `plain`: a space then the answer, as
    Llama-2's template writes it.
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
    return task, train, training.train_indices(len(train), job.train_limit, job.seed)


def job_tasks(job: FinetuneJob) -> tuple[str, ...]:
    """The tasks a job trains on, in the order of `Example.task`."""
    return (job.task, *job.mix_with)


def head_labels(job: FinetuneJob, hp: dict[str, Any]) -> dict[str, list[str]]:
    """Each head task's label list (a head classifies a task with one label sub-task)."""
    from grid.data import label_sets
    from grid.tasks import get_task

    if hp["head_norm"] not in ("none", "standardize"):
        raise GridError(f"decoder fine-tune: head_norm {hp['head_norm']!r} is none or standardize")
    if hp["head_init"] not in ("random", "probe"):
        raise GridError(f"decoder fine-tune: head_init {hp['head_init']!r} is random or probe")
    heads = {}
    for name in hp["heads"]:
        task = get_task(name)
        if name not in job_tasks(job):
            raise GridError(f"decoder fine-tune: head task {name} is not one of the job's tasks {job_tasks(job)}")
        if len(task.subtasks) != 1 or task.subtasks[0].type != "label":
            raise GridError(f"decoder fine-tune: a head classifies a task with one label sub-task; {name} has "
                            f"{[sub.type for sub in task.subtasks]}")
        heads[name] = list(label_sets(task, job.data_dir)[task.subtasks[0].name])
    return heads


def build_examples(job: FinetuneJob, tokenizer: Any, max_length: int | None = None,
                   heads: dict[str, list[str]] | None = None) -> tuple[list[Example], int]:
    """The training examples of a job (of its task, then of each `mix_with` task: the batches
    shuffle them together), and how many were dropped for exceeding `max_length`. A head task's
    example is its prompt and its gold label's index, with no answer tokens."""
    from grid.data import label_sets
    from grid.parsing import format_answer
    from grid.prompting import PromptBuilder, gold_of

    heads = heads or {}
    examples, dropped = [], 0
    for index, task_name in enumerate(job_tasks(job)):
        task, train, indices = train_rows_of(job, task_name)
        # The few-shot examples come from the whole train split, as at inference.
        builder = PromptBuilder(task, label_sets(task, job.data_dir), train, job.text_budget, job.sampler,
                                tokenizer if job.text_budget_unit == "tokens" else None)
        for i in indices:
            row = train[i]
            prompt = builder.build(row, job.shots, job.seed)
            text = prompt.as_text(job.prompt_format, tokenizer)
            gold = gold_of(task, row)
            if task_name in heads:
                ids = tokenizer(text, add_special_tokens=(job.prompt_format != "chat")).input_ids
                example = Example(ids, [IGNORE] * len(ids), index, heads[task_name].index(gold[task.subtasks[0].name]))
            else:
                answer = answer_text(text, prompt, format_answer(task, gold), job.prompt_format, tokenizer)
                example = encode_example(text, answer, tokenizer, job.prompt_format)
                example.task = index
            if max_length is not None and len(example.input_ids) > max_length:
                dropped += 1
                continue
            examples.append(example)
    if not examples:
        raise GridError(f"decoder fine-tune on {'+'.join(job_tasks(job))}: no example fits max_length={max_length}")
    return examples, dropped


# --- batches and the loss ------------------------------------------------------------------


# Below this many shared tokens a second forward call costs more than the prefix saves.
MIN_SHARED_PREFIX = 16


def shared_prefix(examples: list[Example]) -> int:
    """How many leading tokens the forward pass may run once for the whole batch: those every row
    has in common (the instruction, the label list, the shots of a fixed-shot prompt), up to the
    first position any row predicts an answer token or a head label from. 0 when too few to pay.

    Every row's prompt starts with the same template, so most of a short prompt is shared: on
    20ng-20's zero-shot chat prompts with SmolLM2, 226 tokens of rows 250-400 tokens long.
    """
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    # every row keeps its last token (a head reads it) and the token before its first label
    n = min(len(e.input_ids) for e in examples) - 1
    for e in examples:
        labelled = next((i for i, label in enumerate(e.labels) if label != IGNORE), len(e.labels))
        n = min(n, labelled - 1)
        n = next((i for i in range(n) if e.input_ids[i] != first[i]), n)
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; `targets[t]` is the token predicted at t (labels shifted), `last` the
    position of each row's last token, `task` and `class_id` each row's task and head label,
    `prefix` the length of the prefix the rows share (`shared_prefix`)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[r, :n] = torch.tensor(e.input_ids)
        attention_mask[r, :n] = 1
        targets[r, : n - 1] = torch.tensor(e.labels[1:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
            "last": torch.tensor([len(e.input_ids) - 1 for e in examples]),
            "task": torch.tensor([e.task for e in examples]),
            "class_id": torch.tensor([e.class_id for e in examples]),
            "prefix": torch.tensor(shared_prefix(examples))}


class DecoderWithHeads(nn.Module):
    """A causal LM, and optionally a linear classification head per head task on the hidden state
    of the prompt's last token. One module, so DDP and DeepSpeed wrap body and heads together.

    `forward(batch)` returns the training loss and, for a job with heads, the mean loss of each
    task the batch has rows of (the loss is the weighted sum of the tasks' mean losses); without
    heads, the mean over all answer tokens.

    The prefix the rows share (`batch["prefix"]` tokens) runs once, for one row; its keys and
    values are repeated for every row and the rest of each row attends to them. The loss and its
    gradients are those of the whole rows (autograd sums the repeated keys' and values' gradients
    back into the one prefix pass); only a LoRA dropout mask on the prefix is drawn once for the
    batch instead of once per row."""

    def __init__(self, lm: nn.Module, tasks: tuple[str, ...], heads: dict[str, list[str]],
                 weights: dict[str, float]):
        super().__init__()
        self.lm, self.tasks, self.labels = lm, tasks, heads
        self.weights = [float(weights.get(t, 1.0)) for t in tasks]
        hidden = lm.config.get_text_config(decoder=True).hidden_size
        std = getattr(lm.config, "initializer_range", 0.02)
        self.heads = nn.ModuleDict({t: LabelHead(hidden, len(labels), std) for t, labels in heads.items()})

    def causal_lm(self) -> nn.Module:
        """The transformers model under a peft wrapper (LoRA layers in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lm = self.causal_lm()
        hidden, p = self.hidden_after_prefix(batch)  # hidden states of positions p onwards
        targets = batch["targets"][:, p:]
        keep = targets != IGNORE
        token_losses = nn.functional.cross_entropy(
            lm.get_output_embeddings()(hidden[keep]).float(), targets[keep], reduction="none")
        if not self.heads:
            return token_losses.mean(), {}
        token_task = batch["task"].unsqueeze(1).expand_as(keep)[keep]
        last = hidden[torch.arange(len(hidden)), batch["last"] - p]
        total = hidden.new_zeros((), dtype=torch.float32)
        losses: dict[str, torch.Tensor] = {}  # the tasks this batch has rows of
        for index, (name, weight) in enumerate(zip(self.tasks, self.weights)):
            if name in self.heads:
                mine = batch["task"] == index
                ce = nn.functional.cross_entropy(self.heads[name](last).float(), batch["class_id"], reduction="none")
            else:
                mine, ce = token_task == index, token_losses
            loss = (ce * mine).sum() / mine.sum().clamp(min=1)
            total = total + weight * loss  # a task without rows adds 0, and DDP still sees its head used
            if mine.any():
                losses[name] = loss
        return total, losses

    def last_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """The body's final hidden state at each row's last token (what a head reads)."""
        hidden, p = self.hidden_after_prefix(batch)
        return hidden[torch.arange(len(hidden)), batch["last"] - p]

    def hidden_after_prefix(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The body's last hidden states from the shared prefix's end on, and that prefix's length."""
        decoder = self.causal_lm().get_decoder()
        input_ids, p = batch["input_ids"], int(batch["prefix"])
        if not p:
            return decoder(input_ids=input_ids, attention_mask=batch["attention_mask"],
                           use_cache=False).last_hidden_state, 0
        cache = decoder(input_ids=input_ids[:1, :p], use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(input_ids))
        hidden = decoder(input_ids=input_ids[:, p:], attention_mask=batch["attention_mask"],
                         past_key_values=cache, use_cache=True).last_hidden_state
        return hidden, p


@torch.no_grad()
def prepare_heads(model: DecoderWithHeads, examples: list[Example], pad_id: int, device: Any, norm: str,
                  init: str, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Before any step, from the untuned body's last states on each head task's train rows:
    `norm == "standardize"` sets the head's `mean` and `scale` (1 / std); `init == "probe"` fits
    the head's linear layer as an L2-regularized logistic regression on the features it reads
    (`fit_probe`). Deterministic, so a resumed job prepares the same (and then loads its trained
    head). Returns, per head, the states' mean norm, largest mean |feature| (the scale a raw head
    faces), mean spread across rows (the scale of body drift a standardized head amplifies) and,
    with a probe, its accuracy on those train rows."""
    model.eval()
    out = {}
    for index, name in enumerate(model.tasks):
        if name not in model.heads:
            continue
        rows = [e for e in examples if e.task == index]
        states = torch.cat([model.last_states({k: v.to(device)
                                               for k, v in collate(rows[i:i + batch_size], pad_id).items()})
                            for i in range(0, len(rows), batch_size)]).float()
        head = model.heads[name]
        if norm == "standardize":
            head.mean.copy_(states.mean(0))
            head.scale.copy_(1 / states.std(0).clamp(min=1e-6))
        out[name] = {"state_norm": round(float(states.norm(dim=1).mean()), 2),
                     "largest_mean_abs_feature": round(float(states.mean(0).abs().max()), 2),
                     "mean_feature_std": round(float(states.std(0).mean()), 4)}
        if init == "probe":
            labels = torch.tensor([e.class_id for e in rows], device=states.device)
            features = (states - head.mean) * head.scale
            out[name]["probe_train_accuracy"] = fit_probe(head.linear, features, labels)
    model.train()
    return out


def fit_probe(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor, c: float = 1.0) -> float:
    """Fit `linear` as a multinomial logistic regression, scikit-learn's objective at C = `c`
    (sum of cross-entropies + ||W||^2 / (2C), bias unpenalized), by full-batch L-BFGS; returns its
    accuracy on the rows it was fitted on. The linear-probe step of LP-FT (Kumar et al., 2022): a
    head that starts where a probe ends is not thrown off by a random start while the body moves."""
    weight = linear.weight.detach().clone().zero_().requires_grad_(True)
    bias = linear.bias.detach().clone().zero_().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = (nn.functional.cross_entropy(features @ weight.T + bias, labels, reduction="sum")
                 + weight.pow(2).sum() / (2 * c)) / len(labels)
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    linear.weight.copy_(weight.detach())
    linear.bias.copy_(bias.detach())
    return round(float(((features @ weight.T + bias).argmax(1) == labels).float().mean()), 4)


def head_param_groups(model: DecoderWithHeads, hp: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the body's trainable weights at `lr`, the heads' at
    `head_lr` (default `lr`): a fresh linear head on fixed-scale features wants a larger step than
    LoRA adapters do."""
    head_ids = {id(p) for p in model.heads.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    heads = [p for p in model.heads.parameters() if p.requires_grad]
    groups = [{"params": body, "lr": hp["lr"]}]
    if heads:
        groups.append({"params": heads, "lr": hp["head_lr"] if hp["head_lr"] is not None else hp["lr"]})
    return groups


def train_step(model: nn.Module, batch: dict[str, Any], optimizer: Any, scheduler: Any, trainable: list[Any],
               max_grad_norm: float, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on the loss: forward (bf16 autocast on a GPU), backward, clip, step,
    schedule. Plain PyTorch, so that the GPU check (benchmarks/gpu_check.py) times the very step
    that Ray Train's workers run. Returns the loss and each task's."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss, losses = model(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, losses


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
            raise GridError(f"decoder fine-tune: lora_layers {last} must be between 1 "
                            f"and the model's {num_layers} layers")
        layers = list(range(num_layers - last, num_layers))
        if targets == "all-linear":
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    return LoraConfig(
        r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
        target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers,
    )


def load_model(job: FinetuneJob, hp: dict[str, Any], heads: dict[str, list[str]] | None = None) -> DecoderWithHeads:
    """The job's model: the base weights (fp32), LoRA adapters for a LoRA job, fresh heads. The
    torch seed is the job's, so LoRA's and the heads' initial weights follow the seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(job.seed)
    lm = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32)
    if job.mode == "lora":
        from peft import get_peft_model

        lm = get_peft_model(lm, lora_config(hp, lm))  # the heads, outside it, train in full
    return DecoderWithHeads(lm, job_tasks(job), heads or {}, hp["loss_weights"])


def save_final(model: DecoderWithHeads, tokenizer: Any, job: FinetuneJob) -> None:
    """Write output_dir/model (and for LoRA output_dir/adapter); each folder appears whole or not
    at all. A model with heads keeps them beside the LM's weights (read by workers/decoder_heads.py)."""

    def write(folder: str, save) -> None:
        with artifacts.staging(uris.join(job.output_dir, folder)) as tmp:
            save(tmp)

    lm = model.lm
    if job.mode == "lora":
        write("adapter", lm.save_pretrained)  # a PeftModel saves its adapter only
        lm = lm.merge_and_unload()

    def save_model(folder: Path) -> None:
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if model.heads:
            torch.save(model.heads.state_dict(), folder / HEADS_FILE)
            meta = {"heads": {t: {"labels": labels} for t, labels in model.labels.items()},
                    "pooling": "last prompt token", "prompt": {"shots": job.shots, "format": job.prompt_format,
                                                              "text_budget": job.text_budget,
                                                              "text_budget_unit": job.text_budget_unit,
                                                              "seed": job.seed}}
            (folder / HEADS_META).write_text(json.dumps(meta, indent=1))

    write("model", save_model)


# --- the per-worker training loop ----------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the decoder's model and step, in the core's loop."""
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    job = FinetuneJob.model_validate(config["job"])
    job = job.model_copy(update={"model": artifacts.fetch(job.model)})  # a grid-made model: onto this node
    hp, heads = config["hp"], config["heads"]
    stage = job.resources.deepspeed_stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    tokenizer = AutoTokenizer.from_pretrained(job.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples, dropped = ray.get(config["examples"])  # built once, by the driver
    lengths = [len(e.input_ids) for e in examples]
    steps_per_epoch = len(training.epoch_batches(lengths, hp, job.seed, 0, rank, world))

    model = load_model(job, hp, heads)
    head_stats = {}
    if heads and (hp["head_norm"] == "standardize" or hp["head_init"] == "probe"):  # before any step, and on resume
        head_stats = prepare_heads(model.to(device), examples, pad_id, device, hp["head_norm"], hp["head_init"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = head_param_groups(model, hp)
    if job.resources.zero_offload != "none":
        from workers.deepspeed import offload_optimizer

        optimizer = offload_optimizer(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
    scheduler = training.linear_schedule(optimizer, hp, training.total_steps_of(hp, steps_per_epoch))

    if stage:
        import deepspeed

        from workers.deepspeed import zero_config

        ds_config = zero_config(stage, micro_batch_size=max(1, hp["batch_size"] // world), world_size=world,
                                gradient_clipping=hp["max_grad_norm"], on_gpu=on_gpu,
                                offload=job.resources.zero_offload)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    else:
        forward_model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to device

    def step(indices: list[int]) -> training.StepResult:
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
        if stage:
            loss, losses = engine(batch)
            engine.backward(loss)
            engine.step()  # clips, steps the optimizer and the scheduler, zeroes the gradients
        else:
            loss, losses = train_step(forward_model, batch, optimizer, scheduler, trainable,
                                      hp["max_grad_norm"], on_gpu)
        tokens = int(batch["attention_mask"].sum())
        return training.StepResult(loss.item(), tokens, batch["attention_mask"].numel() - tokens,
                                   {name: value.item() for name, value in losses.items()})

    def save_state(folder: Path, rank_: int) -> None:
        if stage:  # every rank writes its ZeRO partition; Ray merges the folders
            engine.save_checkpoint(str(folder), tag="ds")
        elif rank_ == 0:  # the trainable weights only (LoRA: the adapters and heads)
            trainable_state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"model": trainable_state, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, folder / "state.pt")

    def load_state(folder: Path) -> None:
        if stage:
            engine.load_checkpoint(str(folder), tag="ds")
            return
        state = torch.load(folder / "state.pt", map_location="cpu")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    model.train()
    metrics = training.train(training.Hooks(step, save_state, load_state, scheduler), lengths, hp, job.seed)
    metrics |= {"dropped_examples": dropped, **({"head_features": head_stats} if head_stats else {}),
                # what DeepSpeed actually did with the optimizer (ZeRO-Offload steps it on the CPU)
                "optimizer_offloaded": bool(stage and engine.zero_cpu_offload())}

    # The final model: ZeRO-3 gathers the partitions on rank 0; otherwise rank 0 has the weights.
    if stage == 3:
        from workers.deepspeed import full_state_dict

        state = full_state_dict(engine)
        if rank == 0:
            final = load_model(job, hp, heads)
            final.load_state_dict(state)
    else:
        final = engine.module if stage else model
    if rank == 0:
        save_final(final.to("cpu").float(), tokenizer, job)
        training.write_metrics(job, metrics)


# --- the job -------------------------------------------------------------------------------


def run(job: FinetuneJob) -> dict[str, Any]:
    """Fine-tune `job.model` on `job.task` (and `mix_with`) with Ray Train; returns the metrics."""
    import ray
    from transformers import AutoTokenizer

    if job.family != "decoder":
        raise GridError(f"train_decoder runs decoder jobs, not {job.family!r}")
    hp = training.resolve_hparams(job)
    heads = head_labels(job, hp)
    if not ray.is_initialized():
        ray.init()
    job = job.model_copy(update={"output_dir": artifacts.ensure_dir(job.output_dir)})
    examples = build_examples(job, AutoTokenizer.from_pretrained(artifacts.fetch(job.model)), hp["max_length"], heads)
    config = {"job": job.model_dump(), "hp": hp, "heads": heads, "examples": ray.put(examples)}
    return training.fit(train_loop, config, job, hp["checkpoints_to_keep"])
