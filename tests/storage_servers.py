"""Object-storage servers on loopback for the tests: moto's S3 and a plain HTTP server over a folder."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from processes import free_port, wait_until

BUCKET = "data"
# moto accepts any key; these are what the tests' processes take from the environment.
KEY_ID, SECRET = "testing-key-id", "testing-secret-value"


def s3_env(endpoint: str, key_id: str = KEY_ID, secret: str = SECRET) -> dict[str, str]:
    """The environment s3fs takes its endpoint and credentials from."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


class S3:
    """moto's S3 server in a thread of this process; its objects outlive a stop and start."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.running = False

    def start(self) -> None:
        self._server.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file under ``folder`` as ``s3://BUCKET/prefix/...``; returns that URL."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3]:
    server = S3()
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The module's S3 server, running, with its endpoint and credentials in the environment
    (which the server's spawned workers inherit)."""
    if not s3_server.running:
        s3_server.start()
    for name, value in s3_env(s3_server.endpoint).items():
        monkeypatch.setenv(name, value)
    return s3_server


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``cut`` (set on the server) makes that many GETs of files stop halfway."""

    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet

    def copyfile(self, source: Any, outputfile: Any) -> None:
        with self.server.lock:
            cut = self.server.cut > 0
            self.server.cut -= cut
            self.server.gets += 1
        if not cut:
            shutil.copyfileobj(source, outputfile)
            return
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.close_connection = True  # the rest never comes: as if the server died mid-download


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    cut = 0
    gets = 0
    lock = threading.Lock()


class HTTP:
    """A plain HTTP server over ``root`` in a thread, stoppable and restartable on its port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handler = functools.partial(_Handler, directory=str(self.root))
        self._server = _HTTPServer(("127.0.0.1", self.port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = self._thread = None

    def cut(self, n: int) -> None:
        """The next ``n`` file downloads stop halfway, the connection closed."""
        assert self._server is not None
        with self._server.lock:
            self._server.cut = n

    @property
    def gets(self) -> int:
        return self._server.gets if self._server is not None else 0


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HTTP]:
    root = tmp_path / "www"
    root.mkdir()
    server = HTTP(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class AuthS3:
    """A moto S3 server in its own process that checks credentials (none of the tests' are valid)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> None:
        import socket

        def up() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        assert wait_until(up, timeout=30), "moto server did not start"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def auth_s3() -> Iterator[AuthS3]:
    server = AuthS3()
    try:
        server.wait()
        yield server
    finally:
        server.close()
