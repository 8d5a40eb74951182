"""The Table 3 report: numbers equal cell.json (what `grid status` prints), rows and columns as in the
paper, significance pairs, plots, merges, and the HTML page rendered by a real headless Chromium.

Results are written with grid.store in the real format (cell.json from grid.metrics.score, the
predictions parquet with the columns grid.execute writes), from synthetic answers: the tiny smoke
model answers nothing valid, so it cannot exercise the numbers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest
from scipy import stats

from grid.metrics.score import score
from grid.parsing import Parsed
from grid.plan import Cell
from grid.report import write_report
from grid.report.table import PAPER_COLUMNS, build_table
from grid.store import Store
from grid.tasks import get_task
from grid.terminal import headline

ROOT = Path(__file__).resolve().parent.parent
N = 60
ROOTS = ["comp", "rec", "sci", "talk", "misc", "alt", "soc"]
NAMES = [f"{r}.{i}" for r in ROOTS for i in range(3)][:20]
INTENTS = ["alarm_set", "play_music", "weather_query", "iot_cleaning", "news_query"]
SLOT_TYPES = ["date", "time", "place_name", "song_name"]


def _gold(task_name: str, i: int) -> dict:
    rng = random.Random(i)
    name = NAMES[rng.randrange(len(NAMES))]
    words = rng.randint(2, 6)
    tags = ["Other"] * words
    start = rng.randrange(words)
    tags[start] = SLOT_TYPES[rng.randrange(len(SLOT_TYPES))]
    full = {"label": name, "root": name.split(".")[0], "intent": INTENTS[rng.randrange(len(INTENTS))],
            "slots": tags}
    return {s.name: full[s.name] for s in get_task(task_name).subtasks}


def _answer(sub, gold, skill: float, invalid: float, rng: random.Random) -> Parsed:
    if rng.random() < invalid:
        return Parsed(None, False, "no answer")
    if sub.type == "word_tags":
        tags = list(gold) if rng.random() < skill else ["Other"] * len(gold)
        return Parsed(tags, True, None)
    pool = {"label": NAMES, "root": ROOTS, "intent": INTENTS}[sub.name]
    return Parsed(gold if rng.random() < skill else rng.choice(pool), True, None)


def add_cell(store: Store, model: str, family: str, task_name: str, shots: int, finetune: str,
             skill: float, invalid: float = 0.05, status: str = "done", decoding: str = "free",
             seen_tasks: list[str] | None = None, lineage: dict | None = None, depends_on: str | None = None,
             calibration: str | None = None, source: str | None = None) -> str:
    task = get_task(task_name)
    cell = Cell(kind="infer", model=model, source=source or f"hub/{model}", weights="main", family=family,
                backend={"encoder": "transformers", "decoder": "vllm", "api": "litellm"}[family],
                prompt_format="none" if family == "encoder" else "chat", task=task_name, data_fp="fp",
                template_fp=None, shots=shots, finetune=finetune, seed=0,
                decoding=None if family == "encoder" else {"mode": decoding, "max_new_tokens": 64,
                                                           "temperature": 0.0, "length_normalized": False,
                                                           **({"calibration": calibration} if calibration else {})},
                text_budget=None, sampler="random", limits={"test": None, "train": None, "seed": 0},
                recipe=None, depends_on=depends_on)
    dumped = cell.model_dump()
    if seen_tasks is not None:  # the plain form: cell.seen_tasks
        dumped["seen_tasks"] = seen_tasks
    if lineage is not None:  # grid.plan's form: cell.lineage.seen_tasks, .reference
        dumped["lineage"] = lineage
    cid = cell.id
    if status != "done":
        store.write_cell(cid, {"cell_id": cid, "status": status, "cell": dumped, "error": "CUDA out of memory"})
        return cid
    rng = random.Random(f"{model}{task_name}{shots}{finetune}{seen_tasks}{calibration or ''}")
    golds = [_gold(task_name, i) for i in range(N)]
    parsed = [{s.name: _answer(s, g[s.name], skill, invalid, rng) for s in task.subtasks} for g in golds]
    metrics = score(task, golds, parsed, seed=0, n_boot=200)
    store.write_predictions(cid, pa.table({
        "cell_id": [cid] * N, "example_id": [f"ex{i}" for i in range(N)],
        "raw_output": ["..."] * N,
        "prediction": [json.dumps({k: p.value for k, p in ps.items()}) for ps in parsed],
        "gold": [json.dumps(g) for g in golds],
        "valid": [all(p.valid for p in ps.values()) for ps in parsed],
        "invalid_reason": ["; ".join(f"{k}: {p.reason}" for k, p in ps.items() if not p.valid) or None
                           for ps in parsed],
    }))
    store.write_cell(cid, {"cell_id": cid, "status": "done", "cell": dumped, "metrics": metrics,
                           "n_examples": N, "seconds": 1.0})
    return cid


TASKS = ["20ng-20", "20ng-7", "20ng-multi", "massive-intent", "massive-slots", "massive-multi"]


def make_results(path: Path, merges: bool = True) -> Store:
    store = Store.open(path)
    for t in TASKS:
        add_cell(store, "roberta-base", "encoder", t, 0, "full", 0.85, invalid=0.0)
        for shots in (0, 5):
            add_cell(store, "llama3-8b", "decoder", t, shots, "none", 0.45 + 0.05 * shots, invalid=0.2)
            add_cell(store, "llama3-8b", "decoder", t, shots, "full", 0.9)
            failed = t == "massive-slots" and shots == 5
            add_cell(store, "gpt-4o", "api", t, shots, "none", 0.7, invalid=0.1,
                     status="failed" if failed else "done")
    if merges:  # a merge cell (kind merge, no predictions) and its merged model's inference cells
        lineage = {"seen_tasks": ["massive-intent", "massive-slots"], "reference": "llama3-8b"}
        store.write_cell("mergecell000001", {"cell_id": "mergecell000001", "status": "done", "seconds": 3.0,
                                             "cell": {"kind": "merge", "model": "merge-ties", "task": "-", "shots": 0,
                                                      "finetune": "none", "seed": 0, "family": "decoder",
                                                      "lineage": lineage}})
        add_cell(store, "merge-ties", "decoder", "massive-intent", 0, "none", 0.8, lineage=lineage,
                 depends_on="mergecell000001", source="merge:merge-ties")
        add_cell(store, "merge-ties", "decoder", "20ng-20", 0, "none", 0.3, lineage=lineage,
                 depends_on="mergecell000001", source="merge:merge-ties")
    return store


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    root = tmp_path_factory.mktemp("rich")
    make_results(root / "results")
    paths = write_report(root / "results", root / "out", n_boot=200, seed=0)
    return root, paths


class _Cells(HTMLParser):
    """Rows of <table id=...> as lists of cell texts, plus data-* attributes of data cells."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.attrs = table_id, False, [], []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self._text = []
            if tag == "td":
                self.attrs.append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self._text is not None:
            self.rows[-1].append("".join(self._text).strip())
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def _table(html_text: str, table_id: str) -> _Cells:
    p = _Cells(table_id)
    p.feed(html_text)
    return p


def test_numbers_equal_cell_json_and_status(rich):
    root, paths = rich
    assert [Path(p).name for p in paths] == ["table3.md", "report.html", "report.json"]
    data = json.loads(Path(paths[2]).read_text())
    store = Store.open(root / "results")
    checked = 0
    for row in data["rows"]:
        for key, entry in row["entries"].items():
            rec = store.read_cell(entry["cell_id"])
            if rec["status"] != "done":
                assert entry["text"] == rec["status"]
                continue
            task, sub, metric = key.split("/")
            assert rec["cell"]["task"] == task
            m = rec["metrics"]
            assert entry["value"] == m[f"{sub}/{metric}"]
            assert entry["ci_low"] == m[f"{sub}/{metric}_ci_low"]
            assert entry["invalid_rate"] == m[f"{sub}/invalid_rate"]
            # the same number `grid status` prints (3 decimals there, a percent with 1 decimal here)
            shown = re.search(rf"{sub}/{metric}=([0-9.]+)", headline(m)).group(1)
            assert abs(float(shown) - entry["value"]) <= 0.0005
            assert entry["text"].startswith(f"{100 * m[f'{sub}/{metric}']:.1f} [")
            assert f"inv {100 * m[f'{sub}/invalid_rate']:.1f}%" in entry["text"]
            checked += 1
    assert checked == 7 * 8 - 1 + 2  # 7 rows x 8 paper columns, one failed, + 2 merge entries


def test_markdown_rows_and_columns(rich):
    _root, paths = rich
    md = Path(paths[0]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    assert header.count("|") == 10  # Model + 8 paper columns
    for label in ["roberta-base w/ FT", "llama3-8b five-shot w/o FT", "llama3-8b zero-shot w/ FT",
                  "gpt-4o five-shot w/o FT",
                  "merge-ties zero-shot merged (inputs tuned on massive-intent, massive-slots)"]:
        assert f"| {label} |" in md, label
    assert "| failed |" in md  # gpt-4o 5-shot on massive-slots
    assert re.search(r"\d+\.\d \[\d+\.\d, \d+\.\d\] inv \d+\.\d%", md)


def test_default_significance_pairs(rich):
    _root, paths = rich
    data = json.loads(Path(paths[2]).read_text())
    kinds = {c["name"] for c in data["comparisons"]}
    assert {c["family"] for c in data["comparisons"]} == {"exploratory"}  # no declared comparison
    assert data["families"] == [{"family": "exploratory", "tests": len(data["comparisons"]),
                                 "correction": "Benjamini-Hochberg"}]
    assert kinds == {"fine-tuned vs not", "5-shot vs 0-shot", "consolidated vs dual", "LLM vs encoder"}
    # every LLM row's done entries against the fine-tuned encoder (done on all 8 columns): llama3-8b
    # 4 rows x 8, gpt-4o 8 + 7 (its 5-shot slot cell failed), merge-ties 2
    assert sum(c["name"] == "LLM vs encoder" for c in data["comparisons"]) == 32 + 15 + 2
    ft = [c for c in data["comparisons"] if c["name"] == "fine-tuned vs not"]
    assert len(ft) == 2 * 8  # llama3-8b at 0 and 5 shots, 8 columns
    tests = {c["result"]["test"] for c in ft}
    assert tests == {"mcnemar-exact", "paired-permutation"}
    intent = [c["result"] for c in ft if c["column"].endswith("Intent")]
    assert all(r["p_value"] < 0.05 for r in intent)
    # the stars follow the Benjamini-Hochberg adjusted p: one raw p of 0.029 is not significant among these tests
    assert all(r["significant"] == (r["p_adjusted"] < 0.05) and r["p_adjusted"] >= r["p_value"] for r in intent)
    assert [r["significant"] for r in intent].count(False) == 1
    slot = next(c for c in ft if c["column"] == "MASSIVE dual: Slot filling")
    assert slot["result"]["test"] == "paired-permutation" and slot["result"]["n_resamples"] == 200


def test_calibrated_vs_raw_and_llm_vs_encoder_pairs(tmp_path):
    """A calibrated row is compared with its raw row, every LLM row with the fine-tuned encoder."""
    from grid.report.comparisons import default_pairs

    store = Store.open(tmp_path / "res")
    enc = add_cell(store, "roberta-base", "encoder", "massive-intent", 0, "full", 0.85, invalid=0.0)
    raw = add_cell(store, "smollm2", "decoder", "massive-intent", 0, "none", 0.2, decoding="constrained")
    cal = {c: add_cell(store, "smollm2", "decoder", "massive-intent", 0, "none", 0.6, decoding="constrained",
                       calibration=c) for c in ("contextual", "pmi")}
    add_cell(store, "smollm2", "decoder", "massive-slots", 0, "none", 0.2, decoding="constrained")  # no encoder there
    table = build_table(store.records())
    assert {r.decoding for r in table.rows} == {"-", "constrained", "constrained+contextual", "constrained+pmi"}
    pairs = {(kind, table.entries[(a, ca.key)].cell_id, table.entries[(b, cb.key)].cell_id)
             for kind, ca, cb, a, b in default_pairs(table)}
    assert pairs == {("calibrated vs raw", cal["contextual"], raw), ("calibrated vs raw", cal["pmi"], raw),
                     ("LLM vs encoder", raw, enc), ("LLM vs encoder", cal["contextual"], enc),
                     ("LLM vs encoder", cal["pmi"], enc)}
    data = json.loads(Path(write_report(tmp_path / "res", tmp_path / "out", n_boot=50)[2]).read_text())
    comps = [(c["name"], c["a_label"]) for c in data["comparisons"]]
    assert comps[:2] == [("calibrated vs raw", "smollm2 zero-shot w/o FT constrained+contextual [massive-intent]"),
                         ("calibrated vs raw", "smollm2 zero-shot w/o FT constrained+pmi [massive-intent]")]
    assert [k for k, _ in comps[2:]] == ["LLM vs encoder"] * 3
    assert all(c["result"]["test"] == "mcnemar-exact" for c in data["comparisons"])
    assert "smollm2 zero-shot w/o FT constrained+pmi" in {r["label"] for r in data["rows"]}


def test_requested_pairs_and_confusion_cell(tmp_path):
    store = make_results(tmp_path / "res", merges=False)
    table = build_table(store.records())
    a = next(r for r in table.records.values() if r["cell"]["model"] == "llama3-8b"
             and r["cell"]["task"] == "massive-multi" and r["cell"]["finetune"] == "full" and r["cell"]["shots"] == 0)
    b = next(r for r in table.records.values() if r["cell"]["model"] == "gpt-4o"
             and r["cell"]["task"] == "massive-intent" and r["cell"]["shots"] == 0)
    paths = write_report(tmp_path / "res", tmp_path / "out", pairs=f"{a['cell_id']}:{b['cell_id']}",
                         confusion_cell=f"{a['cell_id']}:intent", n_boot=100, default_pairs_on=False)
    data = json.loads(Path(paths[2]).read_text())
    assert [c["name"] for c in data["comparisons"]] == ["requested"]  # intent is the only shared sub-task
    assert data["comparisons"][0]["result"]["n"] == N
    conf = data["confusion"]
    assert conf["cell_id"] == a["cell_id"] and conf["subtask"] == "intent"
    assert sum(map(sum, conf["counts"])) == N
    assert conf["predicted_labels"][-1] == "(invalid)"
    from grid.errors import GridError
    with pytest.raises(GridError, match="not in the results dir"):
        write_report(tmp_path / "res", tmp_path / "out2", pairs="nope:nada")


def test_merges_seen_and_unseen(rich):
    root, paths = rich
    data = json.loads(Path(paths[2]).read_text())
    rows = data["forgetting"]
    assert {(r["column"], r["seen"]) for r in rows} == {("MASSIVE dual: Intent", True), ("20NG dual: 20-class", False)}
    assert all(r["reference_model"] == "llama3-8b" and r["reference_kind"] == "declared reference" for r in rows)
    table = {r["label"]: r for r in data["rows"]}
    ref = table["llama3-8b zero-shot w/o FT"]["entries"]
    for r in rows:  # the declared reference's not-fine-tuned cell at the same shots, as `grid status` does
        key = next(c["key"] for c in data["columns"] if c["title"] == r["column"])
        assert r["reference"] == ref[key]["value"]
        assert r["delta"] == pytest.approx(r["score"] - r["reference"])
        # skill beside accuracy: macro-F1's difference from the same reference cell's (no label scores here)
        ref_f1 = next(rec for rec in Store.open(root / "results").records()
                      if rec["cell_id"] == ref[key]["cell_id"])["metrics"][key.split("/")[1] + "/macro_f1"]
        mine = next(rec for rec in Store.open(root / "results").records() if rec["cell_id"] == r["cell_id"])
        assert r["macro_f1_delta"] == pytest.approx(mine["metrics"][key.split("/")[1] + "/macro_f1"] - ref_f1)
        assert r["gold_logprob_delta"] is None
    md = Path(paths[0]).read_text()
    assert "| Δ macro-F1 | Δ balanced acc. | Δ gold log-prob |" in md
    assert data["plots"]["forgetting"] is True


def test_merged_model_without_a_declared_reference_has_no_difference(tmp_path):
    """No `reference:` in the grid: the row is listed, with no reference and no difference (as in
    `grid status`); no other model stands in for the reference."""
    store = make_results(tmp_path / "res", merges=False)
    add_cell(store, "merged", "decoder", "20ng-7", 0, "none", 0.5, lineage={"seen_tasks": ["20ng-20"]})
    data = json.loads(Path(write_report(tmp_path / "res", tmp_path / "out", n_boot=50)[2]).read_text())
    (row,) = data["forgetting"]
    assert row["seen"] is False and row["model"] == "merged"
    assert row["reference"] is None and row["reference_kind"] is None and row["delta"] is None


def test_smoke_like_results_without_merges_or_matplotlib(tmp_path, monkeypatch):
    store = Store.open(tmp_path / "res")
    add_cell(store, "tiny", "decoder", "massive-intent", 0, "none", 0.0, invalid=1.0)
    monkeypatch.setattr("grid.report.plots.pyplot", lambda: None)
    paths = write_report(tmp_path / "res", tmp_path / "out")
    page = Path(paths[1]).read_text()
    assert "No merge cells" in page and "matplotlib is not installed" in page
    t = _table(page, "table3")
    assert len(t.rows) == 4 and t.rows[2][0] == "tiny zero-shot w/o FT" and t.rows[3][0] == "majority-class rate"
    # only the column a cell fills; 0 of N right has the exact (Clopper-Pearson) interval, not [0.0, 0.0]
    high = stats.binomtest(0, N).proportion_ci(method="exact").high
    assert t.rows[2][1:] == [f"0.0 [0.0, {100 * high:.1f}] mF1 0.0 inv 100.0%"]


def test_cli_report(tmp_path):
    store = Store.open(tmp_path / "res")
    for shots in (0, 5):
        add_cell(store, "llama3-8b", "decoder", "20ng-7", shots, "none", 0.5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "grid", "report", str(tmp_path / "res"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "o" / n) for n in ("table3.md", "report.html", "report.json")]
    bad = subprocess.run([sys.executable, "-m", "grid", "report", str(tmp_path / "missing")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: results dir")


# --- a real browser -------------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _png_stats(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct row hashes) of a PNG, read with zlib only."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", blob[16:24])
    pos, idat = 8, b""
    while pos < len(blob):
        length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        if kind == b"IDAT":
            idat += blob[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = len(raw) // h
    rows = {hash(raw[i * stride + 1:(i + 1) * stride]) for i in range(h)}
    return w, h, len(rows)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install -y chromium")
def test_html_renders_in_headless_chromium(rich, tmp_path):
    _root, paths = rich
    page = Path(paths[1])
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    url = page.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    t = _table(dom.stdout, "table3")
    body, majority = t.rows[2:-1], t.rows[-1]
    labels = [r[0] for r in body]
    assert labels == ["roberta-base w/ FT", "llama3-8b five-shot w/o FT", "llama3-8b zero-shot w/o FT",
                      "llama3-8b five-shot w/ FT", "llama3-8b zero-shot w/ FT",
                      "merge-ties zero-shot merged (inputs tuned on massive-intent, massive-slots)",
                      "gpt-4o five-shot w/o FT", "gpt-4o zero-shot w/o FT"]
    assert t.rows[1] == [c.head for c in PAPER_COLUMNS]
    assert all(len(r) == 1 + len(PAPER_COLUMNS) for r in body)
    # accuracy columns: value [CI] mF1 macro-F1 inv invalid%; slot columns: no macro-F1
    assert all(re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]( mF1 \d+\.\d)? inv \d+\.\d%", c) for c in body[0][1:])
    assert sum(" mF1 " in c for c in body[0][1:]) == 6
    # the last row: each accuracy column's majority-class rate, as the cells' records give it
    assert majority[0] == "majority-class rate" and majority[6] == "–" and majority[8] == "–"
    assert all(re.fullmatch(r"\d+\.\d", m) for i, m in enumerate(majority[1:], 1) if i not in (6, 8))
    data = json.loads(Path(paths[2]).read_text())
    by_label = {r["label"]: r for r in data["rows"]}
    for row in body:
        for col, cell_text in zip(PAPER_COLUMNS, row[1:]):
            entry = by_label[row[0]]["entries"].get(col.key)
            assert cell_text == (entry["text"] if entry else "–")
    assert _table(dom.stdout, "significance").rows[1:]  # the tests table rendered too
    assert dom.stdout.count('src="data:image/png;base64,') == 4  # by shots, fine-tune, confusion, forgetting

    shot = tmp_path / "report.png"
    run = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1400,1800", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    w, h, distinct = _png_stats(shot)
    assert (w, h) == (1400, 1800)
    assert shot.stat().st_size > 20_000 and distinct > 100  # text, table rules and plots, not a blank page


def test_per_example_outcomes_reproduce_cell_json(rich):
    """The significance tests' per-example outcomes give back each cell's own metric."""
    from grid.metrics.slots import slot_f1_statistic
    from grid.report.comparisons import OutcomeCache

    root, _ = rich
    store = Store.open(root / "results")
    cache = OutcomeCache(store)
    n = 0
    for rec in store.records():
        c = rec["cell"]
        if rec["status"] != "done" or c["kind"] != "infer":
            continue
        for sub in get_task(c["task"]).subtasks:
            out = cache.get(rec, sub.name)
            if sub.type == "word_tags":
                assert float(slot_f1_statistic(out.counts[None])[0]) == pytest.approx(rec["metrics"]["slots/slot_f1"])
            else:
                assert out.correct.mean() == pytest.approx(rec["metrics"][f"{sub.name}/accuracy"])
            n += 1
    assert n > 50


def test_each_fine_tune_evaluated_on_other_tasks_has_its_own_row(tmp_path):
    """With finetuned_eval: all, the 20ng-7 fine-tune answers massive-intent too: that cell is the 20ng
    fine-tune's transfer row, not the intent column's fine-tune (which 'fine-tuned vs not' tests)."""
    store = Store.open(tmp_path / "res")
    add_cell(store, "m", "decoder", "massive-intent", 0, "none", 0.2)
    own = add_cell(store, "m", "decoder", "massive-intent", 0, "lora", 0.6, lineage={"trained_on": "massive-intent"},
                   depends_on="ft-intent")
    other = add_cell(store, "m", "decoder", "massive-intent", 0, "lora", 0.9, lineage={"trained_on": "20ng-7"},
                     depends_on="ft-20ng")
    table = build_table(store.records())
    labels = {table.label(r): r for r in table.rows}
    assert set(labels) == {"m zero-shot w/o FT", "m zero-shot w/ FT (lora)", "m zero-shot w/ FT (lora) on 20ng-7"}
    col = next(c for c in table.used_columns() if c.task == "massive-intent")
    assert table.entries[(labels["m zero-shot w/ FT (lora)"], col.key)].cell_id == own
    assert table.entries[(labels["m zero-shot w/ FT (lora) on 20ng-7"], col.key)].cell_id == other
    from grid.report.comparisons import default_pairs

    pairs = [(kind, table.entries[(a, ca.key)].cell_id) for kind, ca, cb, a, b in default_pairs(table)]
    assert pairs == [("fine-tuned vs not", own)]


def test_rows_are_named_from_lineage_and_each_legend_entry_is_one_combination(tmp_path):
    """A model the grid tuned, or one with a classification head, is never "w/o FT"; each plot line
    names its model, fine-tune and decoding (two decodings of one model are two entries)."""
    from grid.report.model import shots_panels

    store = Store.open(tmp_path / "res")
    seen = {"seen_tasks": ["massive-intent", "20ng-7"], "reference": None, "trained_on": None}
    add_cell(store, "multi", "decoder", "massive-intent", 0, "none", 0.5, lineage=seen, decoding="head")
    for shots in (0, 5):
        for decoding in ("constrained", "free"):
            add_cell(store, "m", "decoder", "massive-intent", shots, "none", 0.3 + shots / 50, decoding=decoding)
    table = build_table(store.records())
    labels = {table.label(r) for r in table.rows}
    assert "multi zero-shot tuned on massive-intent, 20ng-7 head" in labels
    assert not any("w/o FT" in label for label in labels if label.startswith("multi"))
    (panel,) = shots_panels(table)
    names = [name for name, _ in panel.series]
    assert names == ["m w/o FT constrained", "m w/o FT free", "multi tuned on massive-intent, 20ng-7 head"]
