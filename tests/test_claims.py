"""Two drivers on one results dir: claims (grid/claims.py), then two real drivers on one grid."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from grid.claims import CLAIM_FILE, Claims
from grid.store import Store
from tests.conftest import ROOT


def test_a_claim_is_exclusive_and_released(tmp_path):
    store = Store.open(tmp_path / "r")
    a, b = Claims(store), Claims(store)
    try:
        assert a.claim("c1") and not b.claim("c1")
        assert b.holder("c1")["driver"] == a.me["driver"] and a.holder("c1") is None
        a.release("c1")
        assert not (tmp_path / "r" / "cells" / "c1" / CLAIM_FILE).exists()
        assert b.claim("c1")
    finally:
        a.close()
        b.close()
    assert not list((tmp_path / "r").rglob(CLAIM_FILE))  # close gives back what is held


def test_a_stale_claim_is_taken_over_once(tmp_path):
    store = Store.open(tmp_path / "r")
    path = tmp_path / "r" / "cells" / "c1" / CLAIM_FILE
    path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = Claims(store)
    path.write_text(json.dumps({**owner.me, "pid": int(dead.stdout), "driver": "gone"}))  # a dead driver here
    owner.close()
    a, b = Claims(store), Claims(store)
    try:
        assert a.holder("c1") is None  # its owner is dead
        assert a.claim("c1") and not b.claim("c1")
        # on another host only the heartbeat tells: untouched for stale_after seconds
        path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "driver": "far"}))
        fresh = Claims(store, stale_after=30)
        assert not fresh.claim("c1")
        old = time.time() - 60
        import os

        os.utime(path, (old, old))
        assert fresh.claim("c1")
        fresh.close()
    finally:
        a.close()
        b.close()


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path):
    store = Store.open(tmp_path / "r")
    a = Claims(store, stale_after=1.0, beat_every=0.2)
    other = Claims(store, stale_after=1.0)
    try:
        path = tmp_path / "r" / "cells" / "c1" / CLAIM_FILE
        assert a.claim("c1")
        path.write_text(json.dumps({**a.me, "host": "elsewhere"}))  # only the heartbeat can keep it
        time.sleep(1.6)
        assert not other.claim("c1")  # touched every 0.2 s: never stale
    finally:
        a.close()
        other.close()


@pytest.mark.slow
def test_two_drivers_on_one_grid_run_each_cell_once(tmp_path):
    grid = {"name": "two", "models": [{"name": "tiny", "source": "tiny:llama", "family": "decoder",
                                       "prompt_format": "chat"}],
            "tasks": ["massive-intent", "fpb-sentiment"], "shots": [0], "finetune": ["none", "lora"],
            "decoding": {"mode": "free", "max_new_tokens": 4}, "limits": {"test": 8, "train": 16},
            "text_budget": 32, "inference": {"batch_size": 4},
            "recipes": {"decoder/lora": {"hparams": {"max_steps": 2, "batch_size": 4, "log_every_steps": 0}}}}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    results = tmp_path / "results"
    drivers = [subprocess.Popen([sys.executable, "grid/run.py", str(config), "--results", str(results),
                                 "--num-cpus", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [d.communicate(timeout=900) for d in drivers]
    for d, (_out, err) in zip(drivers, outputs):
        assert d.returncode == 0, err[-3000:]
    label = r"\] done ((?:infer|finetune) \S+ \S+ \d-shot ft=\S+ seed=\d+(?: free)?)"
    done_lines = [m for out, err in outputs for m in re.findall(label, out + err)]
    records = [json.loads(p.read_text()) for p in results.glob("cells/*/cell.json")]
    assert len(records) == 6 and {r["status"] for r in records} == {"done"}
    assert len(done_lines) == 6 and len(set(done_lines)) == 6, done_lines  # each cell ran once, by one driver
    assert not list(results.rglob(CLAIM_FILE))
    import pyarrow.parquet as pq

    for parquet in results.glob("cells/*/predictions.parquet"):
        assert pq.read_table(parquet).num_rows == 8
