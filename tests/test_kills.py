"""Kills at random, the short version of benchmarks/kill_at_random.py: 3 SIGKILLs of the driver
(with its local Ray) or of a Ray worker, across a grid with inference, fine-tune and merge cells
(the benchmark's grid on its first task only), each followed by a rerun; the end state equals an
uninterrupted run's: its predictions, no finished cell run again, no corrupt parquet. The suite's
one proof of a driver killed midway."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_three_kills_change_nothing(tmp_path):
    out = tmp_path / "kills.json"
    proc = run_cli("benchmarks/kill_at_random.py", "--kills", "3", "--seed", "1", "--max-delay", "30",
                   "--tasks", "fpb-sentiment", "--test-rows", "24", "--work", str(tmp_path / "work"), "--out", str(out),
                   timeout=1500)
    figures = json.loads(out.read_text()) if out.exists() else {}
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], figures)
    assert figures["kills"] == 3 and figures["runs"] >= 2 and figures["all_done"]
    # seed 1 kills the driver with its local Ray at 9.1 s (and at 5.8 s and 14.6 s a worker, or
    # the driver where no worker is up yet)
    assert figures["driver_kills"] >= 1, figures["events"]
    assert figures["cells_run_twice"] == 0 and figures["corrupt_parquet"] == []
    assert figures["predictions_equal"], figures["difference"]
