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
  scores both sides with it.) A choice whose scores are not kept, a word's slot tag, is found
  by branch and bound on its trie instead (`_search_choices`: the same pick, a few subtrees run,
  the chunk's examples word by word in the same passes): about 5x scoring every tag on SmolLM2
  five-shot massive-slots (benchmarks/slot_decoding.py).
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
import re
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


def answer_regex(program: Program) -> str:
    """The answers strategy greedy allows, as a regular expression: up to MAX_LEAD_SPACE
    whitespace characters, the program's text with one option per choice, as many after. An
    engine that constrains decoding by a regex (vLLM's structured outputs) then takes the same
    greedy path as `_greedy_answer`."""
    def literal(text: str) -> str:  # only the metacharacters: engines differ on other escapes
        return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text)

    parts = [literal(s.text) if isinstance(s, Fixed) else "(?:" + "|".join(map(literal, s.options)) + ")"
             for s in program]
    return rf"\s{{0,{MAX_LEAD_SPACE}}}" + "".join(parts) + rf"\s{{0,{MAX_LEAD_SPACE}}}"


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


class _Search:
    """One row's branch and bound over a choice's token trie (see `_search_choices`): what it
    knows of each node, and which nodes it wants run next."""

    def __init__(self, trie: tuple, logprobs: torch.Tensor, need_next: bool):
        self.tokens, self.parent, _, self.paths, _, self.children, self.ends = trie
        self.need_next = need_next
        self.cum: dict[int, float] = {}  # node -> summed log-prob of its prefix (known once its parent ran)
        self.slot: dict[int, int] = {}  # node run -> its column in the cache after the prompts
        self.after: dict[int, torch.Tensor] = {}  # node run -> the next-token logits after it
        self.best, self.best_c = -math.inf, len(self.paths)
        roots = self.children[-1]
        for node, value in zip(roots, logprobs[torch.tensor([self.tokens[n] for n in roots])].tolist()):
            self._known(node, value)
        self.open = [max(roots, key=self.cum.__getitem__)]  # the likeliest first token's subtree first

    def _known(self, node: int, logp: float) -> None:
        up = self.parent[node]
        self.cum[node] = (self.cum[up] if up >= 0 else 0.0) + logp
        for c in self.ends.get(node, ()):
            if self.cum[node] > self.best or (self.cum[node] == self.best and c < self.best_c):
                self.best, self.best_c = self.cum[node], c

    def _subtree(self, node: int) -> list[int]:
        """The nodes under `node` (itself included) to run for every candidate there to be
        scored: those with children, and the leaves too when the state after the winner is wanted."""
        out, todo = [], [node]
        while todo:
            n = todo.pop()
            kids = self.children.get(n, [])
            if kids or self.need_next:
                out.append(n)
            todo += kids
        return sorted(out)  # a parent before its children

    def wants(self) -> list[int]:
        """The nodes to run next (each after its ancestors: run before, or earlier in the list);
        none when the search is over. First the subtree of the likeliest first token, which
        scores some complete candidates; then the subtrees of every node not run whose prefix
        still reaches the best score, until none does."""
        if not self.open:
            self.open = [n for n in self.cum if n not in self.slot and self.cum[n] >= self.best
                         and (self.children.get(n) or self.need_next)]
        wanted = sorted({m for n in self.open for m in self._subtree(n)} - self.slot.keys())
        self.open = []
        if not wanted:
            leaf = self.paths[self.best_c][-1]
            return [leaf] if self.need_next and leaf not in self.after else []
        return wanted

    def ran(self, nodes: list[int], columns: list[int], logits: torch.Tensor, lse: torch.Tensor) -> None:
        """`nodes` ran at these cache columns (parents first), with these next-token logits and
        their logsumexp: a log-prob is a logit minus it, so only the winner's whole row of
        log-probs is ever made (`after`)."""
        for node, column, row, norm in zip(nodes, columns, logits, lse.tolist()):
            self.slot[node], self.after[node] = column, row
            kids = self.children.get(node, [])
            if kids:
                for kid, value in zip(kids, row[torch.tensor([self.tokens[k] for k in kids])].tolist()):
                    self._known(kid, value - norm)


def _search_choices(model: Any, states: list[_State], candidates: list[list[int]],
                    need_next: bool = True) -> list[tuple[int, _State]]:
    """For each state, the candidate `_score_choice` picks by summed log-probs (the first of
    equal scores) and the state after it, found without scoring every candidate: branch and
    bound on the token trie, every row of a chunk in the same forward passes.

    A candidate's score is at most the summed log-prob of any prefix of it (each further token
    adds a log-prob <= 0). So each row first runs the subtree of its likeliest first token,
    which scores the candidates there; then the subtrees of the nodes whose prefix still reaches
    the best score, until none does; every other candidate is bounded below it and cannot win.
    A whole subtree runs in one pass (tree attention, as `_score_trie`): on a CPU a pass of a
    few tokens costs what streaming the weights costs, so passes, not tokens, are what to save.
    For the choices whose scores are not kept (a word's slot tag): a tag's tokens and the `", "`
    after it, over ~60 tags, are most of a full trie's nodes, and a model sure of a word's tag
    leaves a few subtrees to run, in two passes. The rows run together, as on one batch cache: each row's
    prompt (right-padded to the longest), then the nodes run so far, a column each pass per row
    (a row with fewer nodes pads its columns, seen by no one); a node sees its row's prompt and
    its own ancestors, at its depth's position, so its logits are those the full trie pass gives;
    a pass streams the weights once for the whole chunk. The states' caches are used up.
    """
    tokens, parent, depth, paths, lines = _token_trie(candidates)
    children: dict[int, list[int]] = {}
    for node, up in enumerate(parent):
        children.setdefault(up, []).append(node)
    ends: dict[int, list[int]] = {}
    for c, path in enumerate(paths):
        ends.setdefault(path[-1], []).append(c)
    trie = (tokens, parent, depth, paths, lines, children, ends)
    rows = [_Search(trie, st.logprobs, need_next) for st in states]
    pasts = [st.length for st in states]
    width = max(pasts)
    cache = _full_cache([(torch.cat([_pad_seq(st.cache.layers[k].keys, width) for st in states]),
                          torch.cat([_pad_seq(st.cache.layers[k].values, width) for st in states]))
                         for k in range(len(states[0].cache.layers))])
    k_pos = torch.arange(width).expand(len(rows), width)
    columns = 0  # node columns in the cache after the prompts
    while wanted := [r.wants() for r in rows]:
        if not any(wanted):
            break
        n = max(len(w) for w in wanted)
        total = width + columns + n
        visible = torch.zeros((len(rows), n, total), dtype=torch.bool)
        q_pos = torch.zeros((len(rows), n), dtype=torch.long)
        ids = torch.full((len(rows), n), tokens[0], dtype=torch.long)
        for b, (row, nodes) in enumerate(zip(rows, wanted)):
            visible[b, :, :pasts[b]] = True
            here = {node: columns + k for k, node in enumerate(nodes)}  # this pass's columns
            for k, node in enumerate(nodes):
                ids[b, k], q_pos[b, k] = tokens[node], pasts[b] + depth[node]
                visible[b, k, [width + (row.slot[j] if j in row.slot else here[j]) for j in lines[node]]] = True
        k_pos = torch.cat([k_pos, q_pos], 1)
        out = model(input_ids=ids.to(model.device), past_key_values=cache,
                    attention_mask=_masks(model, visible, q_pos, k_pos), use_cache=True,
                    position_ids=q_pos.to(model.device))
        cache = out.past_key_values
        logits = out.logits.float()
        lse = torch.logsumexp(logits, -1)
        for b, (row, nodes) in enumerate(zip(rows, wanted)):
            if nodes:
                row.ran(nodes, list(range(columns, columns + len(nodes))), logits[b, :len(nodes)], lse[b, :len(nodes)])
        columns += n
    picked = []
    for b, (row, past) in enumerate(zip(rows, pasts)):
        if not need_next:
            picked.append((row.best_c, _State(states[b].cache, past, states[b].logprobs)))
            continue
        path = paths[row.best_c]
        keep = torch.tensor(list(range(past)) + [width + row.slot[j] for j in path], device=model.device)
        state = _State(_map_cache(cache, lambda t, b=b, keep=keep: t[b:b + 1].index_select(2, keep)),
                       past + len(path), torch.log_softmax(row.after[path[-1]], -1))
        picked.append((row.best_c, state))
    return picked


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """A (1, heads, seq, dim) cache tensor right-padded with zeros to `width` positions."""
    return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) if t.shape[2] < width else t


def _score_answers(model: Any, encode, programs: list[Program], states: list[_State], leads: list[str],
                   eos: int, length_normalized: list[bool], label_choices: list[frozenset[str]],
                   search: bool = True) -> list[tuple[list[int], int, dict[str, dict[str, float]]]]:
    """Choose every choice of each row's program, the rows in step (choice k of every row, then
    k + 1). Returns per row the picks, the answer's token count and, for each choice named in
    its `label_choices` (the label sub-tasks), its labels' log-probs.

    Fixed scaffolding (`{"task1": "`) is forced as text; each candidate is scored with the fixed
    text that follows it, and EOS after the last choice; a whitespace-only lead joins the labels.
    A choice whose scores are not kept (not a label sub-task) and are plain sums is found by
    branch and bound, the rows that face the same candidates together (`_search_choices`: the
    same pick); with `search` off every candidate is scored, one row at a time (the tests
    compare the two).
    """
    n = len(programs)
    at, pending = [0] * n, list(leads)  # each row's next segment, and fixed text not yet fed
    picks: list[list[int]] = [[] for _ in range(n)]
    n_tokens, label_logprobs = [0] * n, [{} for _ in range(n)]
    states = list(states)
    active = list(range(n))
    while active:
        searched: dict[tuple, list[int]] = {}  # (candidates, last) -> rows
        asked: dict[int, list[list[int]]] = {}  # row -> the candidates of its choice now
        for r in list(active):
            program = programs[r]
            while at[r] < len(program) and isinstance(program[at[r]], Fixed):
                pending[r] += program[at[r]].text
                at[r] += 1
            if at[r] == len(program):  # a program without choices (word tags of an empty input)
                if pending[r].strip():
                    n_tokens[r] += len(encode(pending[r]))
                active.remove(r)
                continue
            if pending[r] and not pending[r].isspace():
                ids = encode(pending[r])
                states[r] = _extend(model, states[r], ids)
                n_tokens[r] += len(ids)
                pending[r] = ""
            seg, i = program[at[r]], at[r]
            after = program[i + 1].text if i + 1 < len(program) and isinstance(program[i + 1], Fixed) else ""
            last = i + (2 if after else 1) >= len(program)
            candidates = [encode(pending[r] + opt + after) + ([eos] if last else []) for opt in seg.options]
            asked[r] = candidates
            at[r] += 2 if after else 1
            pending[r] = ""
            if last:  # its last choice, made below
                active.remove(r)
            if search and seg.name not in label_choices[r] and not length_normalized[r]:
                searched.setdefault((tuple(map(tuple, candidates)), last), []).append(r)
            else:
                index, states[r], scores = _score_choice(model, states[r], candidates, length_normalized[r],
                                                         need_next=not last)
                if seg.name in label_choices[r]:
                    label_logprobs[r][seg.name] = dict(zip(seg.values, _log_softmax(scores)))
                picks[r].append(index)
                n_tokens[r] += len(candidates[index])
        for (_, last), rows in searched.items():
            for r, (index, state) in zip(rows, _search_choices(model, [states[r] for r in rows], asked[rows[0]],
                                                               need_next=not last)):
                states[r] = state
                picks[r].append(index)
                n_tokens[r] += len(asked[r][index])
    return list(zip(picks, n_tokens, label_logprobs))


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


def label_candidates(encode, options: Sequence[str], lead: str, eos: int) -> list[list[int]]:
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

    candidates = label_candidates(encode, labels, answer_lead(tokenizer, prompts[0]), tokenizer.eos_token_id)
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
    candidates = label_candidates(encode, choice.options, lead, eos)
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
    return [label_answer(choice, lengths, row, [cf[tuple(p)] for p in cal], item.get("decoding") or {}, len(prompt))
            for item, prompt, row, cal in zip(items, prompts, scores, calibration_prompts)]


def label_answer(choice: Choice, lengths: Sequence[int], scores: Sequence[float],
                 cf_scores: Sequence[Sequence[float]], decoding: dict[str, Any], n_prompt: int) -> dict[str, Any]:
    """A label task's answer from its candidates' summed log-probs (`scores`; `lengths`: their
    token counts), as strategy score makes it on any backend (here and workers/vllm_backend.py):
    per token when length-normalized, calibrated by the scores after its calibration prompts
    (`cf_scores`, one row each), the argmax, and every label's log-prob kept."""
    per_token = [n if decoding.get("length_normalized") else 1 for n in lengths]  # sum, or mean per token
    final = [x / n for x, n in zip(scores, per_token)]
    if cf_scores:
        final = calibrate(final, [[x / n for x, n in zip(row, per_token)] for row in cf_scores],
                          decoding["calibration"])
    best = _best(final)
    return {"raw_output": choice.options[best], "n_prompt_tokens": n_prompt, "n_output_tokens": lengths[best],
            "label_logprobs": {choice.name: dict(zip(choice.values, _log_softmax(final)))}}


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
        if strategy == "score":
            chosen = _score_answers(
                model, encode, programs, states, leads, eos,
                [bool((it.get("decoding") or {}).get("length_normalized")) for it in items],
                [frozenset(s.name for s in get_task(it["task"]).subtasks if s.type == "label") for it in items])
            return [{"n_prompt_tokens": len(prompt), "n_output_tokens": n_out, "label_logprobs": logprobs,
                     "raw_output": render_answer(program, picks)}
                    for prompt, program, (picks, n_out, logprobs) in zip(prompts, programs, chosen)]
        for prompt, state, program in zip(prompts, states, programs):
            text, n_out = _greedy_answer(model, _vocab(tokenizer), program, state, eos)
            answers.append({"n_prompt_tokens": len(prompt), "n_output_tokens": n_out, "raw_output": text.strip()})
    return answers
