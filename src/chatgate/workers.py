"""`chatgate serve --workers N`: N full chatgate processes on one port, under a supervisor.

The supervisor migrates the database and creates the first admin once, then forks the workers.
Each worker binds its own listening socket to the port with SO_REUSEPORT, so the kernel spreads
new connections evenly over the workers (by a hash of the connection's addresses). The other
way, one socket bound by the supervisor and shared, leaves the balance to whichever worker's
event loop wakes first: uneven under load, and the relay is CPU-bound. The supervisor keeps a
socket of its own bound to the port (never listening, so it gets no connection): the port stays
reserved while a worker restarts, and `--port 0` picks one port for all.

A worker that dies is started again after a pause that doubles with each quick death (0.5 s up
to 30 s; a worker that lived a minute starts the count again). SIGTERM or SIGINT to the
supervisor drains every worker (each lets its running chats finish within
`CHATGATE_DRAIN_TIMEOUT`), then the supervisor exits 0; a second signal makes them stop at once.
Workers stay in the supervisor's process group (a service manager's kill reaches them) and
ignore SIGINT, which a Ctrl-C sends to the whole group: the supervisor passes it on once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from chatgate.config import Settings

log = logging.getLogger("chatgate.workers")

FIRST_PAUSE = 0.5  # seconds before a dead worker's first restart
LONGEST_PAUSE = 30.0
STEADY = 60.0  # seconds a worker must live for its slot's pause to start again from FIRST_PAUSE
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Worker:
    """One worker's place among the processes of `serve --workers N`."""

    slot: int  # 1..N, kept by the worker that restarts in its place
    count: int  # N
    run_dir: Path  # the supervisor's directory: one metrics file per slot


class WorkersProblem(Exception):
    """Why these settings cannot be served by several workers, in plain words."""


def check(settings: Settings) -> list[str]:
    """Raise WorkersProblem when `settings.workers` processes cannot serve these settings as one
    gateway; return the warnings to log (what is not shared between them)."""
    workers = settings.workers
    limits = [
        name
        for name, value in (
            ("CHATGATE_RATE_LIMIT_PER_MINUTE", settings.rate_limit_per_minute),
            ("CHATGATE_MAX_CONCURRENT_STREAMS", settings.max_concurrent_streams),
        )
        if value
    ]
    if settings.redis_url:
        return []
    if limits:
        raise WorkersProblem(
            f"{' and '.join(limits)} are per-user limits that, without Redis, each process keeps in its "
            f"own memory: with {workers} workers a user would get up to {workers} times the limit. "
            "Set CHATGATE_REDIS_URL (the workers then share the limits), or serve with --workers 1"
        )
    return [
        f"no CHATGATE_REDIS_URL: a model changed through one worker reaches the other "
        f"{workers - 1} within CHATGATE_MODEL_CACHE_TTL ({settings.model_cache_ttl:g} s)"
    ]


def bind(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A TCP socket bound to `host:port` (not listening yet), with SO_REUSEPORT when `shared`."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Slot:
    number: int
    pid: int | None = None
    started: float = 0.0
    deaths: int = 0  # quick deaths in a row
    restart_at: float | None = None


class Supervisor:
    """Runs `settings.workers` chatgate workers until a signal, restarting any that dies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slots = [_Slot(n) for n in range(1, settings.workers + 1)]
        self._pid = os.getpid()
        self._stopping = 0  # stop signals received
        self._failed_exit = False
        self._run_dir: Path | None = None
        self._mask: set[int | signal.Signals] = set()

    def run(self) -> int:
        """Serve until stopped; the exit status (0 when every worker drained and ended well)."""
        for warning in check(self.settings):
            log.warning("%s", warning)
        # First without SO_REUSEPORT: that fails while anything holds the port, even another
        # chatgate's workers, which the port shared with them would otherwise quietly join.
        bind(self.settings.host, self.settings.port, shared=False).close()
        reserved = bind(self.settings.host, self.settings.port)
        try:
            port = reserved.getsockname()[1]
            self.settings = self.settings.model_copy(update={"port": port})
            asyncio.run(_prepare(self.settings))
            self._run_dir = Path(tempfile.mkdtemp(prefix="chatgate-workers-", dir=_memory_dir()))
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*_STOP_SIGNALS, signal.SIGCHLD})
            try:
                return self._supervise()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        finally:
            reserved.close()
            if self._run_dir is not None:
                shutil.rmtree(self._run_dir, ignore_errors=True)

    def _supervise(self) -> int:
        log.info(
            "chatgate serving on http://%s:%d with %d workers (supervisor pid %d)",
            self.settings.host,
            self.settings.port,
            len(self._slots),
            self._pid,
        )
        for slot in self._slots:
            self._start(slot)
        while True:
            self._reap()
            live = [slot for slot in self._slots if slot.pid is not None]
            if self._stopping and not live:
                return 1 if self._failed_exit else 0
            now = time.monotonic()
            if not self._stopping:
                for slot in self._slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
            due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            wait = max(0.0, min([*due, now + 1.0]) - now)
            received = signal.sigtimedwait({*_STOP_SIGNALS, signal.SIGCHLD}, wait)
            if received is not None and received.si_signo in _STOP_SIGNALS:
                self._stop(signal.Signals(received.si_signo))

    def _start(self, slot: _Slot) -> None:
        assert self._run_dir is not None
        worker = Worker(slot.number, len(self._slots), self._run_dir)
        _single_threaded()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
                code = _serve_worker(self.settings, worker, self._pid)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", worker.slot)
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None
        log.info("worker %d started (pid %d)", slot.number, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = None
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            if self._stopping:
                if code != 0:
                    self._failed_exit = True
                    log.warning("worker %d (pid %d) %s while stopping", slot.number, pid, how)
                else:
                    log.info("worker %d (pid %d) stopped", slot.number, pid)
                continue
            lived = time.monotonic() - slot.started
            slot.deaths = 1 if lived >= STEADY else slot.deaths + 1
            pause = min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** (slot.deaths - 1))
            slot.restart_at = time.monotonic() + pause
            log.warning(
                "worker %d (pid %d) %s after %.1f s; starting a new one in %g s",
                slot.number,
                pid,
                how,
                lived,
                pause,
            )

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping += 1
        live = [slot for slot in self._slots if slot.pid is not None]
        for slot in self._slots:
            slot.restart_at = None
        if self._stopping == 1:
            log.info(
                "%s: draining %d worker(s); running chats may take %g s to finish (a second signal stops at once)",
                sig.name,
                len(live),
                self.settings.drain_timeout,
            )
        else:
            log.warning("%s again: stopping the workers now, without waiting for running chats", sig.name)
        for slot in live:
            assert slot.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)


def _memory_dir() -> str | None:
    """A directory in memory (tmpfs) for the metrics files: replacing a file there costs ~50 µs
    of CPU and ~0.1 ms, against ~0.4 ms and 3 ms (the journal) on an ext4 /tmp (measured here)."""
    shm = "/dev/shm"  # noqa: S108 - a private directory (mkdtemp, 0700) is made inside it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


async def _prepare(settings: Settings) -> None:
    """What must happen once before the workers start: migrations, the first admin, the key file."""
    from chatgate.accounts import Accounts
    from chatgate.runtime import bootstrap_admin
    from chatgate.security.keys import Keys
    from chatgate.store import db

    Keys.from_settings(settings)  # the key file, when there is none and no CHATGATE_SECRET_KEY

    engine = db.create_engine(settings.database_url, timeout=settings.database_timeout, pool_size=1)
    try:
        if settings.migrate_on_start:
            await db.upgrade(engine)
        accounts = Accounts.for_engine(engine)
        try:
            await bootstrap_admin(settings, accounts)
        finally:
            accounts.close()
    finally:
        await engine.dispose()
    Keys.from_settings(settings)  # the key file, when there is none and no CHATGATE_SECRET_KEY


def _single_threaded(wait: float = 5.0) -> None:
    """Wait for the threads of the preparation (aiosqlite's) to end: a fork copies only the
    calling thread, and with it any lock another thread held, never to be released."""
    deadline = time.monotonic() + wait
    while threading.active_count() > 1:
        if time.monotonic() > deadline:
            names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
            raise RuntimeError(f"the supervisor must not run threads when it forks a worker: {names}")
        time.sleep(0.01)


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM (a drain) when the supervisor dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _serve_worker(settings: Settings, worker: Worker, parent: int) -> int:
    from chatgate.app import create_app
    from chatgate.logs import configure
    from chatgate.server import DrainingServer, uvicorn_config

    configure(settings.log_level, settings.log_format, worker=worker.slot)
    sock = bind(settings.host, settings.port)
    _die_with_parent(parent)
    gateway = create_app(settings, worker)
    DrainingServer(uvicorn_config(gateway, settings), gateway.drain, worker=worker.slot).run(sockets=[sock])
    return 0
