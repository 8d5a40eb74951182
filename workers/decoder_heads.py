"""Answers from a fine-tuned decoder's classification heads (seed 003's shared body).

A decoder fine-tuned with `heads` (workers/train_decoder.py) saves, beside its LM weights,
`heads.pt` and `heads.json`: per head task, a linear layer on the hidden state of the prompt's
last token, and its labels. A cell with decoding `{mode: head}` is answered here: the prompt is
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


def load_heads(path: str | Path) -> dict[str, tuple[nn.Linear, list[str]]]:
    """Each head task's linear layer and labels; empty when the model has no heads."""
    meta_file = Path(path) / HEADS_META
    if not meta_file.is_file():
        return {}
    meta = json.loads(meta_file.read_text())["heads"]
    state = torch.load(Path(path) / HEADS_FILE, map_location="cpu", weights_only=True)
    heads = {}
    for task, info in meta.items():
        weight = state[f"{task}.weight"]
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": state[f"{task}.bias"]})
        heads[task] = (layer.eval(), info["labels"])
    return heads


@torch.inference_mode()
def head_answers(model: Any, tokenizer: Any, heads: dict[str, tuple[nn.Linear, list[str]]],
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
