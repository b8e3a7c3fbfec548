"""The PostgreSQL and Redis servers the suite runs against, and a database per chatgate server.

Each chatgate server on PostgreSQL gets a database of its own (`CREATE DATABASE` from the admin
database, dropped afterwards), so parallel workers and tests never see each other's rows.
The servers are the ones of `CHATGATE_TEST_POSTGRES_URL` and `CHATGATE_TEST_REDIS_URL`
(default: the local ones on 127.0.0.1). When one is missing the tests that need it fail under CI
(`CI` set) and are skipped, saying why, elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

POSTGRES_URL = os.environ.get("CHATGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHATGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require(service: str, problem: str | None) -> None:
    """Fail (under CI) or skip (elsewhere) when `problem` says the service is missing."""
    if problem is None:
        return
    message = f"{service} is not available: {problem}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run these tests: start the service)", pytrace=False)
    pytest.skip(message)


def _reachable(url: str, default_port: int) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1.0):
            return None
    except OSError as exc:
        return f"{url}: {exc}"


def postgres_problem() -> str | None:
    problem = _reachable(POSTGRES_URL, 5432)
    if problem is None:
        try:
            sql(POSTGRES_URL, "SELECT 1")
        except (OSError, asyncpg.PostgresError) as exc:
            problem = f"{POSTGRES_URL}: {exc}"
    return problem


def redis_problem() -> str | None:
    return _reachable(REDIS_URL, 6379)


def sql(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement (or several without arguments) on `url`; the rows of a query."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            if args or statement.lstrip().upper().startswith(("SELECT", "WITH")):
                return list(await conn.fetch(statement, *args))
            await conn.execute(statement)
            return []
        finally:
            await conn.close()

    return asyncio.run(run())


def database_url(name: str) -> str:
    """The URL of database `name` on the test server."""
    parts = urlsplit(POSTGRES_URL)
    return parts._replace(path="/" + name).geturl()


def create_database(prefix: str = "chatgate_test") -> str:
    """A new, empty database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    sql(POSTGRES_URL, f'CREATE DATABASE "{name}"')
    return database_url(name)


def drop_database(url: str) -> None:
    """Drop a database `create_database` made, whoever is still connected to it."""
    name = urlsplit(url).path.lstrip("/")
    sql(POSTGRES_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary directory, on a free port),
    which the test may stop, restart or freeze without touching the shared one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="chatgate-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    @staticmethod
    def binaries() -> Path | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(found[-1]).parent if found else None

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        bindir = self.binaries()
        assert bindir is not None
        command = [str(bindir / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def init(self) -> PrivatePostgres:
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def _pids(self) -> list[int]:
        """The postmaster and its children (the server processes this object started)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *(int(pid) for pid in children)]

    def freeze(self) -> None:
        """Stop every process of this server (SIGSTOP): it accepts TCP connections, answers nothing."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            self.thaw()
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
