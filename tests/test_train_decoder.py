"""Decoder fine-tuning as Ray Train jobs, on the tiny Llama and real MASSIVE intent rows.

Every `run` is a Ray Train fit (about 35-40 s of start-up on 2 cores), so the file keeps to six:
full (one worker), resume (one more fit on its folder), LoRA (two DDP workers), ZeRO-2 and ZeRO-3
(two workers each).
"""

from __future__ import annotations

import os

for _var, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "RAY_DEDUP_LOGS": "1"}.items():
    os.environ.setdefault(_var, _value)

import pytest  # noqa: E402 - after the environment above
import torch  # noqa: E402

ray = pytest.importorskip("ray")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from grid.data import label_sets, load_split  # noqa: E402
from grid.jobs import FinetuneJob, Resources  # noqa: E402
from grid.parsing import format_answer  # noqa: E402
from grid.prompting import PromptBuilder, gold_of  # noqa: E402
from grid.tasks import get_task  # noqa: E402
from workers.models import resolve  # noqa: E402
from workers.train_decoder import build_examples, collate, run, train_rows_of  # noqa: E402

TASK = "massive-intent"


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # another module's cluster: use it
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve("tiny:llama")


def job(tiny: str, out, mode: str = "full", **kw) -> FinetuneJob:
    hparams = {"lr": 1e-3, "batch_size": 4, "max_steps": 8, "checkpoint_every_steps": 4, "log_every_steps": 0}
    hparams.update(kw.pop("hparams", {}))
    kw = {"prompt_format": "inst", "train_limit": 48, **kw}
    kw = {"task": TASK, **kw}
    return FinetuneJob(model=tiny, family="decoder", mode=mode, output_dir=str(out), hparams=hparams, **kw)


def first_test_prompt(fmt: str = "inst", tokenizer=None) -> str:
    task = get_task(TASK)
    builder = PromptBuilder(task, label_sets(task), load_split(task, "train"))
    return builder.build(load_split(task, "test")[0], 0, 0).as_text(fmt, tokenizer)


def generate(model_dir, prompt: str) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def weights_changed(tiny: str, model_dir) -> bool:
    base = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    return any(not torch.equal(base[k], tuned[k]) for k in base)


def test_a_mixed_job_trains_on_each_task_under_its_own_prompt(tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    mixed = job(tiny, tmp_path, task="fpb-sentiment", mix_with=("fomc-stance",), train_limit=5)
    examples, dropped = build_examples(mixed, tokenizer)
    assert dropped == 0 and len(examples) == 10
    texts = [tokenizer.decode(e.input_ids) for e in examples]
    # fomc's label list names "hawkish"; fpb's does not
    assert not any("hawkish" in t for t in texts[:5]) and all("hawkish" in t for t in texts[5:])


@pytest.mark.parametrize("fmt", ["inst", "chat"])
def test_loss_mask_covers_the_answer_and_eos_only(tiny, tmp_path, fmt):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    the_job = job(tiny, tmp_path, prompt_format=fmt, train_limit=3)
    examples, dropped = build_examples(the_job, tokenizer)
    assert len(examples) == 3 and dropped == 0

    # The prompt part is the inference prompt's own tokens, untouched.
    task, train, indices = train_rows_of(the_job)
    row = train[indices[0]]
    prompt = PromptBuilder(task, label_sets(task), train).build(row, 0, 0).as_text(fmt, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=(fmt != "chat")).input_ids
    example = examples[0]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(example.labels[: len(prompt_ids)]) == {-100}

    # Exactly the answer and EOS carry labels.
    answer = format_answer(task, gold_of(task, row))
    unmasked = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    assert unmasked == example.labels[len(prompt_ids):] == example.input_ids[len(prompt_ids):]
    assert unmasked[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(unmasked) == f" {answer}{tokenizer.eos_token}"

    # The batch predicts those tokens, and only those: targets are the labels shifted by one.
    batch = collate(examples, tokenizer.pad_token_id)
    keep = batch["targets"][0] != -100
    assert batch["targets"][0][keep].tolist() == unmasked
    assert keep.nonzero().flatten().tolist() == list(range(len(prompt_ids) - 1, len(example.input_ids) - 1))


def test_the_shared_prefix_runs_once_and_changes_no_loss_or_gradient(tiny, tmp_path):
    """A batch's common prompt prefix runs once for all rows; loss and gradients are those of the
    whole rows, for answer tokens and for a head on the last token alike."""
    from workers.train_decoder import MIN_SHARED_PREFIX, DecoderWithHeads, shared_prefix

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    examples, _ = build_examples(job(tiny, tmp_path, train_limit=6), tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    p = int(batch["prefix"])
    first_label = min(e.labels.index(next(t for t in e.labels if t != -100)) for e in examples)
    assert MIN_SHARED_PREFIX <= p < first_label  # shared, and no answer token is predicted inside it
    assert all(e.input_ids[:p] == examples[0].input_ids[:p] for e in examples)
    assert len({e.input_ids[p] for e in examples}) > 1  # the longest common prefix, not less
    assert shared_prefix(examples[:1]) == 0

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = DecoderWithHeads(lm, (TASK,), {TASK: ["a", "b", "c"]}, {})
    batch["class_id"] = torch.tensor([i % 3 for i in range(len(examples))])

    def loss_and_grads(b):
        model.zero_grad()
        loss, _ = model(b)
        loss.backward()
        return loss.detach(), [q.grad.clone() for q in model.parameters()]

    shared, whole = loss_and_grads(batch), loss_and_grads(batch | {"prefix": torch.tensor(0)})
    torch.testing.assert_close(shared[0], whole[0])
    for a, b in zip(shared[1], whole[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_full_finetune_learns_saves_and_resumes(local_ray, tiny, tmp_path):
    metrics = run(job(tiny, tmp_path))
    assert metrics["steps"] == 8 and metrics["resumed_from_step"] == 0
    assert metrics["train_loss"] < metrics["first_loss"]
    assert metrics["padding_share"] <= 0.05 and metrics["nonpad_tokens_per_s"] > 0
    assert weights_changed(tiny, tmp_path / "model")
    assert isinstance(generate(tmp_path / "model", first_test_prompt()), str)

    # A second run on the same folder with twice the steps picks up where the first stopped.
    again = run(job(tiny, tmp_path, hparams={"max_steps": 16}))
    assert again["resumed_from_step"] == 8
    assert again["steps"] == 16 and again["steps_run"] == 8
    assert again["train_loss"] < metrics["first_loss"]


def test_lora_with_two_ddp_workers_saves_merged_model_and_adapter(local_ray, tiny, tmp_path):
    from peft import PeftModel

    two_workers = Resources(num_workers=2, cpus_per_worker=1)  # plain DDP, no DeepSpeed
    metrics = run(job(tiny, tmp_path, mode="lora", resources=two_workers, hparams={"lr": 3e-3}))
    assert metrics["world_size"] == 2
    assert metrics["train_loss"] < metrics["first_loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert weights_changed(tiny, tmp_path / "model")

    # The merged model and base + adapter are the same function.
    prompt = first_test_prompt()
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tok(prompt, return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
    assert isinstance(generate(tmp_path / "model", prompt), str)


@pytest.mark.slow
@pytest.mark.parametrize("stage,mode,offload", [(2, "full", "none"), (3, "lora", "none"), (3, "full", "optimizer")])
def test_deepspeed_zero_two_workers(local_ray, tiny, tmp_path, stage, mode, offload):
    """ZeRO-2 and -3 with 2 CPU workers, and ZeRO-3 with the optimizer offloaded (DeepSpeed's CPU
    Adam), as the 70B models of grids/paper.yaml train."""
    resources = Resources(num_workers=2, cpus_per_worker=1, deepspeed_stage=stage, zero_offload=offload)
    metrics = run(job(tiny, tmp_path, mode=mode, resources=resources, hparams={"max_steps": 6, "lr": 3e-3}))
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert metrics["optimizer_offloaded"] == (offload != "none")
    assert metrics["train_loss"] < metrics["first_loss"]
    # ZeRO checkpoints hold every rank's partition, merged into one folder.
    newest = sorted((tmp_path / "checkpoints").glob("step_*"))[-1]
    assert len(list(newest.glob("ds/*optim_states.pt"))) == 2
    # ZeRO-3's partitioned weights were gathered into a whole model that loads and predicts.
    assert weights_changed(tiny, tmp_path / "model")
    assert isinstance(generate(tmp_path / "model", first_test_prompt()), str)
