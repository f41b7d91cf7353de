"""A throwaway Redis for the tests: Debian's ``redis-server`` on 127.0.0.1 at a free port.

No persistence (``--save '' --appendonly no``), its directory a temporary one. When the
binary is missing the tests are skipped, except under ``CI=true``, where that is a failure:
CI must exercise Redis (``.ci/run`` installs it). :meth:`RedisServer.kill` SIGKILLs it and
:meth:`RedisServer.start` starts it again, empty, on the same port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ("RedisServer", "redis_fixture", "redis_server")

START_TIMEOUT = 10.0  # s for the server to answer PING


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"redis-server is required in CI: {reason}", pytrace=False)
    pytest.skip(f"Redis unavailable: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (empty) and wait, a bounded time, for it to answer PING."""
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "yes"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.proc.poll() is not None:
                _unavailable(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                self.kill()
                _unavailable(f"redis-server did not answer PING within {START_TIMEOUT:g} s")
            time.sleep(0.005)  # polling PING, bounded by the deadline

    def kill(self) -> None:
        """SIGKILL: every key is lost (nothing is persisted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server not found on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="sluice-redis-"))
    server = RedisServer(binary, tmp)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(name="redis")
def redis_fixture() -> Iterator[RedisServer]:
    """A fresh server per test (it starts in milliseconds); import into a test module."""
    with redis_server() as server:
        yield server
