"""A loopback HTTP proxy that injects faults, for testing API clients against a real server.

    proxy = FaultProxy(upstream="http://127.0.0.1:8000", fault_rate=0.3, seed=0).start()
    ... point the client at proxy.url ...
    proxy.stop()

Each request is, with probability `fault_rate` (a seeded RNG, so a run is repeatable), answered
by a fault instead of the upstream: a 429 (with Retry-After: 0), a 500, a 503 (S3's SlowDown), a
reset (the connection closed with no answer), or a hang of `hang_s` seconds and a dropped
connection (the client times out first). `faults` picks among them; `errors` says how an error's
body is written, as an OpenAI-style API (`json`) or S3 (`s3`: an XML <Error> with its code).
No request is faulted more than `max_in_a_row` times running (per method and path), so a
client that retries more often than that always gets through; `fail_paths` are the exception:
every request whose path holds one of them is answered 503, a fault no retry outlasts. Every
other request is forwarded (GET, HEAD, PUT, POST, DELETE) and the upstream's answer
returned; `drop_headers` are removed from requests on the way, which makes a server that ignores
them (an S3-compatible server without conditional writes, for `If-None-Match`). Counters:
`requests` (all that arrived), `forwarded`, `injected` (per fault kind), `injected_by` (per
client, from its User-Agent: `boto3`, `aws-sdk-cpp` for pyarrow, or `other`), and `auth_headers`
(distinct Authorization values seen, so a test can check a key was sent without printing it).
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
S3_FAULTS = ("500", "503", "reset", "timeout")
S3_ERRORS = {"429": ("SlowDown", "Please reduce your request rate."),
             "500": ("InternalError", "We encountered an internal error. Please try again."),
             "503": ("SlowDown", "Please reduce your request rate.")}


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0,
                 faults: tuple[str, ...] = FAULTS, hang_s: float = 3.0, port: int = 0, errors: str = "json",
                 drop_headers: tuple[str, ...] = (), max_in_a_row: int | None = None,
                 fail_paths: tuple[str, ...] = ()):
        parts = urlsplit(upstream)
        assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "loopback upstreams only"
        self.upstream = (parts.hostname, parts.port or 80)
        self.fault_rate = fault_rate
        self.faults = faults
        self.hang_s = hang_s
        self.errors = errors
        self.drop_headers = {h.lower() for h in drop_headers}
        self.max_in_a_row = max_in_a_row
        self.fail_paths = fail_paths
        self.in_a_row: Counter[str] = Counter()  # method and path -> faults running
        self.injected_by: Counter[str] = Counter()
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

    def _decide(self, key: str, agent: str) -> str | None:
        client = "boto3" if agent.startswith("Boto3") else "aws-sdk-cpp" if agent.startswith("aws-sdk-cpp") \
            else "other"
        with self.lock:
            self.requests += 1
            if any(p in key for p in self.fail_paths):
                self.injected["outlasting 503"] += 1
                self.injected_by[client] += 1
                return "503"
            capped = self.max_in_a_row is not None and self.in_a_row[key] >= self.max_in_a_row
            if not capped and self.rng.random() < self.fault_rate:
                fault = self.rng.choice(self.faults)
                self.injected[fault] += 1
                self.injected_by[client] += 1
                self.in_a_row[key] += 1
                return fault
            self.in_a_row.pop(key, None)
            self.forwarded += 1
            return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _relay(self, method: str) -> None:
                body = self._body()
                auth = self.headers.get("Authorization")
                if auth:
                    with proxy.lock:
                        proxy.auth_headers.add(auth)
                fault = proxy._decide(f"{method} {self.path.split('?')[0]}", self.headers.get("User-Agent", ""))
                if fault in ("timeout", "reset"):
                    if fault == "timeout":
                        time.sleep(proxy.hang_s)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                if fault in ("429", "500", "503"):
                    self._error(int(fault), method)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=600)
                drop = {"host", "connection", "accept-encoding", "transfer-encoding", "expect"} | proxy.drop_headers
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD's answer has no body, but its length is the object's
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if method == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes | None:
                """The request's body, also when sent in chunks (the S3 client's uploads): it is
                forwarded whole, with its length."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else None
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def _error(self, status: int, method: str) -> None:
                if proxy.errors == "s3":
                    code, message = S3_ERRORS[str(status)]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    kind = "application/xml"
                else:
                    payload = (b'{"error": {"message": "injected fault", "type": "server_error", "code": '
                               + str(status).encode() + b"}}")
                    kind = "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)

            def do_POST(self):
                self._relay("POST")

            def do_GET(self):
                self._relay("GET")

            def do_PUT(self):
                self._relay("PUT")

            def do_HEAD(self):
                self._relay("HEAD")

            def do_DELETE(self):
                self._relay("DELETE")

        return Handler
