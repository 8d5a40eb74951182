"""Local decoder inference with transformers: batched greedy (or sampled) generation.

CPU here, GPU on a cluster (the device is picked from what the actor was given). Prompts are
left-padded so every row of a batch ends where its answer begins. Decoding `constrained` is
workers/constrained.py's; `head` (a fine-tune's classification head) workers/decoder_heads.py's.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.decoder_heads import head_answers, load_heads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class TransformersBackend:
    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TransformersBackend:
        """The backend of a model group's spec (workers/predict.py): its path, dtype and options."""
        return cls(spec["path"], dtype=spec.get("dtype", "float32"), **spec.get("options", {}))

    def __init__(self, path: str, dtype: str = "float32", device: str | None = None, **_: Any):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(self.device).eval()
        self.heads = load_heads(path)  # a fine-tune with classification heads (decoding "head")

    @torch.inference_mode()
    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mode = items[0].get("decoding", {}).get("mode") if items else None
        if mode == "constrained":
            from workers.constrained import constrained_answers

            return constrained_answers(self.model, self.tokenizer, items)
        if mode == "head":
            return head_answers(self.model, self.tokenizer, self.heads, items)
        decoding = items[0]["decoding"]
        enc = self.tokenizer(
            [it["prompt"] for it in items], return_tensors="pt", padding=True,
            add_special_tokens=items[0].get("add_special_tokens", False),
        ).to(self.device)
        sample = decoding["temperature"] > 0
        out = self.model.generate(
            **enc, max_new_tokens=decoding["max_new_tokens"], do_sample=sample,
            temperature=decoding["temperature"] if sample else None, top_p=None, top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1]:]
        answers = []
        for row, prompt_mask in zip(new, enc["attention_mask"]):
            n_out = int((row != self.tokenizer.pad_token_id).sum())
            answers.append({
                "raw_output": self.tokenizer.decode(row, skip_special_tokens=True),
                "n_prompt_tokens": int(prompt_mask.sum()),
                "n_output_tokens": n_out,
            })
        return answers
