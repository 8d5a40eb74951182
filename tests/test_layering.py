"""Dependencies point one way: the grid's config and plan know nothing of the workers, the merge
executor or the heavy libraries, so that a grid loads, validates and plans (a dry run) without
them; workers/ and merge/ import the grid's contracts (grid/jobs.py, grid/sources.py,
grid/merges.py), never the reverse."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_config_and_plan_import_no_worker_merge_or_heavy_module():
    code = ("import json, sys; import grid.config, grid.plan; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = run_cli("-c", code)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not loaded & {"workers", "merge", "mergekit", "torch", "ray", "transformers", "peft", "deepspeed"}, loaded


def test_grid_status_imports_no_data_reader_or_report_library():
    """`python -m grid status` on a large results dir answers in about a second: its parser and its
    code path must not load HF datasets or the report's plotting and statistics stack."""
    code = ("import json, sys; import grid.__main__ as m; m.parser(); import grid.store, grid.tables; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = run_cli("-c", code)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not loaded & {"datasets", "matplotlib", "scipy", "nltk", "sklearn", "torch", "ray"}, loaded
