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
    code = ("import json, sys; import grid.__main__ as m; m.parser(); import grid.store, grid.terminal; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = run_cli("-c", code)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not loaded & {"datasets", "matplotlib", "scipy", "nltk", "sklearn", "torch", "ray"}, loaded


# The wiring that runs jobs: the only modules of grid/ that may reach into workers/ and merge/.
WIRING = {"grid/execute.py", "grid/run.py"}


def test_no_module_of_grid_imports_workers_or_merge_except_the_wiring():
    """Every import of every module under grid/, the ones inside functions included, read from
    its source: the grid's contracts, store, scoring and reports stand without the executors."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    reaching = {}
    for path in sorted((root / "grid").rglob("*.py")):
        name = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=name)):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in ("workers", "merge") and name not in WIRING:
                    reaching[f"{name}:{node.lineno}"] = module
    assert not reaching, reaching
    assert len(list((root / "grid").rglob("*.py"))) > 30  # the walk saw the package
