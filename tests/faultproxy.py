"""A loopback HTTP proxy that injects faults, for testing API clients against a real server.

    proxy = FaultProxy(upstream="http://127.0.0.1:8000", fault_rate=0.3, seed=0).start()
    ... point the client at proxy.url ...
    proxy.stop()

Each request is, with probability `fault_rate` (a seeded RNG, so a run is repeatable), answered
by a fault instead of the upstream: a 429 (with Retry-After: 0), a 500, or a hang of `hang_s`
seconds and a dropped connection (the client times out first). `faults` picks among them. Every
other request is forwarded as is and the upstream's answer returned. Counters: `requests`
(all that arrived), `forwarded`, `injected` (per fault kind), and `auth_headers` (distinct
Authorization values seen, so a test can check a key was sent without printing it).
Only loopback addresses are used.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("429", "500", "timeout")


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0,
                 faults: tuple[str, ...] = FAULTS, hang_s: float = 3.0, port: int = 0):
        parts = urlsplit(upstream)
        assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "loopback upstreams only"
        self.upstream = (parts.hostname, parts.port or 80)
        self.fault_rate = fault_rate
        self.faults = faults
        self.hang_s = hang_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.forwarded = 0
        self.injected: Counter[str] = Counter()
        self.auth_headers: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = self.forwarded = 0
            self.injected.clear()

    def _decide(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.rng.random() < self.fault_rate:
                fault = self.rng.choice(self.faults)
                self.injected[fault] += 1
                return fault
            self.forwarded += 1
            return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _relay(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                auth = self.headers.get("Authorization")
                if auth:
                    with proxy.lock:
                        proxy.auth_headers.add(auth)
                fault = proxy._decide()
                if fault == "timeout":
                    time.sleep(proxy.hang_s)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                if fault in ("429", "500"):
                    payload = (b'{"error": {"message": "injected fault", "type": "server_error", "code": '
                               + fault.encode() + b"}}")
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if fault == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=600)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "accept-encoding")}
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def do_POST(self):
                self._relay("POST")

            def do_GET(self):
                self._relay("GET")

        return Handler
