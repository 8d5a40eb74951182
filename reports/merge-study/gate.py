"""The study's gate (issue 29): a seen task's merge results count only where its fine-tune learned
it, that is beat the task's majority rate. For every tuned model on each task it was tuned on (the
single-task fine-tunes, the multi-task LoRA, the merges), a one-sided exact binomial test (scipy)
of its accuracy on the test rows against the majority rate of those rows.

    python reports/merge-study/gate.py [reports/merge-study/results]
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import polars as pl
from scipy.stats import binomtest

from grid.query import forgetting, predictions


def main(results: str) -> None:
    seen = (forgetting(results).filter(pl.col("seen") & pl.col("headline"))
            .select("cell_id", "model", "finetune", "trained_on", "task").unique().collect())
    rows = predictions(results).join(seen.lazy(), on="cell_id").collect()
    for (model, trained_on, task), answers in sorted(rows.group_by(["model", "trained_on", "task"]),
                                                     key=lambda g: tuple(str(x) for x in g[0])):
        golds = [json.loads(g) for g in answers["gold"].to_list()]
        preds = [json.loads(p) if p else None for p in answers["prediction"].to_list()]
        majority = Counter(json.dumps(g, sort_keys=True) for g in golds).most_common(1)[0][1] / len(golds)
        right = sum(g == p for g, p in zip(golds, preds))
        p = binomtest(right, len(golds), majority, alternative="greater").pvalue
        who = model if trained_on is None else f"{model} tuned on {trained_on}"
        print(f"{who}, on {task}: {right}/{len(golds)} right ({100 * right / len(golds):.1f}%), "
              f"majority {100 * majority:.1f}%, one-sided p {p:.2g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/merge-study/results")
