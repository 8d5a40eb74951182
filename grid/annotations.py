"""Annotation formats: how a source writes word-level gold, read into (words, one tag per word).

A `word_tags` sub-task's gold is one tag per whitespace word, a slot type or "Other" (the paper's
word label, grid.tasks.OUTSIDE_TAG); the metric turns them into BIO itself. Sources write that
gold in several ways, each a format here, named by a task's `annotation:`:

- `bracket_slots`: inline markup, `wake me up at [time : nine am]` (MASSIVE's `annot_utt`);
- `bio`: a BIO tag per word (`O B-time I-time`, the seq.out layout), the B-/I- prefix dropped;
- `tags`: a tag per word (a list, or a whitespace string), `outside` naming the no-slot tag.

Every parser raises GridError naming `where` (file and row) on bad markup.
"""

from __future__ import annotations

import re

from grid.errors import GridError
from grid.tasks import OUTSIDE_TAG

_SLOT = re.compile(r"\[([^\]]*)\]")


def bracket_slots(annotated: str, where: str = "") -> tuple[list[str], list[str]]:
    """Words and one tag per word from inline `[slot : words]` markup.

    `wake me up at [time : nine am]` -> words [wake, me, up, at, nine, am],
    tags [Other, Other, Other, Other, time, time].
    """
    words: list[str] = []
    tags: list[str] = []
    pos = 0
    for match in _SLOT.finditer(annotated):
        outside = annotated[pos : match.start()].split()
        _check_plain(outside, annotated, where)
        words += outside
        tags += [OUTSIDE_TAG] * len(outside)
        slot, sep, value = match.group(1).partition(" : ")
        if not sep:
            raise GridError(f"{where}: a bracket without ' : ': {match.group(0)!r}")
        inside = value.split()
        words += inside
        tags += [slot.strip()] * len(inside)
        pos = match.end()
    rest = annotated[pos:].split()
    _check_plain(rest, annotated, where)
    words += rest
    tags += [OUTSIDE_TAG] * len(rest)
    return words, tags


def _check_plain(words: list[str], annotated: str, where: str) -> None:
    """Text outside brackets holds no bracket: `[time : nine am` is unclosed, not a word."""
    for word in words:
        if word.startswith("[") or word.endswith("]"):
            raise GridError(f"{where}: unbalanced bracket in {annotated!r}")


def bio_tags(tags: str | list[str], n_words: int, where: str = "") -> list[str]:
    """Slot types from BIO tags (`B-x`, `I-x` -> x; `O` -> Other). Adjacent spans of one type
    become one, as the word-tag gold cannot tell them apart."""
    items = tags.split() if isinstance(tags, str) else list(tags)
    _check_count(items, n_words, where)
    out = []
    for tag in items:
        if tag == "O":
            out.append(OUTSIDE_TAG)
        elif tag[:2] in ("B-", "I-") and len(tag) > 2:
            out.append(tag[2:])
        else:
            raise GridError(f"{where}: {tag!r} is not a BIO tag (O, B-type, I-type)")
    return out


def plain_tags(tags: str | list[str], n_words: int, outside: str, where: str = "") -> list[str]:
    """One tag per word as written, the source's `outside` value read as Other."""
    items = tags.split() if isinstance(tags, str) else [str(t) for t in tags]
    _check_count(items, n_words, where)
    return [OUTSIDE_TAG if t == outside else t for t in items]


def _check_count(tags: list[str], n_words: int, where: str) -> None:
    if len(tags) != n_words:
        raise GridError(f"{where}: {len(tags)} tags for {n_words} words")
