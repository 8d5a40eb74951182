"""A persistent cache of API answers, so a repeated or resumed grid pays for no request twice.

One SQLite file (`requests.sqlite`) in a folder: `options.cache_dir` of the model, else
`$CLFGRID_CACHE/requests` (`~/.cache/clfgrid/requests` by default). The key is a SHA-256 over
the model id, its revision, the endpoint and the full request body (messages, decoding
parameters, response format): any change to any of them is a new request. Only successful
answers are stored. Nothing secret is ever part of a request body or a key: API keys travel in
headers, which are not stored.

Safe for several threads and processes (WAL journal, one connection per thread, short
transactions); a write that loses a race to an identical answer keeps the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

FILE_NAME = "requests.sqlite"


def default_cache_dir(options: dict[str, Any] | None = None) -> Path:
    """options["cache_dir"], else $CLFGRID_CACHE/requests, else ~/.cache/clfgrid/requests."""
    if options and options.get("cache_dir"):
        return Path(options["cache_dir"]).expanduser()
    root = os.environ.get("CLFGRID_CACHE") or str(Path.home() / ".cache" / "clfgrid")
    return Path(root) / "requests"


def request_key(model: str, revision: str | None, api_base: str | None, request: dict[str, Any]) -> str:
    """The identity of one request: model, revision, endpoint and the full request body."""
    blob = json.dumps({"model": model, "revision": revision, "api_base": api_base, "request": request},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / FILE_NAME
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, "
                         "answer TEXT NOT NULL, created REAL NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, answer: dict[str, Any]) -> None:
        self._conn().execute("INSERT OR IGNORE INTO answers (key, model, answer, created) VALUES (?, ?, ?, ?)",
                             (key, model, json.dumps(answer, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0]
