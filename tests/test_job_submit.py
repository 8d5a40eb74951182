"""`ray job submit -- python grid/run.py GRID.yaml` against a real Ray head started on this machine:
the way the README says a grid runs on a cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from grid.query import cells, predictions
from tests.conftest import DATA, ROOT
from tests.test_grid_engine import write_grid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    gcs, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # other Rays on this machine may hold the default agent ports: take free ones
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        config = write_grid(tmp_path / "grid.yaml", tasks=["massive-intent"], shots=[0])
        results = tmp_path / "results"
        for _ in range(30):  # the head answers before its job agent is up: wait for the agent
            job = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 sys.executable, "grid/run.py", str(config), "--results", str(results), "--data", str(DATA)],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        table = cells(results).collect()
        assert table.height == 1 and table["status"].to_list() == ["done"]
        assert predictions(results).collect().height == 12
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
