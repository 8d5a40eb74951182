"""The merge study's chain through the grid engine: fine-tune -> merge -> inference, run by
`execute` on the tiny Llama, then lineage and forgetting read back from `grid status` and the
report, and checked against accuracies this test computes from the predictions parquet. As in
grids/merge-study.yaml, the held-out task is scored calibrated and the seen ones raw."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mergekit")

GRID = """
name: chain
models:
  - {name: inst, source: "tiny:llama", family: decoder, prompt_format: chat}
  - name: multi
    finetuned_from: {model: inst, tasks: [fpb-sentiment, fomc-stance], mix: true, finetune: lora,
                     hparams: {max_steps: 3}}
tasks: [fpb-sentiment, fomc-stance, sst2]
shots: [0]
finetune: [none, lora]
finetuned_eval: all
exclude:
  - {task: [fomc-stance, sst2], finetune: lora}
  - {model: multi, finetune: lora}
  - {task: sst2, decoding: constrained}                                   # held out: calibrated
  - {task: [fpb-sentiment, fomc-stance], decoding: constrained+contextual}  # seen: raw
decoding:
  - {mode: constrained}
  - {mode: constrained, calibration: contextual}
limits: {test: 16, train: 24}
reference: inst
recipes:
  decoder/lora:
    hparams: {max_steps: 3, batch_size: 8, lr: 0.05, log_every_steps: 0}
merges:
  - name: half
    method: task_arithmetic
    base: {model: inst}
    models: [{model: inst, task: fpb-sentiment, finetune: lora, weight: 0.5}]
"""


def accuracy_by_cell(results) -> dict[str, list[bool]]:
    """Right/wrong per example, in example order, straight from the predictions parquet."""
    from grid.query import predictions

    out: dict[str, list[bool]] = {}
    rows = predictions(results).sort("cell_id", "example_id").collect().to_dicts()
    for r in rows:
        right = bool(r["valid"]) and json.loads(r["prediction"]) == json.loads(r["gold"])
        out.setdefault(r["cell_id"], []).append(right)
    return out


@pytest.mark.slow
def test_finetune_merge_infer_chain_through_execute(tmp_path, ray_local):
    from grid.config import load_config
    from grid.execute import execute
    from grid.plan import build_plan
    from grid.report import write_report
    from grid.store import Store
    from tests.conftest import run_cli

    path = tmp_path / "chain.yaml"
    path.write_text(GRID)
    config = load_config(path)
    plan = build_plan(config)
    results = tmp_path / "results"
    store = Store.open(results)
    summary = execute(plan, config, store, None)
    assert not summary.failed, [r.get("error") for r in store.records() if r["status"] == "failed"]
    records = {r["cell_id"]: r for r in store.records()}
    assert len(records) == len(plan.cells) == 2 + 1 + 3 * 4  # 2 fine-tunes, 1 merge, 4 models x 3 tasks

    # lineage: the merge names its inputs; the merged model saw what its fine-tune saw
    (merge,) = [r for r in records.values() if r["cell"]["kind"] == "merge"]
    (ft,) = [r for r in records.values() if r["cell"]["kind"] == "finetune" and r["cell"]["model"] == "inst"]
    assert merge["cell"]["recipe"]["inputs"]["model_0"] == {"cell": ft["cell_id"]}
    assert merge["lineage"]["method"] == "task_arithmetic"
    infer = {(r["cell"]["model"], r["cell"]["finetune"], r["cell"]["task"]): r for r in records.values()
             if r["cell"]["kind"] == "infer"}
    assert infer[("half", "none", "sst2")]["cell"]["lineage"]["seen_tasks"] == ["fpb-sentiment"]
    assert {k: r["cell"]["decoding"].get("calibration") for k, r in infer.items() if k[2] == "sst2"} == {
        ("inst", "none", "sst2"): "contextual", ("inst", "lora", "sst2"): "contextual",
        ("multi", "none", "sst2"): "contextual", ("half", "none", "sst2"): "contextual"}
    assert infer[("multi", "none", "sst2")]["cell"]["lineage"]["seen_tasks"] == ["fpb-sentiment", "fomc-stance"]

    # forgetting, computed here from the parquet: merged minus reference on each unseen task
    right = accuracy_by_cell(results)
    acc = {k: sum(right[r["cell_id"]]) / len(right[r["cell_id"]]) for k, r in infer.items()}
    for k, r in infer.items():
        assert r["metrics"][next(m for m in r["metrics"] if m.endswith("/accuracy"))] == pytest.approx(acc[k])
    expected = {t: acc[("half", "none", t)] - acc[("inst", "none", t)] for t in ("fomc-stance", "sst2")}

    status = run_cli("-m", "grid", "status", str(results))
    assert status.returncode == 0, status.stderr
    header = next(ln for ln in status.stdout.splitlines() if ln.startswith("| weights "))
    lines = [ln for ln in status.stdout.splitlines() if ln.startswith("| half ")]
    rows_by_decoding = {f["decoding"]: f for f in (dict(zip([h.strip() for h in header.split("|")],
                                                            [v.strip() for v in ln.split("|")])) for ln in lines)}
    # one row per decoding: its forgetting is the mean over the unseen tasks scored so
    assert float(rows_by_decoding["constrained"]["forgetting"]) == pytest.approx(expected["fomc-stance"], abs=1e-3)
    assert float(rows_by_decoding["constrained+contextual"]["forgetting"]) == pytest.approx(expected["sst2"], abs=1e-3)
    assert rows_by_decoding["constrained"]["seen_tasks"] == "fpb-sentiment"

    paths = write_report(results, tmp_path / "report", n_boot=200)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    study = report["merge_study"]
    assert study["reference"] == "inst" and study["held_out"] == ["sst2"]
    rows = {(r["variant"], r["task"]): r for r in study["per_task"]}
    for t, diff in expected.items():
        assert rows[("half", t)]["delta"] == pytest.approx(diff)
        assert rows[("half", t)]["seen"] is False
    assert rows[("half", "fpb-sentiment")]["seen"] is True
    summary_rows = {s["variant"]: s for s in study["summary"]}
    half = summary_rows["half"]
    assert half["kind"] == "merge" and half["weight"] == 0.5 and half["parent"] == "inst lora fpb-sentiment"
    assert half["unseen_delta"][0] == pytest.approx(sum(expected.values()) / 2)
    assert half["held_out_delta"][0] == pytest.approx(expected["sst2"])
    assert (summary_rows["multi"]["kind"] == "made"
            and summary_rows["multi"]["seen_tasks"] == ["fpb-sentiment", "fomc-stance"])
    vs_ft = [m for m in study["merges"] if m["against"] == "fine-tune" and m["task"] == "fpb-sentiment"]
    assert vs_ft and vs_ft[0]["diff"] == pytest.approx(acc[("half", "none", "fpb-sentiment")]
                                                      - acc[("inst", "lora", "fpb-sentiment")])
    md = (tmp_path / "report" / "table3.md").read_text()
    assert "## Merge study" in md and "| half | merge: task_arithmetic w=0.5 of inst lora fpb-sentiment |" in md
    assert any(p.endswith("report.html") for p in paths)
