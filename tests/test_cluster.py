"""cluster.yaml against Ray's own cluster config schema and validator, the paper grid's resource
requests against its node types, grids/paper.yaml through the real config loader and planner, and
the `--dry-run` output (cells, placement groups, GPU-hours)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grid.config import load_config
from grid.jobs import Resources, placement_strategy
from grid.resources import GPU_TYPES, check_fits, estimate, model_params, node_types_from_cluster

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
PAPER = ROOT / "grids" / "paper.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def paper():
    return load_config(PAPER)


def test_cluster_yaml_passes_rays_own_validation(cluster):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does: fill in the provider's defaults, then validate against ray-schema.json
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_matches_the_schema_file_shipped_with_ray(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # the file as written, before defaults
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_a100"]["resources"]["GPU"] = 7.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_node_types_cpu_head_and_8_gpu_a100_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] == 8 for t in workers.values())
    for t in workers.values():
        assert t["node_config"]["InstanceType"] in ("p4d.24xlarge", "p4de.24xlarge")
        assert t["resources"]["CPU"] == 96


def test_setup_commands_install_in_the_right_order(cluster):
    cmds = cluster["setup_commands"]
    text = "\n".join(cmds)
    torch = next(i for i, c in enumerate(cmds) if re.search(r"pip install .*torch==\d", c))
    project = next(i for i, c in enumerate(cmds) if "venv-grid" in c and "install" in c and "-e ~/clfgrid" in c)
    ds = next(i for i, c in enumerate(cmds) if "--no-build-isolation deepspeed" in c)
    assert torch < project < ds
    # vLLM in its own environment, pinned, with the same Ray as the cluster
    vllm = next(c for c in cmds if re.search(r"vllm==\d", c))
    assert "venv-vllm" in vllm and "venv-grid" not in vllm
    ray_pins = set(re.findall(r"ray\[[^\]]*\]==([\d.]+)", text))
    assert len(ray_pins) == 1
    assert "CLFGRID_VLLM_PYTHON" in "\n".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])


def test_paper_grid_requests_fit_the_node_types(cluster, paper):
    nodes = node_types_from_cluster(CLUSTER)
    gpu_nodes = [r for r in nodes.values() if r.get("GPU", 0) > 0]
    for m in paper.models:
        inf = paper.inference_for(m)
        assert any(r["GPU"] >= inf.num_gpus and r["CPU"] >= inf.num_cpus for r in gpu_nodes), m.name
    for key, recipe in paper.recipes.items():
        res = recipe.resources
        total_gpus = res.num_workers * res.gpus_per_worker
        total_cpus = res.num_workers * res.cpus_per_worker
        # one node holds the whole group: STRICT_PACK, ZeRO-3 stays on NVLink
        assert any(r["GPU"] >= total_gpus and r["CPU"] >= total_cpus for r in gpu_nodes), key
        assert placement_strategy(res.num_workers, res.gpus_per_worker,
                                  max(r["GPU"] for r in gpu_nodes)) == "STRICT_PACK"
    decoder = paper.recipe("decoder", "full").resources
    assert (decoder.num_workers, decoder.gpus_per_worker, decoder.deepspeed_stage) == (8, 1, 3)
    for m in paper.models:
        tp = m.options.get("tensor_parallel_size", 1)
        if m.backend == "vllm":
            assert paper.inference_for(m).num_gpus == tp, m.name  # no actor reserves idle GPUs
            params = model_params(m.source, m.name)
            assert params * 2 < 0.9 * tp * GPU_TYPES["A100"]["memory_gb"] * 1e9, f"{m.name}: bf16 weights fit TP GPUs"


def test_paper_grid_loads_and_plans(paper):
    from grid.plan import build_plan, validate_references

    assert [m.source for m in paper.models if m.family == "decoder"] == [
        "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-70b-chat-hf",
        "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-70B-Instruct"]
    assert {m.backend for m in paper.models if m.family == "decoder"} == {"vllm"}
    assert {m.source for m in paper.models if m.family == "api"} >= {"gpt-3.5-turbo", "gpt-4", "gpt-4o"}
    assert any(m.source.startswith("claude-3") for m in paper.models)
    assert paper.tasks == ("20ng-20", "20ng-7", "20ng-multi", "massive-intent", "massive-slots", "massive-multi")
    env = {k: os.environ.pop(k) for k in ["HF_HUB_OFFLINE"] if k in os.environ}  # hub ids are not cached here
    try:
        validate_references(paper, PAPER)
    finally:
        os.environ.update(env)
    plan = build_plan(paper)
    kinds = [c.kind for c in plan.cells]
    assert kinds.count("infer") == 2 * 6 + 4 * 6 * 2 * 2 + 4 * 6 * 2 == 156
    assert kinds.count("finetune") == 2 * 6 + 4 * 6 * 2 == 60
    by_model = {c.model: c.recipe["hparams"] for c in plan.cells if c.kind == "finetune"}
    assert by_model["roberta-base"] == {"batch_size": 32, "lr": 1e-5, "epochs": None, "max_length": 512}
    assert by_model["llama3-8b-instruct"]["max_steps"] == 4000 and by_model["llama3-70b-instruct"]["max_steps"] == 8000
    assert {h["lr"] for m, h in by_model.items() if "llama" in m} == {1e-6}
    from grid.tasks import catalog  # epochs: null means the paper's per-dataset epochs, in the task files

    paper_tasks = [n for n in catalog() if n.startswith(("massive", "20ng"))]
    assert {n: catalog()[n].encoder_epochs for n in paper_tasks} == {
        n: 20 if n.startswith("massive") else 10 for n in paper_tasks}

    est = estimate(plan, paper)
    assert not check_fits(est, node_types_from_cluster(CLUSTER))
    assert len(est.placement_groups) == 60 and est.max_group_gpus == 8
    seventy = [p for p in est.placement_groups if "70b" in p.label]
    eight = [p for p in est.placement_groups if "llama3-8b" in p.label]
    assert all(p.strategy == "STRICT_PACK" and len(p.bundles) == 8 for p in seventy)
    assert min(p.gpu_hours for p in seventy) > max(p.gpu_hours for p in eight)  # 70B: 2x steps, ~9x params
    assert not est.unknown_params
    # The 70B models' optimizer is offloaded (models[].resources): 35 GB of state per GPU, not 140.
    assert {c.recipe["resources"].get("zero_offload") for c in plan.cells
            if c.kind == "finetune" and "70b" in c.model} == {"optimizer"}
    assert {round(p.state_gb_per_gpu) for p in seventy} == {35} and {round(p.state_gb_per_gpu) for p in eight} == {16}
    without = paper.model_copy(update={"models": tuple(m.model_copy(update={"resources": {}}) for m in paper.models)})
    problems = check_fits(estimate(build_plan(without), without), node_types_from_cluster(CLUSTER))
    assert [p.split(":")[0] for p in problems] == ["llama2-70b-chat", "llama3-70b-instruct"]
    assert all("140 GB of training state per GPU" in p and "zero_offload" in p for p in problems)


def test_training_state_per_gpu():
    from grid.resources import training_state_bytes

    n = 1e9
    assert training_state_bytes(n, "full", 0, "none", 8) == 16e9  # DDP: every rank holds everything
    assert training_state_bytes(n, "full", 2, "none", 8) == (2 + 14 / 8) * n
    assert training_state_bytes(n, "full", 3, "none", 8) == 2e9
    assert training_state_bytes(n, "full", 2, "optimizer", 8) == (2 + 2 / 8) * n
    assert training_state_bytes(n, "full", 3, "optimizer", 8) == 0.5e9
    assert training_state_bytes(n, "full", 3, "all", 8) == 0
    assert training_state_bytes(n, "lora", 3, "none", 8) == 0.25e9  # the frozen base, in bf16


def test_model_resources_are_checked_against_the_recipe(tmp_path):
    from grid.config import load_config
    from grid.errors import GridError

    grid = tmp_path / "g.yaml"
    base = ("name: g\ntasks: [fpb-sentiment]\nfinetune: [full]\n"
            "recipes: {decoder/full: {resources: {deepspeed_stage: 2}}}\n"
            "models:\n  - {name: big, source: tiny:llama, family: decoder, resources: %s}\n")
    grid.write_text(base % "{zero_offload: optimizer}")
    config = load_config(grid)
    assert config.recipe_for(config.models[0], "full")["resources"]["zero_offload"] == "optimizer"
    for bad, says in (("{zero_offload: all}", "needs deepspeed_stage 3"),
                      ("{zero_ofload: optimizer}", "zero_ofload: Extra inputs are not permitted")):
        grid.write_text(base % bad)
        with pytest.raises(GridError, match=f"g.yaml.*models.0.resources.*{says}"):
            load_config(grid)
    # and the model's inference overrides, over the grid's inference stage
    grid.write_text((base % "{}").replace("resources: {}", "inference: {num_gpus: 4}") + "inference: {num_cpus: 3}\n")
    config = load_config(grid)
    assert (config.inference_for(config.models[0]).num_gpus, config.inference_for(config.models[0]).num_cpus) == (4, 3)
    grid.write_text((base % "{}").replace("resources: {}", "inference: {num_gpu: 4}"))
    with pytest.raises(GridError, match=r"g.yaml.*models.0.inference: num_gpu: Extra inputs are not permitted"):
        load_config(grid)


def test_strategy_and_fits():
    assert placement_strategy(8, 1, 8) == "STRICT_PACK"
    assert placement_strategy(16, 1, 8) == "PACK"
    assert placement_strategy(2, 0, 8) == "PACK"
    # what the dry run prints is what the trainers hand Ray Train
    assert Resources(num_workers=8, gpus_per_worker=1).scaling_config(node_gpus=8).placement_strategy == "STRICT_PACK"
    assert Resources(num_workers=2, cpus_per_worker=2).scaling_config(node_gpus=0).placement_strategy == "PACK"
    assert model_params("meta-llama/Meta-Llama-3-70B-Instruct") == 70e9
    assert model_params("FacebookAI/roberta-large") == 355e6
    assert model_params("gpt-4o") is None


def test_dry_run_prints_cells_placement_groups_and_gpu_hours(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # see test_paper_grid_loads_and_plans
    env.update(HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "grid/run.py", str(PAPER), "--results", str(tmp_path / "x"), "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "cells: 216 in all, 0 done, 216 to do" in text
    assert "placement groups: 60" in text
    assert "8 x {GPU: 1, CPU: 10} STRICT_PACK" in text
    m = re.search(r"GPU-hours \(A100\): fine-tune ([\d,.]+) in 60 placement groups \(largest 8 GPUs\), "
                  r"inference ([\d,.]+), total ([\d,.]+)", text)
    assert m, text[-2000:]
    fine, infer, total = (float(x.replace(",", "")) for x in m.groups())
    assert fine > 0 and infer > 0 and abs(fine + infer - total) < 0.2
    assert "6*N*T" in text  # the stated model


def test_estimate_skips_cells_of_other_kinds(paper):
    """Merge cells (grid.plan kind "merge", task "-") need no GPU and no placement group."""
    from grid.plan import Plan
    from grid.resources import resources_tables

    class FakeCell:
        kind, task, model, id = "merge", "-", "merged", "m1"

    est = estimate(Plan(cells=[FakeCell()]), paper)  # type: ignore[list-item]
    assert est.other_cells == {"merge": 1} and not est.placement_groups and not est.inference
    assert "not counted: 1 merge cells (CPU)" in resources_tables(est)[2]


def test_the_cluster_admits_no_one_else(cluster):
    """Token authentication on every node, the dashboard on the head's loopback, the token and the
    API keys from outside the file."""
    starts = {"head": "\n".join(cluster["head_start_ray_commands"]),
              "worker": "\n".join(cluster["worker_start_ray_commands"])}
    for role, text in starts.items():
        assert "RAY_AUTH_MODE=token" in text, role
    assert "--dashboard-host=127.0.0.1" in starts["head"] and "0.0.0.0" not in CLUSTER.read_text()
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "secretsmanager get-secret-value" in starts["head"]
    import re

    assert not re.search(r"(sk-[A-Za-z0-9]{8,}|(API_KEY|TOKEN)\s*[:=]\s*['\"]?[A-Za-z0-9]{12,})", CLUSTER.read_text())
