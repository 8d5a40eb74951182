"""Claims: which driver is running which cell, so that two drivers on one results dir never run
the same cell at the same time (a user who starts a second driver to go faster, or starts one by
mistake).

Before a driver runs a cell it creates `cells/<id>/claim.json` (host, pid, a driver id, when)
with an exclusive create: of two drivers only one succeeds. While it holds claims a thread
touches them every `beat_every` seconds; a claim not touched for `stale_after` seconds, or one
whose owner is a dead process on this host, is stale, and another driver takes it over (it first
renames the stale file away, which only one driver can do, then claims). After the cell's record
is written the claim is removed, so a finished results dir holds no claim files.

Claims need a filesystem with exclusive create and atomic rename: a local or shared (NFS) disk.
On an object store they are not available, and the driver says so once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from grid.store import Store

log = logging.getLogger("clfgrid.claims")

CLAIM_FILE = "claim.json"


class Claims:
    def __init__(self, store: Store, stale_after: float = 60.0, beat_every: float = 10.0):
        self.store = store
        self.enabled = store.is_local
        if not self.enabled:
            log.warning("results dir %s is not on a local or shared disk: cells are not claimed, so two "
                        "drivers on it could run the same cell", store.uri)
        self.stale_after, self.beat_every = stale_after, beat_every
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "driver": uuid.uuid4().hex[:12]}
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
        if self.enabled:
            self._beat.start()

    def _path(self, cell_id: str) -> Path:
        return Path(self.store.cell_dir(cell_id)) / CLAIM_FILE

    def claim(self, cell_id: str) -> bool:
        """True when this driver now holds the cell (always, without claims); False when another
        live driver does."""
        if not self.enabled:
            return True
        path = self._path(cell_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a stale claim is taken over once
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_stale(path):
                    return False
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({**self.me, "since": time.time()}, fh)
            with self._lock:
                self.held.add(cell_id)
            return True
        return False

    def _take_over_if_stale(self, path: Path) -> bool:
        owner = read_claim(path)
        if owner is None:  # released meanwhile
            return True
        if not self._stale(path, owner):
            return False
        try:  # only one driver can move the stale file away
            path.rename(path.with_name(f"{CLAIM_FILE}.stale-{self.me['driver']}"))
        except FileNotFoundError:
            return False
        path.with_name(f"{CLAIM_FILE}.stale-{self.me['driver']}").unlink(missing_ok=True)
        log.warning("taking over %s from %s:%s (stale)", path.parent.name, owner.get("host"), owner.get("pid"))
        return True

    def _stale(self, path: Path, owner: dict[str, Any]) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > self.stale_after:
            return True
        return owner.get("host") == self.me["host"] and not _alive(int(owner.get("pid", -1)))

    def release(self, cell_id: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.held.discard(cell_id)
        path = self._path(cell_id)
        owner = read_claim(path)
        if owner is not None and owner.get("driver") == self.me["driver"]:
            path.unlink(missing_ok=True)

    def holder(self, cell_id: str) -> dict[str, Any] | None:
        """Another live driver's claim on the cell, or None."""
        if not self.enabled:
            return None
        path = self._path(cell_id)
        owner = read_claim(path)
        if owner is None or owner.get("driver") == self.me["driver"] or self._stale(path, owner):
            return None
        return owner

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat_every):
            with self._lock:
                held = list(self.held)
            for cell_id in held:
                try:
                    os.utime(self._path(cell_id))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Stop the heartbeat and give back every claim still held (a cell that was interrupted)."""
        self._stop.set()
        for cell_id in list(self.held):
            self.release(cell_id)


def read_claim(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # being written: it is someone's, and fresh
        return {"host": "?", "pid": -1, "driver": "?"}


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
