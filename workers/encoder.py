"""An encoder classifier: one shared pretrained encoder, one linear head per sub-task.

The paper's RoBERTa baselines (section 5.4), generalised to any task of the catalog:
- a `label` sub-task gets a sequence head on the first token ([CLS] / <s>);
- a `word_tags` sub-task gets a token head; each word's tag is predicted on its FIRST sub-token
  (the fast tokenizer's word_ids), the other sub-tokens carry the ignore index -100.
The loss is the equally weighted sum of the heads' cross-entropies.

On disk (`save` / `load`): `encoder/` (save_pretrained of the encoder and its tokenizer),
`heads.pt` (the heads' weights) and `heads.json` (task name, each head's sub-task, type and
labels, max_length).

`EncoderPredictor` turns normalized rows into answers in the canonical `format_answer` form, so
the grid's generic parser and scorer read encoder answers like any model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from grid.parsing import format_answer
from grid.tasks import OUTSIDE_TAG, TaskDef, get_task

IGNORE_INDEX = -100
HEAD_TYPES = ("label", "word_tags")


def encoder_path(path: str | Path) -> str:
    """Where the encoder's from_pretrained folder is: a saved EncoderClassifier keeps it in encoder/."""
    return str(Path(path) / "encoder") if (Path(path) / "heads.json").is_file() else str(path)


def load_encoder(path: str | Path) -> nn.Module:
    """The bare encoder, without the pooler when the architecture has one (it is not used)."""
    try:
        return AutoModel.from_pretrained(encoder_path(path), add_pooling_layer=False)
    except TypeError:  # architectures without a pooler do not take the argument
        return AutoModel.from_pretrained(encoder_path(path))


def load_tokenizer(path: str | Path, task: TaskDef):
    # Pre-split words need add_prefix_space with byte-level BPE tokenizers (RoBERTa); BERT ignores it.
    kwargs = {"add_prefix_space": True} if task.needs_words else {}
    tokenizer = AutoTokenizer.from_pretrained(encoder_path(path), **kwargs)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: a fast tokenizer is needed (word_ids)")
    return tokenizer


def head_specs(task: TaskDef, labels: dict[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One head per sub-task: its name, gold field, type and label list."""
    specs = []
    for sub in task.subtasks:
        if sub.type not in HEAD_TYPES:
            raise ValueError(f"task {task.name}: sub-task {sub.name} of type {sub.type} has no encoder head")
        specs.append({"name": sub.name, "field": sub.field, "type": sub.type, "labels": list(labels[sub.name])})
    return specs


class EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, heads: list[dict[str, Any]], task_name: str, max_length: int = 512):
        super().__init__()
        self.encoder = encoder
        self.task_name = task_name
        self.specs = heads
        self.max_length = max_length
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.heads = nn.ModuleDict({h["name"]: nn.Linear(hidden, len(h["labels"])) for h in heads})
        for head in self.heads.values():  # the encoder's own init scale, as *ForSequenceClassification does
            nn.init.normal_(head.weight, std=getattr(encoder.config, "initializer_range", 0.02))
            nn.init.zeros_(head.bias)

    @classmethod
    def from_pretrained(cls, model_path: str, task: TaskDef, labels: dict[str, Sequence[str]],
                        max_length: int = 512) -> EncoderClassifier:
        """A pretrained encoder with fresh heads; from a saved EncoderClassifier (a fine-tune of a
        fine-tune), its heads that match a new head's name, type and labels are kept."""
        model = cls(load_encoder(model_path), head_specs(task, labels), task.name, max_length)
        saved = Path(model_path) / "heads.json"
        if saved.is_file():
            old_specs = json.loads(saved.read_text())["heads"]
            old_heads = torch.load(Path(model_path) / "heads.pt", map_location="cpu", weights_only=True)
            keys = ("name", "type", "labels")
            for spec in model.specs:
                if any(all(old[k] == spec[k] for k in keys) for old in old_specs):
                    prefix = spec["name"] + "."
                    model.heads[spec["name"]].load_state_dict(
                        {k[len(prefix):]: v for k, v in old_heads.items() if k.startswith(prefix)})
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: dict[str, torch.Tensor] | None = None):
        """Logits per head; with `labels`, also each head's cross-entropy (the training loss is
        their equally weighted sum; they are kept apart so that each head's progress is logged)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = self.dropout(hidden)
        logits = {}
        for spec in self.specs:
            head = self.heads[spec["name"]]
            logits[spec["name"]] = head(hidden[:, 0]) if spec["type"] == "label" else head(hidden)
        if labels is None:
            return None, logits
        losses = {
            name: nn.functional.cross_entropy(
                logits[name].reshape(-1, logits[name].shape[-1]), labels[name].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            for name in logits
        }
        return losses, logits

    def save(self, out_dir: str | Path, tokenizer=None) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out / "encoder")
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "encoder")
        torch.save(self.heads.state_dict(), out / "heads.pt")
        meta = {"task": self.task_name, "max_length": self.max_length, "heads": self.specs}
        (out / "heads.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, model_dir: str | Path) -> EncoderClassifier:
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "heads.json").read_text())
        model = cls(load_encoder(model_dir / "encoder"), meta["heads"], meta["task"], meta["max_length"])
        model.heads.load_state_dict(torch.load(model_dir / "heads.pt", map_location="cpu", weights_only=True))
        return model


# --- turning rows into features and logits into answers ----------------------------------------


def encode_rows(tokenizer, task: TaskDef, rows: Sequence[dict[str, Any]], max_length: int,
                specs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Token ids per row, the first sub-token of each word, and (with `specs`) the gold label ids.

    Tasks with word tags are tokenized from `words` (is_split_into_words), others from `text`.
    """
    if task.needs_words:
        enc = tokenizer([list(r["words"]) for r in rows], is_split_into_words=True,
                        truncation=True, max_length=max_length)
    else:
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    index = {spec["name"]: {label: k for k, label in enumerate(spec["labels"])} for spec in specs or []}
    features = []
    for i, row in enumerate(rows):
        ids = enc["input_ids"][i]
        first_tokens: list[int] = []  # token position of word j's first sub-token, or -1
        if task.needs_words:
            first_tokens = [-1] * len(row["words"])
            prev = None
            for pos, word in enumerate(enc.word_ids(i)):
                if word is not None and word != prev:
                    first_tokens[word] = pos
                prev = word
        feat: dict[str, Any] = {"input_ids": ids, "first_tokens": first_tokens}
        for spec in specs or []:
            ids_of, gold = index[spec["name"]], row[spec["field"]]
            if spec["type"] == "label":
                feat[spec["name"]] = ids_of[gold]
            else:
                tags = [IGNORE_INDEX] * len(ids)
                for word, pos in enumerate(first_tokens):
                    if pos >= 0:
                        tags[pos] = ids_of[gold[word]]
                feat[spec["name"]] = tags
        features.append(feat)
    return features


def collate(features: Sequence[dict[str, Any]], pad_id: int, specs: list[dict[str, Any]] | None = None):
    """Right-pad a batch: input_ids, attention_mask and a label tensor per head (-100 on padding)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        attention_mask[i, : len(f["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if specs:
        labels = {}
        for spec in specs:
            if spec["type"] == "label":
                labels[spec["name"]] = torch.tensor([f[spec["name"]] for f in features])
            else:
                tags = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
                for i, f in enumerate(features):
                    tags[i, : len(f[spec["name"]])] = torch.tensor(f[spec["name"]])
                labels[spec["name"]] = tags
        batch["labels"] = labels
    return batch


class EncoderPredictor:
    """Answers for normalized rows (`text`, `words`) from a saved EncoderClassifier.

    Used inside a Ray Data actor: construct once, call `answers` (or `predict`, the texts alone)
    per batch of rows.
    """

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 64):
        self.model = EncoderClassifier.load(model_dir).to(device).eval()
        self.task = get_task(self.model.task_name)
        self.tokenizer = load_tokenizer(Path(model_dir) / "encoder", self.task)
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def answers(self, rows: list[dict]) -> list[dict[str, Any]]:
        """Per row: `raw_output`, the canonical answer of the heads' argmax, and `label_logprobs`,
        each label head's log-softmax over its labels ({sub-task: {label: log-prob}}; the
        answer's label is their argmax), as constrained decoding keeps a decoder's."""
        features = encode_rows(self.tokenizer, self.task, rows, self.model.max_length)
        order = sorted(range(len(rows)), key=lambda i: len(features[i]["input_ids"]))  # little padding
        answers: list[dict[str, Any]] = [{}] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = collate([features[i] for i in chunk], self.tokenizer.pad_token_id)
            _, logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            best = {name: values.argmax(-1).tolist() for name, values in logits.items()}
            label_specs = [spec for spec in self.model.specs if spec["type"] == "label"]
            logprobs = {spec["name"]: torch.log_softmax(logits[spec["name"]].float(), -1).tolist()
                        for spec in label_specs}
            for k, i in enumerate(chunk):
                gold_like = {}
                for spec in self.model.specs:
                    if spec["type"] == "label":
                        gold_like[spec["name"]] = spec["labels"][best[spec["name"]][k]]
                    else:  # words cut by truncation (or without any token) are "Other"
                        gold_like[spec["name"]] = [
                            spec["labels"][best[spec["name"]][k][pos]] if pos >= 0 else OUTSIDE_TAG
                            for pos in features[i]["first_tokens"]
                        ]
                answers[i] = {"raw_output": format_answer(self.task, gold_like),
                              "label_logprobs": {spec["name"]: dict(zip(spec["labels"], logprobs[spec["name"]][k]))
                                                 for spec in label_specs} or None}
        return answers

    def predict(self, rows: list[dict]) -> list[str]:
        """Each row's answer text."""
        return [a["raw_output"] for a in self.answers(rows)]
