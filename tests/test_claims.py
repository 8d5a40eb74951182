"""Two drivers on one results dir: claims (grid/claims.py) on a disk and on a real S3 server (its
conditional writes; a server that ignores them), then two real drivers on one grid on S3."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from grid.claims import CLAIM_FILE, DRIVERS_DIR, Claims
from grid.errors import GridError
from grid.store import Store
from tests.conftest import ROOT
from tests.faultproxy import FaultProxy
from tests.s3server import s3_files


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
        mine = json.loads(path.read_text())
        path.write_text(json.dumps({**mine, "host": "elsewhere"}))  # only the heartbeat can keep it
        time.sleep(1.6)
        assert not other.claim("c1")  # touched every 0.2 s: never stale
    finally:
        a.close()
        other.close()


def test_claims_on_s3_are_exclusive_and_a_stale_one_is_taken_over_once(s3):
    store = Store.open(s3.uri("claims-a"))
    a, b = Claims(store, beat_every=600), Claims(store, stale_after=1.0)
    assert a.enabled and b.enabled  # the server writes conditionally (probed)
    try:
        assert a.claim("c1") and not b.claim("c1")
        assert b.holder("c1")["driver"] == a.me["driver"] and a.holder("c1") is None
        a.release("c1")
        assert b.claim("c1") and not a.claim("c1")
        b._stop.set()  # b stops refreshing: by the server's clock its claim goes stale after 1 s
        time.sleep(2.2)
        c, d = Claims(store, stale_after=1.0), Claims(store, stale_after=1.0)
        seen = c.files.read("c1")
        assert seen.owner["driver"] == b.me["driver"] and seen.age >= 1.0
        # two drivers take the stale claim over from the same sight of it: only one write wins
        won = [c.files.replace("c1", seen, c._body()), d.files.replace("c1", seen, d._body())]
        assert won[0] is not None and won[1] is None
        b.release("c1")  # b's version is gone: its release leaves c's claim alone
        assert c.files.read("c1").owner["driver"] == c.me["driver"]
    finally:
        for claims in (a, b):
            claims.close()


def test_the_heartbeat_keeps_an_s3_claim_and_notices_a_take_over(s3, caplog):
    store = Store.open(s3.uri("claims-b"))
    a = Claims(store, stale_after=1.5, beat_every=0.3)
    other = Claims(store, stale_after=1.5)
    try:
        assert a.claim("c1")
        time.sleep(2.5)
        assert not other.claim("c1")  # refreshed every 0.3 s: never stale
        seen = other.files.read("c1")
        assert other.files.replace("c1", seen, other._body()) is not None  # as if a had been seen stale
        with caplog.at_level("WARNING", logger="clfgrid.claims"):
            time.sleep(1.0)
        assert "c1" not in a.held
        assert any("taken over by another driver" in r.getMessage() for r in caplog.records)
        a.release("c1")
        assert other.files.read("c1").owner["driver"] == other.me["driver"]  # a deleted nothing of other's
    finally:
        a.close()
        other.close()


def test_a_store_without_conditional_writes_refuses_a_second_driver(s3, monkeypatch, caplog):
    """An S3-compatible server that ignores If-None-Match / If-Match (the proxy drops them): a
    driver says cells cannot be claimed, and a second driver is refused while the first runs."""
    proxy = FaultProxy(f"http://127.0.0.1:{s3.port}", drop_headers=("If-None-Match", "If-Match")).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        store = Store.open(s3.uri("claims-c"))
        with caplog.at_level("WARNING", logger="clfgrid.claims"):
            first = Claims(store)
        assert not first.enabled and first.claim("c1")
        assert any("ignores conditional writes" in r.getMessage() for r in caplog.records)
        with pytest.raises(GridError, match=r"another driver .* is running on it .* cannot write conditionally"):
            Claims(store)
        first.close()
        Claims(store).close()  # once the first has ended, a driver starts
        fs, root = store.fs, store.root
        import pyarrow.fs as pafs

        left = fs.get_file_info(pafs.FileSelector(f"{root}/{DRIVERS_DIR}", allow_not_found=True))
        assert left == []  # each driver removes its announcement
    finally:
        proxy.stop()


@pytest.mark.slow
def test_two_drivers_on_one_grid_on_s3_run_each_cell_once(s3, tmp_path):
    """Two real drivers started together on one S3 prefix: the claims are conditional writes on
    the server (the disk's claims are the same code over other writes, tested above)."""
    grid = {"name": "two", "models": [{"name": "tiny", "source": "tiny:llama", "family": "decoder",
                                       "prompt_format": "chat"}],
            "tasks": ["massive-intent", "fpb-sentiment"], "shots": [0], "finetune": ["none", "lora"],
            "decoding": {"mode": "free", "max_new_tokens": 4}, "limits": {"test": 8, "train": 16},
            "text_budget": 32, "inference": {"batch_size": 4},
            "recipes": {"decoder/lora": {"hparams": {"max_steps": 2, "batch_size": 4, "log_every_steps": 0}}}}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    results = s3.uri("two")
    drivers = [subprocess.Popen([sys.executable, "grid/run.py", str(config), "--results", str(results),
                                 "--num-cpus", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [d.communicate(timeout=900) for d in drivers]
    for d, (_out, err) in zip(drivers, outputs):
        assert d.returncode == 0, err[-3000:]
    label = r"\] done ((?:infer|finetune) \S+ \S+ \d-shot ft=\S+ seed=\d+(?: free)?)"
    done_lines = [m for out, err in outputs for m in re.findall(label, out + err)]
    from grid.query import cells, predictions

    records = cells(results).collect()
    assert records.height == 6 and set(records["status"]) == {"done"}
    assert len(done_lines) == 6 and len(set(done_lines)) == 6, done_lines  # each cell ran once, by one driver
    assert not [f for f in s3_files(results) if f.endswith(CLAIM_FILE)]
    counts = predictions(results).group_by("cell_id").len().collect()
    assert counts.height == 4 and set(counts["len"]) == {8}
