"""A cell's files (fine-tuned and merged models, a training job's metrics) wherever the results
dir is: a local or shared folder, or an object store (`s3://bucket/prefix`, `gs://...`, any URI
pyarrow's filesystems read).

Why a module of its own: on a cluster without a shared disk the node that trains a model, the
nodes whose actors load it and the driver that records the cell are different machines; the
object store is the one place they all reach. So a model is written by `staging` (the writer
fills a local folder, which is then published) and read by `fetch` (a local folder to load from).

- A local results dir stays as before: the folder is staged beside its final name and renamed
  into place (it appears whole or not at all); `fetch` returns the folder itself.
- On an object store, `staging` uploads the folder and then writes `<folder>.manifest.json` (each
  file's size and sha256) last: no manifest, no model. `fetch` downloads a model once per node into
  the node's cache, `CLFGRID_CACHE/artifacts/<sha256 of the manifest>` (workers/models.py's
  CACHE_DIR), checks every file against the manifest, and renames the folder into place, so every
  actor and trainer of a node shares one copy, and a model published again with other bytes gets
  a new folder, never a stale one.

Credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID, an IAM role,
AWS_ENDPOINT_URL for an S3-compatible server), never from a URI written in a file.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from grid.errors import GridError
from grid.sources import gguf_file, is_local_path
from grid.uris import filesystem, is_remote

MANIFEST_SUFFIX = ".manifest.json"


# --- writing -----------------------------------------------------------------------------


@contextmanager
def staging(uri: str) -> Iterator[Path]:
    """A local folder to write the artifact `uri` into; published when the block ends without
    an error (a local one renamed into place, a remote one uploaded, its manifest last)."""
    if not is_remote(uri):
        dest = Path(filesystem(uri)[1])
        tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return
    with tempfile.TemporaryDirectory(prefix="clfgrid-stage-") as tmp:
        yield Path(tmp)
        publish(Path(tmp), uri)


def publish(folder: Path, uri: str) -> None:
    """Upload `folder` to the remote `uri`: the old manifest goes first (a reader then sees no
    model rather than a mix), the files, then the new manifest."""
    fs, path = filesystem(uri)
    manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(folder.rglob("*")) if p.is_file()}
    start = time.perf_counter()
    _delete_file(fs, path + MANIFEST_SUFFIX)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)
    with fs.open_output_stream(path + MANIFEST_SUFFIX) as out:
        out.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    size = sum(f["size"] for f in manifest.values())
    _say(f"published {uri} ({len(manifest)} files, {size / 1e6:.1f} MB) in {time.perf_counter() - start:.2f}s")


def remove(uri: str) -> None:
    """Delete a file if it is there."""
    _delete_file(*filesystem(uri))


def ensure_dir(uri: str) -> str:
    """Create a folder (a no-op on object stores, which have none) and return `uri`, a local path
    made absolute."""
    if is_remote(uri):
        return uri
    path = Path(filesystem(uri)[1])
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# --- reading -----------------------------------------------------------------------------


def fetch(uri: str) -> str:
    """A local path to load a model from on this node: a grid-made model's remote URI from this
    node's cache, downloaded (and checked against its manifest) the first time; a model source
    resolved here (workers/models.py: a tiny model built or a GGUF file dequantized into this
    node's cache; a local folder, or a hub or API model name, as it is)."""
    from workers.models import CACHE_DIR, resolve

    if not is_remote(uri):
        text = str(uri)
        # a local folder (a grid-made model, an encoder's own format too) is read as it is
        return text if is_local_path(text) and gguf_file(text) is None else resolve(text)

    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path + MANIFEST_SUFFIX) as fh:
            blob = fh.read()
    except FileNotFoundError:
        raise GridError(f"{uri}: no published model there ({posixpath.basename(path)}{MANIFEST_SUFFIX} is "
                        "missing): the cell that makes it has not finished") from None
    dest = CACHE_DIR / "artifacts" / hashlib.sha256(blob).hexdigest()[:32]
    if dest.is_dir():
        return str(dest)
    manifest = json.loads(blob)
    size = sum(f["size"] for f in manifest.values())
    _say(f"fetching {uri} ({size / 1e6:.1f} MB) into this node's cache {dest}")
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    tmp.mkdir(parents=True)
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                        use_threads=True)
        for name, meta in manifest.items():
            file = tmp / name
            if not file.is_file() or file.stat().st_size != meta["size"] or _sha256(file) != meta["sha256"]:
                raise GridError(f"{uri}: {name} differs from its manifest (published again while being read?)")
        try:
            tmp.rename(dest)
        except OSError:  # another process of this node fetched it meanwhile: theirs is the same bytes
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"fetched {uri} in {time.perf_counter() - start:.2f}s")
    return str(dest)


def _say(line: str) -> None:
    """A progress line: printed, so that it reaches the driver's stderr from a Ray worker too (Ray
    forwards workers' output; their logging is not configured)."""
    print(f"artifacts: {line}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _delete_file(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
