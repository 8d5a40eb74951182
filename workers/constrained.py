"""Constrained decoding for local decoders: answers that are always in the task's label sets.

An answer is a *program* of segments, fixed text and choices, that spells the canonical answer
of `grid.parsing.format_answer`:
- a `label` task:      Choice(labels)
- a `word_tags` task:  `["` Choice(tags) `", "` Choice(tags) ... `"]`   (one choice per word)
- a multi-task:        `{"task1": "` Choice(...) `", "task2": ` ... `}`
so `parse_answer` reads every answer as valid (0% invalid).

Two strategies (`decoding["strategy"]`, default "score"):

- **score** (the default): each choice is made by scoring every candidate as a continuation of
  the prompt and of the choices made so far: the sum of its tokens' log-probs, or their mean
  when `decoding["length_normalized"]`. A candidate is scored together with what must follow it
  (the closing `"` and the JSON up to the next choice, or EOS after the last choice), so a label
  that is a prefix of another (`alarm` / `alarm_set`) does not win for being short. This is
  lm-evaluation-harness' `multiple_choice`, made cheap: the prompt is run once per example, its
  key/value cache reused by every candidate of a choice, and the candidates scored together in
  one forward pass as a token trie (tree attention: shared first tokens run once, leaves not
  run at all); the prefix that all prompts of a cell share (instruction and label list) is
  run once per cell and kept for its next chunks. A chunk of a label task takes two forward
  passes in all: its prompts, then the tries of all its examples as one batch. Every label is
  scored, not only those that could win, because the answers keep them (below): with a few
  labels that costs nothing measurable, with MASSIVE's 60 intents the trie outweighs the
  prompts' own tokens once their shared prefix is cached (SmolLM2 on one CPU thread, chunks of
  8: 2.7x zero-shot, 1.6x five-shot the time of scoring only the labels whose first token could
  still win, as this module did before). (lm-eval scores labels without EOS; the benchmark
  scores both sides with it.)
- **greedy**: the model's greedy path restricted, at every step, to tokens that keep the text a
  prefix of a valid answer (a character trie walked token by token, so any tokenization of a
  label is allowed, not just the canonical one). Whenever free greedy decoding writes a valid
  answer in canonical form (up to whitespace around it), this strategy writes the same answer:
  the allowed token set contains the free argmax at every step. Use it to compare with free
  decoding example by example.

Both are deterministic (temperature is ignored). Before the answer a chat template usually
puts something (Llama-2's ` `, Llama-3's nothing): "score" prepends the template's assistant
prefix when the prompt is in the tokenizer's chat format, else a space when the prompt ends in
a non-space (`Label:`), else nothing; "greedy" lets the model write up to two whitespace
characters first.

**Calibration** (`decoding["calibration"]`; strategy score, single-label tasks): small
instruction-tuned models answer one favourite label for almost every input, so the label scores
(as above, EOS included, per token when length-normalized) are corrected for that prior before
the argmax (`calibrate`); the answer is still the chosen label. `contextual` (Zhao et al. 2021):
the labels' probabilities (softmax of their scores) divided by their mean probabilities on the
same prompt, same examples, with a content-free input (`N/A`, `[MASK]`, empty) in place of the
text. `pmi` (Holtzman et al. 2021): each score minus the label's log-prob after the answer cue
alone (`Label:`, in the same prompt format). The requests carry those prompts
(`calibration_prompts`, grid.execute); each distinct one runs once per chunk (a zero-shot
cell's are the same for every example), in two more forward passes per chunk-sized batch.

**Label log-probs.** Strategy score answers carry `label_logprobs`, {sub-task: {label: log-prob}}
for each label sub-task it chose: the log-softmax over the labels of the scores the answer is
the argmax of. Those are the labels' log-likelihoods (EOS included; per token when
length-normalized), or their calibrated values when calibration is on (contextual: log q(y|x);
pmi: log P(y|x) - log P(y|premise), normalized over the labels), so the argmax of the log-probs
is the answer. In a multi-task answer a label choice's log-probs are conditional on the choices
made before it. An untuned model may give every example the same answer; these show how much
it prefers the gold label all the same (grid.metrics.label_scores). Greedy answers have none.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from grid.tasks import TaskDef, get_task, tag_set

STRATEGIES = ("score", "greedy")
MAX_LEAD_SPACE = 2  # whitespace characters greedy may write before / after the answer
MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix of a chunk's prompts is not run apart


# --- the answer as a program ----------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    text: str


@dataclass(frozen=True)
class Choice:
    name: str
    options: tuple[str, ...]  # the exact text of each option (JSON-escaped inside JSON)
    values: tuple[str, ...]  # the label each option stands for


Program = tuple  # of Fixed | Choice


def _choice(name: str, labels: Sequence[str], in_json: bool) -> Choice:
    labels = tuple(labels)
    options = tuple(json.dumps(label, ensure_ascii=False)[1:-1] for label in labels) if in_json else labels
    return Choice(name, options, labels)



def _tags_program(name: str, tags: tuple[str, ...], n_words: int) -> list:
    if n_words == 0:
        return [Fixed("[]")]
    out: list = [Fixed('["')]
    for i in range(n_words):
        if i:
            out.append(Fixed('", "'))
        out.append(_choice(name, tags, in_json=True))
    return out + [Fixed('"]')]


def answer_program(task: TaskDef, labels: dict[str, Sequence[str]], n_words: int | None) -> Program:
    """The segments that spell `format_answer` of any answer of this task."""
    if any(s.type == "text" for s in task.subtasks):
        raise ValueError(f"task {task.name}: free-text sub-tasks cannot be constrained")
    if any(s.type == "word_tags" for s in task.subtasks) and n_words is None:
        raise ValueError(f"task {task.name}: word tags need the words of the input")
    segs: list = []
    if not task.is_multi:
        sub = task.subtasks[0]
        if sub.type == "label":
            segs = [_choice(sub.name, labels[sub.name], in_json=False)]
        else:
            segs = _tags_program(sub.name, tag_set(labels[sub.name]), n_words)
    else:
        segs.append(Fixed("{"))
        for i, sub in enumerate(task.subtasks, 1):
            segs.append(Fixed(("" if i == 1 else ", ") + f'"task{i}": '))
            if sub.type == "label":
                segs += [Fixed('"'), _choice(sub.name, labels[sub.name], in_json=True), Fixed('"')]
            else:
                segs += _tags_program(sub.name, tag_set(labels[sub.name]), n_words)
        segs.append(Fixed("}"))
    merged: list = []  # adjacent fixed texts as one segment
    for s in segs:
        if isinstance(s, Fixed) and merged and isinstance(merged[-1], Fixed):
            merged[-1] = Fixed(merged[-1].text + s.text)
        elif not (isinstance(s, Fixed) and not s.text):
            merged.append(s)
    return tuple(merged)


def render_answer(program: Program, picks: Sequence[int]) -> str:
    """The answer text of a program with choice i answered by option picks[i]."""
    it = iter(picks)
    return "".join(s.text if isinstance(s, Fixed) else s.options[next(it)] for s in program)


# --- key/value caches -----------------------------------------------------------------------


@dataclass
class _State:
    """Where an answer stands: the cache of everything so far and the next-token log-probs."""

    cache: DynamicCache
    length: int
    logprobs: torch.Tensor  # (vocab,)


def _full_cache(kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A cache that keeps every position, sliding-window layers included (the model's own cache
    drops what slid out of the window). Row slicing and the tries' masks index positions from
    0, and a trie's nodes sit at their own depths; their masks apply the window (_masks)."""
    return DynamicCache(ddp_cache_data=kv)


def _map_cache(cache: DynamicCache, fn) -> DynamicCache:
    """A new cache with `fn` applied to every layer's keys and values."""
    return _full_cache([(fn(layer.keys), fn(layer.values)) for layer in cache.layers])


def _masks(model: Any, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The additive 4-D attention mask(s) for a (batch, query, key) boolean `visible`, with the
    model's sliding window applied: a query at position p sees keys at positions > p - window,
    as transformers' own masks do. A custom 4-D mask replaces the model's for every layer, so
    models that mix full and sliding layers (`layer_types`) get one mask per layer type."""
    config = model.config.get_text_config(decoder=True)
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or [])

    def additive(ok: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype)
        return torch.where(ok, zero, torch.finfo(dtype).min)[:, None].to(model.device)

    if window is None or (layer_types and "sliding_attention" not in layer_types):
        return additive(visible)
    windowed = visible & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    if not layer_types:  # Mistral: every layer slides
        return additive(windowed)
    return {kind: additive(windowed if kind == "sliding_attention" else visible) for kind in layer_types}


# The shared prefix (instruction, label list) of the chunks last run, per model: the chunks of a
# cell come one after another to the same actor, so each cell runs its prefix once, not per chunk.
_PREFIXES: weakref.WeakKeyDictionary[Any, tuple[list[int], DynamicCache]] = weakref.WeakKeyDictionary()


def _shared_prefix(model: Any, prompts: list[list[int]]) -> tuple[int, DynamicCache | None]:
    """The length and cache of a prefix every prompt shares and extends (0, None when shorter
    than MIN_SHARED_PREFIX): the last one run on this model when it still fits, else the chunk's
    longest common prefix, run now and kept for the next chunk."""
    kept = _PREFIXES.get(model)
    if kept and all(len(p) > len(kept[0]) and p[:len(kept[0])] == kept[0] for p in prompts):
        return len(kept[0]), kept[1]
    shared = 0
    if len(prompts) > 1:
        first, shortest = prompts[0], min(len(p) for p in prompts)
        while shared < shortest - 1 and all(p[shared] == first[shared] for p in prompts):
            shared += 1
    if shared < MIN_SHARED_PREFIX:
        return 0, None
    cache = model(input_ids=torch.tensor([prompts[0][:shared]], device=model.device),
                  past_key_values=_full_cache(), use_cache=True, logits_to_keep=1).past_key_values
    _PREFIXES[model] = (prompts[0][:shared], cache)
    return shared, cache


def _prefill_batch(model: Any, prompts: list[list[int]], pad: int):
    """Run every prompt once; the prefix they share (instruction, label list) only once per cell.

    The rest of each prompt runs right-padded in one batch: a real token never sees the padding
    after it (causal attention), so no mask is needed. Returns the batch's cache (row i valid up
    to len(prompts[i])) and each prompt's next-token log-probs.
    """
    shared, prefix = _shared_prefix(model, prompts)
    # expand() views the kept cache; the forward below concatenates into new tensors, so the kept
    # prefix is never written to.
    cache = _map_cache(prefix, lambda t: t.expand(len(prompts), -1, -1, -1)) if prefix else _full_cache()
    rest = [p[shared:] for p in prompts]
    width = max(len(r) for r in rest)
    ends = sorted({len(r) - 1 for r in rest})  # only these positions' logits are needed
    out = model(input_ids=torch.tensor([r + [pad] * (width - len(r)) for r in rest], device=model.device),
                past_key_values=cache, use_cache=True,
                logits_to_keep=torch.tensor(ends, device=model.device))
    logits = out.logits.float()
    return out.past_key_values, [torch.log_softmax(logits[i, ends.index(len(r) - 1)], -1)
                                 for i, r in enumerate(rest)]


def prefill(model: Any, prompts: list[list[int]], pad: int) -> list[_State]:
    """Each prompt's state after running it (see _prefill_batch)."""
    cache, logprobs = _prefill_batch(model, prompts, pad)
    return [_State(_map_cache(cache, lambda t, i=i, n=len(p): t[i:i + 1, :, :n]), len(p), lp)  # noqa: B008 - binds n
            for i, (p, lp) in enumerate(zip(prompts, logprobs))]


def _extend(model: Any, state: _State, ids: list[int]) -> _State:
    """The state after forcing `ids` (the state's cache grows in place)."""
    out = model(input_ids=torch.tensor([ids], device=model.device), past_key_values=state.cache,
                use_cache=True, logits_to_keep=1)
    return _State(out.past_key_values, state.length + len(ids), torch.log_softmax(out.logits[0, -1].float(), -1))


# --- strategy "score": all candidates of a choice as one token trie, in one forward pass -----


def _token_trie(candidates: list[list[int]]):
    """Candidates as a token trie: node tokens, parents (-1: a root child), depths, each
    candidate's path of nodes, and each node's line (its ancestors and itself)."""
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    paths: list[list[int]] = []
    for cand in candidates:
        node, path = -1, []
        for tok in cand:
            if (node, tok) not in index:
                index[(node, tok)] = len(tokens)
                tokens.append(tok)
                parent.append(node)
                depth.append(len(path))
            node = index[(node, tok)]
            path.append(node)
        paths.append(path)
    lines: list[list[int]] = []  # a parent precedes its children
    for i in range(len(tokens)):
        lines.append((lines[parent[i]] if parent[i] >= 0 else []) + [i])
    return tokens, parent, depth, paths, lines


def _score_trie(model: Any, cache: DynamicCache, lengths: list[int], first_logprobs: list[torch.Tensor],
                candidates: list[list[int]], length_normalized: bool, need_next: bool):
    """Score the candidates after each row of a (right-padded) batch cache in one forward pass.

    The candidates become a token trie (shared first tokens once); its nodes run after each
    row's cached prompt, each attending to that prompt (its first `lengths[b]` positions) and to
    its own ancestors (a 4-D mask), at the position its depth gives, so every node's logits are
    those the candidate would get alone. Only nodes with children run (a leaf's score is in
    its parent's logits), and leaves too when `need_next`. Returns (every candidate's score per
    row, model output, trie paths, node -> position among the nodes run, their log-probs).
    """
    tokens, parent, depth, paths, lines = _token_trie(candidates)
    batch, past = len(lengths), cache.get_seq_length()
    # Run only the nodes whose logits are needed: those with children (a leaf's score is read
    # from its parent's logits), and the leaves too when the state after the winner is wanted.
    has_child = set(parent)
    fed = [i for i in range(len(tokens)) if need_next or i in has_child]
    slot = {node: k for k, node in enumerate(fed)}
    out = logp = None
    if fed:
        visible = torch.zeros((batch, len(fed), past + len(fed)), dtype=torch.bool)
        for b, length in enumerate(lengths):
            visible[b, :, :length] = True
        visible[:, [k for k, i in enumerate(fed) for _ in lines[i]],
                [past + slot[j] for i in fed for j in lines[i]]] = True  # a node sees its line
        q_pos = torch.tensor([[length + depth[i] for i in fed] for length in lengths])
        k_pos = torch.cat([torch.arange(past).expand(batch, past), q_pos], 1)
        out = model(input_ids=torch.tensor([[tokens[i] for i in fed]] * batch, device=model.device),
                    past_key_values=cache, attention_mask=_masks(model, visible, q_pos, k_pos),
                    use_cache=True, position_ids=q_pos.to(model.device))
        logp = torch.log_softmax(out.logits.float(), -1)  # (batch row, fed node, vocab)
    ids = torch.tensor(tokens, device=first_logprobs[0].device)
    is_root = torch.tensor(parent, device=ids.device) < 0
    parent_slots = torch.tensor([slot.get(p, 0) for p in parent], device=ids.device)
    scores = []
    for b in range(batch):
        node_logp = (first_logprobs[b][ids] if logp is None else
                     torch.where(is_root, first_logprobs[b][ids], logp[b, parent_slots, ids])).tolist()
        scores.append([sum(node_logp[j] for j in path) / (len(path) if length_normalized else 1) for path in paths])
    return scores, out, paths, slot, logp


def _best(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores


def _score_choice(model: Any, state: _State, candidates: list[list[int]],
                  length_normalized: bool, need_next: bool = True) -> tuple[int, _State, list[float]]:
    """The best candidate (token lists continuing `state`), the state after it (if
    `need_next`) and every candidate's score. The state's cache is used up."""
    (scores,), out, paths, slot, logp = _score_trie(model, state.cache, [state.length], [state.logprobs],
                                                    candidates, length_normalized, need_next)
    best, past = _best(scores), state.length
    if not need_next:
        return best, _State(state.cache, past, state.logprobs), scores  # the answer is complete
    keep = torch.tensor(list(range(past)) + [past + j for j in paths[best]], device=model.device)
    cache = _map_cache(out.past_key_values, lambda t: t.index_select(2, keep))
    return best, _State(cache, past + len(paths[best]), logp[0, slot[paths[best][-1]]]), scores


def _search_choice(model: Any, state: _State, candidates: list[list[int]],
                   need_next: bool = True) -> tuple[int, _State]:
    """The candidate `_score_choice` picks by summed log-probs (the first of equal scores) and the
    state after it, found without scoring every candidate: branch and bound on the token trie.

    A candidate's score is at most the summed log-prob of any prefix of it (each further token
    adds a log-prob <= 0). So the likeliest path is followed down to a complete candidate first
    (one node a pass), giving a score to beat; then, a trie level a pass, only the nodes whose
    prefix still reaches that score run; every other candidate is bounded below it and cannot
    win. A node runs with the prompt and its ancestors in view, at its depth's position (the
    cache keeps every node run, each seeing only its own line), so its logits are those the
    full trie pass gives. For the choices whose scores are not kept (a word's slot tag): a
    tag's own tokens and the `", "` after it, over ~100 tags, are most of a full trie's nodes,
    and a model sure of a word's tag leaves a few of them to run. The state's cache is used up.
    """
    tokens, parent, depth, paths, lines = _token_trie(candidates)
    children: dict[int, list[int]] = {}
    for node, up in enumerate(parent):
        children.setdefault(up, []).append(node)
    ends: dict[int, list[int]] = {}
    for c, path in enumerate(paths):
        ends.setdefault(path[-1], []).append(c)
    past = state.length
    cum: dict[int, float] = {}  # node -> summed log-prob of its prefix (known once its parent ran)
    slot: dict[int, int] = {}  # node -> its place in the cache after the prompt
    best, best_c = -math.inf, len(candidates)
    cache = state.cache
    after: dict[int, torch.Tensor] = {}  # node run -> the next-token log-probs after it

    def known(node: int, logp: float) -> None:
        nonlocal best, best_c
        cum[node] = (cum[parent[node]] if parent[node] >= 0 else 0.0) + logp
        for c in ends.get(node, ()):
            if cum[node] > best or (cum[node] == best and c < best_c):
                best, best_c = cum[node], c

    def run(nodes: list[int]) -> torch.Tensor:
        """Feed `nodes` (their ancestors already fed) in one pass; their next-token log-probs."""
        nonlocal cache
        fed = len(slot)
        visible = torch.zeros((1, len(nodes), past + fed + len(nodes)), dtype=torch.bool)
        visible[0, :, :past] = True
        for k, node in enumerate(nodes):
            slot[node] = fed + k
            visible[0, k, [past + slot[j] for j in lines[node]]] = True
        order = sorted(slot, key=slot.get)
        q_pos = torch.tensor([[past + depth[n] for n in nodes]])
        k_pos = torch.cat([torch.arange(past), torch.tensor([past + depth[n] for n in order], dtype=torch.long)])[None]
        out = model(input_ids=torch.tensor([[tokens[n] for n in nodes]], device=model.device),
                    past_key_values=cache, attention_mask=_masks(model, visible, q_pos, k_pos),
                    use_cache=True, position_ids=q_pos.to(model.device))
        cache = out.past_key_values
        return torch.log_softmax(out.logits[0].float(), -1)

    def expand(nodes: list[int]) -> list[int]:
        """Run `nodes`; their children, now with known prefix scores."""
        logp = run(nodes)
        grown = []
        for k, node in enumerate(nodes):
            after[node] = logp[k]
            kids = children.get(node, [])
            values = logp[k, torch.tensor([tokens[j] for j in kids], dtype=torch.long)].tolist() if kids else []
            for kid, value in zip(kids, values):
                known(kid, value)
                grown.append(kid)
        return grown

    roots = children[-1]
    for node, value in zip(roots, state.logprobs[torch.tensor([tokens[j] for j in roots])].tolist()):
        known(node, value)
    node = max(roots, key=lambda n: cum[n])  # the likeliest path first: a score to beat
    while children.get(node) and node not in ends:
        node = max(expand([node]), key=lambda n: cum[n])
    frontier = [n for n in cum if n not in slot and children.get(n)]
    while frontier := [n for n in frontier if cum[n] >= best]:
        frontier = [kid for kid in expand(frontier) if children.get(kid)]
    if not need_next:
        return best_c, _State(cache, past, state.logprobs)
    path = paths[best_c]
    if path[-1] not in after:  # the winner's last token has not run (it ends no longer candidate)
        expand([path[-1]])
    keep = torch.tensor(list(range(past)) + [past + slot[j] for j in path], device=model.device)
    return best_c, _State(_map_cache(cache, lambda t: t.index_select(2, keep)), past + len(path), after[path[-1]])


def _score_answer(model: Any, encode, program: Program, state: _State, lead: str, eos: int,
                  length_normalized: bool, label_choices: frozenset[str] = frozenset(), search: bool = True
                  ) -> tuple[list[int], int, dict[str, dict[str, float]]]:
    """Choose every choice of the program in turn. Returns the picks, the answer's token count
    and, for each choice named in `label_choices` (the label sub-tasks), its labels' log-probs.

    Fixed scaffolding (`{"task1": "`) is forced as text; each candidate is scored with the fixed
    text that follows it, and EOS after the last choice; a whitespace-only lead joins the labels.
    A choice whose scores are not kept (not a label sub-task) and are plain sums is found by
    branch and bound (`_search_choice`: the same pick) unless `search` is off (every candidate
    scored, as the tests compare).
    """
    label_logprobs: dict[str, dict[str, float]] = {}
    picks: list[int] = []
    n_tokens = 0
    pending = lead  # fixed text not yet fed
    i = 0
    while i < len(program):
        seg = program[i]
        if isinstance(seg, Fixed):
            pending += seg.text
            i += 1
            continue
        if pending and not pending.isspace():
            ids = encode(pending)
            state = _extend(model, state, ids)
            n_tokens += len(ids)
            pending = ""
        after = program[i + 1].text if i + 1 < len(program) and isinstance(program[i + 1], Fixed) else ""
        last = i + (2 if after else 1) >= len(program)
        candidates = [encode(pending + opt + after) + ([eos] if last else []) for opt in seg.options]
        if search and seg.name not in label_choices and not length_normalized:
            index, state = _search_choice(model, state, candidates, need_next=not last)
        else:
            index, state, scores = _score_choice(model, state, candidates, length_normalized, need_next=not last)
            if seg.name in label_choices:
                label_logprobs[seg.name] = dict(zip(seg.values, _log_softmax(scores)))
        picks.append(index)
        n_tokens += len(candidates[index])
        pending = ""
        i += 2 if after else 1
    if pending.strip():  # a program without choices (word tags of an empty input): nothing to ask
        n_tokens += len(encode(pending))
    return picks, n_tokens, label_logprobs


# --- strategy "greedy": a character automaton walked token by token -------------------------


class _Vocab:
    """The text of every token as it reads inside a longer text; special tokens left out.

    Also holds the memo of allowed tokens per automaton state, which only holds for this vocab.
    """

    def __init__(self, tokenizer: Any):
        anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
        head = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
        texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))],
                                       clean_up_tokenization_spaces=False)
        special = set(tokenizer.all_special_ids)
        self.text: dict[int, str] = {}
        self.by_first: dict[str, list[tuple[int, str]]] = {}
        for i, t in enumerate(texts):
            if i in special or not t.startswith(head):
                continue
            t = t[len(head):]
            if t and "\ufffd" not in t:  # partial UTF-8 bytes are left out
                self.text[i] = t
                self.by_first.setdefault(t[0], []).append((i, t))
        self.allowed: dict[tuple, tuple[dict[int, tuple], bool]] = {}


_VOCABS: dict[int, _Vocab] = {}


def _vocab(tokenizer: Any) -> _Vocab:
    key = id(tokenizer)
    if key not in _VOCABS:
        _VOCABS[key] = _Vocab(tokenizer)
    return _VOCABS[key]


class _Trie:
    """A character trie of a choice's options: node 0 is the root."""

    def __init__(self, options: Sequence[str]):
        self.children: list[dict[str, int]] = [{}]
        self.ends: list[bool] = [False]  # an option ends at this node
        for opt in options:
            node = 0
            for ch in opt:
                if ch not in self.children[node]:
                    self.children.append({})
                    self.ends.append(False)
                    self.children[node][ch] = len(self.children) - 1
                node = self.children[node][ch]
            self.ends[node] = True


_TRIES: dict[tuple[str, ...], _Trie] = {}
_TAILS: dict[tuple, int] = {}  # (segment, id of the rest) -> id: equal program tails share memos


class _Automaton:
    """The valid answers of a program as a character automaton.

    States: ("lead", k) before the answer, k whitespace characters written; (i, pos) inside
    segment i (pos: the character offset in a Fixed, the trie node in a Choice); ("tail", k)
    after the complete answer. Inside JSON an option never holds a bare `"`, so leaving an
    option for the text after it is never ambiguous.
    """

    def __init__(self, program: Program):
        self.program = program
        self.tries = [_TRIES.setdefault(s.options, _Trie(s.options)) if isinstance(s, Choice) else None
                      for s in program]
        self.tail_id = [0] * (len(program) + 1)
        for i in range(len(program) - 1, -1, -1):
            self.tail_id[i] = _TAILS.setdefault((program[i], self.tail_id[i + 1]), len(_TAILS) + 1)

    def _start(self, i: int) -> tuple:
        return ("tail", 0) if i == len(self.program) else (i, 0)

    def step(self, state: tuple, ch: str) -> tuple | None:
        kind, pos = state
        if kind == "lead":
            if ch.isspace() and pos < MAX_LEAD_SPACE:
                return ("lead", pos + 1)
            return self.step(self._start(0), ch)
        if kind == "tail":
            return ("tail", pos + 1) if ch.isspace() and pos < MAX_LEAD_SPACE else None
        trie = self.tries[kind]
        if trie is None:
            text = self.program[kind].text
            if text[pos] != ch:
                return None
            return (kind, pos + 1) if pos + 1 < len(text) else self._start(kind + 1)
        child = trie.children[pos].get(ch)
        if child is not None:
            return (kind, child)
        if trie.ends[pos]:  # an option ends here: go on into what follows it
            return self.step(self._start(kind + 1), ch)
        return None

    def complete(self, state: tuple) -> bool:
        """Whether EOS may come now."""
        kind, pos = state
        if kind == "tail":
            return True
        if kind == "lead" or self.tries[kind] is None:
            return False
        return self.tries[kind].ends[pos] and kind + 1 == len(self.program)

    def allowed(self, state: tuple, vocab: _Vocab) -> tuple[dict[int, tuple], bool]:
        """Token id -> the state after it, for every token that keeps the answer valid; EOS allowed.

        Memoized per vocab with segment numbers relative to the state's segment, keyed by the id
        of the program's tail from there: word 3 of 7 and word 5 of 9 share their entries.
        """
        kind, pos = state
        base = None if kind == "tail" else 0 if kind == "lead" else kind
        key = ("tail", pos) if base is None else (self.tail_id[base], kind == "lead", pos)
        if key not in vocab.allowed:
            out: dict[int, tuple] = {}
            for first, tokens in vocab.by_first.items():
                if self.step(state, first) is None:
                    continue
                for tid, text in tokens:
                    s: tuple | None = state
                    for ch in text:
                        s = self.step(s, ch)
                        if s is None:
                            break
                    if s is not None:
                        out[tid] = s if s[0] in ("lead", "tail") else (s[0] - base, s[1])
            vocab.allowed[key] = (out, self.complete(state))
        out, eos_ok = vocab.allowed[key]
        if base:
            out = {t: s if s[0] in ("lead", "tail") else (s[0] + base, s[1]) for t, s in out.items()}
        return out, eos_ok


def _greedy_answer(model: Any, vocab: _Vocab, program: Program, state: _State,
                   eos: int) -> tuple[str, int]:
    """The model's argmax among valid tokens until EOS. Returns the text and the token count."""
    auto = _Automaton(program)
    at: tuple = ("lead", 0)
    text, n_tokens = "", 0
    while True:
        allowed, eos_ok = auto.allowed(at, vocab)
        if eos_ok and not allowed:
            break
        ids = list(allowed) + ([eos] if eos_ok else [])
        if not ids:  # cannot happen with a byte-level or byte-fallback vocab
            raise RuntimeError(f"no token continues the constrained answer {text!r}")
        scores = state.logprobs[torch.tensor(ids, device=state.logprobs.device)]
        tid = ids[int(torch.argmax(scores))]
        n_tokens += 1
        if tid == eos and eos_ok:
            break
        at = allowed[tid]
        text += vocab.text[tid]
        state = _extend(model, state, [tid])
    return text, n_tokens


# --- the entry point ------------------------------------------------------------------------

_CHAT_LEADS: dict[int, tuple[str, str] | None] = {}


def _chat_lead(tokenizer: Any) -> tuple[str, str] | None:
    """(end of the generation prompt, assistant prefix) of the tokenizer's chat template, if any."""
    key = id(tokenizer)
    if key not in _CHAT_LEADS:
        _CHAT_LEADS[key] = None
        if getattr(tokenizer, "chat_template", None):
            try:
                probe = [{"role": "user", "content": "\x00"}]
                gen = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": "\x01"}],
                                                     tokenize=False)
                tail = gen[gen.index("\x00") + 1:]
                if tail and full.startswith(gen) and "\x01" in full[len(gen):]:
                    _CHAT_LEADS[key] = (tail, full[len(gen):full.index("\x01")])
            except Exception:  # noqa: BLE001 - a template that cannot render the probe: use the rule
                pass
    return _CHAT_LEADS[key]


def answer_lead(tokenizer: Any, prompt: str) -> str:
    """What goes between the prompt and the answer for "score" (see the module docstring)."""
    chat = _chat_lead(tokenizer)
    if chat and prompt.endswith(chat[0]):
        return chat[1]
    return " " if prompt and not prompt[-1].isspace() else ""


def _logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _log_softmax(xs: Sequence[float]) -> list[float]:
    z = _logsumexp(xs)
    return [x - z for x in xs]


def calibrate(scores: Sequence[float], cf_scores: Sequence[Sequence[float]], method: str) -> list[float]:
    """One example's label scores corrected for the model's prior over the labels; the answer is
    their argmax. `cf_scores`: the scores of the same labels after each calibration prompt.

    - contextual: log q(y|x), the calibrated distribution q(y|x) = p(y|x) / p_cf(y) normalized
      over the labels, where p = softmax(scores) and p_cf is the mean of softmax(row) over the
      rows (Zhao et al.'s W = diag(p_cf)^-1, b = 0). In log space, so that a label the
      content-free prompts never pick does not divide by an underflowed zero, nor does a label
      q gives almost nothing underflow to log 0.
    - pmi: scores minus the domain premise's (its one row): log P(y|x) - log P(y|premise).
    """
    if method == "pmi":
        (premise,) = cf_scores
        return [s - c for s, c in zip(scores, premise)]
    if method == "contextual":
        rows = [_log_softmax(row) for row in cf_scores]
        log_prior = [_logsumexp(col) - math.log(len(rows)) for col in zip(*rows)]
        return _log_softmax([s - c for s, c in zip(scores, log_prior)])
    raise ValueError(f"unknown calibration {method!r}")


def _label_candidates(encode, options: Sequence[str], lead: str, eos: int) -> list[list[int]]:
    """Each label as strategy score scores it: the answer lead and the label, then EOS."""
    return [encode(lead + opt) + [eos] for opt in options]


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def label_scores(model: Any, tokenizer: Any, prompts: list[str], labels: Sequence[str]) -> list[list[float]]:
    """Every label's log-likelihood (sum over its tokens, EOS included) after each prompt: the
    scores strategy score takes the argmax of, for setting beside another scorer's (the
    lm-eval benchmark). The prompts share one answer lead, as a cell's do."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    candidates = _label_candidates(encode, labels, answer_lead(tokenizer, prompts[0]), tokenizer.eos_token_id)
    with torch.inference_mode():
        return _label_scores(model, [encode(p) for p in prompts], candidates, _pad_id(tokenizer))


def _label_scores(model: Any, prompts: list[list[int]], candidates: list[list[int]], pad: int) -> list[list[float]]:
    """Every candidate's log-likelihood (sum over its tokens) after each prompt, in two forward
    passes: the prompts (their shared prefix once), then all their candidate tries together."""
    cache, logprobs = _prefill_batch(model, prompts, pad)
    scores, *_ = _score_trie(model, cache, [len(p) for p in prompts], logprobs, candidates, False, need_next=False)
    return scores


def _argmax_only(decoding: dict[str, Any]) -> bool:
    """Only the answer is wanted: the label log-probs are not kept, the scores are plain sums."""
    return (decoding.get("label_logprobs") is False and not decoding.get("length_normalized")
            and decoding.get("calibration", "none") == "none")


def _best_labels(model: Any, prompts: list[list[int]], candidates: list[list[int]], pad: int) -> list[int]:
    """Each prompt's highest-scoring candidate (sum of log-probs, the first of equal scores), as
    `_label_scores` would pick it, without scoring every candidate.

    A candidate's log-prob is at most that of its first token, which the prompt pass already
    gives. So: score the candidates that begin with some prompt's likeliest first token (one trie
    pass), then only those whose first token alone still reaches a prompt's best score so far
    (a second pass). An instruction-tuned model puts most of its mass on a few first tokens, so
    of 60 labels a handful are scored; a flat model falls back to scoring nearly all of them.
    """
    cache, first = _prefill_batch(model, prompts, pad)
    lengths, batch = [len(p) for p in prompts], len(prompts)
    heads = torch.tensor([c[0] for c in candidates], device=first[0].device)
    bound = [row[heads].tolist() for row in first]  # a candidate's score is at most its first token's
    scores = [[-math.inf] * len(candidates) for _ in range(batch)]

    def run(which: list[int]) -> None:
        # a new cache over the prompts' tensors: the pass appends its nodes there, not to `cache`
        got, *_ = _score_trie(model, _map_cache(cache, lambda t: t), lengths, first,
                              [candidates[c] for c in which], False, need_next=False)
        for b in range(batch):
            for c, value in zip(which, got[b]):
                scores[b][c] = value

    likeliest = {candidates[_best(row)][0] for row in bound}
    probe = [c for c, cand in enumerate(candidates) if cand[0] in likeliest]
    run(probe)
    tried, best = set(probe), [max(row) for row in scores]
    rest = [c for c in range(len(candidates))
            if c not in tried and any(bound[b][c] >= best[b] for b in range(batch))]
    if rest:
        run(rest)
    return [_best(row) for row in scores]


def _score_labels_batch(model: Any, encode, items: list[dict[str, Any]], prompts: list[list[int]],
                        calibration_prompts: list[list[list[int]]], choice: Choice, lead: str, eos: int,
                        pad: int) -> list[dict[str, Any]]:
    """Label tasks (one choice, the same labels for every item): the whole chunk in two forward
    passes, every label scored and its log-prob kept. The calibration prompts of calibrated items
    take two more per chunk-sized batch of distinct ones (a zero-shot cell's are the same for
    every example: run once). Items whose decoding sets `label_logprobs: false` (plain sums, no
    calibration) keep only the answer, found in three passes that skip every label that cannot
    win (`_best_labels`)."""
    candidates = _label_candidates(encode, choice.options, lead, eos)
    lengths = [len(c) for c in candidates]
    if all(_argmax_only(it.get("decoding") or {}) for it in items):
        return [{"raw_output": choice.options[best], "n_prompt_tokens": len(prompt),
                 "n_output_tokens": len(candidates[best])}
                for prompt, best in zip(prompts, _best_labels(model, prompts, candidates, pad))]
    scores = _label_scores(model, prompts, candidates, pad)
    distinct = list(dict.fromkeys(tuple(p) for ps in calibration_prompts for p in ps))
    cf: dict[tuple[int, ...], list[float]] = {}
    for start in range(0, len(distinct), len(items)):  # no batch larger than the chunk's own
        part = distinct[start:start + len(items)]
        cf.update(zip(part, _label_scores(model, [list(p) for p in part], candidates, pad)))
    answers = []
    for item, prompt, row, cal in zip(items, prompts, scores, calibration_prompts):
        decoding = item.get("decoding") or {}
        per_token = [n if decoding.get("length_normalized") else 1 for n in lengths]  # sum, or mean per token
        final = [x / n for x, n in zip(row, per_token)]
        if cal:
            final = calibrate(final, [[x / n for x, n in zip(cf[tuple(p)], per_token)] for p in cal],
                              decoding["calibration"])
        best = _best(final)
        answers.append({"raw_output": choice.options[best], "n_prompt_tokens": len(prompt),
                        "n_output_tokens": len(candidates[best]),
                        "label_logprobs": {choice.name: dict(zip(choice.values, _log_softmax(final)))}})
    return answers


def constrained_answers(model: Any, tokenizer: Any, items: list[dict[str, Any]],
                        strategy: str | None = None) -> list[dict[str, Any]]:
    """Answers to a chunk of requests (see the module docstring), each always valid.

    `strategy` overrides the items' `decoding["strategy"]` ("score" when neither says).
    """
    if not items:
        return []
    decoding = items[0].get("decoding") or {}
    strategy = strategy or decoding.get("strategy") or "score"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown constrained strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    token_memo: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in token_memo:
            token_memo[text] = tokenizer.encode(text, add_special_tokens=False)
        return token_memo[text]

    def tokenize(text: str, item: dict[str, Any]) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=item.get("add_special_tokens", False))

    prompts = [tokenize(it["prompt"], it) for it in items]
    answers: list[dict[str, Any]] = []
    with torch.inference_mode():
        programs = [answer_program(get_task(it["task"]), it["labels"],
                                   len(it["words"]) if it.get("words") is not None else None) for it in items]
        leads = [answer_lead(tokenizer, it["prompt"]) for it in items]
        if (strategy == "score" and len(set(programs)) == 1 and len(programs[0]) == 1
                and isinstance(programs[0][0], Choice) and len(set(leads)) == 1 and not leads[0].strip()):
            calibration = [[tokenize(p, it) for p in it.get("calibration_prompts") or []] for it in items]
            return _score_labels_batch(model, encode, items, prompts, calibration, programs[0][0], leads[0], eos, pad)
        if any(it.get("calibration_prompts") for it in items):
            raise ValueError("calibration corrects the scores of one label choice: it needs strategy score, "
                             "a single-label task and a chat template whose answer lead is whitespace")
        states = prefill(model, prompts, pad)
        for item, prompt, state, program, lead in zip(items, prompts, states, programs, leads):
            answer: dict[str, Any] = {"n_prompt_tokens": len(prompt)}
            if strategy == "score":
                label_choices = frozenset(s.name for s in get_task(item["task"]).subtasks if s.type == "label")
                picks, answer["n_output_tokens"], answer["label_logprobs"] = _score_answer(
                    model, encode, program, state, lead, eos,
                    bool((item.get("decoding") or {}).get("length_normalized")), label_choices)
                answer["raw_output"] = render_answer(program, picks)
            else:
                text, answer["n_output_tokens"] = _greedy_answer(model, _vocab(tokenizer), program, state, eos)
                answer["raw_output"] = text.strip()
            answers.append(answer)
    return answers
