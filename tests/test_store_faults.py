"""Faults on the object store: a grid with inference, a fine-tune and a merge runs on the suite's
S3 server through a fault-injecting proxy (tests/faultproxy.py: a seeded share of requests
answered 500, 503 SlowDown, a reset connection or a hang past the client's timeout, never more
than twice running for one request) and ends with the answers of a fault-free run; each retry is
logged with its reason; a fault that outlasts every retry (every write of one cell's predictions
answered 503) fails that cell alone, in one line, and the rest of the grid finishes."""

from __future__ import annotations

import re

import pytest
import yaml

from grid.compare import compare
from grid.config import load_config
from grid.plan import build_plan
from grid.query import cells
from tests.conftest import run_cli
from tests.faultproxy import S3_FAULTS, FaultProxy

GRID = {
    "name": "faults",
    "models": [{"name": "base", "source": "tiny:llama", "family": "decoder", "prompt_format": "chat"}],
    "tasks": ["fpb-sentiment"], "shots": [0], "finetune": ["none", "lora"],
    "decoding": {"mode": "constrained"}, "limits": {"test": 8, "train": 32}, "text_budget": 48,
    "inference": {"batch_size": 4},
    "recipes": {"decoder/lora": {"hparams": {"max_steps": 4, "batch_size": 4, "lr": 0.01,
                                             "checkpoint_every_steps": 2, "log_every_steps": 0}}},
    "merges": [{"name": "half", "method": "task_arithmetic", "base": {"model": "base"},
                "models": [{"model": "base", "task": "fpb-sentiment", "finetune": "lora", "weight": 0.5}]}],
}


@pytest.mark.slow
def test_a_grid_survives_faults_on_the_store(s3, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(GRID))
    plan = build_plan(load_config(config))
    victim = next(c for c in plan.cells if c.kind == "infer" and c.model == "base" and c.finetune == "none")
    clean = run_cli("grid/run.py", str(config), "--results", s3.uri("faults-clean"), "--num-cpus", "2")
    assert clean.returncode == 0, clean.stderr[-3000:]

    proxy = FaultProxy(f"http://127.0.0.1:{s3.port}", fault_rate=0.06, seed=4, faults=S3_FAULTS, hang_s=5.0,
                       errors="s3", max_in_a_row=2, fail_paths=(f"{victim.id}/predictions.parquet",)).start()
    try:
        # the S3 client's own retries (pyarrow's AWS SDK) are logged at its warn level
        faulty = run_cli("grid/run.py", str(config), "--results", s3.uri("faults"), "--num-cpus", "2",
                         env={"AWS_ENDPOINT_URL": proxy.url, "ARROW_S3_LOG_LEVEL": "warn"})
    finally:
        proxy.stop()
    text = faulty.stdout + faulty.stderr
    assert set(proxy.injected) == {*S3_FAULTS, "outlasting 503"}, proxy.injected  # every kind happened

    # the outlasting fault fails its own cell, in one line; every other cell is done
    assert faulty.returncode == 1, text[-3000:]
    assert f"ran {len(plan.cells)} cells (0 already done), 1 failed" in faulty.stdout
    records = {r["cell_id"]: r for r in cells(s3.uri("faults")).collect().to_dicts()}
    assert {cid for cid, r in records.items() if r["status"] != "done"} == {victim.id}
    error = records[victim.id]["error"]
    assert "\n" not in error and re.search(r"SlowDown|SLOW_DOWN|503", error), error

    # the rest equals a run with no fault: the same answers and metrics
    diff = compare(s3.uri("faults-clean"), s3.uri("faults"))
    assert diff.status == {victim.id: ("done", "failed")}
    assert not diff.answers and not diff.metrics and not diff.only_a and not diff.only_b, diff

    # each retry is logged with its reason: pyarrow's client (the AWS SDK's own lines), and the
    # claims' boto3 client (grid/claims.py)
    if proxy.injected_by["aws-sdk-cpp"]:
        assert "Request failed, now waiting" in text
        assert re.search(r"SlowDown|InternalError|Timeout was reached|Recv failure|Empty reply", text)
    if proxy.injected_by["boto3"]:
        assert re.search(r"S3 \w+: attempt \d of 5 failed \(.+\); retrying", text), text[-3000:]
