"""The bad-input corpus: grid YAML, task YAML, data files, model sources, merge recipes, CLI
arguments and model outputs that cannot be used. Each, run the way a user runs it (a few in a
process of their own, the rest through the same main(argv) in-process), gives exit code 2 and one
line on stderr that names the file and the field or row, no traceback, and leaves the results dir
byte for byte as it was."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli

TASK = """\
name: t
description: a test task
data:
  files: {train: d/train.jsonl, test: d/test.jsonl}
  read: {format: jsonl}
  text: text
  fields:
    label: {column: label}
subtasks:
  - {name: label, field: label, type: label}
"""
ROW = '{"text": "wake me at nine", "label": "alarm"}\n{"text": "play jazz", "label": "music"}\n'
GRID = """\
name: g
models:
  - {name: m, source: "tiny:llama", family: decoder}
tasks: [t]
"""


# A finished inference cell's record, as far as `grid compare`, `grid status` and reports read it.
DONE_INFER = {"cell_id": "abc", "status": "done", "metrics": {"label/accuracy": 1.0},
              "cell": {"kind": "infer", "model": "m", "family": "decoder", "backend": "transformers", "task": "t",
                       "shots": 0, "finetune": "none", "seed": 0, "decoding": None, "prompt_format": "plain"}}


@dataclass
class Case:
    """What to write (relative path -> text), the command, and what the one line must say."""

    files: dict[str, str]
    argv: list[str]
    says: list[str]  # fragments; "{tmp}" is the case's folder


def grid_case(grid: str, *says: str, task: str = TASK, train: str = ROW * 3, test: str = ROW,
              extra: dict[str, str] | None = None) -> Case:
    files = {"grid.yaml": grid, "tasks/t.yaml": task, "data/d/train.jsonl": train, "data/d/test.jsonl": test,
             **(extra or {})}
    return Case(files, ["grid/run.py", "{tmp}/grid.yaml", "--results", "{tmp}/results", "--tasks", "{tmp}/tasks",
                        "--data", "{tmp}/data"], list(says))


def task_case(task: str, *says: str, train: str = ROW * 3, test: str = ROW) -> Case:
    return grid_case(GRID, *says, task=task, train=train, test=test)


def score_case(table: pa.Table | bytes, *says: str) -> Case:
    return Case({"preds.parquet": table}, ["-m", "grid", "score", "{tmp}/preds.parquet", "--task", "t",
                                           "--tasks", "{tmp}/tasks", "--data", "{tmp}/data"], list(says))


LINES_TASK = """\
name: t
description: a test task in line files
data:
  files: {train: d/train, test: d/test}
  read: {format: lines, line_files: {text: seq.in, label: label}}
  text: text
  fields:
    label: {column: label}
subtasks:
  - {name: label, field: label, type: label}
"""
RUN = ["grid/run.py", "{tmp}/grid.yaml", "--results", "{tmp}/results", "--tasks", "{tmp}/tasks", "--data", "{tmp}/data"]
PROMPT = ["-m", "grid", "prompt", "t", "--index", "0", "--tasks", "{tmp}/tasks", "--data", "{tmp}/data"]
ALIASES = "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10 if p else ["x"] * 10) + "]\n"
                  for p, c in zip(["", *"abcdef"], "abcdefg"))  # 10^7 values in 200 bytes


def lines_case(seq_in: str, label: str, *says: str) -> Case:
    files = {"grid.yaml": GRID, "tasks/t.yaml": LINES_TASK, "data/d/train/seq.in": seq_in,
             "data/d/train/label": label, "data/d/test/seq.in": "play jazz\n", "data/d/test/label": "music\n"}
    return Case(files, RUN, list(says))


MERGE = GRID.replace("tasks: [t]", "tasks: [t]\nmerges:\n") + "  - {name: mm, method: ties, base: {model: m}, "
CASES = {
    # --- grid YAML ---
    "yaml-syntax": grid_case("name: [unclosed", "grid.yaml", "not valid YAML"),
    "no-models": grid_case("name: g\nmodels: []\ntasks: [t]\n", "grid.yaml", "field models"),
    "model-field-typo": grid_case(GRID.replace("source:", "sourc:"), "grid.yaml", "field models.0"),
    "unknown-task": grid_case(GRID.replace("[t]", "[t, nope]"), "grid.yaml", "field tasks.1", "nope"),
    "shots-3": grid_case(GRID + "shots: [3]\n", "grid.yaml", "field shots.0"),
    "exclude-key-typo": grid_case(GRID + "exclude:\n  - {familly: encoder}\n", "grid.yaml", "exclude.0", "familly"),
    "hparam-typo": grid_case(GRID + "finetune: [lora]\nrecipes:\n  decoder/lora: {hparams: {learning_rate: 0.1}}\n",
                             "grid.yaml", "recipes.decoder/lora.hparams", "learning_rate"),
    "model-hparam-typo": grid_case(GRID.replace("family: decoder}", "family: decoder, hparams: {lora_rank: 4}}"),
                                   "grid.yaml", "models.0.hparams", "lora_rank"),
    "calibration-free": grid_case(GRID + "decoding: {mode: free, calibration: pmi}\n", "grid.yaml", "decoding",
                                  "calibration"),
    "parent-unknown": grid_case(GRID.replace("tasks: [t]", "  - {name: k, finetuned_from: {model: zz, tasks: [t]}}\n"
                                             "tasks: [t]"), "grid.yaml", "models.1.finetuned_from.model", "zz"),
    "head-not-tuned": grid_case(GRID.replace("tasks: [t]", "  - {name: k, finetuned_from: {model: m, tasks: [t], "
                                             "hparams: {heads: [sst2]}}}\ntasks: [t]"),
                                "grid.yaml", "heads", "sst2"),
    "limit-zero": grid_case(GRID + "limits: {test: 0}\n", "grid.yaml", "limits.test"),
    "grid-not-mapping": grid_case("- just\n- a list\n", "grid.yaml", "mapping"),
    "yaml-duplicate-key": grid_case(GRID + "tasks: [t]\n", "grid.yaml", "key 'tasks' appears twice"),
    "yaml-alias-bomb": grid_case(GRID + ALIASES, "grid.yaml", "aliases are expanded"),
    "yaml-too-deep": grid_case(GRID + "x: " + "[" * 50_000, "grid.yaml", "nested too deep"),
    "yaml-nested-past-bound": grid_case(GRID + "x: " + "[" * 100 + "]" * 100 + "\n", "grid.yaml", "nested more than"),
    "yaml-not-utf8": grid_case(GRID.encode() + b"# caf\xe9\n", "grid.yaml", "not UTF-8", "0xe9"),
    "seeds-negative": grid_case(GRID + "seeds: [-1]\n", "grid.yaml", "field seeds.0"),
    "shots-too-few-train-rows": grid_case(GRID + "shots: [5]\n", "grid.yaml", "field shots", "5-shot", "has 3"),
    "finetune-mode": grid_case(GRID + "finetune: [qlora]\n", "grid.yaml", "field finetune.0"),
    "decoding-mode": grid_case(GRID + "decoding: {mode: beam}\n", "grid.yaml", "field decoding", "mode"),
    "backend-unknown": grid_case(GRID.replace("family: decoder}", "family: decoder, backend: vlm}"), "grid.yaml",
                                 "field models.0.backend"),
    "backend-of-another-family": grid_case(GRID.replace("family: decoder}", "family: api, backend: transformers}"),
                                           "grid.yaml", "models.0", "api models use backend litellm"),
    "prompt-format": grid_case(GRID.replace("family: decoder}", "family: decoder, prompt_format: xml}"),
                               "grid.yaml", "field models.0.prompt_format"),
    "dtype": grid_case(GRID.replace("family: decoder}", "family: decoder, dtype: float8}"), "grid.yaml",
                       "field models.0.dtype"),
    "top-level-typo": grid_case(GRID + "seed: [0]\n", "grid.yaml", "seed"),
    "parallel-zero": grid_case(GRID + "parallel: 0\n", "grid.yaml", "field parallel"),
    "text-budget-negative": grid_case(GRID + "text_budget: -1\n", "grid.yaml", "field text_budget"),
    "batch-size-zero": grid_case(GRID + "inference: {batch_size: 0}\n", "grid.yaml", "field inference.batch_size"),
    "shots-not-a-list": grid_case(GRID + "shots: five\n", "grid.yaml", "field shots"),
    "exclude-not-a-list": grid_case(GRID + "exclude: {shots: 5}\n", "grid.yaml", "field exclude"),
    "recipe-key-unknown": grid_case(GRID + "recipes: {decoder/qlora: {hparams: {lr: 0.1}}}\n", "grid.yaml",
                                    "recipes", "decoder/qlora"),
    "model-name-twice": grid_case(GRID.replace("tasks: [t]", '  - {name: m, source: "tiny:mistral", family: decoder}\n'
                                               "tasks: [t]"), "grid.yaml", "field models", "'m'"),
    "task-listed-twice": grid_case(GRID.replace("tasks: [t]", "tasks: [t, t]"), "grid.yaml", "field tasks",
                                   "'t' is listed more than once"),
    "seed-listed-twice": grid_case(GRID + "seeds: [0, 1, 0]\n", "grid.yaml", "field seeds", "0 is listed more"),
    "no-tasks": grid_case(GRID.replace("tasks: [t]", "tasks: []"), "grid.yaml", "field tasks"),
    # --- task YAML ---
    "task-name-not-file-name": task_case(TASK.replace("name: t", "name: u"), "t.yaml", "field name", "'u'"),
    "task-metric-misspelt": task_case(TASK + "metrics: [accuracy, macro-f1]\n", "t.yaml", "metrics.1", "macro_f1"),
    "task-metric-without-its-subtask": task_case(TASK + "metrics: [accuracy, slot_f1]\n", "t.yaml",
                                                 "slot_f1 needs a word_tags sub-task"),
    "task-include-missing": task_case("include: _nope.yaml\n" + TASK, "t.yaml", "field include", "_nope.yaml"),
    "task-not-utf8": task_case(TASK.encode() + b"# \xff\n", "t.yaml", "not UTF-8"),
    "task-format": task_case(TASK.replace("format: jsonl", "format: xml"), "t.yaml", "data.read.format"),
    "task-missing-file": task_case(TASK.replace("d/test.jsonl", "d/nope.jsonl"), "nope.jsonl"),
    "task-missing-column": task_case(TASK.replace("column: label}", "column: intent}"), "train.jsonl", "intent"),
    "task-label-not-in-set": task_case(TASK.replace("type: label}", "type: label, labels: [weather]}"),
                                       "train.jsonl", "row 1", "alarm"),
    "task-subtask-type": task_case(TASK.replace("type: label}", "type: labels}"), "t.yaml", "subtasks.0.type"),
    "task-not-mapping": task_case("[1, 2]\n", "t.yaml", "mapping"),
    # --- data files ---
    "data-row-not-json": task_case(TASK, "train.jsonl:3", "not valid JSON", train=ROW + "{not json\n"),
    "data-empty-test": task_case(TASK, "test.jsonl", "no rows", test=""),
    "data-null-label": task_case(TASK, "train.jsonl", "row 2", "label",
                                 train='{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n'),
    "data-not-utf8": task_case(TASK, "train.jsonl", "not UTF-8", "offset",
                               train=ROW.encode() + b'{"text": "caf\xe9", "label": "x"}\n'),
    "data-blank-line-in-line-files": lines_case("wake me\n\nplay jazz\n", "alarm\nmusic\nmusic\n", "seq.in:2",
                                                "blank line"),
    "data-mixed-label-types": task_case(TASK, "train.jsonl", "row 7", "label 3 is a int",
                                        train=ROW * 3 + '{"text": "a b", "label": 3}\n'),
    "data-missing-text": task_case(TASK, "train.jsonl:1", "text", train='{"txt": "a", "label": "x"}\n'),
    # --- model sources ---
    "source-unknown-pypi": grid_case(GRID.replace('"tiny:llama"', "pypi:no-such-model"), "grid.yaml",
                                     "models.0.source", "pypi:no-such-model"),
    "source-unknown-tiny": grid_case(GRID.replace('"tiny:llama"', '"tiny:gpt9"'), "grid.yaml", "models.0.source",
                                     "gpt9"),
    "source-missing-path": grid_case(GRID.replace('"tiny:llama"', "./no/such/model"), "grid.yaml",
                                     "models.0.source", "no/such/model"),
    "source-missing-gguf": grid_case(GRID.replace('"tiny:llama"', "./weights.gguf"), "grid.yaml",
                                     "models.0.source", "weights.gguf"),
    # --- merge recipes ---
    "merge-method": grid_case(MERGE.replace("method: ties", "method: slerp") + "models: [{model: m, weight: 1}]}\n",
                              "grid.yaml", "merges.0.method"),
    "merge-density": grid_case(MERGE + "models: [{model: m, weight: 1, density: 2}]}\n", "grid.yaml",
                               "merges.0.models.0.density"),
    "merge-recipe-missing": grid_case(GRID.replace("tasks: [t]", "tasks: [t]\nmerges:\n  - {name: mm, recipe: "
                                                   "nope.yaml, bind: {base: {model: m}}}"), "grid.yaml", "merges.0",
                                      "nope.yaml"),
    "merge-recipe-unbound": grid_case(GRID.replace("tasks: [t]", "tasks: [t]\nmerges:\n  - {name: mm, recipe: "
                                                   "{tmp}/r.yaml, bind: {base: {model: m}}}"),
                                      "grid.yaml", "bind", "other",
                                      extra={"r.yaml": "merge_method: task_arithmetic\nbase_model: ${base}\n"
                                                       "models:\n  - model: ${other}\n    parameters: {weight: 1}\n"}),
    # --- CLI arguments ---
    "cli-config-missing": Case({}, ["grid/run.py", "{tmp}/nope.yaml", "--results", "{tmp}/results"], ["nope.yaml"]),
    "cli-results-is-a-file": grid_case(GRID, "results", extra={"results": "not a folder\n"}),
    "cli-data-missing": Case({"grid.yaml": GRID, "tasks/t.yaml": TASK},
                             ["grid/run.py", "{tmp}/grid.yaml", "--results", "{tmp}/results", "--tasks", "{tmp}/tasks",
                              "--data", "{tmp}/nodata"], ["nodata"]),
    "cli-num-cpus-zero": Case(grid_case(GRID).files, RUN + ["--num-cpus", "0"], ["--num-cpus 0"]),
    "cli-num-cpus-negative": Case(grid_case(GRID).files, RUN + ["--num-cpus", "-3"], ["--num-cpus -3"]),
    "cli-prompt-too-few-shots": Case(grid_case(GRID).files, PROMPT + ["--shots", "5"], ["task t", "5-shot", "has 3"]),
    "cli-prompt-text-budget-zero": Case(grid_case(GRID).files, PROMPT + ["--text-budget", "0"], ["--text-budget 0"]),
    "cli-report-out-is-a-file": Case({"afile": "not a folder\n"}, ["-m", "grid", "report", "{tmp}/results", "--out",
                                                                   "{tmp}/afile"], ["--out", "afile"]),
    "cli-status-missing": Case({}, ["-m", "grid", "status", "{tmp}/nowhere"], ["nowhere"]),
    "cli-report-missing": Case({}, ["-m", "grid", "report", "{tmp}/nowhere", "--out", "{tmp}/out"], ["nowhere"]),
    "cli-compare-damaged-predictions": Case(
        {"a/cells/abc/cell.json": json.dumps(DONE_INFER), "a/cells/abc/predictions.parquet": b"",
         "b/cells/abc/cell.json": json.dumps(DONE_INFER),
         "b/cells/abc/predictions.parquet": pa.table({"example_id": ["test-00000"], "raw_output": ["alarm"],
                                                      "prediction": ['{"label": "alarm"}']})},
        ["-m", "grid", "compare", "{tmp}/a", "{tmp}/b"], ["a/cells/abc/predictions.parquet", "not a readable parquet"]),
    "cli-prompt-unknown-task": Case(grid_case(GRID).files, PROMPT[:3] + ["nope"] + PROMPT[4:], ["unknown task 'nope'"]),
    "cli-prompt-index-out-of-range": Case(grid_case(GRID).files, [*PROMPT[:5], "99", *PROMPT[6:]], ["99"]),
    "cli-score-unknown-task": Case({"preds.parquet": pa.table({"example_id": ["test-00000"], "prediction": ["x"]})},
                                   ["-m", "grid", "score", "{tmp}/preds.parquet", "--task", "nope", "--tasks",
                                    "{tmp}/tasks", "--data", "{tmp}/data"], ["unknown task 'nope'"]),
    "cli-compare-missing": Case({}, ["-m", "grid", "compare", "{tmp}/nowhere", "{tmp}/nothere"], ["nowhere"]),
    # --- model outputs (a predictions parquet to score) ---
    "outputs-no-column": score_case(pa.table({"example_id": ["t-test-0"]}), "preds.parquet", "prediction"),
    "outputs-not-parquet": score_case(b"PAR1 but not really", "preds.parquet"),
    "outputs-repeated-example": score_case(pa.table({"example_id": ["test-00000", "test-00000"],
                                                     "prediction": ["alarm", "music"]}),
                                           "preds.parquet", "rows 0 and 1"),
    "outputs-unknown-example": score_case(pa.table({"example_id": ["nope-7"], "prediction": ["alarm"]}),
                                          "preds.parquet", "nope-7"),
}


def write_case(case: Case, tmp: Path) -> list[str]:
    for rel, content in case.files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{tmp}", str(tmp)))
    if "tasks/t.yaml" not in case.files:  # the score and CLI cases read the good task
        (tmp / "tasks").mkdir(exist_ok=True)
        (tmp / "tasks" / "t.yaml").write_text(TASK)
        (tmp / "data" / "d").mkdir(parents=True, exist_ok=True)
        (tmp / "data" / "d" / "train.jsonl").write_text(ROW * 3)
        (tmp / "data" / "d" / "test.jsonl").write_text(ROW)
    return [a.replace("{tmp}", str(tmp)) for a in case.argv]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Run as a user runs them, in a process of their own; the other cases run through the same entry
# point's main(argv) in the test's process (a Python start-up and its imports, about 2 s, spared
# per case), which sees the same stderr: what is printed there, and every log record a run prints.
IN_A_PROCESS = {"yaml-syntax", "yaml-not-utf8", "task-missing-column", "data-row-not-json", "cli-num-cpus-zero",
                "cli-status-missing", "cli-compare-damaged-predictions", "outputs-not-parquet"}


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`python <argv>` (grid/run.py or -m grid) through its main(argv): the exit code, and stderr
    as the process would have written it (printed lines, then the log records at INFO and above
    that grid/run.py's logging sends there)."""
    import grid.__main__
    import grid.run

    if argv[0] == "grid/run.py":
        main, args = grid.run.main, argv[1:]
    else:
        assert argv[:2] == ["-m", "grid"], argv
        main, args = grid.__main__.main, argv[2:]
    monkeypatch.chdir(ROOT)
    # --tasks sets it in os.environ: setenv first records its value (or its absence) for the undo,
    # which delenv alone does not when it is absent, and a later test would read this case's tasks
    monkeypatch.setenv("CLFGRID_TASKS", "")
    monkeypatch.delenv("CLFGRID_TASKS")
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, "\n".join([*err, *(f"{r.levelname}: {r.getMessage()}" for r in caplog.records)])


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 80 and set(CASES) >= IN_A_PROCESS


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(tmp_path, name, capsys, caplog, monkeypatch):
    case = CASES[name]
    argv = write_case(case, tmp_path)
    results = tmp_path / "results"
    if not results.exists():  # a results dir with a finished cell in it: it must stay as it is
        (results / "cells" / "abc").mkdir(parents=True)
        (results / "cells" / "abc" / "cell.json").write_text(json.dumps({"cell_id": "abc", "status": "done"}))
    before = tree_hashes(results) if results.is_dir() else None
    if name in IN_A_PROCESS:
        proc = run_cli(*argv, timeout=300)
        code, stderr = proc.returncode, proc.stderr
    else:
        code, stderr = run_in_process(argv, capsys, caplog, monkeypatch)
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    for fragment in case.says:
        assert fragment.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    if before is not None:
        assert tree_hashes(results) == before


def test_a_label_column_of_numbers_reads_as_text(tmp_path):
    """Labels 0/1 without names are the labels "0" and "1" (datasets kept the column's number type
    through normalization; a column that mixes numbers and text is refused, in the corpus above)."""
    numbers = '{"text": "a b", "label": 1}\n{"text": "c d", "label": 0}\n{"text": "e f", "label": 1}\n'
    write_case(task_case(TASK, train=numbers, test='{"text": "g h", "label": 0}\n'), tmp_path)
    proc = run_cli("-m", "grid", "prompt", "t", "--index", "0", "--tasks", str(tmp_path / "tasks"),
                   "--data", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    assert "the labels in the list ['0', '1']" in proc.stdout, proc.stdout


def test_test_labels_no_train_row_has_are_named_in_one_warning_line(tmp_path):
    """A label set read from train cannot offer a label only the test split has: the rows stay in
    the scores (every model gets them wrong), and one line says how many."""
    test = ROW + '{"text": "set the heating", "label": "thermostat"}\n'
    write_case(task_case(TASK, test=test), tmp_path)
    proc = run_cli("-m", "grid", "tasks", "t", "--tasks", str(tmp_path / "tasks"), "--data", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "no train row has" in line]
    assert lines == ["task t: 1 of 3 test rows have a label value no train row has (thermostat); they stay in the "
                     "scores, and no model can answer them"], proc.stderr


def test_a_results_path_that_is_a_symlink_loop_is_one_line(tmp_path):
    argv = write_case(grid_case(GRID), tmp_path)
    (tmp_path / "results").symlink_to(tmp_path / "results")
    for args in (argv, ["-m", "grid", "status", str(tmp_path / "results")]):
        proc = run_cli(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "symlink loop" in lines[0], proc.stderr[-2000:]


def _empty_predictions(cell: Path) -> list[str]:
    """A predictions file damaged after it was written (writes are atomic; the next run does the
    cell again: tests/test_grid_engine.py). What `grid status` must say."""
    (cell / "predictions.parquet").write_bytes(b"")
    return ["1 finished cells have a damaged predictions file",
            f"cells/{cell.name}/predictions.parquet: not a parquet file (0 bytes)"]


def _metric_not_a_number(cell: Path) -> list[str]:
    """A cell.json whose metric is not a number (edited by hand, or damaged); before, the value
    vanished from status and report without a word."""
    path = cell / "cell.json"
    record = json.loads(path.read_text())
    metric = next(k for k in record["metrics"] if k.endswith("/accuracy"))
    record["metrics"][metric] = "high"
    path.write_text(json.dumps(record))
    return ["1 finished cells have a metric that is not a number",
            f"cells/{cell.name}/cell.json: metric {metric} is 'high', not a number"]


@pytest.mark.parametrize("damage", [_empty_predictions, _metric_not_a_number])
def test_a_damaged_finished_cell_is_named_by_status_and_left_out_of_a_report(tmp_path, damage):
    """A finished cell damaged after it was written: `grid status` names the file and what is
    wrong, and a report leaves the cell out and says so, instead of failing on it."""
    import shutil

    good = Path(__file__).resolve().parent.parent / "reports" / "merge-study" / "probe" / "results"
    results = tmp_path / "results"
    shutil.copytree(good, results)
    victim = sorted(p.name for p in (results / "cells").iterdir())[0]
    says = damage(results / "cells" / victim)
    status = run_cli("-m", "grid", "status", str(results))
    assert status.returncode == 0, status.stderr
    assert all(line in status.stdout for line in says), status.stdout
    report = run_cli("-m", "grid", "report", str(results), "--out", str(tmp_path / "report"), "--n-boot", "50")
    assert report.returncode == 0, report.stderr[-2000:]
    model = json.loads((tmp_path / "report" / "report.json").read_text())
    assert victim not in json.dumps(model["rows"]) and "1 finished cells left out" in model["summary"]


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` as a read-only bind mount, for as long as the block runs. Root passes every
    permission check (chmod would not stop it), but not a read-only mount; where mounting is not
    allowed the test is skipped, saying so."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a read-only bind mount needs mount privileges: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


def test_a_read_only_results_dir_or_report_folder_is_one_line_before_any_work(tmp_path):
    """A results dir a grid ran in before, now read-only (a mount, a bucket without write
    permission): one line naming it, before any work; before, a traceback from the run record.
    The same for `grid report --out` at a read-only folder."""
    argv = write_case(grid_case(GRID), tmp_path)
    (tmp_path / "results" / "cells").mkdir(parents=True)
    before = tree_hashes(tmp_path / "results")
    with read_only(tmp_path / "results"), read_only(tmp_path / "report"):
        proc = run_cli(*argv)
        report = run_cli("-m", "grid", "report", str(ROOT / "reports" / "merge-study" / "probe" / "results"),
                         "--out", str(tmp_path / "report"), "--n-boot", "20")
    for p, says in ((proc, f"results dir {tmp_path / 'results'}: cannot write there"),
                    (report, f"--out {tmp_path / 'report'}: cannot write")):
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and says in lines[0], p.stderr[-2000:]
    assert tree_hashes(tmp_path / "results") == before
