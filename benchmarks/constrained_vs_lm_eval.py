"""Five-shot massive-intent with the tiny decoder: this project's free and constrained decoding
against lm-evaluation-harness on the same model and the very same prompts, in one run.

    python benchmarks/constrained_vs_lm_eval.py [--n 120] [--batch-size 8] [--threads 1]

Methods (each timed on the inference call only; the model is loaded once, before any of them):
- free:            TransformersBackend, greedy generation (max_new_tokens 16), answers parsed.
- constrained:     TransformersBackend, decoding.mode constrained (strategy "score": every label
                   scored as a continuation in one token-trie pass over the cached prompt).
- constrained-greedy: strategy "greedy" (argmax restricted to valid label prefixes).
- lm-eval generate_until: a custom YAML task over a jsonl of the exact prompts, until EOS/newline.
- lm-eval multiple_choice: the same prompts, the 60 labels as choices (log-likelihood of each);
                   60 full forward passes per example, so it runs on the first `--mc-n` examples
                   only and its rate is examples/s over those.
Accuracy and invalid rate of every method come from grid.parsing.parse_answer on its answers (the
multiple_choice answer is the argmax choice, never invalid). Torch runs on `--threads` threads for
every method (1 by default: on a small shared machine more threads are slower, not faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TASK = "massive-intent"


def build_items(tokenizer, n: int, shots: int, seed: int):
    from grid.config import GridConfig
    from grid.execute import data_dir_arg, prepare_cell
    from grid.plan import build_plan

    data = data_dir_arg(None)
    cfg = GridConfig.model_validate({
        "name": "bench", "models": [{"name": "tiny", "source": "tiny:llama", "family": "decoder"}],
        "tasks": [TASK], "shots": [shots], "seeds": [seed], "limits": {"test": n, "seed": seed},
        "decoding": {"mode": "free", "max_new_tokens": 16}})
    (cell,) = build_plan(cfg, data).cells
    return prepare_cell(cell, data, tokenizer)


def score(prepared, raw_outputs):
    """(accuracy, invalid rate) of answers to the first len(raw_outputs) examples."""
    from grid.data import label_sets
    from grid.parsing import parse_answer
    from grid.tasks import get_task

    task = get_task(TASK)
    labels = label_sets(task)
    correct = invalid = 0
    for raw, row in zip(raw_outputs, prepared.rows):
        p = parse_answer(raw, task, labels, None)["intent"]
        invalid += not p.valid
        correct += p.valid and p.value == row["intent"]
    n = len(raw_outputs)
    return correct / n, invalid / n


def run_backend(backend, items, batch_size: int, **decoding):
    items = [{**it, "decoding": {**it["decoding"], **decoding}} for it in items]
    start = time.perf_counter()
    out = []
    for i in range(0, len(items), batch_size):
        out += backend.generate(items[i:i + batch_size])
    return [a["raw_output"] for a in out], time.perf_counter() - start


def write_lm_eval_tasks(folder: Path, prepared) -> None:
    labels = list(prepared.items[0]["labels"]["intent"])
    with open(folder / "prompts.jsonl", "w") as f:
        for it, row in zip(prepared.items, prepared.rows):
            f.write(json.dumps({"prompt": it["prompt"], "choices": labels,
                                "gold": labels.index(row["intent"]), "answer": row["intent"]}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'prompts.jsonl'}\n"
              "test_split: test\ndoc_to_text: \"{{prompt}}\"\n")
    (folder / "gen.yaml").write_text(
        "task: clfgrid_intent_gen\noutput_type: generate_until\n" + common
        + "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"</s>\", \"\\n\"]\n"
        "  max_gen_toks: 16\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (folder / "mc.yaml").write_text(
        "task: clfgrid_intent_mc\noutput_type: multiple_choice\n" + common
        + "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")


def run_lm_eval(lm, folder: Path, task: str, limit: int | None = None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder))
    start = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                          bootstrap_iters=0, verbosity="ERROR", limit=limit)
    seconds = time.perf_counter() - start
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return samples, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="test examples")
    ap.add_argument("--mc-n", type=int, default=24,
                    help="examples for lm-eval multiple_choice (60 full forward passes each: slow)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM

    from workers.models import resolve
    from workers.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve("tiny:llama"), device="cpu")
    prepared = build_items(backend.tokenizer, args.n, args.shots, args.seed)
    n = len(prepared.items)
    lens = [len(backend.tokenizer.encode(it["prompt"], add_special_tokens=False)) for it in prepared.items]
    print(f"{TASK} {args.shots}-shot, {n} examples, prompts {min(lens)}-{max(lens)} tokens "
          f"(mean {sum(lens) / n:.0f}), 60 labels, batch {args.batch_size}, torch threads {args.threads}")

    rows = []
    free, t = run_backend(backend, prepared.items, args.batch_size, mode="free")
    rows.append(("clfgrid free (greedy)", t, *score(prepared, free), n))
    con, t = run_backend(backend, prepared.items, args.batch_size, mode="constrained")
    rows.append(("clfgrid constrained (score)", t, *score(prepared, con), n))
    cong, t = run_backend(backend, prepared.items, args.batch_size, mode="constrained", strategy="greedy")
    rows.append(("clfgrid constrained (greedy)", t, *score(prepared, cong), n))

    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=args.batch_size,
              device="cpu", max_length=4096)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_lm_eval_tasks(folder, prepared)
        samples, t = run_lm_eval(lm, folder, "clfgrid_intent_gen")
        gen = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
               for s in samples]
        rows.append(("lm-eval generate_until", t, *score(prepared, gen), n))
        mc_n = min(args.mc_n, n)
        samples, t = run_lm_eval(lm, folder, "clfgrid_intent_mc", limit=mc_n)
        labels = list(prepared.items[0]["labels"]["intent"])
        mc = [labels[max(range(len(labels)), key=lambda k: s["filtered_resps"][k][0])] for s in samples]
        rows.append(("lm-eval multiple_choice", t, *score(prepared, mc), mc_n))

    print()
    print(f"| {'method':<30} | {'n':>4} | {'examples/s':>10} | {'seconds':>8} | {'accuracy':>8} | {'invalid':>7} |")
    print(f"|{'-' * 32}|{'-' * 6}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    speed = {}
    for name, seconds, acc, inv, count in rows:
        speed[name] = count / seconds
        print(f"| {name:<30} | {count:>4} | {count / seconds:>10.2f} | {seconds:>8.1f} | {acc:>8.3f} | {inv:>7.1%} |")
    c = speed["clfgrid constrained (score)"]
    print()
    print(f"constrained / lm-eval multiple_choice = {c / speed['lm-eval multiple_choice']:.1f}x (target >= 5x)")
    print(f"constrained / lm-eval generate_until  = {c / speed['lm-eval generate_until']:.1f}x (target >= 2x)")
    print(f"constrained / clfgrid free            = {c / speed['clfgrid free (greedy)']:.1f}x")
    agree = sum(a == b for a, b in zip(con, mc)) / len(mc)
    print(f"constrained (score) picks the lm-eval multiple_choice label on {agree:.0%} of the {len(mc)} "
          "examples both answered (the same log-likelihood argmax)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
