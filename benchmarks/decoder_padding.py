"""Non-pad tokens/s of the decoder fine-tune loop against a naively padded HF Trainer.

Both train the same tiny Llama on the same 20ng-20 training examples (the inference prompt, the
answer and EOS, loss on the answer only) for the same number of steps of 8 examples:

- ours: workers.train_decoder.run (a Ray Train job, one worker with all CPUs): length-grouped
  batches, logits only where an answer token is predicted;
- naive: transformers.Trainer, random batch order, every batch padded to its longest example,
  logits for every position.

Run:  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/decoder_padding.py [--steps 60]
Target: ours >= 2x the naive figure, with padding <= 5%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "20ng-20"


def naive_hf_trainer(model_dir: str, examples, steps: int, batch_size: int, lr: float, cpus: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(cpus)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    counts = {"nonpad": 0, "padded": 0}

    def pad_to_longest(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counts["nonpad"] += int(mask.sum())
        counts["padded"] += mask.numel() - int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
            lr_scheduler_type="linear", optim="adamw_torch", save_strategy="no", report_to=[],
            logging_steps=10**6, dataloader_num_workers=0, remove_unused_columns=False, use_cpu=True,
            disable_tqdm=True, seed=0,
        )
        data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=pad_to_longest,
                          callbacks=[Clock()])
        trainer.train()
    seconds = clock["end"] - clock["start"]
    total = counts["nonpad"] + counts["padded"]
    return {"nonpad_tokens_per_s": counts["nonpad"] / seconds, "padding_share": counts["padded"] / total,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    import ray
    from transformers import AutoTokenizer

    from grid.jobs import DECODER_HPARAMS, FinetuneJob, Resources
    from workers.models import resolve
    from workers.train_decoder import build_examples, run

    model_dir = resolve("tiny:llama")
    hparams = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4,
               "checkpoint_every_steps": 0, "log_every_steps": 0}
    with tempfile.TemporaryDirectory() as out:
        job = FinetuneJob(model=model_dir, family="decoder", task=TASK, mode="full", prompt_format="inst",
                          train_limit=args.train_limit, output_dir=out, hparams=hparams,
                          resources=Resources(num_workers=1, cpus_per_worker=args.cpus))
        examples, dropped = build_examples(job, AutoTokenizer.from_pretrained(model_dir), DECODER_HPARAMS["max_length"])
        lengths = sorted(len(e.input_ids) for e in examples)
        print(f"{TASK}: {len(examples)} examples (dropped {dropped} over {DECODER_HPARAMS['max_length']} tokens), "
              f"tokens median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
              f"{args.steps} steps of {args.batch_size} examples each, {args.cpus} CPUs", flush=True)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ours = run(job)
        ray.shutdown()
    naive = naive_hf_trainer(model_dir, examples, args.steps, args.batch_size, 1e-4, args.cpus)

    print(f"ours  (train_decoder.run): {ours['nonpad_tokens_per_s']:9.0f} non-pad tokens/s, "
          f"padding {ours['padding_share']:.1%} (loop {ours['train_seconds']:.1f} s; "
          f"{ours['nonpad_tokens'] / ours['train_seconds']:.0f} tokens/s by loop wall time)")
    print(f"naive (HF Trainer)       : {naive['nonpad_tokens_per_s']:9.0f} non-pad tokens/s, "
          f"padding {naive['padding_share']:.1%} (loop {naive['seconds']:.1f} s)")
    print(f"ratio ours/naive         : {ours['nonpad_tokens_per_s'] / naive['nonpad_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
