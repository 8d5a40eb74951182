"""The LiteLLM backend: request building and caching on their own, then against a real
OpenAI-compatible server on loopback (`transformers serve` with the tiny decoder), through a
fault-injecting proxy, and a grid end to end through the real engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from grid.tasks import get_task
from tests.faultproxy import FaultProxy
from workers.litellm_backend import (
    APICallError,
    LiteLLMBackend,
    _RateLimiter,
    answer_schema,
    canonical_from_structured,
    response_format,
)
from workers.request_cache import RequestCache, default_cache_dir, request_key

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "sk-SENTINEL-7f3c9a1e5b2d4c6e8a0f"
KEY_ENV = "CLFGRID_TEST_API_KEY"


def item(i: int, task: str = "fpb-sentiment", mode: str = "free") -> dict:
    labels = {"fpb-sentiment": {"sentiment": ["negative", "neutral", "positive"]}}.get(task)
    return {"messages": [{"role": "user", "content": f"Text {i}. Label:"}], "task": task, "labels": labels,
            "words": None, "decoding": {"mode": mode, "max_new_tokens": 6, "temperature": 0.0,
                                        "length_normalized": False}}


# --- no server ---------------------------------------------------------------------------------


def test_schema_of_every_kind_of_task():
    from grid.data import label_sets

    intent = get_task("massive-intent")
    schema = answer_schema(intent, label_sets(intent), None)
    assert schema["properties"]["answer"]["enum"][:2] == list(label_sets(intent)["intent"])[:2]
    slots = answer_schema(get_task("massive-slots"), {"slots": ["date", "time"]}, 3)
    assert slots["properties"]["answer"] == {"type": "array",
                                             "items": {"type": "string", "enum": ["date", "time", "Other"]},
                                             "minItems": 3, "maxItems": 3}
    multi = response_format(get_task("massive-multi"), {"intent": ["a", "b"], "slots": ["date"]}, 2)
    props = multi["json_schema"]["schema"]["properties"]
    assert list(props) == ["task1", "task2"] and props["task1"]["enum"] == ["a", "b"]
    assert multi["type"] == "json_schema" and multi["json_schema"]["strict"] is True


def test_structured_replies_become_canonical_answers():
    assert canonical_from_structured('{"answer": "positive"}', get_task("fpb-sentiment")) == "positive"
    assert canonical_from_structured('{"answer": ["date", "Other"]}', get_task("massive-slots")) == '["date", "Other"]'
    multi = canonical_from_structured('{"task2": ["Other"], "task1": "alarm_set"}', get_task("massive-multi"))
    assert multi == '{"task1": "alarm_set", "task2": ["Other"]}'
    assert canonical_from_structured("not json", get_task("fpb-sentiment")) == "not json"


def test_request_key_covers_model_revision_endpoint_and_request():
    base = request_key("openai/tiny", None, "http://127.0.0.1:1/v1", {"messages": [1], "temperature": 0})
    assert base == request_key("openai/tiny", None, "http://127.0.0.1:1/v1", {"temperature": 0, "messages": [1]})
    for other in [request_key("openai/other", None, "http://127.0.0.1:1/v1", {"messages": [1], "temperature": 0}),
                  request_key("openai/tiny", "v2", "http://127.0.0.1:1/v1", {"messages": [1], "temperature": 0}),
                  request_key("openai/tiny", None, "http://127.0.0.1:2/v1", {"messages": [1], "temperature": 0}),
                  request_key("openai/tiny", None, "http://127.0.0.1:1/v1", {"messages": [1], "temperature": 1})]:
        assert other != base


def test_request_cache_persists(tmp_path, monkeypatch):
    cache = RequestCache(tmp_path)
    cache.put("k", "m", {"raw_output": "x", "cost_usd": 0.5})
    cache.put("k", "m", {"raw_output": "y"})  # the first answer stays
    assert RequestCache(tmp_path).get("k") == {"raw_output": "x", "cost_usd": 0.5}
    assert RequestCache(tmp_path).get("other") is None and len(cache) == 1
    monkeypatch.setenv("CLFGRID_CACHE", str(tmp_path / "root"))
    assert default_cache_dir({}) == tmp_path / "root" / "requests"
    assert default_cache_dir({"cache_dir": str(tmp_path / "c")}) == tmp_path / "c"


def test_rate_limiter_spaces_starts():
    limiter = _RateLimiter(50.0)
    start = time.monotonic()
    for _ in range(11):
        limiter.wait()
    assert time.monotonic() - start >= 0.19


def test_constrained_request_uses_schema_only_when_supported(tmp_path):
    spec = {"model_name": "openai/tiny", "options": {"api_base": "http://127.0.0.1:9/v1", "cache_dir": str(tmp_path)}}
    assert "response_format" not in LiteLLMBackend(spec).build_request(item(0, mode="constrained"))
    forced = LiteLLMBackend({**spec, "options": {**spec["options"], "structured_outputs": "json_schema"}})
    req = forced.build_request(item(0, mode="constrained"))
    assert (req["response_format"]["json_schema"]["schema"]["properties"]["answer"]["enum"]
            == ["negative", "neutral", "positive"])
    assert "response_format" not in forced.build_request(item(0, mode="free"))


def test_sampled_requests_differ_by_seed_and_greedy_ones_do_not(tmp_path):
    backend = LiteLLMBackend({"model_name": "openai/tiny", "options": {"api_base": "http://127.0.0.1:9/v1",
                                                                      "cache_dir": str(tmp_path)}})

    def key(seed: int, temperature: float) -> str:
        it = item(0)
        it = {**it, "seed": seed, "decoding": {**it["decoding"], "temperature": temperature}}
        return backend.keyed_request(it)[1]

    assert key(0, 0.7) != key(1, 0.7)  # two seeds of a sampled cell: two samples, not one cached answer
    assert key(0, 0.0) == key(1, 0.0)  # greedy answers do not depend on the seed: shared
    assert backend.build_request({**item(0), "seed": 3,
                                  "decoding": {**item(0)["decoding"], "temperature": 0.5}})["seed"] == 3


def test_errors_never_carry_the_key(tmp_path, monkeypatch):
    import litellm

    monkeypatch.setenv(KEY_ENV, SENTINEL)

    def fail(**kwargs):
        raise litellm.AuthenticationError(f"bad key {kwargs['api_key']}", llm_provider="openai", model="tiny")

    monkeypatch.setattr(litellm, "completion", fail)
    backend = LiteLLMBackend({"model_name": "openai/tiny", "options": {
        "api_base": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV, "cache_dir": str(tmp_path)}})
    with pytest.raises(APICallError) as err:
        backend.generate([item(0)])
    assert SENTINEL not in str(err.value) and "***" in str(err.value)
    assert backend.sent == 1  # a 401 is not retried


# --- a real server on loopback --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transformers serve` with the tiny decoder, served as model `tiny` (a folder of its cwd)."""
    from workers.models import resolve

    folder = tmp_path_factory.mktemp("serve")
    (folder / "tiny").symlink_to(resolve("tiny:llama"))
    port = _free_port()
    exe = Path(sys.executable).parent / "transformers"
    log = open(folder / "serve.log", "w")  # noqa: SIM115 - the server writes to it while the fixture lives
    proc = subprocess.Popen([str(exe), "serve", "tiny", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], cwd=folder, stdout=log, stderr=log,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {(folder / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("transformers serve did not come up in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def backend_for(url: str, cache_dir: Path, **options) -> LiteLLMBackend:
    return LiteLLMBackend({"model_name": "openai/tiny", "options": {
        "api_base": url + "/v1", "cache_dir": str(cache_dir), "timeout_s": 1.5, "backoff_s": 0.05,
        "max_retries": 10, "max_concurrency": 4, **options}})


def test_real_server_answers_and_cache_sends_nothing_twice(server, tmp_path):
    proxy = FaultProxy(server).start()
    try:
        backend = backend_for(proxy.url, tmp_path)
        first = backend.generate([item(i) for i in range(6)])
        assert proxy.requests == 6 and all(not a["cached"] for a in first)
        assert all(a["n_prompt_tokens"] > 0 and a["n_output_tokens"] > 0 and a["cost_usd"] == 0.0 for a in first)
        again = backend_for(proxy.url, tmp_path).generate([item(i) for i in range(6)])  # a fresh process would too
        assert proxy.requests == 6 and all(a["cached"] for a in again)
        assert [a["raw_output"] for a in again] == [a["raw_output"] for a in first]
    finally:
        proxy.stop()


def test_thirty_percent_faults_are_retried_through(server, tmp_path):
    proxy = FaultProxy(server, fault_rate=0.3, seed=1, hang_s=3.0).start()
    try:
        answers = backend_for(proxy.url, tmp_path, requests_per_second=20).generate([item(i) for i in range(12)])
        assert len(answers) == 12 and all(isinstance(a["raw_output"], str) for a in answers)
        assert sum(proxy.injected.values()) >= 2 and proxy.forwarded == 12
    finally:
        proxy.stop()


RUNNER = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from grid.config import load_config
from grid.data import data_dir_arg
from grid.execute import execute
from grid.plan import build_plan
from grid.store import Store
import ray
config = load_config(sys.argv[1])
data = data_dir_arg(None)
summary = execute(build_plan(config, data), config, Store.open(sys.argv[2]), data, num_cpus=2)
session = ray._private.worker._global_node.get_session_dir_path()
print(json.dumps({"ran": len(summary.ran), "failed": sorted(summary.failed), "session": session}))
"""


def _grid(path: Path, flaky_url: str, dead_url: str, cache_dir: Path) -> Path:
    common = {"api_key_env": KEY_ENV, "cache_dir": str(cache_dir), "timeout_s": 1.5, "backoff_s": 0.05,
              "max_concurrency": 4, "requests_per_second": 40}
    grid = {
        "name": "api-test",
        "models": [
            {"name": "tiny-api", "source": "openai/tiny", "family": "api", "backend": "litellm",
             "options": {**common, "api_base": flaky_url + "/v1", "max_retries": 12}},
            {"name": "tiny-dead", "source": "openai/tiny-dead", "family": "api", "backend": "litellm",
             "options": {**common, "api_base": dead_url + "/v1", "max_retries": 2, "breaker_after": 2}},
        ],
        "tasks": ["fpb-sentiment", "massive-slots"],
        "decoding": [{"mode": "free", "max_new_tokens": 8}],
        "limits": {"test": 6},
        "inference": {"batch_size": 3, "retries": 1},
    }
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


def _run_grid(config: Path, results: Path) -> tuple[dict, str]:
    env = {**os.environ, KEY_ENV: SENTINEL, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(config), str(results)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def _files_with(folder: Path, needle: str) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                if needle.encode() in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                pass
    return hits


@pytest.mark.slow
def test_grid_end_to_end_faults_failures_cache_and_no_key_leak(server, tmp_path):
    """Through the real engine (Ray Data, Predictor, store): a model behind 30% faults finishes
    every cell, a permanently failing one is marked failed while the others finish, a second run
    sends 0 requests, and the API key is in no result file and no log."""
    flaky = FaultProxy(server, fault_rate=0.3, seed=2, hang_s=3.0).start()
    dead = FaultProxy(server, fault_rate=1.0, faults=("500",)).start()
    try:
        config = _grid(tmp_path / "grid.yaml", flaky.url, dead.url, tmp_path / "cache")
        first, log1 = _run_grid(config, tmp_path / "results1")
        assert first["ran"] == 4 and len(first["failed"]) == 2
        cells = [json.loads(p.read_text()) for p in (tmp_path / "results1").rglob("cell.json")]
        status = {(c["cell"]["model"], c["cell"]["task"]): c["status"] for c in cells}
        assert status == {("tiny-api", "fpb-sentiment"): "done", ("tiny-api", "massive-slots"): "done",
                          ("tiny-dead", "fpb-sentiment"): "failed", ("tiny-dead", "massive-slots"): "failed"}
        assert sum(flaky.injected.values()) >= 2 and flaky.forwarded == 12
        # The dead model's breaker opened after 2 requests failed for good (3 tries each). Of its
        # 12 examples x 2 chunk tries x 3 tries = 72 requests, only the first chunk's went out
        # (both its tries may start before the breaker counts 2: 2 x 3 x 3); that chunk may fail
        # with the server's own error, every later one with the open circuit.
        assert dead.requests <= 2 * 3 * 3
        assert any("circuit open" in c["error"] for c in cells if c["status"] == "failed")
        assert any(a.startswith("Bearer sk-SENTINEL") for a in flaky.auth_headers)  # the key was sent

        flaky.reset_counts()
        second, log2 = _run_grid(config, tmp_path / "results2")  # a fresh results dir, the same cache
        assert flaky.requests == 0
        assert second["ran"] == 4 and len(second["failed"]) == 2
        # Usage tells what the answers cost from what each run paid: run 2 paid for nothing.
        from grid.query import cells, predictions

        for results, n_cached in ((tmp_path / "results1", 0), (tmp_path / "results2", 6)):
            done = cells(results).filter(pl.col("status") == "done").collect()
            assert done["n_examples"].to_list() == [6, 6] and done["n_cached"].to_list() == [n_cached] * 2
            assert (done["n_prompt_tokens"] > 0).all() and done["spent_usd"].to_list() == [0.0, 0.0]
            assert predictions(results).select(pl.col("cached").sum()).collect().item() == 2 * n_cached

        for folder in (tmp_path / "results1", tmp_path / "results2", Path(first["session"]) / "logs",
                       Path(second["session"]) / "logs"):
            assert _files_with(folder, SENTINEL) == [], folder
        assert SENTINEL not in log1 and SENTINEL not in log2
        assert "sk-SENTINEL" not in log1 + log2
    finally:
        flaky.stop()
        dead.stop()
