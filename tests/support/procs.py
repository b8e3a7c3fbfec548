"""Run servers as real processes on loopback, talk to them, and tear them down cleanly.

Every process is started in its own session with stdout and stderr in one log file, and is
always waited for, so no test leaves a zombie, a ResourceWarning or an open socket behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict

import httpx
from tests.support.scripts import Script

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


def unique_name(prefix: str = "model") -> str:
    """A name no other test uses: scripts and gates are keyed by it, so tests never reset the fake."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (prefer `--port 0` where the program can report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def refused_base_url() -> str:
    """A model server that refuses every connection: a loopback port nothing listens on."""
    return f"http://{LOOPBACK}:{free_port()}/v1"


class Blackhole:
    """A dead host on loopback: a listening socket whose accept queue is full and never drained,
    so the kernel drops every further SYN and a connect waits for its timeout, as with an
    address that does not answer at all. A real socket, not a mock."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(3):  # a backlog of 0 still queues one or two: fill it
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((LOOPBACK, self.port))
            self._fillers.append(filler)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def close(self) -> None:
        for sock in [*self._fillers, self._listener]:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until `host:port` accepts a TCP connection; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} did not accept a connection within {timeout} s")
        time.sleep(0.05)


def wait_until(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy, and return that; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s (last result {result!r})")
        time.sleep(interval)


class StartupError(RuntimeError):
    """A server process exited or never became ready; the message ends with its log."""


class ServerProcess:
    """A server process: started, awaited until ready, logged to a file, stopped on exit.

    Readiness is the first of: the port in `port_file` (written by the child) or `port` accepting
    connections, and then `health_path` answering 200 if given. Stopping sends SIGTERM and, after
    `stop_timeout` seconds, SIGKILL to the process group it was started in.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        host: str = LOOPBACK,
        port: int | None = None,
        port_file: Path | None = None,
        health_path: str | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if port is None and port_file is None:
            raise ValueError("give the port, or a port file the process writes")
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.host = host
        self._port = port
        self.port_file = port_file
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the process has not reported its port yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)
            self._port = None
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own group: a Ctrl-C on the test run does not reach it first
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            code = self.proc.poll()
            if code is not None:
                raise StartupError(f"{self.argv} exited with {code} before it was ready:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise StartupError(f"{self.argv} not ready after {self.startup_timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if self._port is None and self.port_file is not None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self._port = int(self.port_file.read_text())
        if self._port is None or not port_accepts(self.host, self._port):
            return False
        if self.health_path is None:
            return True
        try:
            with httpx.Client(trust_env=False, timeout=2.0) as client:
                return client.get(self.url + self.health_path).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL) and return its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group we created: workers go too
                proc.wait()
        return proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test run's environment, unbuffered, with the repository importable (for `tests.support`)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class RequestRecord(TypedDict):
    id: int
    connection: int
    time: float
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON, or None
    raw_body: str
    model: str | None


class ConnectionRecord(TypedDict):
    id: int
    opened: float  # time.time() of accept
    closed: float | None  # time.time() of the close, None while open
    closed_by: str | None  # "peer" or "server"
    peer_closed: bool
    requests: list[int]
    models: list[str]


class FakeUpstream:
    """The test side of a running fake upstream: its URLs and its control API."""

    def __init__(self, root_url: str, process: ServerProcess | None = None) -> None:
        self.root_url = root_url.rstrip("/")
        self.base_url = self.root_url + "/v1"  # what a user registers as the model's base URL
        self.process = process
        self._client = httpx.Client(base_url=self.root_url, timeout=10.0, trust_env=False)

    @classmethod
    @contextlib.contextmanager
    def launch(cls, log_dir: Path) -> Iterator[FakeUpstream]:
        """Run a fake upstream process for the duration of the block."""
        log_dir.mkdir(parents=True, exist_ok=True)
        port_file = log_dir / f"fake-upstream-{uuid.uuid4().hex[:8]}.port"
        argv = [
            sys.executable,
            "-m",
            "tests.support.fake_upstream",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ]
        process = ServerProcess(argv, log_path=port_file.with_suffix(".log"), env=_python_env(), port_file=port_file)
        with process, cls(process.url, process) as fake:
            yield fake

    def url(self, path: str) -> str:
        return self.root_url + path

    def script(self, name: str, script: Script | Sequence[Script]) -> None:
        """Make the requests whose `model` is `name` follow `script` (a list: one per request)."""
        response = self._client.post(f"/_script/{name}", json=script)
        if response.status_code != 200:
            raise ValueError(f"the fake rejected the script: {response.text}")

    def release(self, gate: str) -> None:
        self._client.post(f"/_release/{gate}").raise_for_status()

    def gates(self) -> dict[str, Any]:
        """`{"released": [names], "waiting": {name: requests blocked there}}`."""
        result: dict[str, Any] = self._client.get("/_gates").raise_for_status().json()
        return result

    def requests(self, model: str | None = None) -> list[RequestRecord]:
        records: list[RequestRecord] = self._client.get("/_requests").raise_for_status().json()
        return [r for r in records if model is None or r["model"] == model]

    def connections(self, model: str | None = None) -> list[ConnectionRecord]:
        records: list[ConnectionRecord] = self._client.get("/_connections").raise_for_status().json()
        return [r for r in records if model is None or model in r["models"]]

    def reset(self) -> None:
        """Forget everything. Prefer unique names: a reset races with other tests' requests."""
        self._client.post("/_reset").raise_for_status()

    def wait_for_requests(self, model: str, count: int = 1, timeout: float = 5.0) -> list[RequestRecord]:
        """Block until the fake has received `count` requests for `model`."""

        def received() -> list[RequestRecord] | None:
            records = self.requests(model)
            return records if len(records) >= count else None

        return wait_until(received, timeout)  # type: ignore[no-any-return]

    def wait_for_gate(self, gate: str, count: int = 1, timeout: float = 5.0) -> None:
        """Block until `count` requests are parked at `gate`."""
        wait_until(lambda: self.gates()["waiting"].get(gate, 0) >= count, timeout)

    def wait_for_closed(self, model: str, timeout: float = 5.0) -> list[ConnectionRecord]:
        """Block until every connection that carried a request for `model` is closed, and return them."""

        def closed() -> list[ConnectionRecord] | None:
            records = self.connections(model)
            return records if records and all(r["closed"] is not None for r in records) else None

        return wait_until(closed, timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def chatgate_env_name(key: str) -> str:
    """`idle_timeout` and `CHATGATE_IDLE_TIMEOUT` both name `CHATGATE_IDLE_TIMEOUT`."""
    key = key.upper()
    return key if key.startswith("CHATGATE_") else f"CHATGATE_{key}"


def _env_value(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class ChatgateServer:
    """`python -m chatgate serve` on a free loopback port, with its own data directory and database.

    The environment is the test run's minus every inherited `CHATGATE_*` variable, plus the
    defaults below, plus `env` (keys with or without the prefix; a None value unsets the variable).
    The working directory is `data_dir`, so a developer's `.env` never leaks into a test.
    """

    def __init__(
        self,
        data_dir: Path,
        env: Mapping[str, object] | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        module: str = "chatgate",
        startup_timeout: float = 30.0,
    ) -> None:
        self.data_dir = data_dir
        self.module = module
        self.startup_timeout = startup_timeout
        self.port = free_port()
        base = {k: v for k, v in _python_env(extra_env).items() if not k.startswith("CHATGATE_")}
        base |= {
            "CHATGATE_DATABASE_URL": f"sqlite:///{data_dir}/chatgate.db",
            "CHATGATE_PORT": str(self.port),
            "CHATGATE_HOST": LOOPBACK,
            "CHATGATE_DATA_DIR": str(data_dir),
            "CHATGATE_ALLOW_PRIVATE_UPSTREAMS": "true",
        }
        for key, value in (env or {}).items():
            if value is None:
                base.pop(chatgate_env_name(key), None)
            else:
                base[chatgate_env_name(key)] = _env_value(value)
        self.env = base
        self.process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "chatgate.log"

    def log_text(self) -> str:
        """The server's stdout and stderr, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, attempts: int = 3) -> Self:
        """Start and wait for `GET /healthz` to answer 200; moves to a new port if this one was taken."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self.process = ServerProcess(
                [sys.executable, "-m", self.module, "serve"],
                log_path=self.log_path,
                env=self.env,
                cwd=self.data_dir,
                port=self.port,
                health_path="/healthz",
                startup_timeout=self.startup_timeout,
            )
            try:
                self.process.start()
                return self
            except StartupError as exc:
                # free_port() cannot reserve the port; another test may have bound it meanwhile.
                if "address already in use" not in str(exc).lower() or attempt == attempts - 1:
                    raise
                self.port = free_port()
                self.env["CHATGATE_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def stop(self) -> int | None:
        return self.process.stop() if self.process is not None else None

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def cli(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60.0,
        env_extra: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -m chatgate ARGS` with the server's environment; never raises on exit status."""
        return subprocess.run(
            [sys.executable, "-m", self.module, *args],
            input=input,
            capture_output=True,
            text=True,
            env={**self.env, **(env_extra or {})},
            cwd=self.data_dir,
            timeout=timeout,
            check=False,
        )

    @property
    def admin_token(self) -> str:
        """The token of the `admin` user that the first start created and saved."""
        return (self.data_dir / "admin-token").read_text().strip()

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin_token}"}

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An httpx client for this server, authenticated as admin unless another token is given."""
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, headers=self.auth(token), trust_env=False, **kwargs)

    def add_model(self, token: str | None = None, **fields: Any) -> str:
        """Register a model through the REST API; returns its id."""
        fields.setdefault("name", unique_name("model"))
        fields.setdefault("model_id", "fake-model")
        fields.setdefault("api_key", "sk-test-0000000000000000")
        with self.client(token) as client:
            response = client.post("/api/models", json=fields)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def new_user(self, name: str | None = None, *, admin: bool = False) -> str:
        """Create a user with the CLI and return a fresh token of theirs."""
        name = name or unique_name("user")
        added = self.cli("users", "add", name, *(["--admin"] if admin else []))
        assert added.returncode == 0, added.stderr
        created = self.cli("tokens", "create", "--user", name)
        assert created.returncode == 0, created.stderr
        return created.stdout.strip()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
