"""The study's gate (issue 29): shared vs single counts on SST-2 only if the single-task head beats
its majority rate. For each seed's single-task head (and the shared body's), a one-sided exact
binomial test (scipy) of its accuracy on the 100 test rows against the majority rate of those rows.

    python reports/seed003/gate.py [reports/seed003/results]
"""

from __future__ import annotations

import sys
from collections import Counter

import polars as pl
from scipy.stats import binomtest

from grid.query import cells, predictions


def main(results: str) -> None:
    heads = cells(results).filter((pl.col("task") == "sst2") & (pl.col("decoding") == "head"))
    rows = predictions(results).join(heads.select("cell_id", "model", "seed"), on="cell_id").collect()
    for (model, seed), answers in sorted(rows.group_by(["model", "seed"]), key=lambda g: g[0]):
        golds = answers["gold"].to_list()  # a JSON answer: the gold and the head's label compare as text
        majority = Counter(golds).most_common(1)[0][1] / len(golds)
        right = sum(g == p for g, p in zip(golds, answers["prediction"].to_list()))
        p = binomtest(right, len(golds), majority, alternative="greater").pvalue
        print(f"{model} seed {seed}: {right}/{len(golds)} right, majority {majority:.2f}, one-sided p {p:.2g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/seed003/results")
