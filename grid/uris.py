"""Where a results dir's files are: a local path or an object-store URI (`s3://bucket/prefix`,
`gs://...`, any URI pyarrow's filesystems read), as one pyarrow filesystem and a path in it.

The store (grid/store.py), the report and the workers' artifacts (workers/artifacts.py) all
address files this way; it lives in grid/ so that the store needs nothing from the workers.
"""

from __future__ import annotations

import errno
import posixpath
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str | Path) -> bool:
    """True for a filesystem URI other than a local file (s3://, gs://, ...)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of `uri` and the path inside it; a plain path is a local one, made
    absolute (a Ray job's working dir is not the user's)."""
    text = str(uri)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    try:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    except RuntimeError as exc:  # Path.resolve on a symlink loop: an OSError, as every other bad path
        raise OSError(errno.ELOOP, "a symlink loop", text) from exc


def join(uri: str | Path, *parts: str) -> str:
    """`uri` with path parts appended (before a URI's `?options`, if any)."""
    base, sep, query = str(uri).partition("?")
    return posixpath.join(base, *parts) + sep + query


def write_text(uri: str, text: str) -> None:
    """A small file (one object on an object store: it appears whole)."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()
