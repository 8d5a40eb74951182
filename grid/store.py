"""The results store: a directory (local path or any pyarrow filesystem URI) of finished cells.

    DIR/cells/<cell_id>/predictions.parquet   one row per example (inference cells)
    DIR/cells/<cell_id>/cell.json              the cell, its status, timings, metrics, error
    DIR/cells/<cell_id>/model/                 the fine-tuned or merged model (fine-tune, merge cells)
    DIR/cells/<cell_id>/checkpoints/           Ray Train's checkpoints (fine-tune cells)
    DIR/runs/<started>-<pid>.json              one run of a grid: commit, command, machine, ... (grid/provenance.py)

Every file is written to a temporary name and moved into place, so a reader (or a resumed run)
never sees half a file; `cell.json` is written last, so a cell counts as done only once all of
its files are there. A killed run therefore loses at most the cells it was in the middle of.
On an object store a model folder is published with a manifest written last (workers/artifacts.py),
so the same holds there.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grid.errors import GridError
from grid.gcpause import gc_paused
from grid.uris import filesystem, join

CELL_FILE = "cell.json"
RUNS_DIR = "runs"
PREDICTIONS_FILE = "predictions.parquet"
PARQUET_MAGIC = b"PAR1"  # a parquet file's first and last four bytes
T = TypeVar("T", dict, "CellState")


log = logging.getLogger(__name__)


class CellState(msgspec.Struct):
    """What a resume needs of a cell record: its status, and the metrics it was scored with.

    Decoded straight from cell.json by msgspec, which skips the other keys without building
    them: a resume of a 100,000-cell grid reads every record, and building each one whole was
    most of its time."""

    cell_id: str
    status: str
    scored_with: list[str] | None = None


_DECODERS = {dict: msgspec.json.Decoder(dict[str, Any]), CellState: msgspec.json.Decoder(CellState)}


def _decode(blob: bytes, kind: type[T], path: str) -> T:
    """A cell.json as `kind`. json.dumps writes NaN for a NaN metric (a diverged training loss),
    which strict JSON (msgspec) refuses: such a file is read by the standard library instead.
    A whole record (a dict) must have its id, status and cell, which every reader uses."""
    try:
        record = _DECODERS[kind].decode(blob)
    except msgspec.ValidationError as exc:  # valid JSON, but not a record (a subclass of DecodeError)
        raise GridError(f"{path}: not a cell record ({exc})") from None
    except msgspec.DecodeError:
        try:
            record = msgspec.convert(json.loads(blob), kind)
        except (json.JSONDecodeError, UnicodeDecodeError, msgspec.ValidationError) as exc:
            raise GridError(f"{path}: not a cell record ({exc})") from None
    if kind is dict:
        missing = [k for k in ("cell_id", "status", "cell") if k not in record]
        if missing or not isinstance(record["cell"], dict):
            raise GridError(f"{path}: not a cell record (no {missing[0] if missing else 'cell mapping'})")
    return record


def _read_local(path: str) -> bytes:
    """A local file's bytes through os.read: half the time of open().read(), whose buffered file
    objects cost more than a small cell.json's read itself (a resume reads 100,000 of them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, _CHUNK)]
        while len(chunks[-1]) == _CHUNK:
            chunks.append(os.read(fd, _CHUNK))
    finally:
        os.close(fd)
    return b"".join(chunks)


_CHUNK = 1 << 16


@dataclass
class Store:
    fs: pafs.FileSystem
    root: str  # path inside fs
    uri: str  # as the user gave it
    # cell id -> why its cell.json could not be read, from the latest scan: such a cell is left out
    # of records() and states(), so a rerun runs it again and a report goes on without it
    unreadable: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _prefetched: Future | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, uri: str | Path, create: bool = True) -> Store:
        """The store at `uri`. A run creates it (`create`); a reader (status, query, report, a dry
        run) must not, so a mistyped path is an error rather than a new, empty results dir."""
        text = str(uri)
        try:
            fs, root = filesystem(text)
        except (pa.ArrowInvalid, OSError) as exc:
            raise GridError(f"results dir {text}: {exc}") from None
        store, cells = cls(fs=fs, root=root, uri=text), posixpath.join(root, "cells")
        if create:
            try:
                fs.create_dir(cells, recursive=True)
            except OSError as exc:  # a file where the folder should be, no permission, ...
                raise GridError(f"results dir {text}: cannot create {cells}: {exc.strerror or exc}") from None
            store.check_writable()
        elif fs.get_file_info(cells).type != pafs.FileType.Directory:
            raise GridError(f"results dir {text} has no cells/ folder: no grid has run there")
        return store

    def check_writable(self) -> None:
        """Fail before any work where no file can be written (a read-only mount or bucket, no
        permission): a probe file written and removed, so the results dir is left as it was."""
        probe = posixpath.join(self.root, f".write-probe-{uuid.uuid4().hex[:12]}")
        try:
            with self.fs.open_output_stream(probe) as out:
                out.write(b"")
            self.fs.delete_file(probe)
        except OSError as exc:
            reason = exc.strerror or str(exc).splitlines()[0]
            raise GridError(f"results dir {self.uri}: cannot write there ({reason})") from None

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

    def write_file(self, relative: str, data: bytes) -> None:
        """Any file under the results dir (`cells/<id>/predictions.parquet`, `runs/<name>.json`),
        written whole or not at all: a copy of another results dir's file keeps its bytes."""
        self._atomic_write(posixpath.join(self.root, relative), data)

    def write_predictions(self, cell_id: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._atomic_write(posixpath.join(self.cell_dir(cell_id), PREDICTIONS_FILE), sink.getvalue().to_pybytes())

    def write_cell(self, cell_id: str, record: dict[str, Any]) -> None:
        blob = json.dumps(record, indent=1, sort_keys=True, default=str).encode()
        self._atomic_write(posixpath.join(self.cell_dir(cell_id), CELL_FILE), blob)

    def write_run(self, name: str, record: dict[str, Any]) -> None:
        """runs/<name>.json: a run's provenance record, written when it starts and again when it ends."""
        blob = json.dumps(record, indent=1, sort_keys=True).encode()
        self._atomic_write(posixpath.join(self.root, RUNS_DIR, f"{name}.json"), blob)

    def delete_run(self, name: str) -> None:
        """Drop a run's record: a run that changed no cell leaves the results dir as it found it."""
        self.fs.delete_file(posixpath.join(self.root, RUNS_DIR, f"{name}.json"))

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
        cells = posixpath.join(self.root, "cells")
        if self.is_local:  # os.scandir: a tenth of the time of pyarrow's listing on 100,000 folders
            try:
                return sorted(e.name for e in os.scandir(cells) if e.is_dir())
            except FileNotFoundError:
                return []
        selector = pafs.FileSelector(cells, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)

    @gc_paused
    def _read_all(self, kind: type[T]) -> list[T]:
        """Every cell.json in the store, decoded; parallel reads for remote stores. A cell folder
        without cell.json (a cell being written) is left out; so is a file that cannot be read or
        is not a cell record, named in `unreadable` (and logged) instead of stopping the scan."""
        cells = posixpath.join(self.root, "cells")
        unreadable: dict[str, str] = {}

        def read(cell_id: str) -> T | None:
            path = f"{cells}/{cell_id}/{CELL_FILE}"  # posixpath.join, 100,000 times, was a tenth of the scan
            try:
                if self.is_local:
                    blob = _read_local(path)
                else:
                    with self.fs.open_input_stream(path) as fh:
                        blob = fh.read()
                record = _decode(blob, kind, path)
            except FileNotFoundError:
                return None
            except (GridError, OSError) as exc:  # corrupt, a folder, unreadable
                unreadable[cell_id] = str(exc) if isinstance(exc, GridError) else f"{path}: {exc.strerror or exc}"
                return None
            return record

        ids = self.cell_ids()
        if self.is_local:
            found = [r for r in map(read, ids) if r is not None]
        else:
            with ThreadPoolExecutor(16) as pool:
                found = [r for r in pool.map(read, ids) if r is not None]
        self.unreadable = unreadable
        for reason in unreadable.values():
            log.warning("left out (its cell counts as not run): %s", reason)
        return found

    def records(self) -> list[dict[str, Any]]:
        """Every cell record in the store (done and failed)."""
        return self._read_all(dict)

    def states(self) -> list[CellState]:
        """Every cell's status and scored_with, without the rest of its record (a resume's scan).
        The scan `prefetch_states` started, if there is one (once)."""
        pending, self._prefetched = self._prefetched, None
        if pending is not None:
            return pending.result()
        return self._read_all(CellState)

    def prefetch_states(self) -> None:
        """Start the resume scan in a thread, for the next `states()`: its reads (system calls,
        which release the GIL) then run beside the planning on another core. A resume of
        100,048 cells: 5.2 s to 3.2 s on 2 cores."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="resume-scan")
        self._prefetched = pool.submit(self._read_all, CellState)
        pool.shutdown(wait=False)  # the thread ends with its one scan

    def statuses(self) -> dict[str, str]:
        return {s.cell_id: s.status for s in self.states()}

    def predictions_path(self, cell_id: str) -> str:
        return posixpath.join(self.cell_dir(cell_id), PREDICTIONS_FILE)

    def predictions_problem(self, cell_id: str) -> str | None:
        """Why a finished inference cell's predictions file cannot be its answers: missing, or not
        parquet by its size and the magic bytes at both ends (damaged after it was written, since
        writes are atomic); None when it looks whole. A few bytes read, not the file: a resume
        checks every finished inference cell so."""
        path = self.predictions_path(cell_id)
        try:
            if self.is_local:
                fd = os.open(path, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    ends = (os.pread(fd, 4, 0), os.pread(fd, 4, size - 4)) if size >= 12 else None
                finally:
                    os.close(fd)
            else:
                with self.fs.open_input_file(path) as fh:
                    size = fh.size()
                    ends = (fh.read_at(4, 0), fh.read_at(4, size - 4)) if size >= 12 else None
        except FileNotFoundError:
            return f"{path}: missing (the cell's record says done)"
        except OSError as exc:
            return f"{path}: unreadable ({exc.strerror or exc})"
        return None if ends == (PARQUET_MAGIC, PARQUET_MAGIC) else f"{path}: not a parquet file ({size} bytes)"

    def damaged(self, cell_ids: list[str]) -> dict[str, str]:
        """Those of these finished inference cells whose predictions file is damaged
        (`predictions_problem`), each with why; checked in parallel on an object store."""
        if self.is_local:
            problems = list(map(self.predictions_problem, cell_ids))
        else:
            with ThreadPoolExecutor(16) as pool:
                problems = list(pool.map(self.predictions_problem, cell_ids))
        return {cell_id: why for cell_id, why in zip(cell_ids, problems) if why}

    def damaged_predictions(self, records: list[dict[str, Any]]) -> dict[str, str]:
        """Finished inference cells of these records whose predictions file is damaged, each
        with why: what status shows and a report leaves out."""
        return self.damaged([r["cell_id"] for r in records
                             if r["status"] == "done" and r["cell"].get("kind") == "infer"])

    def non_numeric_metrics(self, records: list[dict[str, Any]]) -> dict[str, str]:
        """Finished inference cells with a metric that is not a number, each with why. Scoring
        writes only numbers (or null, for an interval it could not compute), so such a value was
        edited in or damaged after the cell was written: status names it, and a report leaves the
        cell out rather than read around a value it cannot use."""
        out = {}
        for r in records:
            if r["status"] != "done" or r["cell"].get("kind") != "infer":
                continue
            bad = [(k, v) for k, v in (r.get("metrics") or {}).items()
                   if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
            if bad:
                path = posixpath.join(self.cell_dir(r["cell_id"]), CELL_FILE)
                out[r["cell_id"]] = (f"{path}: metric {bad[0][0]} is {bad[0][1]!r}, not a number"
                                     + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        return out

    def read_predictions(self, cell_id: str, columns: list[str] | None = None) -> pa.Table:
        """A finished cell's predictions table; a file that is missing, empty or not parquet
        (damaged after it was written: writes are atomic) is one GridError naming it."""
        path = self.predictions_path(cell_id)
        try:
            with self.fs.open_input_file(path) as fh:
                table = pq.read_table(fh)
        except FileNotFoundError:
            raise GridError(f"{path}: missing (the cell's record says done)") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise GridError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        return table.select([c for c in columns if c in table.column_names]) if columns else table

    def run_files(self) -> list[pafs.FileInfo]:
        """The run records' files in runs/ (not the temporary files of writes in progress)."""
        selector = pafs.FileSelector(posixpath.join(self.root, RUNS_DIR), allow_not_found=True)
        return [info for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.File and info.base_name.endswith(".json")]

    def runs(self) -> list[dict[str, Any]]:
        """Every run record in runs/, oldest first (by start, then name); none for a results dir
        written before runs/ existed."""
        found = []
        for info in self.run_files():
            with self.fs.open_input_stream(info.path) as fh:
                try:
                    record = json.loads(fh.read())
                except json.JSONDecodeError as exc:
                    raise GridError(f"{info.path}: not valid JSON ({exc.msg})") from None
            found.append((record.get("started_at") or "", info.base_name, record))
        return [record for *_, record in sorted(found, key=lambda f: f[:2])]
