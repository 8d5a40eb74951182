"""Two Ray nodes on this machine that share no path, only a real S3 server (moto on loopback):
a head (`ray start --head`, custom resource `trainer`) and a second node (`ray start --address`,
custom resource `predictor`), each with its own temp dir, HOME and model cache. The grid is
submitted with `ray job submit`; its fine-tune cell is placed on the head, its inference cells on
the other node, which gets the fine-tuned model from S3 and builds the base model (never seen
there) into its own cache, not from the driver's path; the predictions equal a local run's.
The suite's one `ray job submit -- python grid/run.py ...` against a real head, as the README runs a
grid on a cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from grid.query import cells, predictions
from tests.conftest import DATA, ROOT, run_cli
from tests.s3server import free_port, s3_files, start_s3
from tests.test_object_store import FINETUNE_GRID

RAY = Path(sys.executable).parent / "ray"
GRID = {**FINETUNE_GRID, "finetune": ["none", "full"]}  # the base model's cell and the fine-tuned one's

pytestmark = pytest.mark.slow  # 4-6 minutes on 2 shared cores; the default suite (.ci/run) runs it


def start_node(env: dict[str, str], tmp: Path, name: str, *args: str) -> subprocess.Popen:
    """One `ray start --block` with its own temp dir, HOME and model cache (CLFGRID_CACHE)."""
    home = tmp / name
    home.mkdir()
    node_env = {**env, "HOME": str(home), "CLFGRID_CACHE": str(home / "cache")}
    temp_dir = tempfile.mkdtemp(prefix=f"mn{name[0]}", dir="/tmp")  # Ray's socket paths must stay short
    (home / "ray_temp_dir").write_text(temp_dir)
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--num-cpus=2", "--object-store-memory=200000000", f"--temp-dir={temp_dir}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", *args],
        env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_node(node: subprocess.Popen, home: Path) -> None:
    os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
    shutil.rmtree((home / "ray_temp_dir").read_text(), ignore_errors=True)


@pytest.fixture
def s3():
    server = start_s3()
    yield server
    server.stop()


def test_finetune_on_one_node_inference_on_the_other_results_on_s3(s3, tmp_path):
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled"}
    gcs, dash = free_port(), free_port()
    nodes = [start_node(env, tmp_path, "head", "--head", f"--port={gcs}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", '--resources={"trainer": 1}')]
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 300  # minutes when other work shares the 2 cores
        while subprocess.run([str(RAY), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert nodes[0].poll() is None, "the head node exited"
            assert time.time() < deadline, "the head's job server did not come up"
            time.sleep(2)
        nodes.append(start_node(env, tmp_path, "worker", f"--address=127.0.0.1:{gcs}",
                                '--resources={"predictor": 1}'))
        grid = json.loads(json.dumps(GRID))
        grid["recipes"]["decoder/full"]["resources"] = {"custom_resources": {"trainer": 1}}
        grid["inference"]["custom_resources"] = {"predictor": 1}
        config = tmp_path / "grid.yaml"
        config.write_text(yaml.safe_dump(grid))
        results = s3.uri("multinode")
        runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                    "LITELLM_LOCAL_MODEL_COST_MAP": "True", "CLFGRID_DATA": str(DATA)}}
        for _ in range(30):  # the head answers before its job agent is up, and the worker joins late
            job = subprocess.run(
                [str(RAY), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps(runtime_env), "--",
                 sys.executable, "grid/run.py", str(config), "--results", results, "--data", str(DATA)],
                env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]

        from ray.util.state import list_actors, list_nodes

        node_of = {n.node_id: ("head" if n.is_head_node else "worker") for n in list_nodes(address=address)}
        placed = {(a.class_name, node_of[a.node_id]) for a in list_actors(address=address, limit=1000, detail=True)
                  if a.node_id}  # an actor never placed (Ray Data's spare pool slots) has no node
        assert ("RayTrainWorker", "head") in placed, placed
        assert any("Predictor" in cls and node == "worker" for cls, node in placed), placed
        assert not any("Predictor" in cls and node == "head" for cls, node in placed), placed
    finally:
        for node, name in reversed(list(zip(nodes, ["head", "worker"]))):
            stop_node(node, tmp_path / name)
        os.environ.update(s3.env)  # the query helpers below read S3 in this process

    # the worker node got the fine-tuned model from S3 into its own cache, and resolved the base
    # model itself (the driver, on the head, handed it the source, not a path in the head's cache)
    worker_cache, head_cache = tmp_path / "worker" / "cache", tmp_path / "head" / "cache"
    assert len(list((worker_cache / "artifacts").iterdir())) == 1
    built = sorted(p.name for p in (worker_cache / "models").iterdir())
    assert len(built) == 1 and built[0].startswith("tiny-llama-"), built
    assert built == sorted(p.name for p in (head_cache / "models").iterdir())  # the same build, made twice
    finetune_id = cells(results).filter(pl.col("kind") == "finetune").collect()["cell_id"][0]
    files = s3_files(results)
    assert f"cells/{finetune_id}/model.manifest.json" in files  # the model, published with its manifest last
    assert any(f.startswith(f"cells/{finetune_id}/checkpoints/") and "step_00000004" in f for f in files)
    assert cells(results).collect()["status"].to_list() == ["done"] * 3

    local = tmp_path / "local"  # the same grid without placement, on a local Ray and a local dir
    config.write_text(yaml.safe_dump(GRID))
    proc = run_cli("grid/run.py", str(config), "--results", str(local), "--num-cpus", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    cols = ["example_id", "raw_output", "prediction"]
    a = predictions(results).select(cols).sort("example_id").collect()
    b = predictions(local).select(cols).sort("example_id").collect()
    assert a.height == 16 and a.equals(b)
