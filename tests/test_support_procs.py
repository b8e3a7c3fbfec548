"""The process helpers, tested with stand-in commands (chatgate itself is not needed)."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.support import ChatgateServer, ServerProcess, StartupError, free_port, wait_for_port
from tests.support.procs import REPO_ROOT

STANDIN = "tests.support.standin_chatgate"


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port_times_out_on_a_closed_port() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)
    assert time.monotonic() - started < 3


def test_server_process_waits_for_health_logs_and_stops(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port)]
    process = ServerProcess(argv, log_path=tmp_path / "fake.log", cwd=REPO_ROOT, port=port, health_path="/v1/models")

    with process:
        assert process.running
        with httpx.Client(trust_env=False) as client:
            assert client.get(process.url + "/v1/models").status_code == 200
        assert f"listening on http://127.0.0.1:{port}" in process.log_text()

    assert not process.running
    assert process.proc is not None and process.proc.returncode == 0  # a clean SIGTERM shutdown


def test_early_exit_is_a_startup_error_carrying_the_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('no luck here', file=sys.stderr); sys.exit(3)"]
    process = ServerProcess(argv, log_path=tmp_path / "x.log", port=free_port())

    with pytest.raises(StartupError, match="exited with 3") as caught:
        process.start()

    assert "no luck here" in str(caught.value)


def test_a_process_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import signal, socket, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "print('stubborn', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = ServerProcess([sys.executable, "-c", code], log_path=tmp_path / "s.log", port=port, stop_timeout=0.5)

    with process:
        pass

    assert process.proc is not None and process.proc.returncode == -9
    assert "stubborn" in process.log_text()


def test_chatgate_server_environment_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGATE_SECRET_KEY", "leaked-from-the-developer-shell")
    server = ChatgateServer(
        tmp_path / "cg",
        {
            "idle_timeout": 1.5,
            "CHATGATE_LOG_LEVEL": "debug",
            "migrate_on_start": False,
            "allow_private_upstreams": None,
        },
        module=STANDIN,
    )

    with server:
        with httpx.Client(trust_env=False) as client:
            env = client.get(server.url + "/healthz").json()
        result = server.cli("models", "add", "--name", "x")

    assert env["CHATGATE_PORT"] == str(server.port)
    assert env["CHATGATE_HOST"] == "127.0.0.1"
    assert env["CHATGATE_DATABASE_URL"] == f"sqlite:///{tmp_path / 'cg'}/chatgate.db"
    assert env["CHATGATE_DATA_DIR"] == str(tmp_path / "cg")
    assert env["CHATGATE_IDLE_TIMEOUT"] == "1.5"
    assert env["CHATGATE_LOG_LEVEL"] == "debug"
    assert env["CHATGATE_MIGRATE_ON_START"] == "false"
    assert "CHATGATE_ALLOW_PRIVATE_UPSTREAMS" not in env
    assert "CHATGATE_SECRET_KEY" not in env
    assert result.returncode == 0
    cli_output = json.loads(result.stdout)
    assert cli_output == {"args": ["models", "add", "--name", "x"], "env": env}
    assert "standin serving" in server.log_text()
    assert "standin stopped" in server.log_text()


def test_chatgate_server_restarts_on_the_same_port(tmp_path: Path) -> None:
    with ChatgateServer(tmp_path, module=STANDIN) as server:
        port = server.port
        server.restart()
        assert server.port == port
        with httpx.Client(trust_env=False) as client:
            assert client.get(server.url + "/healthz").status_code == 200
    assert server.log_text().count("standin serving") == 2
