"""Today's eight tasks, pinned: every split's size, first and last example_id, a sha256 of its rows
and the label sets, as computed by the code before tasks became declarative (issue 12). Any
re-expression of a task must read exactly these rows, so it makes exactly the same predictions."""

from __future__ import annotations

import hashlib
import json

import pytest

from grid.data import label_sets, load_split
from grid.tasks import get_task

# (size, first example_id, last example_id, sha256 of [[example_id, text, [gold...], words], ...])
# labels: sub-task -> "sha256(json list)[:16]:count"
PINNED = {
    '20ng-20': {
        'train': (11314, 'train-00000', 'train-11313',
                  '0a66cf86424a3f3a62082fa1aab2382dba0d2c6c1173b22a82161c5c4f0883a7'),
        'test': (7532, 'test-00000', 'test-07531',
                  '5db1072a2c297b2ad6cd26673ea7e83a6677f1825f37c075554be76316eebd1b'),
        'labels': {'label': 'c6b3cefbb6c34f95:20'},
    },
    '20ng-7': {
        'train': (11314, 'train-00000', 'train-11313',
                  'dbde3cdc7ba71822e1b16781daf56a12f3c3eba865ac2594e43a536ab7363a4a'),
        'test': (7532, 'test-00000', 'test-07531',
                  '6dd7a25757fdbc79e1b79bfbd44eabb185816f59da01406d3fced0345f0daf45'),
        'labels': {'root': '3bd74a1e3ea54442:7'},
    },
    '20ng-multi': {
        'train': (11314, 'train-00000', 'train-11313',
                  '1f1482a3b9da464ae56cc2386ba967bee8280d1aa1b5c7b015f914f2d7237fc4'),
        'test': (7532, 'test-00000', 'test-07531',
                  'b4b3e01e29721b08338e88e43063cba0755d8ef16689d893f85fea0f5dcbc8e2'),
        'labels': {'root': '3bd74a1e3ea54442:7', 'label': 'c6b3cefbb6c34f95:20'},
    },
    'fomc-stance': {  # the same rows, numbered since the files' `index` column repeats (re-pinned)
        'train': (1903, 'train-00000', 'train-01902',
                  'e584cf768f3debe8709532f38e5ef37e29da664bea704b454687e2b8abd954d8'),
        'test': (476, 'test-00000', 'test-00475',
                  'c7c559c2947d091d15808f94988a6a965b3ed01b626727b02330f3bca05bc6ae'),
        'labels': {'stance': 'f8467718b5a5e04b:3'},
    },
    'fpb-sentiment': {
        'train': (3876, '2', '4844',
                  '656c1af69fb1856948d97069309abcbae109eefa42e8fab38cd622a9362cc3da'),
        'test': (970, '0', '4845',
                  'f93f94251b15ce623160c12533f13b70ad04a8aba4f95c0980b1290b57ae2ac9'),
        'labels': {'sentiment': 'e353a148fa24ac60:3'},
    },
    'massive-intent': {
        'train': (11514, '1', '17180',
                  'bd41593b8248a07645cf5e7a71bdad16c99fe7b4d92327ecc3f42359169e4fb2'),
        'test': (2974, '0', '17179',
                  '1aa1bc01c44044484e822cbb09ace8f110312ddbd3ef811ea2c8ccfa150569d1'),
        'labels': {'intent': 'd02cca9e3a1c494a:60'},
    },
    'massive-multi': {
        'train': (11514, '1', '17180',
                  'fcf7f6dab9ac6af168bad5919e798198569e72942987c9cc7583de3c6d553a3c'),
        'test': (2974, '0', '17179',
                  '16900c8b941fb14c6ca4d122fe02190dd011dded2e24178a6460a98f0f2a288f'),
        'labels': {'intent': 'd02cca9e3a1c494a:60', 'slots': '2523c1293b09988e:56'},
    },
    'massive-slots': {
        'train': (11514, '1', '17180',
                  'c036b4cf7c1f94a54ab440bd3691e9fa2810a55e0f241e0cb1c40c7faf140105'),
        'test': (2974, '0', '17179',
                  '189f232c34a8aedf47d48dcceef50bc98da42780bb85cde27239dc29e7235326'),
        'labels': {'slots': '2523c1293b09988e:56'},
    },
}


def rows_digest(task, ds) -> str:
    fields = [s.field for s in task.subtasks]
    rows = [[r["example_id"], r["text"], [r[f] for f in fields], r["words"]] for r in ds]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_task_reads_the_pinned_rows(name):
    task = get_task(name)
    for split in ("train", "test"):
        ds = load_split(task, split)
        got = (len(ds), ds[0]["example_id"], ds[-1]["example_id"], rows_digest(task, ds))
        assert got == PINNED[name][split], f"{name} {split}"
    labels = {k: hashlib.sha256(json.dumps(list(v)).encode()).hexdigest()[:16] + f":{len(v)}"
              for k, v in label_sets(task).items()}
    assert labels == PINNED[name]["labels"]
