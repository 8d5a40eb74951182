"""The results store: a directory (local path or any pyarrow filesystem URI) of finished cells.

    DIR/cells/<cell_id>/predictions.parquet   one row per example (inference cells)
    DIR/cells/<cell_id>/cell.json              the cell, its status, timings, metrics, error
    DIR/cells/<cell_id>/model/                 the fine-tuned or merged model (fine-tune, merge cells)
    DIR/cells/<cell_id>/checkpoints/           Ray Train's checkpoints (fine-tune cells)

Every file is written to a temporary name and moved into place, so a reader (or a resumed run)
never sees half a file; `cell.json` is written last, so a cell counts as done only once all of
its files are there. A killed run therefore loses at most the cells it was in the middle of.
On an object store a model folder is published with a manifest written last (workers/artifacts.py),
so the same holds there.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grid.errors import GridError
from workers.artifacts import filesystem, join

CELL_FILE = "cell.json"
PREDICTIONS_FILE = "predictions.parquet"


@dataclass
class Store:
    fs: pafs.FileSystem
    root: str  # path inside fs
    uri: str  # as the user gave it

    @classmethod
    def open(cls, uri: str | Path, create: bool = True) -> "Store":
        """The store at `uri`. A run creates it (`create`); a reader (status, query, report, a dry
        run) must not, so a mistyped path is an error rather than a new, empty results dir."""
        text = str(uri)
        try:
            fs, root = filesystem(text)
        except (pa.ArrowInvalid, OSError) as exc:
            raise GridError(f"results dir {text}: {exc}") from None
        cells = posixpath.join(root, "cells")
        if create:
            try:
                fs.create_dir(cells, recursive=True)
            except OSError as exc:  # a file where the folder should be, no permission, ...
                raise GridError(f"results dir {text}: cannot create {cells}: {exc.strerror or exc}") from None
        elif fs.get_file_info(cells).type != pafs.FileType.Directory:
            raise GridError(f"results dir {text} has no cells/ folder: no grid has run there")
        return cls(fs=fs, root=root, uri=text)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def cell_dir(self, cell_id: str) -> str:
        return posixpath.join(self.root, "cells", cell_id)

    def cell_uri(self, cell_id: str, *parts: str) -> str:
        """A cell's folder (or a file or folder in it) as workers reach it: an absolute local path,
        or a URI on the object store (workers/artifacts.py reads and writes both)."""
        if self.is_local:
            return posixpath.join(self.cell_dir(cell_id), *parts)
        return join(self.uri, "cells", cell_id, *parts)

    # --- writing ------------------------------------------------------------------------

    def _atomic_write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    def write_predictions(self, cell_id: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._atomic_write(posixpath.join(self.cell_dir(cell_id), PREDICTIONS_FILE), sink.getvalue().to_pybytes())

    def write_cell(self, cell_id: str, record: dict[str, Any]) -> None:
        blob = json.dumps(record, indent=1, sort_keys=True, default=str).encode()
        self._atomic_write(posixpath.join(self.cell_dir(cell_id), CELL_FILE), blob)

    # --- reading ------------------------------------------------------------------------

    def read_cell(self, cell_id: str) -> dict[str, Any] | None:
        path = posixpath.join(self.cell_dir(cell_id), CELL_FILE)
        try:
            with self.fs.open_input_stream(path) as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise GridError(f"{path}: not valid JSON ({exc.msg})") from None

    def cell_ids(self) -> list[str]:
        selector = pafs.FileSelector(posixpath.join(self.root, "cells"), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)

    def records(self) -> list[dict[str, Any]]:
        """Every cell record in the store (done and failed); parallel reads for remote stores."""
        ids = self.cell_ids()
        if self.is_local:
            out = []
            for cid in ids:
                path = os.path.join(self.root, "cells", cid, CELL_FILE)
                try:
                    with open(path, "rb") as fh:
                        out.append(json.loads(fh.read()))
                except FileNotFoundError:
                    continue
            return out
        with ThreadPoolExecutor(16) as pool:
            return [r for r in pool.map(self.read_cell, ids) if r is not None]

    def statuses(self) -> dict[str, str]:
        return {r["cell_id"]: r["status"] for r in self.records()}

    def predictions_path(self, cell_id: str) -> str:
        return posixpath.join(self.cell_dir(cell_id), PREDICTIONS_FILE)
