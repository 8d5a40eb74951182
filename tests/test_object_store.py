"""Results on an object store, a real S3 server (moto, on loopback): a driver killed in the middle
of a fine-tune resumes against it from the fine-tune's S3 checkpoint, with no finished cell
redone; a model is published there whole or not at all and fetched into a node's cache once, by
content. (A fine-tune on S3 whose inference runs on another
node, against a local run: tests/test_multinode.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from grid.errors import GridError
from grid.store import Store
from tests.conftest import ROOT, run_cli
from tests.s3server import s3_files

TINY = {"name": "tiny-llama", "source": "tiny:llama", "family": "decoder", "prompt_format": "chat"}
# a full fine-tune of the tiny decoder (4 steps) and its inference cell
FINETUNE_GRID = {
    "name": "s3", "models": [TINY], "tasks": ["massive-intent"], "shots": [0], "finetune": ["full"],
    "decoding": {"mode": "free", "max_new_tokens": 6}, "limits": {"test": 8, "train": 32}, "text_budget": 48,
    "inference": {"batch_size": 4},
    "recipes": {"decoder/full": {"hparams": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "max_length": 1024,
                                             "log_every_steps": 0}}},
}


@pytest.mark.slow
def test_a_fine_tune_killed_on_s3_resumes_from_its_s3_checkpoint(s3, tmp_path):
    """The driver (and its local Ray) SIGKILLed in the middle of a fine-tune whose checkpoints
    are on S3: the rerun resumes from the newest S3 checkpoint (the steps before it not redone),
    leaves the cell finished before the kill untouched, and a report is written beside it."""
    grid = {**FINETUNE_GRID, "finetune": ["none", "full"], "limits": {"test": 4, "train": 200},
            "recipes": {"decoder/full": {"hparams": {"max_steps": 30, "batch_size": 4, "lr": 1e-3, "max_length": 1024,
                                                     "checkpoint_every_steps": 6, "log_every_steps": 0}}}}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    remote = s3.uri("resume")
    proc = subprocess.Popen([sys.executable, "grid/run.py", str(config), "--results", remote, "--num-cpus", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints: list[str] = []
    deadline = time.time() + 600  # Ray's start-up takes minutes when other work shares the 2 cores
    while time.time() < deadline and not checkpoints and proc.poll() is None:
        time.sleep(0.5)
        checkpoints = [f for f in s3_files(remote) if "/checkpoints/step_" in f]
    assert proc.poll() is None, "the driver exited before a checkpoint was written"
    time.sleep(1)  # let the checkpoint's files land before the kill
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    fs, root = pafs.FileSystem.from_uri(remote)
    finished = {f: fs.get_file_info(f"{root}/{f}").mtime for f in s3_files(remote) if f.endswith("/cell.json")}
    assert len(finished) == 1, f"the base model's cell finishes first, the kill lands in the fine-tune: {finished}"

    resumed = run_cli("grid/run.py", str(config), "--results", remote, "--num-cpus", "2")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "ran 2 cells (1 already done)" in resumed.stdout
    assert all(fs.get_file_info(f"{root}/{f}").mtime == t for f, t in finished.items())  # not rewritten
    records = Store.open(remote, create=False).records()
    assert [r["status"] for r in records] == ["done"] * 3
    metrics = next(r["metrics"] for r in records if r["cell"]["kind"] == "finetune")
    assert 0 < metrics["resumed_from_step"] < 30 and metrics["steps"] == 30  # from an S3 checkpoint, not step 0
    assert metrics["steps_run"] == 30 - metrics["resumed_from_step"]  # the steps before it not redone

    from grid.report import write_report

    write_report(remote, s3.uri("resume/report"), n_boot=50)  # the report beside the results
    assert {"table3.md", "report.html", "report.json"} <= set(s3_files(s3.uri("resume/report")))


def test_a_model_is_fetched_once_per_node_by_content(s3, tmp_path, monkeypatch):
    import workers.models
    from workers import artifacts

    monkeypatch.setattr(workers.models, "CACHE_DIR", tmp_path / "cache")
    uri = s3.uri("artifacts/cells/c1/model")
    with pytest.raises(GridError, match="no published model there"):
        artifacts.fetch(uri)
    with artifacts.staging(uri) as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "w.bin").write_bytes(b"one")
    first = artifacts.fetch(uri)
    assert Path(first, "sub", "w.bin").read_bytes() == b"one"
    assert artifacts.fetch(uri) == first  # from the cache: no second download
    with artifacts.staging(uri) as folder:  # published again with other bytes: a new cache folder
        (folder / "w.bin").write_bytes(b"two")
    second = artifacts.fetch(uri)
    assert second != first and sorted(os.listdir(second)) == ["w.bin"]
    with pytest.raises(RuntimeError), artifacts.staging(uri):  # a writer that fails publishes nothing
        raise RuntimeError("killed")
    assert artifacts.fetch(uri) == second
