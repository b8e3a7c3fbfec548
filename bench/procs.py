"""Processes of the bench: start them pinned to a core, wait until they answer, read /proc, stop them.

Import-light on purpose: the load generator imports it too.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CORE = "0"
CLIENT_CORE = "1"


def raise_fd_limit(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (hard too, where allowed) so that children can hold 10k+ sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = hard
    target = max(soft, min(want, nr_open))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# /proc readers -----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """`pid` and all its descendants (a server may fork workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes, in seconds (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def core_busy_seconds(core: str) -> float:
    """CPU time that processes used on one core (/proc/stat user+nice+system), in seconds.

    Interrupt time is left out: on loopback it is mostly the bench's own traffic.
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                user, nice, system = (int(x) for x in line.split()[1:4])
                return (user + nice + system) / CLK_TCK
    return 0.0


def rss_kb(pids: Iterable[int]) -> int:
    return sum(_status_kb(p, "VmRSS:") for p in pids)


def hwm_kb(pids: Iterable[int]) -> int:
    """Peak RSS (VmHWM) since start or since the last `reset_hwm`."""
    return sum(_status_kb(p, "VmHWM:") for p in pids)


def reset_hwm(pids: Iterable[int]) -> bool:
    """Reset VmHWM to the current RSS (`echo 5 > clear_refs`); False where not permitted."""
    ok = True
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


# Servers ------------------------------------------------------------------------------------------


def http_status(port: int, path: str, method: str = "GET", timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@dataclass
class Server:
    """A process of the bench, started in its own session so that it and its children stop together."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    pids: list[int] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if http_status(self.port, path) == 200:
                    self.pids = children_of(self.proc.pid)
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {path} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Children that outlived their parent (a forked worker) belong to our session too.
        for pid in self.pids:
            try:
                if os.getsid(pid) == self.proc.pid:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class NoIdleHalt:
    """Keeps idle cores from halting while the bench runs: a PM QoS request for zero wake-up
    latency (`/dev/cpu_dma_latency`, held while the file stays open), which makes the kernel's
    idle loop poll instead of halt, as `idle=poll` would.

    On a VM a halted vCPU can take milliseconds to wake, and that dominates P99 at concurrency 1
    (a bare ASGI app measured +4 ms P99 over direct without this). Polling is the kernel's idle
    loop, not a task: it takes no CPU time from the processes measured, unlike the SCHED_IDLE busy
    loops an earlier version ran (on one host those halved every server's throughput).
    """

    PATH = "/dev/cpu_dma_latency"

    def __init__(self) -> None:
        self._fd: int | None = None
        self.problem: str | None = None

    def __enter__(self) -> NoIdleHalt:
        try:
            self._fd = os.open(self.PATH, os.O_WRONLY)
            os.write(self._fd, struct.pack("=i", 0))
        except OSError as exc:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.problem = f"idle cores may halt (P99 then includes VM wake-ups): {self.PATH}: {exc.strerror}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing withdraws the request
            self._fd = None


def await_workers(server: Server, workers: int, timeout: float = 60.0) -> None:
    """Wait until `server` (a `serve --workers N` supervisor) has forked every worker, and take
    them into `server.pids`, so that their CPU is counted."""
    deadline = time.monotonic() + timeout
    while len(server.pids) < workers + 1:  # the supervisor and every worker
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: {len(server.pids) - 1} of {workers} workers started")
        time.sleep(0.2)
        server.pids = children_of(server.proc.pid)
    time.sleep(2.0)  # every worker listening, not only started


def start(
    name: str,
    cmd: Sequence[str],
    *,
    port: int,
    core: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    unset: Sequence[str] = (),
) -> Server:
    """Start `cmd` pinned to `core` with `taskset` (which execs it, so the pid is the server's)."""
    log = log_dir / f"{name}.log"
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", core, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    return Server(name, port, proc, log)


@contextlib.contextmanager
def running(server: Server, ready_path: str, timeout: float) -> Iterator[Server]:
    """Wait until `server` answers `ready_path`, yield it, and stop it however the block ends."""
    try:
        server.wait_ready(ready_path, timeout)
        yield server
    finally:
        server.stop()
