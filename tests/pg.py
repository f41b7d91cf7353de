"""A throwaway PostgreSQL server for the tests: initdb + pg_ctl in a temporary directory.

The server listens on 127.0.0.1 at a free port (password authentication) and on
a unix socket inside the directory; it runs as ``nobody`` when the tests run as
root (initdb refuses root). When the binaries are missing the tests are skipped,
except under ``CI=true``, where that is a failure: CI must exercise PostgreSQL
(``.ci/run`` installs it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

__all__ = ("PgServer", "find_pg_bin", "pg_fixture", "pg_server")

PASSWORD = "s3cret-Pw-for-tests"


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    sockdir: Path

    def dsn(self, **override: object) -> str:
        params: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
            "connect_timeout": 5,
        }
        params.update(override)
        return " ".join(f"{k}={_quote(str(v))}" for k, v in params.items())

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn(), autocommit=True)

    def execute(self, *statements: str) -> None:
        with self.connect() as conn:
            for stmt in statements:
                conn.execute(stmt.encode())


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary on PATH, else the newest under /usr/lib/postgresql."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@contextmanager
def pg_server(dbname: str = "sluice") -> Iterator[PgServer]:
    initdb, pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("initdb/pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin")
    tmp = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(tmp, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data, sock, pwfile = tmp / "data", tmp / "sock", tmp / "pwfile"
    sock.mkdir()
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        for p in (sock, pwfile):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], cwd=tmp, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = (tmp / "server.log").read_text() if (tmp / "server.log").exists() else ""
            _unavailable(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip()} {log[-2000:]}")

    started = False
    try:
        run(initdb, "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
            "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
        port = _free_port()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sock} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        run(pg_ctl, "-D", str(data), "-l", str(tmp / "server.log"), "-w", "-t", "60", "-o", opts, "start")
        started = True
        server = PgServer("127.0.0.1", port, "postgres", PASSWORD, "postgres", sock)
        server.execute(f"CREATE DATABASE {dbname}")
        server.dbname = dbname
        yield server
    finally:
        if started:
            subprocess.run(
                [*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                cwd=tmp,
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session", name="pg")
def pg_fixture() -> Iterator[PgServer]:
    """Session-wide server; import this into a test module and ask for ``pg``."""
    with pg_server() as server:
        yield server
