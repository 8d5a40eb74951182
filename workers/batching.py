"""Length-grouped batches, shared by the encoder and decoder trainers.

Shuffle, cut the order into windows of `group_batches` batches, sort each window by length and
cut it into batches, then shuffle the batches: every batch holds examples of similar length (little
padding) while the epoch stays random. A pure function of its arguments, so a resumed run sees
the same batches.
"""

from __future__ import annotations

import random


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int | str, group_batches: int) -> list[list[int]]:
    """Shuffled batches of example indices, each cut from a length-sorted window of the shuffle."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
