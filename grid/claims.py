"""Claims: which driver is running which cell, so that two drivers on one results dir never run
the same cell at the same time (a user who starts a second driver to go faster, or starts one by
mistake), on a disk or on an object store.

Before a driver runs a cell it creates `cells/<id>/claim.json` (host, pid, a driver id, when)
with a write that succeeds only if no claim is there: of two drivers only one succeeds. While it
holds claims a thread refreshes them every `beat_every` seconds; a claim not refreshed for
`stale_after` seconds, or one whose owner is a dead process on this host, is stale, and another
driver takes it over with a write that only one driver can win. After the cell's record is
written the claim is removed, so a finished results dir holds no claim files.

The conditional writes come from the storage:
- a local or shared (NFS) disk: exclusive create (`O_EXCL`), a rename to take over (only one
  driver can move the stale file away), the file's mtime as its heartbeat;
- S3 and S3-compatible servers: conditional writes (`If-None-Match: *` to create, `If-Match` on the
  claim's ETag to refresh, take over or remove it), and the age of a claim by the server's own
  clock (its `Date` minus the claim's `Last-Modified`), so drivers' clocks need not agree.
A store that cannot write conditionally (another object store, or an S3-compatible server that
ignores the headers, found by a probe at start) cannot keep two drivers apart: there a driver
announces itself in `drivers/<id>.json` and refuses to start while another driver's is fresh.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from grid.errors import GridError
from grid.store import Store

log = logging.getLogger("clfgrid.claims")

CLAIM_FILE = "claim.json"
DRIVERS_DIR = "drivers"
ATTEMPTS = 5  # each S3 request of a claim, retried by botocore
# the owner of a claim file that is not JSON (being written on a disk; not written by this code)
UNKNOWN_OWNER = {"host": "?", "pid": -1, "driver": "?"}


@dataclass
class Seen:
    """A claim as read: its owner, seconds since its last refresh, and the version a conditional
    write must match (an ETag on S3; on a disk, the nonce in its body)."""

    owner: dict[str, Any]
    age: float
    version: Any


class ClaimFiles(Protocol):
    """The four conditional writes claims need, on one kind of storage."""

    def create(self, cell_id: str, body: dict[str, Any]) -> Any | None:
        """Write the claim if there is none; its version, or None when one exists."""

    def read(self, cell_id: str) -> Seen | None: ...

    def replace(self, cell_id: str, seen: Seen, body: dict[str, Any]) -> Any | None:
        """Overwrite the claim if it is still at `seen`'s version (a take-over, a heartbeat): the
        new version, or None when another driver wrote it meanwhile."""

    def remove(self, cell_id: str, version: Any) -> None:
        """Delete the claim if it is still at `version`."""


class DiskClaims:
    """Claims on a local or shared disk: exclusive create, rename, mtime. A claim's version is the
    nonce in its body (every claim written gets a new one)."""

    def __init__(self, store: Store):
        self.store = store

    def _path(self, cell_id: str) -> Path:
        return Path(self.store.cell_dir(cell_id)) / CLAIM_FILE

    def create(self, cell_id: str, body: dict[str, Any]) -> Any | None:
        path = self._path(cell_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        return body["nonce"]

    def read(self, cell_id: str) -> Seen | None:
        return _read_file(self._path(cell_id))

    def replace(self, cell_id: str, seen: Seen, body: dict[str, Any]) -> Any | None:
        path = self._path(cell_id)
        if body.get("driver") == seen.owner.get("driver"):  # a heartbeat: touch our own file
            now = _read_file(path)
            if now is None or now.version != seen.version:
                return None
            os.utime(path)
            return seen.version
        aside = path.with_name(f"{CLAIM_FILE}.stale-{body['driver']}")
        try:  # only one driver can move the file away ...
            path.rename(aside)
        except FileNotFoundError:
            return None
        moved = _read_file(aside)
        if moved is not None and moved.version != seen.version:  # ... and it was a fresh one: give it back
            os.rename(aside, path)
            return None
        aside.unlink(missing_ok=True)
        return self.create(cell_id, body)

    def remove(self, cell_id: str, version: Any) -> None:
        path = self._path(cell_id)
        seen = _read_file(path)
        if seen is not None and seen.version == version:
            path.unlink(missing_ok=True)


def _read_file(path: Path) -> Seen | None:
    try:
        stat = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:  # being written: it is someone's, and fresh
        owner = dict(UNKNOWN_OWNER)
    return Seen(owner, time.time() - stat.st_mtime, owner.get("nonce"))


class S3Claims:
    """Claims on S3 or an S3-compatible server, through boto3's conditional writes."""

    def __init__(self, store: Store):
        import boto3
        import botocore.config

        parts = urlsplit(store.uri)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = None
        if "endpoint_override" in options:
            endpoint = f"{options.get('scheme', 'https')}://{options['endpoint_override']}"
        self.bucket, _, prefix = store.root.partition("/")
        self.prefix = prefix.strip("/")
        # boto3 reads the credentials and AWS_ENDPOINT_URL from the environment, as pyarrow does;
        # a throttled or failed request is retried by botocore's standard mode, each retry logged
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name=options.get("region"),
                               config=botocore.config.Config(retries={"mode": "standard", "max_attempts": ATTEMPTS}))
        self.s3.meta.events.register("needs-retry.s3", _log_retry)

    def key(self, cell_id: str) -> str:
        return posixpath.join(self.prefix, "cells", cell_id, CLAIM_FILE)

    def _put(self, key: str, body: dict[str, Any], **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(body).encode(), **condition)["ETag"]
        except ClientError as exc:
            if _error_code(exc) in PRECONDITION_FAILED:
                # also when a retry of our own write found it done: the caller reads the claim back
                return None
            raise

    def create(self, cell_id: str, body: dict[str, Any]) -> Any | None:
        etag = self._put(self.key(cell_id), body, IfNoneMatch="*")
        return etag if etag is not None else self._ours(cell_id, body)

    def read(self, cell_id: str) -> Seen | None:
        from botocore.exceptions import ClientError

        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self.key(cell_id))
        except ClientError as exc:
            if _error_code(exc) in MISSING:
                return None
            raise
        text = got["Body"].read()
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:  # not a claim this code wrote: someone's, of unknown age
            owner = dict(UNKNOWN_OWNER)
        now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        return Seen(owner, (now - got["LastModified"]).total_seconds(), got["ETag"])

    def replace(self, cell_id: str, seen: Seen, body: dict[str, Any]) -> Any | None:
        etag = self._put(self.key(cell_id), body, IfMatch=seen.version)
        return etag if etag is not None else self._ours(cell_id, body)

    def remove(self, cell_id: str, version: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key(cell_id), IfMatch=version)
        except ClientError as exc:
            if _error_code(exc) not in PRECONDITION_FAILED | MISSING:
                raise

    def _ours(self, cell_id: str, body: dict[str, Any]) -> Any | None:
        """After a refused write: the claim's version if it is the very body we wrote (a retry
        whose first attempt had landed), else None."""
        seen = self.read(cell_id)
        return seen.version if seen is not None and seen.owner.get("nonce") == body["nonce"] else None

    def conditional(self) -> bool:
        """Does the server honour `If-None-Match` (some S3-compatible servers ignore it)? Probed by
        creating one object twice under the results prefix."""
        key = posixpath.join(self.prefix, DRIVERS_DIR, f"probe-{uuid.uuid4().hex}")
        try:
            first = self._put(key, {}, IfNoneMatch="*")
            second = self._put(key, {}, IfNoneMatch="*")
        finally:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        return first is not None and second is None


def _log_retry(attempts: int, operation: Any = None, response: Any = None, caught_exception: Any = None,
               **_: Any) -> None:
    """botocore's needs-retry event: say why a claim request failed (a 5xx, SlowDown, a reset or
    timed-out connection) before botocore retries it. Its own retry decision is left to it."""
    if caught_exception is not None:
        reason = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None and (response[0].status_code >= 500 or response[0].status_code == 429):
        reason = f"HTTP {response[0].status_code} {response[1].get('Error', {}).get('Code', '')}".strip()
    else:
        return
    then = "giving up" if attempts >= ATTEMPTS else "retrying"
    log.warning("S3 %s: attempt %d of %d failed (%s); %s", getattr(operation, "name", "request"), attempts,
                ATTEMPTS, reason, then)


# A conditional write refused (409 ConditionalRequestConflict: a concurrent conditional write to
# the same key won), and an object that is not there.
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
MISSING = frozenset({"NoSuchKey", "404"})


def _error_code(exc: Exception) -> str | None:
    """The S3 error code of a botocore ClientError."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code")


class Claims:
    """This driver's claims on a results dir (see the module docstring)."""

    def __init__(self, store: Store, stale_after: float = 60.0, beat_every: float = 10.0):
        self.store = store
        self.stale_after, self.beat_every = stale_after, beat_every
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "driver": uuid.uuid4().hex[:12]}
        self.files: ClaimFiles | None = _claim_files(store)
        self.held: dict[str, Any] = {}  # cell id -> the version of our claim
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._alone: str | None = None  # our drivers/ file where claims are not possible
        if self.files is None:
            self._alone = announce_alone(store, self.me, stale_after)
        self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
        self._beat.start()

    @property
    def enabled(self) -> bool:
        return self.files is not None

    def _body(self) -> dict[str, Any]:
        return {**self.me, "since": time.time(), "nonce": uuid.uuid4().hex}

    def claim(self, cell_id: str) -> bool:
        """True when this driver now holds the cell (always, without claims); False when another
        live driver does."""
        if self.files is None:
            return True
        for _ in range(2):  # a stale claim is taken over once
            version = self.files.create(cell_id, self._body())
            if version is None:
                seen = self.files.read(cell_id)
                if seen is None:  # released meanwhile
                    continue
                if not self._stale(seen):
                    return False
                version = self.files.replace(cell_id, seen, self._body())
                if version is None:  # another driver took it over first
                    return False
                log.warning("taking over %s from %s:%s (stale)", cell_id, seen.owner.get("host"),
                            seen.owner.get("pid"))
            with self._lock:
                self.held[cell_id] = version
            return True
        return False

    def _stale(self, seen: Seen) -> bool:
        if seen.age > self.stale_after:
            return True
        owner = seen.owner
        return owner.get("host") == self.me["host"] and not _alive(int(owner.get("pid", -1)))

    def release(self, cell_id: str) -> None:
        if self.files is None:
            return
        with self._lock:
            version = self.held.pop(cell_id, None)
        if version is not None:
            self.files.remove(cell_id, version)

    def holder(self, cell_id: str) -> dict[str, Any] | None:
        """Another live driver's claim on the cell, or None."""
        if self.files is None:
            return None
        seen = self.files.read(cell_id)
        if seen is None or seen.owner.get("driver") == self.me["driver"] or self._stale(seen):
            return None
        return seen.owner

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat_every):
            if self._alone is not None:
                try:
                    _write_json(self.store, self._alone, self._body())
                except OSError as exc:  # retried at the next beat
                    log.warning("could not refresh %s (%s)", self._alone, exc)
                continue
            with self._lock:
                held = dict(self.held)
            for cell_id, version in held.items():
                try:
                    new = self.files.replace(cell_id, Seen(self.me, 0.0, version), self._body())
                except Exception as exc:  # noqa: BLE001 - a failed refresh is retried at the next beat
                    log.warning("could not refresh the claim on %s (%s); retrying in %.0f s", cell_id, exc,
                                self.beat_every)
                    continue
                with self._lock:
                    if cell_id not in self.held:  # released meanwhile
                        continue
                    if new is None:
                        log.warning("the claim on %s was taken over by another driver (this one was seen as "
                                    "stale: no refresh for %.0f s)", cell_id, self.stale_after)
                        del self.held[cell_id]
                    else:
                        self.held[cell_id] = new

    def close(self) -> None:
        """Stop the heartbeat and give back every claim still held (a cell that was interrupted)."""
        self._stop.set()
        for cell_id in list(self.held):
            self.release(cell_id)
        if self._alone is not None:
            try:
                self.store.fs.delete_file(self._alone)
            except OSError:
                pass


def _claim_files(store: Store) -> ClaimFiles | None:
    """The claims this store can keep, or None when it cannot write conditionally."""
    if store.is_local:
        return DiskClaims(store)
    if store.fs.type_name == "s3":
        files = S3Claims(store)
        if files.conditional():
            return files
        log.warning("results dir %s: the S3 server ignores conditional writes (If-None-Match), so cells "
                    "cannot be claimed", store.uri)
    return None


def announce_alone(store: Store, me: dict[str, Any], stale_after: float) -> str:
    """On a store without conditional writes: announce this driver (`drivers/<id>.json`,
    refreshed by the heartbeat), then refuse to go on beside a live one announced before it or in
    the same second. Ages are read by the store's clock (the other announcements' mtimes against
    our own's, just written), so the drivers' clocks need not agree; two drivers that start in
    the same second both refuse (safe: neither runs a cell twice, and each says why)."""
    import pyarrow.fs as pafs

    folder = posixpath.join(store.root, DRIVERS_DIR)
    path = posixpath.join(folder, f"{me['driver']}.json")
    try:
        store.fs.create_dir(folder, recursive=True)
        _write_json(store, path, {**me, "since": time.time()})
        now = store.fs.get_file_info(path).mtime
    except OSError as exc:
        raise GridError(f"results dir {store.uri}: cannot write {path}: {exc}") from None
    for info in store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if info.path == path or not info.base_name.endswith(".json") or info.mtime is None:
            continue
        age = (now - info.mtime).total_seconds()
        if 0 <= age < stale_after:  # announced before us, or in the same second of the store's clock
            try:
                with store.fs.open_input_stream(info.path) as fh:
                    other = json.loads(fh.read())
            except (OSError, json.JSONDecodeError):
                other = {}
            store.fs.delete_file(path)
            raise GridError(
                f"results dir {store.uri}: another driver ({other.get('host', '?')}, pid {other.get('pid', '?')}) "
                f"is running on it (seen {age:.0f} s ago), and this store cannot write conditionally, so two "
                "drivers cannot be kept apart: wait for it to finish, or give this run its own --results prefix")
    log.warning("results dir %s cannot write conditionally: cells are not claimed, and a second driver "
                "on it will be refused while this one runs", store.uri)
    return path


def _write_json(store: Store, path: str, body: dict[str, Any]) -> None:
    """A small JSON object, written whole (one object on an object store)."""
    with store.fs.open_output_stream(path) as out:
        out.write(json.dumps(body).encode())


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
