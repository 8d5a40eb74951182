"""Answers from a fine-tuned decoder's classification heads (seed 003's shared body).

A decoder fine-tuned with `heads` (workers/train_decoder.py) saves, beside its LM weights,
`heads.pt` and `heads.json`: per head task, a LabelHead (a linear layer on the hidden state of
the prompt's last token, standardized feature by feature) and its labels. A cell with decoding
`{mode: head}` is answered here: the prompt is
built exactly as in training, the body runs once, the head's argmax is the label, written in the
canonical answer form so the grid's parser and scorer read it like any model's answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEADS_FILE, HEADS_META = "heads.pt", "heads.json"


class LabelHead(nn.Module):
    """A linear classifier on the prompt's last hidden state, standardized feature by feature:
    `linear((x - mean) * scale)`. `mean` and `scale` are fixed buffers, 0 and 1 until
    `prepare_heads` (workers/train_decoder.py) sets them from the untuned body's states on the task's train rows
    (hparam `head_norm: standardize`). Why: SmolLM2's final states have a norm near 55 with one
    feature near |43|, and a head on them did not learn in seed 003's budget, where a logistic
    probe on the standardized states reached 67-70% (reports/seed003/probe.py)."""

    def __init__(self, hidden: int, n_labels: int, init_std: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("scale", torch.ones(hidden))
        self.linear = nn.Linear(hidden, n_labels)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear((states - self.mean) * self.scale)



def load_heads(path: str | Path) -> dict[str, tuple[nn.Module, list[str]]]:
    """Each head task's head (a LabelHead) and labels; empty when the model has no heads. A head
    saved before heads standardized (a bare linear layer) loads with mean 0 and scale 1."""
    meta_file = Path(path) / HEADS_META
    if not meta_file.is_file():
        return {}
    meta = json.loads(meta_file.read_text())["heads"]
    state = torch.load(Path(path) / HEADS_FILE, map_location="cpu", weights_only=True)
    heads = {}
    for task, info in meta.items():
        mine = {key[len(task) + 1:]: value for key, value in state.items() if key.startswith(f"{task}.")}
        if "weight" in mine:  # the bare linear layer of an older model
            mine = {"linear.weight": mine.pop("weight"), "linear.bias": mine.pop("bias")}
        n_labels, hidden = mine["linear.weight"].shape
        head = LabelHead(hidden, n_labels, 0.0)
        head.load_state_dict(mine, strict=False)  # an older head has no mean or scale: 0 and 1
        heads[task] = (head.eval(), info["labels"])
    return heads


@torch.inference_mode()
def head_answers(model: Any, tokenizer: Any, heads: dict[str, tuple[nn.Module, list[str]]],
                 items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The head's label for each request (all of one task), and its log-softmax over the labels
    (`label_logprobs`, whose argmax the label is)."""
    from grid.parsing import format_answer
    from grid.tasks import get_task

    task = get_task(items[0]["task"])
    if task.name not in heads:
        raise ValueError(f"decoding 'head': the model has no head for {task.name} (heads: {sorted(heads)})")
    layer, labels = heads[task.name]
    enc = tokenizer([it["prompt"] for it in items], return_tensors="pt", padding=True, padding_side="right",
                    add_special_tokens=items[0].get("add_special_tokens", False)).to(model.device)
    hidden = model.get_decoder()(**enc, use_cache=False).last_hidden_state
    last = hidden[torch.arange(len(items)), enc["attention_mask"].sum(1) - 1]
    logits = layer.to(hidden.device, hidden.dtype)(last)
    name = task.subtasks[0].name
    return [{"raw_output": format_answer(task, {name: labels[k]}),
             "n_prompt_tokens": int(mask.sum()), "n_output_tokens": 0,
             "label_logprobs": {name: dict(zip(labels, row))}}
            for k, row, mask in zip(logits.argmax(-1).tolist(), torch.log_softmax(logits.float(), -1).tolist(),
                                    enc["attention_mask"])]
