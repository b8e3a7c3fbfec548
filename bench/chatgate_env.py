"""chatgate under test: a throw-away data directory, the bench models registered, one process
(or `--workers N`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from bench.report import PG_LABEL

# The backends a chatgate scenario runs on (`--backends`): the embedded default, and the
# production configuration the README recommends. The label goes after the path's name.
BACKENDS = {"sqlite": "", "postgresql": PG_LABEL}
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


class ChatgateUnavailable(RuntimeError):
    """chatgate cannot be set up for the bench (not built yet, or a command failed)."""


@dataclass(frozen=True)
class BenchModels:
    fast: str  # model id (UUID) routed to the upstream's fast stream
    slow: str  # model id routed to the upstream's hold stream


def env(data_dir: Path, port: int, database_url: str | None = None) -> dict[str, str]:
    """The environment of every chatgate command of the bench: a SQLite file in `data_dir`,
    or the PostgreSQL database given, with Redis (under a prefix of the run's own)."""
    extra = {}
    if database_url is not None:
        extra = {"CHATGATE_REDIS_URL": REDIS_URL, "CHATGATE_REDIS_PREFIX": f"bench-{data_dir.name}:"}
    return {
        **extra,
        "CHATGATE_DATABASE_URL": database_url or f"sqlite:///{data_dir}/bench.db",
        "CHATGATE_DATA_DIR": str(data_dir),
        "CHATGATE_PORT": str(port),
        "CHATGATE_ALLOW_PRIVATE_UPSTREAMS": "true",
        "CHATGATE_LOG_LEVEL": "warning",
    }


def _cli(args: list[str], environ: Mapping[str, str], cwd: Path) -> str:
    full = [sys.executable, "-m", "chatgate", *args]
    try:
        proc = subprocess.run(full, env=dict(environ), cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ChatgateUnavailable(f"`chatgate {' '.join(args)}`: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ChatgateUnavailable(f"`chatgate {' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return proc.stdout


def check_cli(environ: Mapping[str, str], cwd: Path) -> None:
    """Raise ChatgateUnavailable unless `python -m chatgate serve` exists."""
    _cli(["serve", "--help"], environ, cwd)


BENCH_USER = "bench"


def _last_line(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def add_model(environ: Mapping[str, str], cwd: Path, name: str, base_url: str) -> str:
    """Register an upstream model owned by the bench user; return its id (the last line printed)."""
    out = _cli(
        ["models", "add", "--name", name, "--base-url", base_url, "--model-id", "bench-model",
         "--api-key", "sk-bench-0000", "--user", BENCH_USER],
        environ,
        cwd,
    )  # fmt: skip
    try:
        return str(uuid.UUID(_last_line(out)))
    except ValueError as exc:
        raise ChatgateUnavailable(f"`models add` printed no model id: {out!r}") from exc


def register(environ: Mapping[str, str], cwd: Path, upstream_port: int) -> BenchModels:
    base = f"http://127.0.0.1:{upstream_port}"
    # The CLI's user commands need the database to exist: they no longer create it.
    _cli(["db", "upgrade"], environ, cwd)
    _cli(["users", "add", BENCH_USER], environ, cwd)
    return BenchModels(
        fast=add_model(environ, cwd, "bench", base + "/v1"),
        slow=add_model(environ, cwd, "bench-slow", base + "/slow/v1"),
    )


def chatgate_headers(environ: Mapping[str, str], cwd: Path | None = None) -> dict[str, str]:
    """The headers a bench chat request needs: a bearer token of the bench user (made by `register`)."""
    token = _last_line(_cli(["tokens", "create", "--user", BENCH_USER], environ, cwd or Path.cwd()))
    if not token:
        raise ChatgateUnavailable("`tokens create` printed no token")
    return {"authorization": f"Bearer {token}"}


def serve_command(workers: int = 1) -> list[str]:
    """`chatgate serve`, with `--workers N` beyond one (one process, no supervisor, otherwise)."""
    return [sys.executable, "-m", "chatgate", "serve", *(["--workers", str(workers)] if workers > 1 else [])]


def _admin(statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        raise ChatgateUnavailable(f"PostgreSQL at {make_url(POSTGRES_URL).host}: {exc}") from exc


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one chatgate run (BENCH_POSTGRES_URL's server), dropped after."""
    name = f"chatgate_bench_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
