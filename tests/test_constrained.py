"""Constrained decoding with the tiny decoder: always valid, exact scores, free-greedy parity."""

from __future__ import annotations

import random

import pytest
import torch

from grid.config import GridConfig
from grid.data import data_dir_arg, label_sets, load_split
from grid.execute import prepare_cell
from grid.parsing import format_answer, parse_answer
from grid.plan import build_plan
from grid.prompting import gold_of
from grid.tasks import catalog, get_task, tag_set
from workers import constrained
from workers.constrained import answer_program, constrained_answers, prefill, render_answer

torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster here

# free text is not constrained
TASKS = sorted(n for n, t in catalog().items() if all(s.type != "text" for s in t.subtasks))


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models import resolve

    path = resolve("tiny:llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def cells_items(tokenizer, tasks, shots, n, budget=48, source="tiny:llama"):
    """(cell, prepared) of a small grid: the real prompts the engine would send."""
    data = data_dir_arg(None)
    cfg = GridConfig.model_validate({
        "name": "t", "models": [{"name": "m", "source": source, "family": "decoder"}],
        "tasks": list(tasks), "shots": list(shots), "decoding": {"mode": "constrained", "max_new_tokens": 8},
        "limits": {"test": n}, "text_budget": budget})
    return [prepare_cell(c, data, tokenizer) for c in build_plan(cfg, data).cells]


def invalid_count(prepared, answers):
    task = get_task(prepared.cell.task)
    labels = label_sets(task)
    return sum(not all(p.valid for p in parse_answer(a["raw_output"], task, labels, len(r["words"])).values())
               for a, r in zip(answers, prepared.rows))


@pytest.mark.parametrize("task_name", TASKS)
def test_program_spells_format_answer(task_name):
    """Choosing the gold option at every choice writes exactly format_answer(gold)."""
    task = get_task(task_name)
    labels = label_sets(task)
    for row in load_split(task, "test").select(range(5)).to_list():
        gold = gold_of(task, row)
        program = answer_program(task, labels, len(row["words"]))
        picks = []
        for sub in task.subtasks:
            tags = tag_set(labels[sub.name]) if sub.type == "word_tags" else labels[sub.name]
            values = gold[sub.name] if sub.type == "word_tags" else [gold[sub.name]]
            picks += [list(tags).index(v) for v in values]
        assert render_answer(program, picks) == format_answer(task, gold)


@pytest.mark.parametrize("strategy", ["score", "greedy"])
def test_zero_invalid_on_every_task(tiny, strategy):
    model, tok = tiny
    for prepared in cells_items(tok, TASKS, [0], 3):
        answers = constrained_answers(model, tok, prepared.items, strategy=strategy)
        assert invalid_count(prepared, answers) == 0, (prepared.cell.task, [a["raw_output"] for a in answers])
        assert all(a["n_prompt_tokens"] > 0 and a["n_output_tokens"] > 0 for a in answers)


def test_zero_invalid_five_shot_through_backend(tiny):
    """The transformers backend's constrained branch, five-shot prompts, length-normalized."""
    from workers.models import resolve
    from workers.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve("tiny:llama"))
    for prepared in cells_items(backend.tokenizer, ["massive-multi", "20ng-multi", "fomc-stance"], [5], 3):
        items = [{**it, "decoding": {**it["decoding"], "length_normalized": True}} for it in prepared.items]
        answers = backend.generate(items)
        assert invalid_count(prepared, answers) == 0


@torch.inference_mode()
def _loglik(model, prompt, cont):
    """log p(cont | prompt) with one plain forward pass, no cache."""
    ids = torch.tensor([prompt + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(cont)).detach())


def test_trie_scores_equal_plain_log_likelihood(tiny):
    """The one-pass token-trie scores are the log-likelihoods a plain forward pass gives."""
    model, tok = tiny
    prompts = [tok.encode(p, add_special_tokens=False) for p in
               ["Classify the text. Labels: a, b. Text: hello there Label:",
                "Classify the text. Labels: a, b. Text: other words Label:"]]
    labels = ["comp.graphics", "comp.os.ms-windows.misc", "comp.sys.mac.hardware", "sci.med", "comp"]
    cands = [tok.encode(" " + label, add_special_tokens=False) + [tok.eos_token_id] for label in labels]
    with torch.inference_mode():
        shared, alone = prefill(model, prompts, tok.pad_token_id), prefill(model, prompts[:1], tok.pad_token_id)
        assert torch.allclose(shared[0].logprobs, alone[0].logprobs, atol=1e-4)
        want = [_loglik(model, prompts[0], c) for c in cands]
        best, state, _ = constrained._score_choice(model, shared[0], cands, False)
        assert best == max(range(len(want)), key=want.__getitem__)
        # the state after the winner is the plain model's state after prompt + winner
        full = torch.log_softmax(model(input_ids=torch.tensor([prompts[0] + cands[best]])).logits[0, -1].float(), -1)
        assert torch.allclose(state.logprobs, full, atol=1e-4)
        assert state.length == len(prompts[0]) + len(cands[best])


def test_scores_match_per_candidate(tiny):
    """Every candidate's trie score against its plain log-likelihood (sum and mean)."""
    model, tok = tiny
    prompt = tok.encode("[INST]Which label? [/INST]", add_special_tokens=False)
    labels = ["alarm_set", "alarm_query", "alarm_remove", "weather_query", "qa_factoid"]
    cands = [tok.encode(" " + label, add_special_tokens=False) + [tok.eos_token_id] for label in labels]
    want = [_loglik(model, prompt, c) for c in cands]
    with torch.inference_mode():
        for normalized in (False, True):
            state = prefill(model, [prompt], tok.pad_token_id)[0]
            best, *_ = constrained._score_choice(model, state, cands, normalized)
            scores = [w / (len(c) if normalized else 1) for w, c in zip(want, cands)]
            assert best == max(range(len(scores)), key=scores.__getitem__)


def test_greedy_equals_free_greedy_where_free_is_valid(tmp_path):
    """Trie-greedy writes free greedy's answer whenever that answer is a valid label.

    A random tiny decoder (large init, so its answers vary with the input) writes nonsense, so
    the label set is made to contain its own free answers (real prompts): on those examples
    free decoding is valid, and constrained greedy must answer the same label on every one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workers.models import resolve
    from workers.transformers_backend import TransformersBackend

    config = AutoConfig.from_pretrained(resolve("tiny:llama"))
    config.initializer_range = 0.5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve("tiny:llama")).save_pretrained(tmp_path)
    backend = TransformersBackend(str(tmp_path))
    prepared = cells_items(backend.tokenizer, ["massive-intent"], [0], 12)[0]
    items = [{**it, "decoding": {**it["decoding"], "mode": "free", "max_new_tokens": 4}} for it in prepared.items]
    free = backend.generate(items)
    outs = {f["raw_output"].strip() for f in free if f["raw_output"].strip() and "\ufffd" not in f["raw_output"]}
    outs = {o for o in outs if not any(o != p and p.startswith(o) for p in outs)}  # none a prefix of another
    intents = [i for i in items[0]["labels"]["intent"] if not any(i.startswith(o) or o.startswith(i) for o in outs)]
    labels = {"intent": tuple(sorted(outs) + intents)}
    task = get_task("massive-intent")
    con = backend.generate([{**it, "labels": labels, "decoding": {**it["decoding"], "mode": "constrained",
                                                                  "strategy": "greedy"}} for it in items])
    valid = 0
    for f, c in zip(free, con):
        pf = parse_answer(f["raw_output"], task, labels, None)["intent"]
        if pf.valid and len(f["raw_output"]) - len(f["raw_output"].lstrip()) <= constrained.MAX_LEAD_SPACE:
            valid += 1
            assert parse_answer(c["raw_output"], task, labels, None)["intent"].value == pf.value
    assert valid >= 6 and len({f["raw_output"].strip() for f in free}) >= 3


@pytest.mark.slow
def test_trained_model_constrained_accuracy_equals_free_on_valid(tmp_path):
    """A tiny decoder trained for a few steps on 20ng-7 answers validly when free; constrained
    greedy then has the same accuracy on those examples, and is valid on all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grid.prompting import PromptBuilder
    from workers.models import resolve
    from workers.transformers_backend import TransformersBackend

    task = get_task("20ng-7")
    labels = label_sets(task)
    path = resolve("tiny:llama")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    train = load_split(task, "train").select(range(300)).to_list()
    builder = PromptBuilder(task, labels, train, 16)
    seqs = [(tok.encode(builder.build(r, 0, 0).as_text("chat", tok), add_special_tokens=False),
             tok.encode(" " + r["root"], add_special_tokens=False) + [tok.eos_token_id]) for r in train]
    torch.manual_seed(0)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        batch = rng.sample(seqs, 8)
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((8, width), tok.pad_token_id)
        target = torch.full((8, width), -100)
        for i, (p, a) in enumerate(batch):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            target[i, len(p):len(p) + len(a)] = torch.tensor(a)
        model(input_ids=ids, labels=target).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    backend = TransformersBackend(str(tmp_path))
    prepared = cells_items(backend.tokenizer, ["20ng-7"], [0], 24, budget=16, source=str(tmp_path))[0]
    free_items = [{**it, "decoding": {**it["decoding"], "mode": "free"}} for it in prepared.items]
    con_items = [{**it, "decoding": {**it["decoding"], "strategy": "greedy"}} for it in prepared.items]
    free = backend.generate(free_items)
    con = backend.generate(con_items)
    assert invalid_count(prepared, con) == 0
    gold = [r["root"] for r in prepared.rows]
    pf = [parse_answer(f["raw_output"], task, labels, None)["root"] for f in free]
    pc = [parse_answer(c["raw_output"], task, labels, None)["root"] for c in con]
    on_valid = [i for i, p in enumerate(pf) if p.valid]
    assert len(on_valid) >= len(free) // 2
    acc_free = sum(pf[i].value == gold[i] for i in on_valid)
    acc_con = sum(pc[i].value == gold[i] for i in on_valid)
    assert acc_free == acc_con
    assert all(pf[i].value == pc[i].value for i in on_valid)


def test_label_chunks_in_one_pass_equal_one_by_one(tiny):
    """The batched path of label tasks picks what scoring each example alone picks."""
    model, tok = tiny
    for prepared in cells_items(tok, ["massive-intent", "fpb-sentiment"], [0, 5], 5):
        for normalized in (False, True):
            items = [{**it, "decoding": {**it["decoding"], "length_normalized": normalized}} for it in prepared.items]
            together = constrained_answers(model, tok, items)
            with torch.inference_mode():
                for it, got in zip(items, together):
                    program = answer_program(get_task(it["task"]), it["labels"], None)
                    state = prefill(model, [tok.encode(it["prompt"], add_special_tokens=False)], tok.pad_token_id)[0]
                    ((picks, *_),) = constrained._score_answers(
                        model, lambda t: tok.encode(t, add_special_tokens=False),
                        [program], [state], [constrained.answer_lead(tok, it["prompt"])],
                        tok.eos_token_id, [normalized], [frozenset()])
                    assert got["raw_output"] == render_answer(program, picks)


def sliding_model(layers: str, vocab_size: int, window: int = 8):
    """A random decoder whose every layer (Mistral) or every other layer (Qwen2's layer_types,
    as Gemma and Qwen mix them) attends to a sliding window; large weights, so that what the
    window hides changes the scores."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    sizes = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                 "sliding_window": window, "initializer_range": 0.3}
    if layers == "mistral":
        config = MistralConfig(**sizes)
    else:
        config = Qwen2Config(use_sliding_window=True, layer_types=["sliding_attention", "full_attention"], **sizes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("layers", ["mistral", "mixed"])
def test_trie_scores_equal_plain_log_likelihood_with_sliding_windows(tiny, layers):
    """With prompts many windows long, batched and alone, every candidate's trie score is its
    plain log-likelihood, and the state after the winner is the plain model's."""
    _, tok = tiny
    model = sliding_model(layers, len(tok))
    prompts = [tok.encode(p, add_special_tokens=False) for p in
               ["Classify the text into one of the labels: alarm, weather, music. Text: wake me up at "
                "seven tomorrow and play some jazz. Label:",
                "Classify the text into one of the labels: alarm, weather, music. Text: rain? Label:"]]
    assert min(len(p) for p in prompts) > 2 * 8
    labels = ["alarm_set", "alarm_query", "weather_query", "music_likeness", "qa_factoid"]
    cands = [tok.encode(" " + label, add_special_tokens=False) + [tok.eos_token_id] for label in labels]
    want = [[_loglik(model, p, c) for c in cands] for p in prompts]
    with torch.inference_mode():
        cache, logprobs = constrained._prefill_batch(model, prompts, tok.pad_token_id)
        got, *_ = constrained._score_trie(model, cache, [len(p) for p in prompts], logprobs, cands,
                                          False, need_next=False)
        assert got == [pytest.approx(w, abs=1e-4) for w in want]
        for prompt, w in zip(prompts, want):
            best, state, _ = constrained._score_choice(model, prefill(model, [prompt], tok.pad_token_id)[0], cands,
                                                       False)
            assert best == max(range(len(w)), key=w.__getitem__)
            plain = model(input_ids=torch.tensor([prompt + cands[best]])).logits[0, -1].float()
            assert torch.allclose(state.logprobs, torch.log_softmax(plain, -1), atol=1e-4)


@pytest.mark.parametrize("strategy", ["score", "greedy"])
def test_zero_invalid_with_sliding_windows(tiny, strategy):
    """Five-shot prompts hundreds of tokens long on a sliding-window model: always valid."""
    _, tok = tiny
    model = sliding_model("mistral", len(tok), window=64)
    for prepared in cells_items(tok, ["massive-multi", "fpb-sentiment"], [5], 2):
        assert min(len(tok.encode(it["prompt"])) for it in prepared.items) > 2 * 64
        answers = constrained_answers(model, tok, prepared.items, strategy=strategy)
        assert invalid_count(prepared, answers) == 0, [a["raw_output"] for a in answers]


def test_kept_prefix_gives_the_scores_of_a_fresh_one(tiny):
    """The shared prefix kept from one chunk serves the next chunk of the cell: the same
    next-token log-probs as running that chunk with nothing kept."""
    model, tok = tiny
    (prepared,) = cells_items(tok, ["massive-intent"], [5], 6)
    prompts = [tok.encode(it["prompt"], add_special_tokens=False) for it in prepared.items]
    with torch.inference_mode():
        constrained._PREFIXES.clear()
        constrained._prefill_batch(model, prompts[:3], tok.pad_token_id)
        kept = constrained._PREFIXES[model][0]
        assert len(kept) >= constrained.MIN_SHARED_PREFIX
        _, reused = constrained._prefill_batch(model, prompts[3:], tok.pad_token_id)
        assert constrained._PREFIXES[model][0] == kept  # the second chunk did not run its own
        constrained._PREFIXES.clear()
        _, fresh = constrained._prefill_batch(model, prompts[3:], tok.pad_token_id)
    for a, b in zip(reused, fresh):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("layers", ["llama", "mistral", "mixed"])
def test_pruned_label_search_picks_the_full_argmax(tiny, layers):
    """Branch and bound over the label trie (decoding label_logprobs: false) picks what scoring
    every label picks, on random models with peaked (large weights) and flat (tiny llama) label
    distributions, with labels that are prefixes of others and sliding windows shorter than the
    prompts."""
    model, tok = tiny
    if layers != "llama":
        model = sliding_model(layers, len(tok))
    (prepared,) = cells_items(tok, ["massive-intent"], [5], 6)
    prompts = [tok.encode(it["prompt"], add_special_tokens=False) for it in prepared.items]
    labels = list(prepared.items[0]["labels"]["intent"]) + ["alarm", "alarm_q"]
    cands = [tok.encode(" " + label, add_special_tokens=False) + [tok.eos_token_id] for label in labels]
    with torch.inference_mode():
        full = constrained._label_scores(model, prompts, cands, tok.pad_token_id)
        pruned = constrained._best_labels(model, prompts, cands, tok.pad_token_id)
    assert pruned == [constrained._best(row) for row in full]


def test_without_label_logprobs_the_answers_are_the_same(tiny):
    """label_logprobs: false takes the pruned path: the same answers, no log-probs kept."""
    model, tok = tiny
    (prepared,) = cells_items(tok, ["massive-intent"], [0], 6)
    kept = constrained_answers(model, tok, prepared.items)
    items = [{**it, "decoding": {**it["decoding"], "label_logprobs": False}} for it in prepared.items]
    pruned = constrained_answers(model, tok, items)
    assert [a["raw_output"] for a in pruned] == [a["raw_output"] for a in kept]
    assert all("label_logprobs" not in a for a in pruned) and all(a["label_logprobs"] for a in kept)


def test_label_logprobs_false_refuses_what_needs_every_score():
    from pydantic import ValidationError

    from grid.config import Decoding

    assert "label_logprobs" not in Decoding(mode="constrained").model_dump()  # the default keeps old cell ids
    assert Decoding(mode="constrained", label_logprobs=False).model_dump()["label_logprobs"] is False
    for bad in ({"length_normalized": True}, {"calibration": "pmi"}):
        with pytest.raises(ValidationError, match=r"needs? every label's score"):
            Decoding(mode="constrained", label_logprobs=False, **bad)


@pytest.mark.parametrize("which", ["tiny", "mistral", "mixed"])
def test_searched_tags_equal_every_tag_scored(tiny, which):
    """Branch and bound over each word's tags, every example of a chunk in the same passes
    (`_search_choices`), picks what scoring every tag one example at a time picks, word after
    word, on slot-filling and multi-task prompts (zero- and five-shot), with the tiny model and
    with sliding-window models (their masks bite on the nodes kept in cache)."""
    model, tok = tiny
    if which != "tiny":
        model = sliding_model(which, len(tok))
    encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    words = 0
    for prepared in cells_items(tok, ["massive-slots", "massive-multi"], [0, 5], 4):
        task = get_task(prepared.cell.task)
        items = prepared.items
        programs = [answer_program(task, it["labels"], len(it["words"])) for it in items]
        leads = [constrained.answer_lead(tok, it["prompt"]) for it in items]
        labels = [frozenset(s.name for s in task.subtasks if s.type == "label")] * len(items)
        prompts = [encode(it["prompt"]) for it in items]
        got = []
        with torch.inference_mode():
            for search in (True, False):
                states = prefill(model, prompts, tok.pad_token_id)
                got.append(constrained._score_answers(model, encode, programs, states, leads, tok.eos_token_id,
                                                      [False] * len(items), labels, search=search))
        assert [g[:2] for g in got[0]] == [g[:2] for g in got[1]], prepared.cell.task
        words += sum(len(it["words"]) for it in items)
    assert words > 30
