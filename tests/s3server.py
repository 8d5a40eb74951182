"""A real S3-compatible server on loopback for the object-store tests: moto in server mode (its
own HTTP server; pyarrow's S3 client talks to it over the wire like to AWS).

Clients find it the way they find a real S3-compatible endpoint: AWS_ENDPOINT_URL and dummy
credentials in the environment (`env`), never in a URI or a file.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass


@dataclass
class S3Server:
    port: int
    bucket: str
    _server: object

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the server (its children inherit it)."""
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def stop(self) -> None:
        self._server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(bucket: str = "clfgrid-test") -> S3Server:
    """Start moto's server on a free loopback port and create `bucket` (through pyarrow, with the
    server's address from the environment the caller sets with `env`)."""
    import os

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = S3Server(free_port(), bucket, None)
    server._server = ThreadedMotoServer(ip_address="127.0.0.1", port=server.port, verbose=False)
    server._server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
        fs.create_dir(bucket)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return server


def s3_files(uri: str) -> list[str]:
    """Every file under `uri`, as paths relative to it."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)
