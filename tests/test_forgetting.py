"""grid.forgetting, the one rule of seen tasks, reference and forgetting that `grid status`, the
report, the merge-study view and grid.query share, on hand-built cell records."""

from __future__ import annotations

import json

import polars as pl
import pytest

from grid.forgetting import forgetting_frame, headline_scores
from grid.terminal import forgetting_table

LABEL_KEY = {"fpb-sentiment": "sentiment", "fomc-stance": "stance", "sst2": "sentiment", "massive-intent": "intent"}


def infer(cid: str, model: str, task: str, score: float | dict, *, finetune: str = "none",
          seen: list[str] = (), reference: str | None = "inst", trained_on: str | None = None,
          depends_on: str | None = None, shots: int = 0, seed: int = 0, decoding: str = "constrained",
          status: str = "done") -> dict:
    """An inference cell's record as grid.execute writes it: lineage as grid.plan sets it."""
    metrics = score if isinstance(score, dict) else {f"{LABEL_KEY[task]}/accuracy": score}
    return {"cell_id": cid, "status": status, "metrics": metrics if status == "done" else None,
            "cell": {"kind": "infer", "model": model, "task": task, "shots": shots, "seed": seed,
                     "finetune": finetune, "depends_on": depends_on, "decoding": {"mode": decoding},
                     "lineage": {"seen_tasks": list(seen), "reference": reference, "trained_on": trained_on}}}


def producer(cid: str, kind: str, model: str, seen: list[str]) -> dict:
    """A fine-tune or merge cell: no predictions, a lineage."""
    return {"cell_id": cid, "status": "done", "cell": {"kind": kind, "model": model, "task": "-", "shots": 0,
                                                       "seed": 0, "finetune": "none", "lineage": {"seen_tasks": seen}}}


def by(df: pl.DataFrame, **keys) -> dict:
    (row,) = df.filter(*[pl.col(k) == v for k, v in keys.items()]).to_dicts()
    return row


# The merge study's shape: the instruct model `inst` (the reference), its LoRA on fpb-sentiment
# (evaluated on every task), a merge of that LoRA back into inst, and a mixture fine-tune.
STUDY = [
    infer("r-fpb", "inst", "fpb-sentiment", 0.2), infer("r-fomc", "inst", "fomc-stance", 0.3),
    infer("r-sst2", "inst", "sst2", 0.6),
    producer("ft-fpb", "finetune", "inst", ["fpb-sentiment"]),
    *[infer(f"l-{t}", "inst", t, s, finetune="lora", seen=["fpb-sentiment"], trained_on="fpb-sentiment",
            depends_on="ft-fpb") for t, s in (("fpb-sentiment", 0.8), ("fomc-stance", 0.1), ("sst2", 0.7))],
    producer("merge", "merge", "half", ["fpb-sentiment"]),
    *[infer(f"m-{t}", "half", t, s, seen=["fpb-sentiment"], depends_on="merge")
      for t, s in (("fpb-sentiment", 0.5), ("fomc-stance", 0.25), ("sst2", 0.65))],
    producer("ft-mix", "finetune", "multi", ["fpb-sentiment", "fomc-stance"]),
    *[infer(f"x-{t}", "multi", t, s, seen=["fpb-sentiment", "fomc-stance"], depends_on="ft-mix")
      for t, s in (("fpb-sentiment", 0.7), ("fomc-stance", 0.6), ("sst2", 0.4))],
]


def test_merged_model_seen_task_gain_and_unseen_forgetting():
    df = forgetting_frame(STUDY)
    seen = by(df, cell_id="m-fpb-sentiment")
    assert seen["kind"] == "merge" and seen["seen"] and seen["seen_tasks"] == ["fpb-sentiment"]
    assert seen["reference_cell"] == "r-fpb" and seen["delta"] == pytest.approx(0.5 - 0.2)
    assert seen["forgetting"] is None  # a seen task's difference is a gain, not forgetting
    unseen = by(df, cell_id="m-fomc-stance")
    assert not unseen["seen"] and unseen["forgetting"] == pytest.approx(0.25 - 0.3) == unseen["delta"]


def test_mixed_fine_tune_has_several_seen_tasks():
    df = forgetting_frame(STUDY)
    rows = df.filter(pl.col("model") == "multi")
    assert set(rows["kind"]) == {"made"}
    assert {r["task"]: r["seen"] for r in rows.to_dicts()} == {"fpb-sentiment": True, "fomc-stance": True,
                                                               "sst2": False}
    assert by(df, cell_id="x-sst2")["forgetting"] == pytest.approx(0.4 - 0.6)
    assert by(df, cell_id="x-fomc-stance")["delta"] == pytest.approx(0.6 - 0.3)


def test_cross_task_rows_of_a_fine_tune_are_unseen():
    df = forgetting_frame(STUDY)
    own, cross = by(df, cell_id="l-fpb-sentiment"), by(df, cell_id="l-fomc-stance")
    assert own["kind"] == cross["kind"] == "fine-tune"
    assert own["weights"] == cross["weights"] == "inst lora:fpb-sentiment"
    assert own["seen"] and not cross["seen"] and cross["trained_on"] == "fpb-sentiment"
    assert cross["reference_cell"] == "r-fomc" and cross["forgetting"] == pytest.approx(0.1 - 0.3)


def test_the_reference_is_its_own_reference_and_kinds():
    df = forgetting_frame(STUDY)
    ref = by(df, cell_id="r-sst2")
    assert ref["kind"] == "reference" and ref["forgetting"] == 0 and ref["seen_tasks"] == []
    other = forgetting_frame([infer("o", "other", "sst2", 0.5, reference=None)])
    assert other["kind"].to_list() == ["model"]


def test_missing_reference_gives_no_difference():
    records = [infer("a", "half", "sst2", 0.5, seen=["fpb-sentiment"]),  # inst has no sst2 cell
               infer("b", "half", "fomc-stance", 0.5, seen=["fpb-sentiment"], reference=None),  # none declared
               infer("r", "inst", "fomc-stance", 0.9),
               infer("rf", "inst", "sst2", 0.9, status="failed")]  # a failed reference cell is no reference
    df = forgetting_frame(records)
    for cid in ("a", "b"):
        row = by(df, cell_id=cid)
        assert row["reference_cell"] is None and row["delta"] is None and row["forgetting"] is None
    assert by(df, cell_id="a")["reference"] == "inst" and by(df, cell_id="b")["reference"] is None
    assert "rf" not in df["cell_id"].to_list()


def test_reference_matches_shots_seed_and_decoding():
    records = [infer("r0", "inst", "sst2", 0.6), infer("r5", "inst", "sst2", 0.9, shots=5),
               infer("rs", "inst", "sst2", 0.1, seed=1), infer("rf", "inst", "sst2", 0.3, decoding="free"),
               infer("rdup", "inst", "sst2", 0.2),  # a second cell of the same reference: the smallest id wins
               infer("m5", "half", "sst2", 0.5, shots=5, seen=["fpb-sentiment"]),
               infer("mf", "half", "sst2", 0.5, decoding="free", seen=["fpb-sentiment"])]
    df = forgetting_frame(records)
    assert by(df, cell_id="m5")["reference_cell"] == "r5"
    assert by(df, cell_id="mf")["reference_cell"] == "rf"
    assert by(df, cell_id="rs")["reference_cell"] == "rs"
    assert by(df, cell_id="rdup")["reference_cell"] == "r0"


def test_a_multi_task_cell_has_one_row_per_sub_task_and_one_headline():
    metrics = {"exact_match": 0.1, "intent/accuracy": 0.8, "intent/accuracy_ci_low": 0.7, "intent/macro_f1": 0.5,
               "slots/invalid_rate": 0.0, "slots/slot_f1": 0.4, "n": 10}
    assert headline_scores(metrics) == [("intent", "accuracy", 0.8, True), ("slots", "slot_f1", 0.4, False)]
    df = forgetting_frame([infer("r", "inst", "massive-multi", metrics),
                           infer("m", "half", "massive-multi", metrics | {"slots/slot_f1": 0.5},
                                 seen=["massive-intent"])])
    slots = by(df, cell_id="m", subtask="slots")
    assert slots["metric"] == "slot_f1" and slots["delta"] == pytest.approx(0.1) and not slots["seen"]
    assert by(df, cell_id="m", subtask="intent")["headline"] and not slots["headline"]


def test_the_reference_s_own_tuning_tasks_count_as_unseen():
    records = [infer("r", "inst", "massive-intent", 0.6, seen=["massive-intent"]),
               infer("l", "inst", "massive-intent", 0.2, finetune="lora", seen=["massive-intent", "fpb-sentiment"],
                     trained_on="fpb-sentiment")]
    df = forgetting_frame(records)
    row = by(df, cell_id="l")
    assert not row["seen"] and row["seen_tasks"] == ["fpb-sentiment"] and row["forgetting"] == pytest.approx(-0.4)
    assert by(df, cell_id="r")["kind"] == "reference"  # its declared tasks are not a tuning by the grid


def test_reference_per_family():
    df = forgetting_frame([infer("ai", "a-inst", "massive-intent", 0.6, reference="a-inst"),
                           infer("bi", "b-inst", "massive-intent", 0.2, reference=None),
                           infer("ab", "a-base", "massive-intent", 0.1, reference="a-inst"),
                           infer("bb", "b-base", "massive-intent", 0.3, reference="b-inst")])
    got = {r["model"]: r["forgetting"] for r in df.to_dicts()}
    assert got["a-base"] == pytest.approx(-0.5) and got["b-base"] == pytest.approx(0.1) and got["a-inst"] == 0
    assert got["b-inst"] is None


def test_skill_deltas_move_where_a_flipped_default_answer_hides_them():
    """The reference answers the 95% label everywhere; a tuned model answers the 5% label
    everywhere. Accuracy says it lost 90 points; balanced accuracy (1/2 both) says it lost no
    skill, and the gold label's log-prob says it gained some. A cell without label log-probs (a
    greedy or free decoding) has no gold_logprob delta; a seen task no skill forgetting."""
    ref = {"causal/accuracy": 0.95, "causal/macro_f1": 0.487, "causal/balanced_accuracy": 0.5,
           "causal/gold_logprob": -0.8}
    flipped = {"causal/accuracy": 0.05, "causal/macro_f1": 0.048, "causal/balanced_accuracy": 0.5,
               "causal/gold_logprob": -0.7}
    records = [infer("r", "inst", "fincausal", ref), infer("t", "inst", "fincausal", flipped, finetune="lora",
                                                           seen=["sst2"], trained_on="sst2"),
               infer("s", "inst", "fincausal", flipped, finetune="lora", seen=["fincausal"], trained_on="fincausal"),
               infer("g", "inst", "fincausal", {k: v for k, v in flipped.items() if "logprob" not in k},
                     finetune="lora", seen=["sst2"], trained_on="sst2")]
    df = forgetting_frame(records)
    row = by(df, cell_id="t")
    assert row["forgetting"] == pytest.approx(-0.9)
    assert row["balanced_accuracy"] == 0.5 and row["balanced_accuracy_forgetting"] == pytest.approx(0.0)
    assert row["macro_f1_delta"] == row["macro_f1_forgetting"] == pytest.approx(0.048 - 0.487)
    assert row["gold_logprob_delta"] == row["gold_logprob_forgetting"] == pytest.approx(0.1)
    seen = by(df, cell_id="s")
    assert seen["gold_logprob_delta"] == pytest.approx(0.1) and seen["gold_logprob_forgetting"] is None
    greedy = by(df, cell_id="g")
    assert greedy["gold_logprob"] is None and greedy["gold_logprob_delta"] is None
    assert greedy["balanced_accuracy_delta"] == pytest.approx(0.0)
    assert by(df, cell_id="r")["gold_logprob_forgetting"] == 0


def test_status_table_averages_headline_scores_per_weights():
    table, line = forgetting_table(STUDY)
    rows = {r["weights"]: r for r in table.to_dicts()}
    assert set(rows) == {"inst", "inst lora:fpb-sentiment", "half", "multi"}
    assert rows["half"]["seen_tasks"] == "fpb-sentiment" and rows["half"]["seen_score"] == 0.5
    assert rows["half"]["forgetting"] == pytest.approx(((0.25 - 0.3) + (0.65 - 0.6)) / 2, abs=1e-3)
    assert rows["multi"]["seen_tasks"] == "fomc-stance,fpb-sentiment" and rows["multi"]["cells"] == 3
    assert "minus inst's" in line
    empty, no_line = forgetting_table([infer("o", "other", "sst2", 0.5, reference=None)])
    assert empty.is_empty() and no_line == ""  # no reference declared: status prints no forgetting


def test_query_forgetting_reads_a_results_dir(tmp_path):
    from grid.query import forgetting
    from grid.store import Store

    store = Store.open(tmp_path / "res")
    for record in STUDY:
        store.write_cell(record["cell_id"], json.loads(json.dumps(record)))
    df = forgetting(tmp_path / "res").collect()
    assert df.sort("cell_id").equals(forgetting_frame(store.records()).sort("cell_id"))
    assert len(df) == sum(r["cell"]["kind"] == "infer" for r in STUDY)
