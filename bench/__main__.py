"""Run the benchmark: `python -m bench [--quick] [--paths direct,floor,chatgate,litellm]`.

Every server under test runs alone on core 0 (`taskset -c 0`); the upstream, the load generator
and this runner share core 1. Each path is started, warmed up, measured in each scenario and
stopped before the next starts. See docs/performance.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import chatgate_env, litellm_env, paced, procs, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
GROUPS = ("direct", "floor", "chatgate", "workers", "litellm")
SCENARIOS = ("streams", "hold", "paced")  # streams: c1 and c64
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Options:
    groups: tuple[str, ...]
    reps: int
    chunks: int
    c1_seconds: float
    c64_seconds: float
    warmup: float
    hold_streams: int
    hold: bool
    hold_route: str
    backends: tuple[str, ...]
    metrics_off: bool
    metrics_aa: bool
    litellm_hold: int
    slow_delay: float
    poll_idle: bool
    workers: int
    out: Path
    scenarios: tuple[str, ...] = SCENARIOS
    paced: paced.PacedOptions = field(default_factory=paced.PacedOptions)


def parse_args(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, short scenarios, 2,000 held streams")
    ap.add_argument("--paths", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    ap.add_argument("--skip-litellm", action="store_true", help="same as leaving litellm out of --paths")
    ap.add_argument("--reps", type=int, help="repetitions of the c1/c64 scenarios (default 3, quick 1)")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--hold-streams", type=int, help="streams of the hold scenario (default 10000)")
    ap.add_argument("--no-hold", action="store_true", help="skip the hold scenario")
    ap.add_argument(
        "--hold-route",
        choices=("custom", "v1"),
        default="custom",
        help="the chatgate route of the hold (one per run: a second hold in the same process would "
        "reuse the first one's freed heap and understate RSS per stream)",
    )
    ap.add_argument(
        "--no-metrics-off",
        action="store_true",
        help="skip the second chatgate with CHATGATE_METRICS=false (what counting a chat costs)",
    )
    ap.add_argument(
        "--metrics-aa",
        action="store_true",
        help="run the second chatgate with metrics on too (an A/A control): the difference the method "
        "itself shows between two like servers, to read the metrics-off figure against",
    )
    ap.add_argument(
        "--backends",
        default="sqlite,postgresql",
        help="comma-separated databases chatgate runs on: sqlite, postgresql (with Redis; "
        "BENCH_POSTGRES_URL, BENCH_REDIS_URL); each runs every chatgate scenario",
    )
    ap.add_argument(
        "--litellm-hold", type=int, default=0, metavar="N", help="also hold N streams through LiteLLM (slow)"
    )
    ap.add_argument(
        "--let-idle-halt",
        action="store_true",
        help="do not ask the kernel to poll when idle (P99 then includes VM wake-ups; see docs/performance.md)",
    )
    ap.add_argument("--slow-delay", type=float, default=5.0, help="seconds between deltas of a held stream (default 5)")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="the `workers` path: chatgate's custom route under `serve --workers N` on every core (default 2)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--paced", action="store_true", help="only the paced scenario (same as --scenarios paced)")
    ap.add_argument("--paced-tokens", type=int, help="tokens of a paced stream (default 256, quick 64)")
    ap.add_argument("--paced-rate", type=float, default=50.0, help="tokens per second of a paced stream")
    ap.add_argument("--paced-concurrency", help="concurrent paced streams, repeated --reps times (default 64,256,1024)")
    ap.add_argument("--paced-ladder", help="capacity steps, run once each (default 64,128,256,512,1024,2048)")
    ap.add_argument("--paced-window", type=float, help="measured seconds per step, after a ramp of one stream")
    ap.add_argument("--paced-bisect", type=int, help="bisection steps after the ladder (default 1, quick 0)")
    ap.add_argument(
        "--paced-baseline",
        metavar="DIR",
        help="also measure chatgate from DIR/src (e.g. `git worktree add DIR main`), interleaved: before/after",
    )
    a = ap.parse_args(argv)
    scenarios = ("paced",) if a.paced else tuple(x.strip() for x in a.scenarios.split(",") if x.strip())
    if unknown_s := set(scenarios) - set(SCENARIOS):
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown_s))}")
    if a.no_hold:
        scenarios = tuple(x for x in scenarios if x != "hold")
    groups = tuple(g.strip() for g in a.paths.split(",") if g.strip())
    unknown = set(groups) - set(GROUPS)
    if unknown:
        ap.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    backends = tuple(b.strip() for b in a.backends.split(",") if b.strip())
    if not backends or set(backends) - set(chatgate_env.BACKENDS):
        ap.error(f"--backends: choose among {', '.join(chatgate_env.BACKENDS)}")
    if a.skip_litellm:
        groups = tuple(g for g in groups if g != "litellm")
    return Options(
        groups=groups,
        reps=a.reps or (1 if a.quick else 3),
        chunks=a.chunks,
        c1_seconds=1.0 if a.quick else 2.0,
        c64_seconds=1.5 if a.quick else 3.0,
        warmup=0.5 if a.quick else 1.0,
        hold_streams=a.hold_streams or (2000 if a.quick else 10_000),
        hold="hold" in scenarios,
        hold_route=a.hold_route,
        backends=backends,
        metrics_off=not a.no_metrics_off,
        metrics_aa=a.metrics_aa,
        litellm_hold=a.litellm_hold,
        slow_delay=a.slow_delay,
        poll_idle=not a.let_idle_halt,
        workers=a.workers,
        out=a.out,
        scenarios=scenarios,
        paced=_paced_options(a),
    )


def _steps(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return default if not text else tuple(sorted({int(x) for x in text.split(",") if x.strip()}))


def _paced_options(a: argparse.Namespace) -> paced.PacedOptions:
    base = paced.QUICK if a.quick else paced.PacedOptions()
    concurrency = _steps(a.paced_concurrency, base.concurrency)
    return paced.PacedOptions(
        tokens=a.paced_tokens or base.tokens,
        rate=a.paced_rate,
        concurrency=concurrency,
        ladder=tuple(sorted({*_steps(a.paced_ladder, base.ladder), *concurrency})),
        litellm_ladder=base.litellm_ladder,
        window=a.paced_window or base.window,
        reps=a.reps or base.reps,
        bisect=base.bisect if a.paced_bisect is None else a.paced_bisect,
        baseline=a.paced_baseline,
    )


@dataclass(frozen=True)
class Target:
    """One measured path: where to send the two kinds of request and what a good answer ends with."""

    name: str
    port: int
    path: str
    body: dict[str, Any]
    expect_tail: str | None
    hold_path: str
    hold_body: dict[str, Any]
    hold_expect_tail: str | None
    release_port: int
    hold_streams: int  # 0: no hold scenario on this path
    headers: dict[str, str] = field(default_factory=dict)
    # Served on every core (`--workers`): no core is the server's alone, so the CPU of other
    # processes per core cannot be told apart; the client side's own CPU is reported instead.
    spread: bool = False
    # The processes whose CPU is this target's, when not those of the group measured with it.
    pids: tuple[int, ...] = ()


@dataclass
class Bench:
    opts: Options
    log_dir: Path
    upstream: procs.Server
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paced_runs: list[dict[str, Any]] = field(default_factory=list)
    paced_idle_rss_kb: dict[str, int] = field(default_factory=dict)

    def loadgen(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        cmd = ["taskset", "-c", procs.CLIENT_CORE, sys.executable, "-m", "bench.loadgen", json.dumps(spec)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def scenario(self, target: Target, scenario: str, rep: int, watch: list[int]) -> None:
        base: dict[str, Any] = {
            "port": target.port,
            "headers": target.headers,
            "watch_pids": watch,
            "aux_pids": self.upstream.pids if watch != self.upstream.pids else [],
            "core_pids": {}
            if target.spread
            else {
                procs.SERVER_CORE: watch if watch != self.upstream.pids else [],
                procs.CLIENT_CORE: self.upstream.pids,
            },
        }
        if scenario == "hold":
            spec = {
                **base,
                "mode": "hold",
                "path": target.hold_path,
                "body": json.dumps(target.hold_body),
                "expect_tail": target.hold_expect_tail,
                "streams": target.hold_streams,
                "release_port": target.release_port,
                "hold_timeout": 90.0,
                "timeout": 60.0,
            }
            timeout = 300.0
        else:
            c64 = scenario == "c64"
            spec = {
                **base,
                "mode": "closed",
                "path": target.path,
                "body": json.dumps(target.body),
                "expect_tail": target.expect_tail,
                "concurrency": 64 if c64 else 1,
                "duration": self.opts.c64_seconds if c64 else self.opts.c1_seconds,
                "warmup": self.opts.warmup,
                "timeout": 30.0,
            }
            timeout = 120.0
        raw = self.loadgen(spec, timeout)
        summary = report.summarize(raw)
        self.runs.append({"path": target.name, "scenario": scenario, "rep": rep, "summary": summary, "raw": raw})
        extra = ""
        if scenario == "hold":
            extra = f", held {summary.get('held', 0):,}, {summary.get('rss_per_stream_kb') or 0:.1f} KB/stream"
        elif target.spread:
            extra = f"; client side {summary['client_core_busy']:.0%} of a core"
        print(
            f"  {target.name:<16} {scenario:<4} rep {rep + 1}: {summary['throughput_rps']:>8,.0f} req/s  "
            f"TTFB P50 {summary['ttfb_p50_ms'] or 0:8.3f} ms  P99 {summary['ttfb_p99_ms'] or 0:8.3f} ms  "
            f"CPU {summary['cpu_ms_per_req'] or 0:7.3f} ms/req  errors {summary['errors']}" + extra,
            flush=True,
        )

    def measure(self, targets: list[Target], watch: list[int]) -> None:
        for rep in range(self.opts.reps if "streams" in self.opts.scenarios else 0):
            # Every other repetition takes the targets in reverse order: paths measured in turn
            # (metrics on and off) must not owe a difference to which of them always goes first.
            for target in targets if rep % 2 == 0 else targets[::-1]:
                for scenario in ("c1", "c64"):
                    self.scenario(target, scenario, rep, list(target.pids) or watch)
        if self.opts.hold:
            for target in targets:
                if not target.hold_streams:
                    continue
                if not any(r["summary"]["completed"] for r in self.runs if r["path"] == target.name):
                    self.notes.append(f"{target.name}: hold not run, every c1/c64 request failed")
                    continue
                self.scenario(target, "hold", 0, watch)


def fd_capacity() -> int:
    """Sockets one process may hold, leaving room for everything else it opens."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200


def hold_for(opts: Options, sockets_per_stream: int, notes: list[str], name: str) -> int:
    cap = fd_capacity() // sockets_per_stream
    if opts.hold_streams > cap:
        notes.append(
            f"{name}: hold capped at {cap:,} streams: the file-descriptor limit is "
            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,} and cannot be raised here "
            f"(no CAP_SYS_RESOURCE); a proxy needs {sockets_per_stream} sockets per stream"
        )
    return min(opts.hold_streams, cap)


def openai_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": CHAT, "stream": True}


def run_direct(b: Bench) -> None:
    up = b.upstream.port
    t = Target(
        "direct", up, "/v1/chat/completions", openai_body("bench-model"), "data: [DONE]",
        "/slow/v1/chat/completions", openai_body("bench-model"), "data: [DONE]", up,
        hold_for(b.opts, 1, b.notes, "direct"),
    )  # fmt: skip
    b.measure([t], b.upstream.pids)


def run_floor(b: Bench) -> None:
    port = procs.free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "bench.floor:app", "--host", "127.0.0.1", "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        "--backlog", "4096",
    ]  # fmt: skip
    env = {"BENCH_CHUNKS": str(b.opts.chunks), "BENCH_SLOW_DELAY": str(b.opts.slow_delay)}
    server = procs.start("floor", cmd, port=port, core=procs.SERVER_CORE, log_dir=b.log_dir, env=env, cwd=ROOT)
    with procs.running(server, "/healthz", 30):
        last = f"tok{b.opts.chunks - 1}"
        t = Target("floor", port, "/", {}, last, "/slow", {}, None, port, hold_for(b.opts, 1, b.notes, "floor"))
        b.measure([t], server.pids)


def _prepare_chatgate(
    b: Bench, port: int, database_url: str | None = None
) -> tuple[Path, dict[str, str], chatgate_env.BenchModels, dict[str, str]] | None:
    """A data directory, environment, registered models and auth headers; None (noted) when chatgate is unavailable."""
    data_dir = Path(tempfile.mkdtemp(prefix="chatgate-bench-"))
    env = {**os.environ, **chatgate_env.env(data_dir, port, database_url)}
    try:
        chatgate_env.check_cli(env, ROOT)
        models = chatgate_env.register(env, ROOT, b.upstream.port)
        headers = chatgate_env.chatgate_headers(env, ROOT)
    except chatgate_env.ChatgateUnavailable as exc:
        print(f"  chatgate not available: {exc}", flush=True)
        b.notes.append(f"chatgate not available: {str(exc).splitlines()[0]}")
        return None
    return data_dir, env, models, headers


def custom_body(model_id: str) -> dict[str, Any]:
    return {"chatSettings": {"model": "bench-model", "temperature": 0.5}, "messages": CHAT, "customModelId": model_id}


def run_chatgate(b: Bench) -> None:
    for backend in b.opts.backends:
        if backend == "postgresql":
            try:
                with chatgate_env.postgres_database() as url:
                    run_chatgate_on(b, chatgate_env.BACKENDS[backend], url)
            except chatgate_env.ChatgateUnavailable as exc:
                print(f"  chatgate on PostgreSQL not available: {exc}", flush=True)
                b.notes.append(f"chatgate on PostgreSQL not available: {str(exc).splitlines()[0]}")
        else:
            run_chatgate_on(b, chatgate_env.BACKENDS[backend], None)


def run_chatgate_on(b: Bench, label: str, database_url: str | None) -> None:
    """chatgate's scenarios on one backend: SQLite in a fresh data dir, or the PostgreSQL database given."""
    port = procs.free_port()
    streams = hold_for(b.opts, 2, b.notes, "chatgate")
    prepared = _prepare_chatgate(b, port, database_url)
    if prepared is None:
        return
    data_dir, env, models, headers = prepared
    server = procs.start(
        "chatgate", chatgate_env.serve_command(), port=port, core=procs.SERVER_CORE, log_dir=b.log_dir,
        env=env, cwd=data_dir,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(procs.running(server, "/healthz", 60))
        targets = _chatgate_targets(b, label, port, models, headers, streams)
        if b.opts.metrics_off and database_url is None:
            # A second chatgate with metrics off, on the same core, measured in turn with the first in
            # every repetition (interleaved, so drift in the machine's speed hits both alike).
            off_port = procs.free_port()
            off = _prepare_chatgate(b, off_port)
            if off is not None:
                off_dir, off_env, off_models, off_headers = off
                aa = b.opts.metrics_aa
                off_server = procs.start(
                    "chatgate-metrics-" + ("aa" if aa else "off"), chatgate_env.serve_command(), port=off_port,
                    core=procs.SERVER_CORE, log_dir=b.log_dir, env={**off_env, "CHATGATE_METRICS": str(aa).lower()},
                    cwd=off_dir,
                )  # fmt: skip
                stack.enter_context(procs.running(off_server, "/healthz", 60))
                pids = tuple(off_server.pids)
                label = report.METRICS_AA_LABEL if aa else report.METRICS_OFF_LABEL
                off_targets = [
                    replace(t, pids=pids, hold_streams=0)
                    for t in _chatgate_targets(b, label, off_port, off_models, off_headers, 0)
                ]
                targets = [t for pair in zip(targets, off_targets, strict=True) for t in pair]
        b.measure(targets, server.pids)


def _chatgate_targets(
    b: Bench, label: str, port: int, models: chatgate_env.BenchModels, headers: dict[str, str], streams: int
) -> list[Target]:
    up = b.upstream.port
    custom = custom_body(models.fast)
    return [
        Target(
            f"chatgate custom{label}", port, "/api/chat/custom", custom, f"tok{b.opts.chunks - 1}",
            "/api/chat/custom", {**custom, "customModelId": models.slow}, None, up,
            streams if b.opts.hold_route == "custom" else 0, headers,
        ),
        Target(
            f"chatgate v1{label}", port, "/v1/chat/completions", openai_body(models.fast), "data: [DONE]",
            "/v1/chat/completions", openai_body(models.slow), "data: [DONE]", up,
            streams if b.opts.hold_route == "v1" else 0, headers,
        ),
    ]  # fmt: skip


def run_chatgate_workers(b: Bench) -> None:
    """The custom route under `serve --workers N`, on every core: its throughput beside the one
    pinned process's (`chatgate custom`). The upstream and the load generator stay on core 1 and
    compete there with a worker; each run reports how much of a core they took."""
    workers = b.opts.workers
    port = procs.free_port()
    prepared = _prepare_chatgate(b, port)
    if prepared is None:
        return
    data_dir, env, models, headers = prepared
    cores = f"{procs.SERVER_CORE},{procs.CLIENT_CORE}"
    name = f"chatgate custom w{workers}"
    server = procs.start(
        name.replace(" ", "-"), chatgate_env.serve_command(workers), port=port, core=cores,
        log_dir=b.log_dir, env=env, cwd=data_dir,
    )  # fmt: skip
    with procs.running(server, "/healthz", 60):
        procs.await_workers(server, workers)
        target = Target(
            name, port, "/api/chat/custom", custom_body(models.fast), f"tok{b.opts.chunks - 1}",
            "/api/chat/custom", custom_body(models.slow), None, b.upstream.port, 0, headers, spread=True,
        )  # fmt: skip
        b.measure([target], server.pids)
        b.notes.append(
            f"{name}: {workers} workers over cores {cores}, sharing core {procs.CLIENT_CORE} with the upstream and "
            "the load generator (their CPU is in the run's client_core_busy; CPU per request counts every worker)"
        )


def run_litellm(b: Bench) -> None:
    print("  LiteLLM: checking its virtual environment", flush=True)
    installed = litellm_env.ensure()
    if isinstance(installed, str):
        print(f"  LiteLLM not available: {installed}", flush=True)
        b.notes.append(f"LiteLLM not available: {installed.splitlines()[0]}")
        return
    server = litellm_env.start(installed, "litellm", b.log_dir, b.upstream.port)
    port = server.port
    with procs.running(server, "/health/liveliness", 180):
        hold = min(b.opts.litellm_hold, fd_capacity() // 2)
        t = Target(
            "litellm", port, "/v1/chat/completions", openai_body("bench"), "data: [DONE]",
            "/v1/chat/completions", openai_body("bench-slow"), "data: [DONE]", b.upstream.port, hold,
        )  # fmt: skip
        if not hold and b.opts.hold:
            b.notes.append("litellm: hold scenario not run (use --litellm-hold N; it ramps at ~50 streams/s)")
        b.measure([t], server.pids)


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "direct": run_direct,
    "floor": run_floor,
    "chatgate": run_chatgate,
    "workers": run_chatgate_workers,
    "litellm": run_litellm,
}
PATH_ORDER = (
    "direct", "floor", "chatgate custom", "chatgate v1",
    f"chatgate custom{report.METRICS_OFF_LABEL}", f"chatgate v1{report.METRICS_OFF_LABEL}",
    f"chatgate custom{report.METRICS_AA_LABEL}", f"chatgate v1{report.METRICS_AA_LABEL}",
    *(f"chatgate {route}{label}" for label in list(chatgate_env.BACKENDS.values())[1:] for route in ("custom", "v1")),
    "litellm",
)  # fmt: skip


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}x {model}, Linux {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    t0 = time.monotonic()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if (os.cpu_count() or 1) < 2:
        print("the bench needs two cores (server on core 0, clients on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(procs.CLIENT_CORE)})  # keep this runner off the server's core
    limit = procs.raise_fd_limit(1 << 20)
    log_dir = opts.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"chatgate bench — {machine()}; fd limit {limit:,}; logs in {log_dir}", flush=True)

    up_port = procs.free_port()
    upstream = procs.start(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--port", str(up_port), "--chunks", str(opts.chunks),
         "--slow-delay", str(opts.slow_delay), *paced.upstream_args(opts.paced)],
        port=up_port, core=procs.CLIENT_CORE, log_dir=log_dir, cwd=ROOT,
    )  # fmt: skip
    no_halt = procs.NoIdleHalt()
    with procs.running(upstream, "/healthz", 15), no_halt if opts.poll_idle else contextlib.nullcontext():
        bench = Bench(opts, log_dir, upstream)
        if no_halt.problem:
            bench.notes.append(no_halt.problem)
        for group in opts.groups if {"streams", "hold"} & set(opts.scenarios) else ():
            print(f"[{time.monotonic() - t0:5.0f}s] {group}", flush=True)
            try:
                RUNNERS[group](bench)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"  {group} failed: {exc}", flush=True)
                bench.notes.append(f"{group} failed: {str(exc).splitlines()[0]}")
        if "paced" in opts.scenarios:
            print(f"[{time.monotonic() - t0:5.0f}s] paced", flush=True)
            try:
                paced.run(bench, opts.paced)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"  paced failed: {exc}", flush=True)
                bench.notes.append(f"paced failed: {str(exc).splitlines()[0]}")

    meta = {
        "started": started,
        "machine": machine(),
        "reps": opts.reps,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "fd_limit": limit,
        "poll_idle": opts.poll_idle and no_halt.problem is None,
        "notes": list(dict.fromkeys(bench.notes)),
        "wall_s": time.monotonic() - t0,
        "paced_idle_rss_kb": bench.paced_idle_rss_kb,
    }
    measured = {r["path"] for r in bench.runs}
    paths = [p for p in PATH_ORDER if p in measured]
    paths += sorted(p for p in measured if p not in PATH_ORDER)  # chatgate custom wN
    # Only a full run (every path, every scenario, full length) is the one the docs quote.
    full = (
        opts.reps >= 3
        and opts.scenarios == SCENARIOS
        and opts.hold_streams >= 10_000
        and opts.paced == paced.PacedOptions()
        and set(PATH_ORDER) - {p for p in PATH_ORDER if p.endswith(report.METRICS_AA_LABEL)} <= set(paths)
    )
    name = "latest" if full else "partial"
    md = report.write_all(
        opts.out, bench.runs, paths, meta, opts.hold_streams, DOC if full else None, name, bench.paced_runs
    )
    print()
    print(md)
    print(f"wrote {opts.out / (name + '.md')}, {opts.out / (name + '.png')} and the run's JSON "
          f"in {time.monotonic() - t0:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
