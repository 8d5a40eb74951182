"""benchmarks/gpu_check.py stays working without a GPU: on the CPU with the tiny model, it decodes,
trains with the trainer's own step, writes its JSON, and stops itself at its time limit."""

from __future__ import annotations

import json

from tests.conftest import run_cli

SMALL = ["--model", "tiny:llama", "--prompts", "6", "--cpu-prompts", "3", "--train-steps", "2",
         "--warmup-steps", "1"]


def test_gpu_check_runs_on_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_cli("benchmarks/gpu_check.py", *SMALL, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["info"]["device"] == "cpu"
    decode = figures["phases"]["decode"]
    assert decode["on_device"]["examples"] == 6 and decode["on_cpu"]["examples"] == 3
    assert decode["compared"] == 3 and decode["identical_share"] == 1.0  # the same fp32 CPU run twice
    for mode in ("lora", "full"):
        train = figures["phases"][f"train_{mode}"]
        assert train["steps_timed"] == 2 and train["nonpad_tokens_per_s"] > 0 and not train["stopped_early"]
    assert figures["phases"]["train_lora"]["trainable"] < figures["phases"]["train_full"]["trainable"]
    assert figures["phases"]["train_zero2"] == {"skipped": "no CUDA device"}


def test_gpu_check_stops_itself_at_its_time_limit(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_cli("benchmarks/gpu_check.py", *SMALL, "--time-limit", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    phases = json.loads(out.read_text())["phases"]
    assert phases["decode"] == {"skipped": "time limit"}
    assert phases["train_lora"] == {"skipped": "time limit"} and phases["train_full"] == {"skipped": "time limit"}
