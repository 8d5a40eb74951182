"""Merges: mergekit's arithmetic checked by hand, methods that load and generate, bad configs that
fail before any work, and merge cells in a grid plan.

Checkpoints are real saved models: the tiny Llama (tiny:llama) with seeded perturbations.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from grid.errors import GridError  # noqa: E402
from grid.merges import MergeError, MergeSpec, check_template, load_recipe, substitute  # noqa: E402
from merge.config import mergekit_check  # noqa: E402
from merge.run import main as merge_main  # noqa: E402
from merge.run import merge  # noqa: E402


def _perturbed(src: Path, out: Path, seed: int, scale: float = 0.02, **config_changes) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config_changes:
        config = AutoConfig.from_pretrained(src)
        for key, value in config_changes.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from workers.models import build_tiny

    root = tmp_path_factory.mktemp("ckpts")
    base = build_tiny("llama")
    return {"base": base, "a": _perturbed(base, root / "a", 1), "b": _perturbed(base, root / "b", 2),
            "root": root}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ta_config(ckpts, **params) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(ckpts["base"]), "dtype": "float32",
            "models": [{"model": str(ckpts["a"]), "parameters": {"weight": 0.7}},
                       {"model": str(ckpts["b"]), "parameters": {"weight": -0.4}}],
            "parameters": {"normalize": False, **params}}


def test_task_arithmetic_is_the_weighted_sum_of_task_vectors(ckpts, tmp_path):
    merge(_ta_config(ckpts), tmp_path / "out")
    merged, base, a, b = (_tensors(p) for p in (tmp_path / "out", ckpts["base"], ckpts["a"], ckpts["b"]))
    assert set(merged) == set(base)  # every tensor, none dropped or added
    for name, t in merged.items():
        expected = base[name] + 0.7 * (a[name] - base[name]) - 0.4 * (b[name] - base[name])
        assert torch.allclose(t, expected, atol=1e-6, rtol=0), name
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_lambda_scales_the_summed_task_vector(ckpts, tmp_path):
    merge(_ta_config(ckpts, **{"lambda": 0.5}), tmp_path / "out")
    merged, base, a, b = (_tensors(p) for p in (tmp_path / "out", ckpts["base"], ckpts["a"], ckpts["b"]))
    for name, t in merged.items():
        expected = base[name] + 0.5 * (0.7 * (a[name] - base[name]) - 0.4 * (b[name] - base[name]))
        assert torch.allclose(t, expected, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("recipe", ["ties", "dare_ties", "linear"])
def test_recipes_merge_load_and_generate(ckpts, tmp_path, recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = load_recipe(recipe)
    paths = ({"first": str(ckpts["a"]), "second": str(ckpts["b"])} if recipe == "linear" else
             {"base": str(ckpts["base"]), "instruct": str(ckpts["a"]), "finetuned": str(ckpts["b"])})
    merge(substitute(template, paths), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("Label:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert torch.isfinite(next(model.parameters())).all()


def test_dare_masks_follow_the_merge_seed(ckpts, tmp_path):
    """DARE drops a random share of each delta: one seed, one mask (a rerun is the same model);
    another seed, another mask, which is what a study averages over."""
    cfg = {"merge_method": "dare_ties", "base_model": str(ckpts["base"]), "dtype": "float32",
           "models": [{"model": str(ckpts["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": str(ckpts["b"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    for name, seed in (("s1", 1), ("s1-again", 1), ("s2", 2)):
        merge(cfg, tmp_path / name, random_seed=seed)
    s1, again, s2 = (_tensors(tmp_path / n) for n in ("s1", "s1-again", "s2"))
    assert all(torch.equal(s1[k], again[k]) for k in s1)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)


def test_cli_dry_run_and_merge(ckpts, tmp_path, capsys):
    binds = ["--bind", f"base={ckpts['base']}", "--bind", f"instruct={ckpts['a']}", "--bind", f"finetuned={ckpts['b']}"]
    assert merge_main(["merge/task_arithmetic.yaml", str(tmp_path / "o"), *binds, "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()
    assert merge_main(["merge/task_arithmetic.yaml", str(tmp_path / "o"), *binds]) == 0
    assert (tmp_path / "o" / "config.json").is_file()


def test_lora_adapter_folders_are_merged_into_their_base_first(ckpts, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpts["base"], dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ckpts["base"]), "dtype": "float32",
           "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}]}
    merge(cfg, tmp_path / "out")
    expected = peft_model.merge_and_unload().state_dict()
    merged = _tensors(tmp_path / "out")
    for name, t in merged.items():
        assert torch.allclose(t, expected[name], atol=1e-6), name


# --- bad configs: one line naming the field, before any work ---------------------------------


@pytest.fixture(scope="module")
def odd(ckpts) -> dict[str, Path]:
    root = ckpts["root"]
    return {"vocab": _perturbed(ckpts["base"], root / "vocab", 3, vocab_size=4000),
            "arch": _perturbed(ckpts["base"], root / "arch", 4, num_hidden_layers=3)}


@pytest.mark.parametrize("case, field", [
    ("vocab", "models.1.model"),
    ("arch", "models.1.model"),
    ("missing", "models.1.model"),
    ("density_high", "models.0.parameters.density"),
    ("density_zero", "models.0.parameters.density"),
    ("density_ta", "models.0.parameters.density"),
    ("lambda_linear", "parameters.lambda"),
    ("no_base", "base_model"),
    ("method", "merge_method"),
    ("no_weight", "models.1.parameters.weight"),
])
def test_bad_configs_fail_before_any_work(ckpts, odd, tmp_path, case, field):
    cfg = {"merge_method": "ties", "base_model": str(ckpts["base"]), "dtype": "float32",
           "models": [{"model": str(ckpts["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": str(ckpts["b"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    if case in ("vocab", "arch"):
        cfg["models"][1]["model"] = str(odd[case])
    elif case == "missing":
        cfg["models"][1]["model"] = str(tmp_path / "nowhere")
    elif case == "density_high":
        cfg["models"][0]["parameters"]["density"] = 1.5
    elif case == "density_zero":
        cfg["models"][0]["parameters"]["density"] = 0
    elif case == "density_ta":
        cfg["merge_method"] = "task_arithmetic"
    elif case == "lambda_linear":
        cfg = {"merge_method": "linear", "parameters": {"lambda": 0.5},
               "models": [{"model": str(ckpts["a"]), "parameters": {"weight": 1.0}}]}
    elif case == "no_base":
        del cfg["base_model"]
    elif case == "method":
        cfg["merge_method"] = "slerpy"
    elif case == "no_weight":
        del cfg["models"][1]["parameters"]["weight"]
    with pytest.raises(MergeError) as err:
        merge(cfg, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and f"field {field}" in message, message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.*"))  # no temporary or adapter folder left behind


def test_typed_spec_rejects_what_the_method_does_not_take():
    with pytest.raises(ValueError, match="density"):
        MergeSpec(name="m", method="task_arithmetic", base={"model": "b"},
                  models=[{"model": "a", "weight": 1.0, "density": 0.5}])
    with pytest.raises(ValueError, match="less than or equal to 1"):
        MergeSpec(name="m", method="ties", base={"model": "b"}, models=[{"model": "a", "weight": 1.0, "density": 2}])
    with pytest.raises(ValueError, match="base"):
        MergeSpec(name="m", method="ties", models=[{"model": "a", "weight": 1.0}])
    with pytest.raises(ValueError, match="no binding"):
        MergeSpec(name="m", recipe="merge/task_arithmetic.yaml", bind={"base": {"model": "b"}})
    with pytest.raises(ValueError, match="random_seed: ties draws no random mask; only dare_ties takes a seed"):
        MergeSpec(name="m", method="ties", base={"model": "b"}, models=[{"model": "a", "weight": 1.0}], random_seed=1)
    seeded = MergeSpec(name="m", method="dare_ties", base={"model": "b"},
                       models=[{"model": "a", "weight": 1.0, "density": 0.5}], random_seed=2)
    assert seeded.random_seed == 2


def test_every_recipe_in_merge_is_valid():
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("merge").glob("*.yaml")):
        check_template(load_recipe(str(path)), where=path.name)
        mergekit_check(load_recipe(str(path)), where=path.name)


# --- merge cells in a grid plan ---------------------------------------------------------------


GRID = """
name: t
models:
  - {name: base, source: "tiny:llama", family: decoder}
  - {name: instruct, finetuned_from: {model: base, tasks: [massive-intent]}}
tasks: [fpb-sentiment, fomc-stance]
finetune: [none, lora]
reference: instruct
merges:
  - name: merged
    method: task_arithmetic
    base: {model: base}
    models:
      - {model: instruct, weight: 1.0}
      - {model: base, task: fpb-sentiment, finetune: lora, weight: WEIGHT}
"""


def _plan(tmp_path, text: str):
    from grid.config import load_config
    from grid.plan import build_plan

    path = tmp_path / "g.yaml"
    path.write_text(text)
    return build_plan(load_config(path))


def test_plan_has_merge_cells_after_their_inputs(tmp_path):
    plan = _plan(tmp_path, GRID.replace("WEIGHT", "1.0"))
    order = [c.id for c in plan.cells]
    (m,) = [c for c in plan.cells if c.kind == "merge"]
    inputs = [ref["cell"] for ref in m.recipe["inputs"].values() if "cell" in ref]
    assert len(inputs) == 2 and all(order.index(i) < order.index(m.id) for i in inputs)
    assert m.recipe["inputs"]["base"]["source"] == "tiny:llama"
    merged_infers = [c for c in plan.cells if c.model == "merged"]
    assert {c.kind for c in merged_infers} == {"merge", "infer"}
    assert all(c.depends_on == m.id for c in merged_infers if c.kind == "infer")
    assert m.lineage["seen_tasks"] == ["massive-intent", "fpb-sentiment"]
    instruct_ft = [c for c in plan.cells
                   if c.kind == "finetune" and c.model == "instruct" and c.task == "fpb-sentiment"]
    assert instruct_ft[0].depends_on == inputs[0]  # the instruct model is its prep cell's artifact
    # The id follows the weights, and only the merge's cells change with them.
    other = _plan(tmp_path, GRID.replace("WEIGHT", "0.5"))
    changed = {c.id for c in plan.cells} ^ {c.id for c in other.cells}
    assert len(changed) == 2 * (1 + 2)  # the merge cell and its two inference cells, both plans


def test_a_dare_merge_per_mask_seed_is_its_own_model(tmp_path):
    dare = GRID.replace("method: task_arithmetic", "method: dare_ties").replace("WEIGHT", "1.0")
    seeded = dare.replace("    method: dare_ties", "    method: dare_ties\n    random_seed: 3")
    plain, other = (_plan(tmp_path, text) for text in (dare, seeded))
    (m0,), (m3,) = ([c for c in p.cells if c.kind == "merge"] for p in (plain, other))
    assert "random_seed" not in m0.recipe and m3.recipe["random_seed"] == 3
    assert m0.weights != m3.weights and m0.id != m3.id
    assert {c.id for c in plain.cells if c.model != "merged"} == {c.id for c in other.cells if c.model != "merged"}


def test_mixed_finetune_is_one_cell_on_all_its_tasks(tmp_path):
    mixed = GRID.replace("WEIGHT", "1.0").replace(
        "  - {name: instruct, finetuned_from: {model: base, tasks: [massive-intent]}}",
        "  - {name: instruct, finetuned_from: {model: base, tasks: [massive-intent]}}\n"
        "  - {name: multi, finetuned_from: {model: base, tasks: [fpb-sentiment, fomc-stance], mix: true,"
        " finetune: lora}}")
    plan = _plan(tmp_path, mixed)
    (ft,) = [c for c in plan.cells if c.kind == "finetune" and c.lineage.get("prepares") == "multi"]
    assert ft.task == "fpb-sentiment" and ft.recipe["mix_with"] == ["fomc-stance"]
    assert ft.lineage["seen_tasks"] == ["fpb-sentiment", "fomc-stance"]
    single = [c for c in plan.cells if c.kind == "finetune" and c.model == "base" and c.task == "fpb-sentiment"]
    assert ft.data_fp != single[0].data_fp  # both tasks' rows are in its fingerprint
    infers = [c for c in plan.cells if c.model == "multi" and c.kind == "infer" and c.finetune == "none"]
    assert {c.task for c in infers} == {"fpb-sentiment", "fomc-stance"}
    assert all(c.depends_on == ft.id and c.lineage["seen_tasks"] == ["fpb-sentiment", "fomc-stance"] for c in infers)
    from grid.config import load_config

    path = tmp_path / "one.yaml"
    path.write_text(mixed.replace("tasks: [fpb-sentiment, fomc-stance], mix", "tasks: [fpb-sentiment], mix"))
    with pytest.raises(GridError, match=r"models.2.finetuned_from.mix: a mixture needs two"):
        load_config(path)


def test_plan_names_a_missing_finetune_cell(tmp_path):
    text = GRID.replace("WEIGHT", "1.0").replace("finetune: [none, lora]", "finetune: [none]")
    with pytest.raises(GridError, match=r"field merges.0 \(model_1\): the grid has no fine-tune cell"):
        _plan(tmp_path, text)


def test_grid_config_names_the_bad_merge_field(tmp_path):
    from grid.config import load_config

    path = tmp_path / "g.yaml"
    path.write_text(GRID.replace("WEIGHT", "1.0").replace("{model: base, task: fpb", "{model: nobody, task: fpb"))
    with pytest.raises(GridError, match=r"merges.0 \(model_1\): model 'nobody' is not a model"):
        load_config(path)
    path.write_text(GRID.replace("WEIGHT", "1.0, density: 1.5"))
    with pytest.raises(GridError, match=r"field merges.0.models.1.density"):
        load_config(path)


def test_study_grids_plan(tmp_path):
    from grid.config import load_config
    from grid.plan import build_plan

    root = Path(__file__).resolve().parent.parent
    plan = build_plan(load_config(root / "grids" / "merge-study-tiny.yaml"))
    assert sum(c.kind == "merge" for c in plan.cells) == 3
    paper = load_config(root / "grids" / "merge-study-paper.yaml")
    assert {m.source for m in paper.models} >= {"mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2",
                                                "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                                                "microsoft/Phi-3-mini-4k-instruct"}


def test_finetuned_eval_all_adds_unseen_task_cells_and_keeps_own_ids(tmp_path):
    own = _plan(tmp_path, GRID.replace("WEIGHT", "1.0"))
    every = _plan(tmp_path, GRID.replace("WEIGHT", "1.0").replace("reference:", "finetuned_eval: all\nreference:"))
    assert {c.id for c in own.cells} < {c.id for c in every.cells}  # the own-task cells keep their ids
    cross = [c for c in every.cells if c.kind == "infer" and c.finetune == "lora"
             and c.lineage["trained_on"] != c.task]
    assert len(cross) == 2 * 2  # base and instruct, each fine-tune on the other task
    for c in cross:
        ft = every.by_id[c.depends_on]
        assert ft.kind == "finetune" and ft.task == c.lineage["trained_on"] and c.task not in ft.lineage["seen_tasks"]


def test_finetuned_eval_all_scores_each_task_with_the_decodings_its_rules_keep(tmp_path):
    """The merge study's design: held-out tasks scored calibrated, seen tasks raw, for every model.
    A rule naming a decoding drops an evaluation, never a fine-tune; the other rules drop training."""
    text = """
name: t
models:
  - {name: base, source: "tiny:llama", family: decoder}
tasks: [fpb-sentiment, fomc-stance, sst2]
finetune: [none, lora]
finetuned_eval: all
decoding:
  - {mode: constrained}
  - {mode: constrained, calibration: contextual}
exclude:
  - {task: sst2, finetune: lora}
  - {task: sst2, decoding: constrained}
  - {task: [fpb-sentiment, fomc-stance], decoding: constrained+contextual}
"""
    from grid.config import decoding_name

    plan = _plan(tmp_path, text)
    assert sorted(c.task for c in plan.cells if c.kind == "finetune") == ["fomc-stance", "fpb-sentiment"]
    infers = [(c.task, c.finetune, decoding_name(c.decoding)) for c in plan.cells if c.kind == "infer"]
    assert len(infers) == len(set(infers)) + 3  # each lora evaluation twice: by the fpb and the fomc fine-tune
    assert sorted(set(infers)) == [("fomc-stance", "lora", "constrained"), ("fomc-stance", "none", "constrained"),
                                   ("fpb-sentiment", "lora", "constrained"), ("fpb-sentiment", "none", "constrained"),
                                   ("sst2", "lora", "constrained+contextual"),
                                   ("sst2", "none", "constrained+contextual")]
    # each fine-tune's evaluations: raw on the seen tasks (its own and the other's), calibrated on sst2
    for ft in (c for c in plan.cells if c.kind == "finetune"):
        mine = sorted((c.task, decoding_name(c.decoding)) for c in plan.cells if c.depends_on == ft.id)
        assert mine == [("fomc-stance", "constrained"), ("fpb-sentiment", "constrained"),
                        ("sst2", "constrained+contextual")]


def test_merge_cell_runs_from_the_plan_and_records_lineage(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    from grid.execute import run_merge_cell
    from grid.store import Store

    text = f"""
name: t
models:
  - {{name: base, source: "tiny:llama", family: decoder}}
tasks: [fpb-sentiment]
merges:
  - name: merged
    method: ties
    base: {{model: base}}
    models:
      - {{source: {ckpts['a']}, weight: 1.0, density: 0.5}}
      - {{source: {ckpts['b']}, weight: 1.0, density: 0.5}}
"""
    plan = _plan(tmp_path, text)
    (cell,) = [c for c in plan.cells if c.kind == "merge"]
    store = Store.open(tmp_path / "results")
    record = run_merge_cell(cell, store)
    assert record["status"] == "done", record.get("error")
    assert record["lineage"]["method"] == "ties" and record["lineage"]["inputs"]["model_0"] == str(ckpts["a"])
    assert store.read_cell(cell.id)["mergekit_config"]["merge_method"] == "ties"
    AutoModelForCausalLM.from_pretrained(store.cell_uri(cell.id, "model"))
    infer = [c for c in plan.cells if c.kind == "infer" and c.model == "merged"]
    assert infer and all(c.depends_on == cell.id for c in infer)


def test_merge_cell_on_s3_publishes_its_model_there(ckpts, tmp_path, monkeypatch):
    """A merge cell with an object-store results dir: the merged model is uploaded (manifest
    last) and fetched back into a node cache that loads."""
    from transformers import AutoModelForCausalLM

    import workers.models
    from grid.execute import run_merge_cell
    from grid.store import Store
    from tests.s3server import start_s3
    from workers.artifacts import fetch

    text = f"""
name: t
models:
  - {{name: base, source: "tiny:llama", family: decoder}}
tasks: [fpb-sentiment]
merges:
  - name: merged
    method: task_arithmetic
    base: {{model: base}}
    models:
      - {{source: {ckpts['a']}, weight: 0.5}}
"""
    (cell,) = [c for c in _plan(tmp_path, text).cells if c.kind == "merge"]
    s3 = start_s3()
    try:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(workers.models, "CACHE_DIR", tmp_path / "node-cache")
        store = Store.open(s3.uri("merges"))
        record = run_merge_cell(cell, store)
        assert record["status"] == "done", record.get("error")
        assert store.read_cell(cell.id)["status"] == "done"
        local = fetch(store.cell_uri(cell.id, "model"))
        assert local.startswith(str(tmp_path / "node-cache" / "artifacts"))
        AutoModelForCausalLM.from_pretrained(local)
    finally:
        s3.stop()
