"""Shared fixtures: one fake upstream process per test session (per xdist worker), chatgate launchers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# pytest puts tests/ (not the repository) on sys.path when tests/ has no __init__.py;
# the support package is imported as `tests.support`, as its processes are run (`-m tests.support...`).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support import ChatgateServer, FakeUpstream  # noqa: E402


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    """The session's fake upstream process; key scripts by `unique_name()` instead of resetting it."""
    with FakeUpstream.launch(tmp_path_factory.mktemp("fake-upstream")) as fake:
        yield fake


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream, for one test."""
    return fake_upstream


@pytest.fixture
def make_chatgate(tmp_path: Path) -> Iterator[Callable[..., ChatgateServer]]:
    """`make_chatgate(**env)` starts a chatgate server with its own data dir; all stop at teardown."""
    servers: list[ChatgateServer] = []

    def make(**env: object) -> ChatgateServer:
        server = ChatgateServer(tmp_path / f"chatgate-{len(servers)}", env)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def chatgate_server(make_chatgate: Callable[..., ChatgateServer]) -> ChatgateServer:
    """A chatgate server with the default test settings."""
    return make_chatgate()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatgateServer]:
    """One chatgate server for the session (per xdist worker), with short upstream timeouts so
    that timeout cases finish quickly. Tests keep apart by registering their own models."""
    server = ChatgateServer(
        tmp_path_factory.mktemp("gateway"),
        {"first_byte_timeout": 2, "idle_timeout": 2, "connect_timeout": 2, "log_level": "info"},
    )
    with server:
        yield server
