"""The paced scenario: streams shaped like a real model server's, and how many one core sustains.

Real model servers (vLLM, llama.cpp, Ollama, OpenAI) write one event per token, chunked, on
keep-alive connections, tens of milliseconds apart. Then a relay reads, parses and writes once
per token, and its cost per relayed event decides how many users one core serves. Here:
- the upstream's `/paced/` stream (`bench.upstream.Pacer`) writes `tokens` deltas at `rate` per
  second; the floor app's `/paced` sends as many delta texts at the same pace; chatgate (both
  routes) and LiteLLM relay the upstream's; *direct* reads the upstream itself;
- `bench.paced_load` holds C such streams at once, started evenly over one stream's duration,
  and times every read;
- each concurrency of a ladder (64, 128, 256, 512, 1,024, 2,048 by default) is run for every path, the
  paths interleaved (floor, chatgate custom, chatgate v1 take turns, each against a server that
  stays up), so that load elsewhere on the machine falls on all of them alike.

Figures per path and concurrency (medians over repetitions):
- server CPU per relayed event, and its ratio to the floor's at the same concurrency;
- time to first byte, and what it adds to direct's;
- the largest gap between a stream's reads, P99 over streams, and what it adds to direct's: the
  jitter the path adds to token delivery;
- RSS per open stream (RSS during the window minus the server's RSS before the first step, over C);
- the client core's CPU (upstream + load generator): over 90%, the step says so.
**Capacity** is the largest concurrency whose added gap P99 is ≤ 10 ms with no errors, below the
first one that fails; one bisection between them refines it (`--paced-bisect`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import chatgate_env, litellm_env, procs
from bench.report import CLIENT_CORE as REPORT_CLIENT_CORE
from bench.report import SERVER_CORE as REPORT_SERVER_CORE
from bench.report import percentile

if TYPE_CHECKING:
    from bench.__main__ import Bench

ROOT = Path(__file__).resolve().parent.parent
DIRECT, FLOOR, CUSTOM, V1, LITELLM = "direct", "floor", "chatgate custom", "chatgate v1", "litellm"
BASE = " (base)"  # chatgate from another source tree (`--paced-baseline`): before/after in one run
PATHS = (DIRECT, FLOOR, CUSTOM + BASE, CUSTOM, V1 + BASE, V1, LITELLM)
GAP_LIMIT_MS = 10.0  # the capacity criterion: added gap P99 at most this
CLIENT_BUSY = 0.9  # the client core above this: the step may be bounded by the client side
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class PacedOptions:
    tokens: int = 256
    rate: float = 50.0  # tokens per second
    concurrency: tuple[int, ...] = (64, 256, 1024)  # the issue's; repeated `reps` times
    ladder: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # capacity steps (once each, if not above)
    litellm_ladder: tuple[int, ...] = (4, 8, 16, 32, 64)
    window: float = 3.0
    reps: int = 3
    bisect: int = 1
    baseline: str | None = None  # a source tree of chatgate to measure beside this one

    @property
    def interval(self) -> float:
        return 1.0 / self.rate

    @property
    def duration(self) -> float:
        """Seconds of one stream: the ramp."""
        return self.tokens * self.interval


QUICK = PacedOptions(tokens=64, concurrency=(64, 256), ladder=(64, 256), litellm_ladder=(4, 16), window=2.0, reps=1)


# Figures (pure) -----------------------------------------------------------------------------------


def summarize(raw: dict[str, Any], tokens: int, whole_stream: float | None = None) -> dict[str, Any]:
    """One step's figures from `bench.paced_load`'s result.

    Relayed events are counted from the body bytes read in the window over the bytes of a whole
    stream, times the stream's `tokens`: exact for every path whatever its framing (SSE events
    or delta texts), and counting the streams cut at the window's edges for what they moved in it.
    A path too slow to finish a stream in the window is counted with `whole_stream`, the bytes of
    its whole stream seen at an earlier step.
    """
    elapsed = raw["elapsed_s"]
    whole = statistics.median(raw["stream_bytes"]) if raw["stream_bytes"] else whole_stream
    events = raw["window_bytes"] * tokens / whole if whole else None
    gaps, ttfb = sorted(raw["max_gap_ms"]), sorted(raw["ttfb_ms"])
    c = raw["concurrency"]
    return {
        "concurrency": c,
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "streams_started": raw["streams_started"],
        "events_per_s": events / elapsed if events else None,
        "cpu_us_per_event": raw["server_cpu_s"] * 1e6 / events if events else None,
        "server_core_busy": raw["server_cpu_s"] / elapsed,
        "client_core_busy": (raw["upstream_cpu_s"] + raw["loadgen_cpu_s"]) / elapsed,
        "other_load_server_core": raw["other_cpu_s"].get(REPORT_SERVER_CORE, 0.0) / elapsed,
        "other_load_client_core": raw["other_cpu_s"].get(REPORT_CLIENT_CORE, 0.0) / elapsed,
        "ttfb_p50_ms": percentile(ttfb, 50),
        "ttfb_p99_ms": percentile(ttfb, 99),
        "gap_p50_ms": percentile(gaps, 50),
        "gap_p99_ms": percentile(gaps, 99),
        "gap_streams": len(gaps),
        "rss_kb": raw["rss_kb"],
        "stream_bytes": whole,
    }


def medians(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (path, concurrency): the median of each figure over the repetitions (errors summed)."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["path"], run["summary"]["concurrency"]), []).append(run["summary"])
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for key, sums in grouped.items():
        values: dict[str, Any] = {"reps": len(sums), "errors": sum(s["errors"] for s in sums)}
        kinds: dict[str, int] = {}
        for s in sums:
            for kind, n in s["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        values["error_kinds"] = kinds
        for name in sums[0]:
            if name not in values:
                present = [s[name] for s in sums if s.get(name) is not None]
                values[name] = statistics.median(present) if present else None
        out[key] = values
    return out


def added(fig: dict[str, Any], direct: dict[str, Any] | None, name: str) -> float | None:
    """The path's figure minus direct's at the same concurrency."""
    if direct is None or fig.get(name) is None or direct.get(name) is None:
        return None
    return float(fig[name]) - float(direct[name])


def passes(
    fig: dict[str, Any], direct: dict[str, Any] | None, rate: float | None = None, limit_ms: float = GAP_LIMIT_MS
) -> bool | None:
    """Whether a step is sustained: added gap P99 within the limit, no errors, and (given the
    `rate`) every event due relayed. None when it cannot be judged: no direct figure, or direct
    itself fell behind the pace (the client core could not carry the step; a path compared with
    a late direct would pass on direct's lateness)."""
    gap = added(fig, direct, "gap_p99_ms")
    if gap is None or direct is None:
        return None
    if rate is not None:
        if not kept_pace(direct, rate):
            return None
        if not kept_pace(fig, rate):
            return False
    return gap <= limit_ms and fig["errors"] == 0


def capacity(verdicts: dict[int, bool | None]) -> tuple[int | None, int | None]:
    """(largest passing concurrency below the first failing one, that first failing one).

    A pass above a failure is noise, not capacity: stepping stops at the first failure.
    """
    best: int | None = None
    for c in sorted(verdicts):
        ok = verdicts[c]
        if ok is None:
            continue
        if not ok:
            return best, c
        best = c
    return best, None


def midpoint(low: int | None, high: int | None, step: int = 16) -> int | None:
    """The concurrency halfway between a pass and a failure, rounded to `step`; None if none lies between."""
    if low is None or high is None:
        return None
    mid = round((low + high) / 2 / step) * step
    return mid if low < mid < high else None


def next_step(best: int | None, fail: int | None, grain: int) -> int | None:
    """The next concurrency to try after the ladder: half the first step if even that failed,
    else halfway between the capacity and the first failure."""
    if best is None and fail is not None:
        return fail // 2 if fail >= 2 else None
    return midpoint(best, fail, grain)


# Tables (pure) ------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(f: dict[str, Any], floor: dict[str, Any] | None) -> float | None:
    """CPU per event over the floor's."""
    if floor is None or not f["cpu_us_per_event"] or not floor["cpu_us_per_event"]:
        return None
    return float(f["cpu_us_per_event"]) / float(floor["cpu_us_per_event"])


def table(figs: dict[tuple[str, int], dict[str, Any]], idle_rss_kb: dict[str, int]) -> str:
    head = [
        "path", "streams", "events/s", "CPU µs/event", "x floor", "+TTFB P50 ms", "+TTFB P99 ms", "gap P99 ms",
        "+gap P99 ms", "RSS KB/stream", "server CPU %", "client CPU %", "errors",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in sorted({c for _, c in figs}):
        direct, floor = figs.get((DIRECT, c)), figs.get((FLOOR, c))
        for path in _paths(figs):
            f = figs.get((path, c))
            if f is None:
                continue
            ratio = _ratio(f, floor) if path not in (DIRECT, FLOOR) else None
            rss = None
            if path != DIRECT and path in idle_rss_kb and f.get("rss_kb"):
                rss = (f["rss_kb"] - idle_rss_kb[path]) / c
            client = f["client_core_busy"] * 100
            cells = [
                path, f"{c:,}", _f(f["events_per_s"], 0), _f(f["cpu_us_per_event"]), _f(ratio, 2),
                _f(None if path == DIRECT else added(f, direct, "ttfb_p50_ms"), 2),
                _f(None if path == DIRECT else added(f, direct, "ttfb_p99_ms"), 2),
                _f(f["gap_p99_ms"]), _f(None if path == DIRECT else added(f, direct, "gap_p99_ms")),
                _f(rss), _f(f["server_core_busy"] * 100, 0),
                _f(client, 0) + (" (saturated)" if f["client_core_busy"] > CLIENT_BUSY else ""),
                str(f["errors"]) + (f" ({', '.join(sorted(f['error_kinds']))})" if f["errors"] else ""),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def capacities(figs: dict[tuple[str, int], dict[str, Any]], rate: float | None = None) -> dict[str, dict[str, Any]]:
    """Per path: its capacity, the first failing step, whether the client core was saturated, and
    the steps not judged because direct fell behind the pace there."""
    out: dict[str, dict[str, Any]] = {}
    for path in _paths(figs):
        if path == DIRECT:
            continue
        steps = {c: f for (p, c), f in figs.items() if p == path}
        verdicts = {c: passes(f, figs.get((DIRECT, c)), rate) for c, f in steps.items()}
        best, fail = capacity(verdicts)
        saturated = [c for c, f in steps.items() if f["client_core_busy"] > CLIENT_BUSY and (fail is None or c <= fail)]
        unjudged = [c for c, ok in verdicts.items() if ok is None and (fail is None or c < fail)]
        out[path] = {
            "capacity": best,
            "first_fail": fail,
            "client_saturated_at": sorted(saturated),
            "unjudged": sorted(unjudged),
        }
    return out


def _paths(figs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """The paths measured, in PATHS order, then any other (`chatgate custom w2`) by name."""
    measured = {p for p, _ in figs}
    return [p for p in PATHS if p in measured] + sorted(measured - set(PATHS))


def capacity_lines(caps: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for path, cap in caps.items():
        best, fail, sat = cap["capacity"], cap["first_fail"], cap["client_saturated_at"]
        text = f"- {path}: {'—' if best is None else f'{best:,}'} streams"
        text += f" (first failing step {fail:,})" if fail is not None else " (no step failed: at least this)"
        if sat:
            steps = ", ".join(f"{c:,}" for c in sat)
            text += f"; the client core was saturated at {steps}: the capacity may be the client's"
        if cap.get("unjudged"):
            steps = ", ".join(f"{c:,}" for c in cap["unjudged"])
            text += f"; not judged at {steps} streams, where direct itself fell behind the pace"
        lines.append(text)
    return lines


def kept_pace(f: dict[str, Any], rate: float) -> bool:
    """Whether a step's server relayed (nearly) every event its streams were due in the window."""
    return bool(f["events_per_s"]) and f["events_per_s"] >= 0.95 * f["concurrency"] * rate


def targets(figs: dict[tuple[str, int], dict[str, Any]], main_c: Sequence[int], rate: float) -> list[str]:
    """Issue 15's targets: CPU per event ≤ 1.3x the floor's (both routes, at each of the issue's
    concurrencies), capacity ≥ 0.75x the floor's and ≥ 30x LiteLLM's."""
    lines = []

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    caps = capacities(figs, rate)
    floor_cap = caps.get(FLOOR, {}).get("capacity")
    ll_cap = caps.get(LITELLM, {}).get("capacity")
    for route in (CUSTOM, V1):
        if route not in caps:
            lines.append(f"- n/a  {route}: paced scenario not measured")
            continue
        # CPU per event is judged only where both servers kept pace: one that falls behind reads
        # several events per wake-up, and its cost per event drops with the backlog.
        for c in main_c:
            f, fl = figs.get((route, c)), figs.get((FLOOR, c))
            if f is None or fl is None:
                continue
            ratio = _ratio(f, fl)
            behind = [name for name, x in ((route, f), (FLOOR, fl)) if not kept_pace(x, rate)]
            ok = None if ratio is None or behind else ratio <= 1.3
            lines.append(
                f"- {verdict(ok)} {route}: CPU per relayed event {_f(ratio, 2)}x the paced floor's at {c:,} "
                f"streams ({_f(f['cpu_us_per_event'])} vs {_f(fl['cpu_us_per_event'])} µs; target ≤ 1.3x)"
                + (f"; not judged: {' and '.join(behind)} fell behind the pace" if behind else "")
            )
        cap = caps[route]["capacity"]
        x_floor = cap / floor_cap if cap and floor_cap else None
        lines.append(
            f"- {verdict(None if x_floor is None else x_floor >= 0.75)} {route}: capacity "
            f"{_f(cap, 0)} streams, {_f(x_floor, 2)}x the floor's {_f(floor_cap, 0)} (target ≥ 0.75x)"
        )
        x_ll = cap / ll_cap if cap and ll_cap else None
        lines.append(
            f"- {verdict(None if x_ll is None else x_ll >= 30)} {route}: capacity {_f(x_ll, 1)}x LiteLLM's "
            f"{_f(ll_cap, 0)} (target ≥ 30x)"
        )
    return lines


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    figs = medians(runs)
    opts = meta["options"]["paced"]
    return "\n".join(
        [
            f"**Paced streams** ({opts['tokens']} tokens at {opts['rate']:g}/s, one event per upstream write, "
            f"chunked, keep-alive; CPU = server utime+stime per relayed event; gap = the largest gap between "
            f"a stream's reads, P99 over streams; + = minus direct's at the same concurrency; medians of "
            f"{opts['reps']} repetition(s) at {', '.join(f'{c:,}' for c in opts['concurrency'])} streams, "
            "one at the other steps)",
            "",
            table(figs, meta.get("paced_idle_rss_kb", {})),
            "",
            f"**Capacity** (the largest number of concurrent {opts['rate']:g}-tokens/s streams on one core with "
            f"added gap P99 ≤ {GAP_LIMIT_MS:g} ms and no errors)",
            "",
            *capacity_lines(capacities(figs, opts["rate"])),
        ]
    )


# Running ------------------------------------------------------------------------------------------


@dataclass
class PacedTarget:
    name: str
    port: int
    path: str
    body: dict[str, Any]
    expect_tail: str
    pids: list[int]
    headers: dict[str, str] = field(default_factory=dict)
    spread: bool = False  # the server runs on both cores (`serve --workers N`), beside the client


class Runner:
    DOWN = 3  # halvings below the ladder for a path that fails its first step (besides `bisect`)

    def __init__(self, bench: Bench, opts: PacedOptions) -> None:
        self.b, self.opts = bench, opts
        self.idle_rss_kb: dict[str, int] = {}
        self.whole_stream: dict[str, float] = {}  # per path: the bytes of one whole stream

    def step(self, t: PacedTarget, c: int, rep: int) -> dict[str, Any]:
        upstream = self.b.upstream.pids
        server = [] if t.name == DIRECT else t.pids
        spec = {
            "port": t.port, "path": t.path, "body": json.dumps(t.body), "concurrency": c,
            "ramp": self.opts.duration, "window": self.opts.window, "headers": t.headers,
            "expect_tail": t.expect_tail, "watch_pids": t.pids, "aux_pids": [] if t.name == DIRECT else upstream,
            "core_pids": {procs.SERVER_CORE: server, procs.CLIENT_CORE: upstream + (server if t.spread else [])},
        }  # fmt: skip
        cmd = ["taskset", "-c", procs.CLIENT_CORE, sys.executable, "-m", "bench.paced_load", json.dumps(spec)]
        timeout = self.opts.duration + self.opts.window + 120
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"paced load generator failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        summary = summarize(json.loads(proc.stdout), self.opts.tokens, self.whole_stream.get(t.name))
        if summary["stream_bytes"]:
            self.whole_stream[t.name] = summary["stream_bytes"]
        self.b.paced_runs.append({"path": t.name, "rep": rep, "summary": summary})
        print(
            f"  {t.name:<16} paced c{c:<5} rep {rep + 1}: {summary['events_per_s'] or 0:>8,.0f} events/s  "
            f"CPU {summary['cpu_us_per_event'] or 0:6.1f} µs/event  TTFB P50 {summary['ttfb_p50_ms'] or 0:7.2f} ms  "
            f"gap P99 {summary['gap_p99_ms'] or 0:7.2f} ms  client core {summary['client_core_busy']:.0%}  "
            f"errors {summary['errors']}",
            flush=True,
        )
        return summary

    def ladder(
        self, targets: list[PacedTarget], direct: PacedTarget, steps: Sequence[int], keep: Sequence[int], grain: int
    ) -> None:
        """Every step for every target, interleaved; a target stops after its first failing step
        (except at the steps in `keep`, which are repeated); then bisection to `grain` streams."""
        failed: set[str] = set()
        for c in steps:
            reps = self.opts.reps if c in keep else 1
            for rep in range(reps):
                active = [t for t in targets if t.name not in failed or c in keep]
                if not active:
                    break
                self.step(direct, c, rep)
                for t in active:
                    self.step(t, c, rep)
            figs = medians(self.b.paced_runs)
            for t in targets:
                f = figs.get((t.name, c))
                if f is not None and passes(f, figs.get((DIRECT, c)), self.opts.rate) is False:
                    failed.add(t.name)
        tries: dict[tuple[str, bool], int] = {}  # (path, below the ladder): steps taken
        for _ in range(self.opts.bisect + self.DOWN):
            figs = medians(self.b.paced_runs)
            caps = capacities(figs, self.opts.rate)
            todo = []
            for t in targets:
                if t.name not in caps:
                    continue
                best, fail = caps[t.name]["capacity"], caps[t.name]["first_fail"]
                key = (t.name, best is None)
                if tries.get(key, 0) >= (self.DOWN if best is None else self.opts.bisect):
                    continue
                if (mid := next_step(best, fail, grain)) and (t.name, mid) not in figs:
                    todo.append((t, mid))
                    tries[key] = tries.get(key, 0) + 1
            for c in sorted({mid for _, mid in todo}):
                if (DIRECT, c) not in figs:
                    self.step(direct, c, 0)
                for t, mid in todo:
                    if mid == c:
                        self.step(t, c, 0)

    def baseline(self, t: PacedTarget) -> None:
        self.idle_rss_kb[t.name] = procs.rss_kb(t.pids)


def upstream_args(opts: PacedOptions) -> list[str]:
    """The upstream's command-line options for this scenario's paced stream."""
    return ["--paced-tokens", str(opts.tokens), "--paced-interval", repr(opts.interval)]


def _openai(model: str) -> dict[str, Any]:
    return {"model": model, "messages": CHAT, "stream": True}


def run(b: Bench, opts: PacedOptions) -> None:
    """The paced scenario for the paths of `b.opts.groups` (direct always: it is the baseline)."""
    runner = Runner(b, opts)
    up = b.upstream
    last = f"tok{opts.tokens - 1}"
    direct = PacedTarget(DIRECT, up.port, "/paced/v1/chat/completions", _openai("bench-model"), "data: [DONE]", up.pids)
    targets: list[PacedTarget] = []
    with contextlib.ExitStack() as stack:
        if FLOOR in b.opts.groups:
            port = procs.free_port()
            cmd = [
                sys.executable, "-m", "uvicorn", "bench.floor:app", "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
                "--backlog", "4096",
            ]  # fmt: skip
            env = {"BENCH_PACED_TOKENS": str(opts.tokens), "BENCH_PACED_INTERVAL": repr(opts.interval)}
            server = procs.start(
                "floor-paced", cmd, port=port, core=procs.SERVER_CORE, log_dir=b.log_dir, env=env, cwd=ROOT
            )
            stack.enter_context(procs.running(server, "/healthz", 30))
            targets.append(PacedTarget(FLOOR, port, "/paced", {}, last, server.pids))
        if "chatgate" in b.opts.groups:
            if opts.baseline:
                targets.extend(_chatgate(b, stack, opts.tokens, Path(opts.baseline)))
            targets.extend(_chatgate(b, stack, opts.tokens))
        if "workers" in b.opts.groups:
            targets.extend(_chatgate(b, stack, opts.tokens, workers=b.opts.workers))
        for t in targets:
            runner.baseline(t)
        print(f"  paced: {opts.tokens} tokens at {opts.rate:g}/s, steps {', '.join(map(str, opts.ladder))}", flush=True)
        runner.ladder(targets, direct, opts.ladder, keep=opts.concurrency, grain=16)
    if LITELLM in b.opts.groups:
        _litellm(b, runner, direct)
    b.paced_idle_rss_kb = runner.idle_rss_kb


def _chatgate(
    b: Bench, stack: contextlib.ExitStack, tokens: int, source: Path | None = None, workers: int = 1
) -> list[PacedTarget]:
    """chatgate serving both routes; from `source`/src instead of this tree when given. With
    `workers` above one, `serve --workers N` on both cores, beside the client, and its custom
    route only (`chatgate custom wN`): its capacity beside the one pinned process's."""
    data_dir = Path(tempfile.mkdtemp(prefix="chatgate-bench-paced-"))
    port = procs.free_port()
    env = {**os.environ, **chatgate_env.env(data_dir, port)}
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve() / "src")  # ahead of the editable install's path
    try:
        chatgate_env.register(env, ROOT, b.upstream.port)
        model = chatgate_env.add_model(env, ROOT, "bench-paced", f"http://127.0.0.1:{b.upstream.port}/paced/v1")
        headers = chatgate_env.chatgate_headers(env, ROOT)
    except chatgate_env.ChatgateUnavailable as exc:
        b.notes.append(f"paced: chatgate not available: {str(exc).splitlines()[0]}")
        return []
    name = "chatgate-paced" + ("-base" if source else "") + (f"-w{workers}" if workers > 1 else "")
    core = f"{procs.SERVER_CORE},{procs.CLIENT_CORE}" if workers > 1 else procs.SERVER_CORE
    server = procs.start(
        name, chatgate_env.serve_command(workers), port=port, core=core, log_dir=b.log_dir, env=env, cwd=data_dir
    )
    stack.enter_context(procs.running(server, "/healthz", 60))
    custom = {"chatSettings": {"model": "bench-model", "temperature": 0.5}, "messages": CHAT, "customModelId": model}
    last = f"tok{tokens - 1}"
    if workers > 1:
        procs.await_workers(server, workers)
        spread = PacedTarget(f"{CUSTOM} w{workers}", port, "/api/chat/custom", custom, last, server.pids, headers, True)
        return [spread]
    suffix = BASE if source else ""
    return [
        PacedTarget(CUSTOM + suffix, port, "/api/chat/custom", custom, last, server.pids, headers),
        PacedTarget(V1 + suffix, port, "/v1/chat/completions", _openai(model), "data: [DONE]", server.pids, headers),
    ]


def _litellm(b: Bench, runner: Runner, direct: PacedTarget) -> None:
    installed = litellm_env.ensure()
    if isinstance(installed, str):
        b.notes.append(f"paced: LiteLLM not available: {installed.splitlines()[0]}")
        return
    server = litellm_env.start(installed, "litellm-paced", b.log_dir, b.upstream.port)
    port = server.port
    with procs.running(server, "/health/liveliness", 180):
        t = PacedTarget(LITELLM, port, "/v1/chat/completions", _openai("bench-paced"), "data: [DONE]", server.pids)
        runner.baseline(t)
        # LiteLLM saturates its core early: it stops at its first failing step, whatever the step.
        runner.ladder([t], direct, runner.opts.litellm_ladder, keep=(), grain=2)
