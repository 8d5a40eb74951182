"""Run provenance: what a run records of its code, command, grid, machine and versions, how the
store keeps it in runs/, and what a report reads back (grid/provenance.py)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from grid.errors import GridError
from grid.provenance import PACKAGES, capture, provenance_markdown, report_provenance
from grid.registry import own_python
from grid.store import Store
from tests.conftest import ROOT
from tests.s3server import start_s3

GRID = "name: g\nmodels: [{name: m, source: \"tiny:llama\", family: decoder}]\ntasks: [massive-intent]\n"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=root,
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture()
def grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    return path


# --- capture ---------------------------------------------------------------------------------

def test_capture_in_this_checkout_gives_its_head_and_its_dirty_state(grid_file):
    record = capture(["python", "grid/run.py", str(grid_file)], grid_file)
    assert record["commit"] == git(ROOT, "rev-parse", "HEAD").strip()
    assert record["dirty"] == bool(git(ROOT, "status", "--porcelain", "--untracked-files=no").strip())


def test_the_dirty_flag_follows_tracked_files_only(tmp_path, grid_file):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", "code.py")
    git(repo, "commit", "-q", "-m", "first")
    clean = capture([], grid_file, root=repo)
    assert clean["commit"] == git(repo, "rev-parse", "HEAD").strip() and clean["dirty"] is False
    (repo / "scratch.log").write_text("untracked\n")
    assert capture([], grid_file, root=repo)["dirty"] is False  # untracked files do not count
    (repo / "code.py").write_text("x = 2\n")
    assert capture([], grid_file, root=repo)["dirty"] is True
    git(repo, "add", "code.py")
    assert capture([], grid_file, root=repo)["dirty"] is True  # staged, not committed


def test_outside_a_checkout_or_below_its_top_there_is_no_commit(tmp_path, grid_file):
    assert capture([], grid_file, root=tmp_path)["commit"] is None  # /tmp is no checkout
    below = capture([], grid_file, root=ROOT / "grid")  # a folder inside a checkout is not a project root
    assert (below["commit"], below["dirty"]) == (None, None)


@pytest.mark.parametrize("argv, secret", [
    (["--api-key", "sk-abc123"], "sk-abc123"),
    (["--api-key=hunter2"], "hunter2"),
    (["--hf-token", "hf_notARealToken99"], "notARealToken99"),
    (["OPENAI_API_KEY=plain-secret-value"], "plain-secret-value"),
    (["--results", "s3://bucket/r?access_key=AKID&secret_key=s3cr3t&region=eu"], "s3cr3t"),
    (["--results", "s3://AKID:s3cr3t@bucket/r"], "s3cr3t"),
    (["--note", "key is sk-proj-ABCdef_123 ok"], "sk-proj-ABCdef_123"),
])
def test_secrets_never_reach_the_command_line(grid_file, argv, secret):
    record = capture(["python", "grid/run.py", str(grid_file), *argv], grid_file)
    assert secret not in record["command"] and not any(secret in a for a in record["argv"])
    assert "REDACTED" in record["command"]
    assert record["argv"][:3] == ["python", "grid/run.py", str(grid_file)]  # the rest is kept as it was


def test_ordinary_arguments_are_kept_as_given(grid_file):
    argv = ["python", "grid/run.py", str(grid_file), "--results", "reports/task-risk", "--num-cpus", "2"]
    record = capture(argv, grid_file)
    assert record["argv"] == argv and record["command"] == " ".join(argv)


def test_the_grid_file_machine_and_versions(grid_file):
    record = capture([], grid_file)
    assert record["grid_sha256"] == hashlib.sha256(grid_file.read_bytes()).hexdigest()
    assert record["grid_text"] == GRID
    assert record["machine"]["cores"] == os.cpu_count() and record["machine"]["memory_bytes"] > 0
    assert "hostname" not in json.dumps(record)

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    versions = record["versions"]
    assert {k: v for k, v in versions.items() if k != "vllm"} == {n: installed(n) for n in PACKAGES if n != "vllm"}
    assert versions["torch"] and versions["ray"]  # installed here
    if own_python("vllm"):  # install.sh's .venv-vllm: vLLM's version read from there
        assert re.fullmatch(r"\d+\.\d+\.\d+\S* \(vllm(-cpu)?, its own environment\)", versions["vllm"])
    else:
        assert versions["vllm"] == installed("vllm")
    assert record["started_at"].endswith("Z")


# --- the store's runs/ ----------------------------------------------------------------------

@pytest.fixture()
def s3_results(monkeypatch):
    server = start_s3()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    yield server.uri("r")
    server.stop()


def round_trip(store: Store) -> None:
    assert store.runs() == []  # a results dir from before runs/ existed
    late = {"started_at": "2026-02-01T00:00:00Z", "commit": "b"}
    early = {"started_at": "2026-01-01T00:00:00Z", "commit": "a", "wall_s": 1.5}
    store.write_run("20260201T000000Z-2", late)
    store.write_run("20260101T000000Z-1", early)
    with store.fs.open_output_stream(f"{store.root}/runs/20260301T000000Z-3.json.tmp-abcd1234") as out:
        out.write(b"{half")  # a write under way
    assert store.runs() == [early, late]
    store.delete_run("20260201T000000Z-2")
    assert store.runs() == [early]


def test_store_runs_round_trip_oldest_first(tmp_path):
    round_trip(Store.open(tmp_path / "r"))


def test_store_runs_round_trip_on_an_object_store(s3_results):
    round_trip(Store.open(s3_results))


# --- what a report shows --------------------------------------------------------------------

def run_record(**extra) -> dict:
    return {"started_at": "2026-01-01T10:00:00Z", "finished_at": "2026-01-01T10:01:30Z", "wall_s": 90.0,
            "commit": "0123456789abcdef0123", "dirty": True, "argv": ["python", "grid/run.py", "g.yaml"],
            "command": "python grid/run.py g.yaml", "grid_path": "g.yaml", "grid_sha256": "ab" * 32,
            "grid_text": GRID, "machine": {"cpu": "Some CPU", "cores": 2, "memory_bytes": 8 * 2**30,
                                          "platform": "Linux-x"},
            "python": "3.11.7", "versions": {"torch": "2.13.0", "vllm": None},
            "ran": ["c1", "c2"], "failed": [], "already_done": ["c0"], "rescored": [], "elsewhere": [], **extra}


def test_report_provenance_sums_cell_seconds_and_reads_the_latest_grid(tmp_path):
    store = Store.open(tmp_path / "r")
    store.write_run("b", run_record(started_at="2026-01-02T00:00:00Z", grid_text="name: later\n"))
    store.write_run("a", run_record())
    records = [{"cell_id": "c2", "seconds": 2.25, "started_at": 100.0, "finished_at": 110.0},
               {"cell_id": "c1", "started_at": 100.0, "finished_at": 103.5},  # no seconds: its wall time
               {"cell_id": "c3", "status": "failed"}]  # failed before it started: no time
    prov = report_provenance(store, records)
    assert prov["cell_seconds"] == {"c1": 3.5, "c2": 2.25} and list(prov["cell_seconds"]) == ["c1", "c2"]
    assert prov["cell_seconds_total"] == 5.75
    assert prov["grid_text"] == "name: later\n"
    assert [r["started_at"] for r in prov["runs"]] == ["2026-01-01T10:00:00Z", "2026-01-02T00:00:00Z"]
    assert prov["runs"][0]["cells"] == {"ran": 2, "already_done": 1, "failed": 0, "rescored": 0, "elsewhere": 0}
    assert json.dumps(prov) == json.dumps(report_provenance(store, list(reversed(records))))  # deterministic

    text = "\n".join(provenance_markdown(prov))
    assert "commit 0123456789ab (dirty), 1m 30s wall; 2 cells ran (0 failed), 1 already done" in text
    assert "`python grid/run.py g.yaml`" in text and "sha256 abababababab" in text
    assert "Some CPU, 2 cores, 8.0 GiB, Linux-x; Python 3.11.7" in text
    assert "torch 2.13.0 (not installed: vllm)" in text and "5.8 s over 2 cells" in text


def test_a_results_dir_without_runs_and_a_run_without_an_end(tmp_path):
    store = Store.open(tmp_path / "r")
    prov = report_provenance(store, [])
    assert prov["runs"] == [] and prov["grid_text"] is None and prov["cell_seconds_total"] == 0
    assert "no run record: results written before runs/ existed" in "\n".join(provenance_markdown(prov))
    killed = {k: v for k, v in run_record().items() if k not in ("finished_at", "wall_s", "ran", "failed",
                                                                  "already_done", "rescored", "elsewhere")}
    store.write_run("a", killed)
    text = "\n".join(provenance_markdown(report_provenance(store, [])))
    assert "no end recorded (killed, or still running)" in text


# --- a run's own record: tests/test_grid_engine.py::test_run_rerun_and_add_a_seed ------------

@pytest.mark.parametrize("raised, kept", [(RuntimeError("worker lost"), True), (GridError("refused"), False)])
def test_a_crashed_run_keeps_its_record_with_the_error_and_a_refused_one_none(tmp_path, monkeypatch, raised, kept):
    """A crash (or Ctrl-C) in the middle of a run: the record ends with its error. A GridError from
    execute is a refusal before any cell ran: no run, no record."""
    import grid.execute
    from grid import run

    def fail(*_args, **_kwargs):
        raise raised

    monkeypatch.setattr(grid.execute, "execute", fail)
    config = tmp_path / "grid.yaml"
    config.write_text(GRID)
    results = tmp_path / "results"
    if kept:
        with pytest.raises(RuntimeError):
            run.main([str(config), "--results", str(results)])
        (record,) = Store.open(results, create=False).runs()
        assert record["error"] == "RuntimeError: worker lost" and record["wall_s"] >= 0 and "ran" not in record
    else:
        assert run.main([str(config), "--results", str(results)]) == 2
        assert Store.open(results, create=False).runs() == []
