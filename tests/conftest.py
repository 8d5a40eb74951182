"""Shared test setup: offline Hugging Face, the real data beside the checkout, one local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

if not DATA.is_dir():
    pytest.exit(f"the real data is expected at {DATA} (../shared/data beside the checkout)", returncode=2)


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python <args>` the way a user would, capturing output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test that needs it in-process (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="module")
def s3():
    """A real S3 server on loopback (tests/s3server.py), its address and dummy credentials in this
    process's environment (the query helpers, boto3) and so in every driver a test starts."""
    from tests.s3server import start_s3

    server = start_s3()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with long end-to-end runs (marked slow) first, the most first: the suite runs a file
    to a worker on two workers (pyproject.toml), and the longest files starting early keep one
    from ending the run alone. Files keep their order otherwise."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
