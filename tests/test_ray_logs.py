"""The driver's terminal shows the grid's progress and the workers' own lines, not Ray's chatter:
a warning from Ray Train's placement-group watcher, logged in a worker, lands in a file in the
Ray session's log folder instead (workers/ray_setup.py, installed by grid.execute.connect_ray)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli

DRIVER = '''
import logging, time
import ray
from grid.execute import connect_ray

connect_ray(1)

@ray.remote
def work():
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").warning(
        "Failed to query Ray Train Controller actor state. CHATTER")
    print("step 1/1 loss 0.5 WORKER-LINE", flush=True)
    return ray._private.worker.global_worker.node.get_logs_dir_path()

logs = ray.get(work.remote())
time.sleep(2)  # the log monitor forwards worker output once a second
print("LOGS", logs)
ray.shutdown()
'''


def test_ray_chatter_goes_to_a_file_and_worker_lines_reach_the_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = run_cli(str(script), timeout=180, env={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "WORKER-LINE" in out and "CHATTER" not in out
    logs = Path(next(line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("LOGS ")))
    assert "CHATTER" in (logs / "clfgrid-ray-chatter.log").read_text()
