"""The temporary local Prefect API of a command run without PREFECT_API_URL (`evomerge evolve`).

Prefect's own ephemeral mode starts the API server as a plain child process: when the command is
killed with SIGKILL the server outlives it (an orphan, still running hours later), it logs a
telemetry ERROR on a machine without internet access, and it gives the server 20 s to start.
Here the command owns the server instead:

- the server process asks the kernel for SIGKILL when its parent dies (Linux
  `prctl(PR_SET_PDEATHSIG)`), and runs in its own session so a terminal's Ctrl-C reaches only the
  command, which then stops the server by PID after the flow has recorded its final state;
- telemetry is off (`PREFECT_SERVER_ANALYTICS_ENABLED=false`), so an offline run logs no ERROR;
- it is started at the beginning of the command and becomes ready while the command validates the
  config and loads data (`start_server()` ... `server.wait_ready()`), so its start-up mostly
  overlaps work the command does anyway;
- the start-up limit is `EVOMERGE_PREFECT_START_TIMEOUT_S` (default 300 s); past it the command
  stops with one `error:` line naming the setting.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from evomerge_core.errors import EvomergeError

START_TIMEOUT_ENV = "EVOMERGE_PREFECT_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 300.0
_PR_SET_PDEATHSIG = 1


class ServerStartError(EvomergeError):
    """The temporary Prefect API did not start (exit code 1)."""


def start_timeout_s() -> float:
    """The start-up limit in seconds (`EVOMERGE_PREFECT_START_TIMEOUT_S`)."""
    raw = os.environ.get(START_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_START_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ServerStartError(f"{START_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set it to e.g. 300")
    return value


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the parent dies (kept across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A Prefect API server process on 127.0.0.1 owned by this process."""

    def __init__(self) -> None:
        import prefect

        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = tempfile.NamedTemporaryFile(prefix="evomerge-prefect-server-", suffix=".log", delete=False)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        args = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]
        parent = os.getpid()
        preexec = (lambda: _die_with_parent(parent)) if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=preexec)
        self.started = time.monotonic()
        self.keep_log = False  # kept when the start failed (the error names it)

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until `/api/health` answers; returns the seconds since the start."""
        import httpx

        limit = start_timeout_s() if timeout_s is None else timeout_s
        with httpx.Client(timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    self.keep_log = True
                    raise ServerStartError(f"the temporary Prefect API server exited with code {self.proc.returncode} "
                                           f"while starting (its log: {self.log.name}); or start a server "
                                           "(`prefect server start`) and set PREFECT_API_URL")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return time.monotonic() - self.started
                if time.monotonic() - self.started > limit:
                    self.keep_log = True
                    raise ServerStartError(f"the temporary Prefect API server did not start within {limit:.0f} s (a busy "
                                           f"machine?; its log: {self.log.name}); raise {START_TIMEOUT_ENV} (now {limit:.0f}), or start a server "
                                           "(`prefect server start`) and set PREFECT_API_URL")
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server by its PID (TERM, then KILL after 10 s); its log is removed unless the start failed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        if not self.keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log.name)


@contextlib.contextmanager
def local_api() -> Iterator[LocalServer | None]:
    """With PREFECT_API_URL unset: a `LocalServer` (call `wait_ready()` before the first API use),
    stopped on exit; with it set: None (the command uses that API)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield None
        return
    server = LocalServer()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def using(server: LocalServer | None) -> Iterator[None]:
    """Wait for `server` and point Prefect (this process and its children) at it."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server.wait_ready()
    os.environ["PREFECT_API_URL"] = server.api_url  # Dask workers and other children inherit it
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                _drain()
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _drain(timeout_s: float = 10.0) -> None:
    """Send the logs and events still queued in this process while the server still runs (else
    Prefect's exit hooks retry against a stopped server and print `Error logging to API`)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)
