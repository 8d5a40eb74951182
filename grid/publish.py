"""`python -m grid publish RESULTS DEST`: the part of a results dir that a report is built from,
copied where it can be committed beside the report (a study's `reports/<study>/results/`).

It copies every cell's `cell.json` (fine-tune and merge cells too: the report reads their
lineage), every inference cell's `predictions.parquet`, and the runs' provenance records
(`runs/*.json`); never checkpoints, fine-tuned or merged models. `python -m grid report DEST`
then rebuilds the study's `table3.md` and `report.json` byte for byte. A study's results should
stay under MAX_BYTES: past it, a line says so.
"""

from __future__ import annotations

import posixpath
import sys

from grid.errors import GridError
from grid.store import PREDICTIONS_FILE, RUNS_DIR, Store

MAX_BYTES = 20 * 2**20


def publish(results: str, dest: str) -> tuple[int, int]:
    """Copy what a report reads from `results` into `dest`; return (cells, bytes written)."""
    source = Store.open(results, create=False)
    target = Store.open(dest)
    if target.cell_ids():
        raise GridError(f"{dest}: already holds cells; publish into an empty folder")
    written = 0
    records = source.records()
    for record in records:
        cid = record["cell_id"]
        if record["cell"].get("kind") == "infer" and record["status"] == "done":
            with source.fs.open_input_stream(source.predictions_path(cid)) as fh:
                blob = fh.read()
            target.write_file(f"cells/{cid}/{PREDICTIONS_FILE}", blob)
            written += len(blob)
        target.write_cell(cid, record)
        written += target.fs.get_file_info(posixpath.join(target.cell_dir(cid), "cell.json")).size
    for info in source.run_files():
        with source.fs.open_input_stream(info.path) as fh:
            target.write_file(f"{RUNS_DIR}/{info.base_name}", fh.read())
    if written > MAX_BYTES:
        print(f"note: {dest} holds {written / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB a committed study "
              f"should keep", file=sys.stderr)
    return len(records), written
