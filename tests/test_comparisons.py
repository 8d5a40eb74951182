"""Declared comparisons (grid/comparisons.py, grid.report.comparisons): validated against the plan
when a grid loads (one line naming the file, the comparison and the field), paired like with like
(seed s with seed s, the same examples), and tested in the report with the metric's test, raw and
family-adjusted p and a CI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from grid.comparisons import check_plan, pair_cells
from grid.config import load_config
from grid.errors import GridError
from grid.plan import build_plan
from grid.report import write_report
from grid.significance import adjust
from grid.store import Store
from tests.conftest import DATA
from tests.test_seeds_report import N, seeded_results

TINY = {"name": "tiny", "source": "tiny:llama", "family": "decoder", "prompt_format": "chat"}
ENC = {"name": "enc", "source": "tiny:bert", "family": "encoder"}


def grid_file(tmp_path: Path, comparisons: list, **overrides) -> Path:
    grid = {"name": "c", "models": [TINY], "tasks": ["fpb-sentiment", "dialogsum"], "shots": [0, 5],
            "finetune": ["none", "lora"], "seeds": [0, 1], "decoding": {"mode": "free", "max_new_tokens": 8},
            "limits": {"test": 12, "train": 16}, "comparisons": comparisons, **overrides}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def check(path: Path) -> None:
    config = load_config(path)
    check_plan(config, build_plan(config, DATA), str(path))


FIVE_VS_ZERO = {"name": "five-vs-zero", "question": "Does five-shot help the untuned model?",
                "a": {"shots": 5, "finetune": "none"}, "b": {"shots": 0, "finetune": "none"},
                "metrics": ["accuracy"], "family": "primary"}


def test_a_valid_declaration_pairs_seed_with_seed_on_the_same_task(tmp_path):
    path = grid_file(tmp_path, [FIVE_VS_ZERO | {"a": {"shots": 5, "finetune": "none", "task": "fpb-sentiment"},
                                               "b": {"shots": 0, "finetune": "none", "task": "fpb-sentiment"}}])
    check(path)
    config = load_config(path)
    cells = [{**c.model_dump(), "id": c.id} for c in build_plan(config, DATA).cells]
    (group,) = pair_cells(config.comparisons[0], cells, "x")
    assert [(p.seed, p.a["seed"], p.b["seed"]) for p in group.pairs] == [(0, 0, 0), (1, 1, 1)]
    assert all(p.a["shots"] == 5 and p.b["shots"] == 0 and p.a["task"] == p.b["task"] for p in group.pairs)


@pytest.mark.parametrize("change,message", [
    ({"a": {"shots": 5, "model": "nope"}},
     r"comparisons\.0 \(five-vs-zero\)\.a: \{model: nope, shots: 5\} matches no "),
    ({"a": {"task": "fpb-sentiment", "shots": 5}, "b": {"task": "dialogsum", "shots": 0}},
     r"comparisons\.0 \(five-vs-zero\)\.a/b: pairs cells scored on different examples "
     r"\(task fpb-sentiment vs dialogsum, which read different data\)"),
    ({"metrics": ["accuracy"]},  # dialogsum is a summary: accuracy is not its metric (seed003's fault)
     r"comparisons\.0 \(five-vs-zero\)\.metrics: accuracy does not apply to dialogsum \(sub-task summary: rouge1"),
    ({"b": {"finetune": "none"}},
     r"comparisons\.0 \(five-vs-zero\)\.b: 2 cells of B pair with one cell of A .*; name shots in b"),
])
def test_a_bad_declaration_fails_at_load_naming_the_comparison_and_field(tmp_path, change, message):
    with pytest.raises(GridError, match=message) as err:
        check(grid_file(tmp_path, [FIVE_VS_ZERO | change]))
    assert str(err.value).startswith(str(tmp_path / "grid.yaml"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change,message", [
    ({"a": {"seed": 0}}, r"field comparisons\.0\.a: .*cannot name a seed"),
    ({"a": {"temperature": 0}}, r"field comparisons\.0\.a: .*unknown key 'temperature'"),
    ({"metrics": ["f1"]}, r"field comparisons\.0\.metrics: .*unknown metric 'f1'"),
    ({"family": "tertiary"}, r"field comparisons\.0\.family"),
])
def test_a_malformed_declaration_fails_when_the_grid_loads(tmp_path, change, message):
    with pytest.raises(GridError, match=message):
        load_config(grid_file(tmp_path, [FIVE_VS_ZERO | change]))


CONSOLIDATED = {"name": "consolidated-vs-dual", "question": "Does one model of both 20NG label sets match the two?",
                "a": {"task": "20ng-multi"}, "b": {"task": "20ng-20"}, "metrics": ["label/accuracy"]}


def consolidation_grid(tmp_path: Path, comparison: dict) -> Path:
    return grid_file(tmp_path, [comparison], tasks=["20ng-7", "20ng-20", "20ng-multi"], finetune=["full"],
                     shots=[0], decoding={"mode": "constrained"},
                     limits={"test": 40, "train": 16, "stratify": True})


def test_a_multi_task_pairs_with_its_single_task_on_the_same_rows(tmp_path):
    """The consolidated-vs-dual question of seed 002: two tasks of one source, the same test rows."""
    path = consolidation_grid(tmp_path, CONSOLIDATED)
    check(path)
    config = load_config(path)
    cells = [{**c.model_dump(), "id": c.id} for c in build_plan(config, DATA).cells]
    (group,) = pair_cells(config.comparisons[0], cells, "x")
    assert (group.task, group.task_b) == ("20ng-multi", "20ng-20")
    assert [p.a["lineage"]["trained_on"] for p in group.pairs] == ["20ng-multi"] * 2


@pytest.mark.parametrize("change,message", [
    ({"metrics": ["accuracy"]}, r"\.metrics: accuracy means root/accuracy, label/accuracy on 20ng-multi but "
                                r"label/accuracy on 20ng-20; name one sub-task both have, e\.g\. label/accuracy"),
    ({"b": {"task": "fpb-sentiment"}}, r"task 20ng-multi vs fpb-sentiment, which read different data"),
])
def test_two_tasks_pair_only_on_one_source_and_a_sub_task_both_have(tmp_path, change, message):
    raw = yaml.safe_load(consolidation_grid(tmp_path, CONSOLIDATED | change).read_text())
    if "fpb-sentiment" not in raw["tasks"]:
        raw["tasks"].append("fpb-sentiment")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match=message):
        check(tmp_path / "grid.yaml")


def test_two_comparisons_cannot_share_a_name(tmp_path):
    rouge = FIVE_VS_ZERO | {"metrics": ["rougeL"], "a": {"shots": 5, "finetune": "none", "task": "dialogsum"},
                            "b": {"shots": 0, "finetune": "none", "task": "dialogsum"}}
    with pytest.raises(GridError, match=r"comparisons\.1 \(five-vs-zero\)\.name: 'five-vs-zero' names two"):
        check(grid_file(tmp_path, [rouge, rouge]))


# --- in the report ---------------------------------------------------------------------------


DECLARED = [
    {"name": "shared-vs-single", "question": "Does the shared body classify as well as the single-task one?",
     "a": {"model": "shared", "task": "sst2"}, "b": {"model": "single", "task": "sst2"},
     "metrics": ["accuracy", "macro_f1"], "family": "primary"},
    {"name": "shared-vs-single-summaries", "question": "Does the shared body summarize as well?",
     "a": {"model": "shared", "task": "dialogsum"}, "b": {"model": "single-sum", "task": "dialogsum"},
     "metrics": ["rougeL", "rouge2"], "family": "primary"},
    {"name": "seed-mates", "question": "Is the other single-task model's sentiment any different?",
     "a": {"model": "single"}, "b": {"model": "other"}, "metrics": ["accuracy"], "family": "secondary"},
]


@pytest.fixture
def declared_results(tmp_path):
    """tests.test_seeds_report's results at 3 seeds, with 'other', a second model like 'single'."""
    seeded_results(tmp_path / "results", others=("other",))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"comparisons": DECLARED}))
    return tmp_path, grid


def test_the_report_tests_each_declared_comparison(declared_results):
    root, grid = declared_results
    paths = write_report(root / "results", root / "out", n_boot=200, grid=grid)
    data = json.loads(Path(paths[2]).read_text())
    comps = {(c["name"], c["metric"]): c for c in data["comparisons"]}
    assert set(comps) == {("shared-vs-single", "accuracy"), ("shared-vs-single", "macro_f1"),
                          ("shared-vs-single-summaries", "rougeL"), ("shared-vs-single-summaries", "rouge2"),
                          ("seed-mates", "accuracy")}  # declared: no default pairs beside them
    assert all(c["seeds"] == [0, 1, 2] and c["error"] is None for c in comps.values())
    tests = {k: c["result"]["test"] for k, c in comps.items()}
    assert tests[("shared-vs-single", "accuracy")] == "mcnemar-exact"
    assert (tests[("shared-vs-single", "macro_f1")] == tests[("shared-vs-single-summaries", "rougeL")]
            == "paired-permutation")
    assert data["families"] == [{"family": "primary", "tests": 4, "correction": "Holm"},
                                {"family": "secondary", "tests": 1, "correction": "Benjamini-Hochberg"}]
    primary = [c for c in data["comparisons"] if c["family"] == "primary"]
    assert [c["result"]["p_adjusted"] for c in primary] == pytest.approx(
        adjust([c["result"]["p_value"] for c in primary], "holm"))
    acc = comps[("shared-vs-single", "accuracy")]
    assert acc["result"]["ci_low"] < acc["result"]["diff"] < acc["result"]["ci_high"]
    assert acc["result"]["strata"] == 3 and len(acc["per_seed_diff"]) == 3 and acc["p_seeds"] is not None
    assert np.mean(acc["per_seed_diff"]) == pytest.approx(acc["result"]["diff"])
    md = Path(paths[0]).read_text()
    assert "Tests per family: primary 4 (Holm); secondary 1 (Benjamini-Hochberg)." in md
    assert "- **shared-vs-single** (primary): Does the shared body classify as well as the single-task one?" in md
    row = next(line for line in md.splitlines()
               if line.startswith("| primary | shared-vs-single | sst2 sentiment/accuracy"))
    assert "mcnemar-exact" in row and "s0 +" in row and "t-test p" in row and row.endswith("* |")


def test_a_declared_comparison_that_pairs_nothing_shows_its_error(declared_results):
    root, grid = declared_results
    grid.write_text(yaml.safe_dump({"comparisons": [DECLARED[0] | {"b": {"model": "absent"}}]}))
    data = json.loads(Path(write_report(root / "results", root / "out", n_boot=50, grid=grid)[2]).read_text())
    (comp,) = data["comparisons"]
    assert comp["result"] is None and "matches no inference cell" in comp["error"]


def test_a_grid_with_declared_comparisons_runs_and_reports_them(tmp_path):
    """End to end on a real local Ray: the grid runs, and `grid report` finds its comparisons in
    the run's record (no --grid), tests them, and writes the provenance beside them."""
    from tests.conftest import run_cli

    grid = {"name": "declared", "models": [TINY], "tasks": ["fpb-sentiment"], "shots": [0, 5],
            "decoding": {"mode": "constrained"}, "limits": {"test": 12}, "text_budget": 32,
            "inference": {"batch_size": 4}, "comparisons": [FIVE_VS_ZERO | {"metrics": ["accuracy", "macro_f1"]}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    run = run_cli("grid/run.py", str(path), "--results", str(tmp_path / "r"), "--num-cpus", "2")
    assert run.returncode == 0, run.stderr
    report = run_cli("-m", "grid", "report", str(tmp_path / "r"), "--out", str(tmp_path / "out"), "--n-boot", "200")
    assert report.returncode == 0, report.stderr
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(c["name"], c["metric"], c["family"]) for c in data["comparisons"]] == [
        ("five-vs-zero", "accuracy", "primary"), ("five-vs-zero", "macro_f1", "primary")]
    for c in data["comparisons"]:
        assert c["error"] is None and c["result"]["n"] == 12 and c["result"]["p_adjusted"] >= c["result"]["p_value"]
    assert data["comparisons"][1]["result"]["ci_low"] is not None
    (record,) = data["provenance"]["runs"]
    assert record["grid_path"] == str(path) and record["cells"]["ran"] == 2
    md = (tmp_path / "out" / "table3.md").read_text()
    assert "**Provenance**" in md and "| primary | five-vs-zero | fpb-sentiment sentiment/accuracy |" in md
    bad = dict(grid, comparisons=[FIVE_VS_ZERO | {"a": {"shots": 5, "model": "nope"}}])
    path.write_text(yaml.safe_dump(bad))
    refused = run_cli("grid/run.py", str(path), "--results", str(tmp_path / "r2"), "--dry-run")
    assert refused.returncode == 2 and "comparisons.0 (five-vs-zero).a:" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_malformed_grid_for_the_report_is_one_line_and_writes_nothing(declared_results, capsys):
    from grid.__main__ import main

    root, grid = declared_results
    grid.write_text(yaml.safe_dump({"comparisons": [DECLARED[0] | {"metrics": ["f1"]}]}))
    code = main(["report", str(root / "results"), "--out", str(root / "out"), "--grid", str(grid)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {grid}: field comparisons.0.metrics") and err.count("\n") == 1
    assert not (root / "out").exists()


def test_published_results_rebuild_the_same_report(declared_results, tmp_path):
    """`grid publish` keeps what a report reads (cell.json, predictions, runs) and no model; the
    report built from the copy has the same numbers as the one built from the results dir."""
    from grid.publish import publish

    root, grid = declared_results
    source = root / "results"
    (source / "cells" / "x-finetune" / "model").mkdir(parents=True)  # a fine-tune's model: never copied
    (source / "cells" / "x-finetune" / "model" / "weights.safetensors").write_bytes(b"0" * 1000)
    (source / "cells" / "x-finetune" / "cell.json").write_text(json.dumps(
        {"cell_id": "x-finetune", "status": "done", "cell": {"kind": "finetune", "model": "m", "task": "sst2",
                                                            "shots": 0, "finetune": "lora", "seed": 0}}))
    cells, size = publish(str(source), str(tmp_path / "published"))
    assert cells == 16 and 0 < size < 2**20
    copied = {p.relative_to(tmp_path / "published").as_posix()
              for p in (tmp_path / "published").rglob("*") if p.is_file()}
    assert "cells/x-finetune/cell.json" in copied and not any("model" in p for p in copied)
    assert sum(p.endswith("predictions.parquet") for p in copied) == 15
    a = json.loads(Path(write_report(source, root / "a", n_boot=100, grid=grid)[2]).read_text())
    b = json.loads(Path(write_report(tmp_path / "published", root / "b", n_boot=100, grid=grid)[2]).read_text())
    for key in ("rows", "comparisons", "families", "seeds", "provenance"):
        assert a[key] == b[key], key
    with pytest.raises(GridError, match="already holds cells"):
        publish(str(source), str(tmp_path / "published"))


# --- seed003's two faults, on small data ------------------------------------------------------


def test_a_summary_column_is_tested_on_rouge_not_mcnemar(tmp_path):
    """seed003's table ran McNemar on DialogSum's "accuracy" (n10 = n01 = 0, p = 1) while ROUGE-2
    fell: the default 5-shot vs 0-shot pair of a text column is now a ROUGE-L permutation test."""
    from tests.test_seeds_report import add

    store = Store.open(tmp_path / "results")
    texts = [f"person {i} asks about the train to town number {i}" for i in range(N)]
    add(store, "m", "dialogsum", 0, texts, texts, [], "free", shots=0)
    add(store, "m", "dialogsum", 0, [" ".join(t.split()[:4]) for t in texts], texts, [], "free", shots=5)
    data = json.loads(Path(write_report(tmp_path / "results", tmp_path / "out", n_boot=200)[2]).read_text())
    (comp,) = data["comparisons"]
    assert comp["name"] == "5-shot vs 0-shot" and comp["metric"] == "rougeL"
    assert comp["result"]["test"] == "paired-permutation" and comp["result"]["diff"] < -0.3
    assert comp["result"]["p_floor"] and "< 1/200" in Path(tmp_path / "out" / "table3.md").read_text()


def test_llm_vs_encoder_pairs_never_cross_seeds(tmp_path):
    """seed003's table paired every SmolLM2 seed with every MiniLM seed (16 of 24 rows across
    seeds): the default pairs now hold seed s against seed s only."""
    from tests.test_seeds_report import add

    store = Store.open(tmp_path / "results")
    golds = ["positive" if i % 2 else "negative" for i in range(N)]
    for seed in (0, 1, 2):
        add(store, "llm", "sst2", seed, golds[::-1], golds, [], "constrained")
        add(store, "enc", "sst2", seed, golds, golds, ["sst2"], None, finetune="full", family="encoder")
    data = json.loads(Path(write_report(tmp_path / "results", tmp_path / "out", n_boot=50)[2]).read_text())
    pairs = [c for c in data["comparisons"] if c["name"] == "LLM vs encoder"]
    seeds = {r["cell_id"]: r["cell"]["seed"] for r in Store.open(tmp_path / "results").records()}
    assert len(pairs) == 3 and all(seeds[c["a"]] == seeds[c["b"]] for c in pairs)
