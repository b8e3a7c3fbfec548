"""The paced bench scenario's own logic: its figures, the capacity search and the upstream's pacer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from bench import paced, payload
from bench.upstream import Pacer, UpstreamConfig


def _raw(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "concurrency": 4,
        "streams_started": 3,
        "ttfb_ms": [1.0, 2.0, 3.0],
        "errors": {},
        "elapsed_s": 2.0,
        "server_cpu_s": 0.5,
        "upstream_cpu_s": 0.2,
        "loadgen_cpu_s": 0.1,
        "other_cpu_s": {"0": 0.0, "1": 0.0},
        "max_gap_ms": [21.0, 20.5, 30.0, 20.0],
        "window_bytes": 5_000,
        "stream_bytes": [1_000, 1_000, 1_000],
        "rss_kb": 1_000,
    }
    raw.update(over)
    return raw


def test_events_are_counted_from_the_bytes_read_in_the_window() -> None:
    # 5,000 bytes in the window of 1,000-byte streams of 10 tokens: 50 events, in 2 s.
    s = paced.summarize(_raw(), tokens=10)
    assert s["events_per_s"] == 25.0
    assert s["cpu_us_per_event"] == pytest.approx(0.5e6 / 50)
    assert s["gap_p99_ms"] == 30.0
    assert s["gap_p50_ms"] == 20.5
    assert s["client_core_busy"] == pytest.approx(0.15)


def test_no_whole_stream_means_no_event_count_rather_than_a_guess() -> None:
    s = paced.summarize(_raw(stream_bytes=[]), tokens=10)
    assert s["cpu_us_per_event"] is None
    assert s["events_per_s"] is None


def test_a_path_too_slow_to_end_a_stream_is_counted_with_an_earlier_steps_stream() -> None:
    s = paced.summarize(_raw(stream_bytes=[]), tokens=10, whole_stream=500.0)
    assert s["events_per_s"] == 50.0  # 5,000 bytes of 500-byte streams of 10 tokens, in 2 s
    assert paced.summarize(_raw(), tokens=10, whole_stream=500.0)["events_per_s"] == 25.0  # its own first


def _run(path: str, c: int, gap: float, errors: int = 0, cpu: float = 10.0) -> dict[str, Any]:
    summary = paced.summarize(_raw(concurrency=c, max_gap_ms=[gap], server_cpu_s=cpu * 50 / 1e6), tokens=10)
    summary["errors"] = errors
    summary["error_kinds"] = {"timeout": errors} if errors else {}
    return {"path": path, "rep": 0, "summary": summary}


def test_medians_over_repetitions_and_errors_summed() -> None:
    figs = paced.medians(
        [_run("floor", 64, 20.0, cpu=10), _run("floor", 64, 22.0, errors=1, cpu=30), _run("floor", 64, 40.0, cpu=20)]
    )
    f = figs[("floor", 64)]
    assert f["reps"] == 3
    assert f["gap_p99_ms"] == 22.0
    assert f["cpu_us_per_event"] == pytest.approx(20.0)
    assert f["errors"] == 1
    assert f["error_kinds"] == {"timeout": 1}


def test_a_step_passes_on_the_gap_it_adds_to_direct_and_no_errors() -> None:
    direct = {"gap_p99_ms": 25.0, "errors": 0}
    assert paced.passes({"gap_p99_ms": 35.0, "errors": 0}, direct) is True
    assert paced.passes({"gap_p99_ms": 35.1, "errors": 0}, direct) is False
    assert paced.passes({"gap_p99_ms": 21.0, "errors": 2}, direct) is False
    assert paced.passes({"gap_p99_ms": 21.0, "errors": 0}, None) is None


def test_capacity_is_the_last_pass_below_the_first_failure() -> None:
    assert paced.capacity({64: True, 128: True, 256: False, 512: True}) == (128, 256)
    assert paced.capacity({64: True, 128: None, 256: True}) == (256, None)
    assert paced.capacity({64: False, 128: True}) == (None, 64)


def test_midpoint_bisects_on_a_grain() -> None:
    assert paced.midpoint(128, 256) == 192
    assert paced.midpoint(16, 32, 2) == 24
    assert paced.midpoint(16, 24, 16) is None  # 16 and 32 are both outside (16, 24)
    assert paced.midpoint(None, 64) is None


def test_a_step_behind_the_pace_fails_and_one_direct_could_not_carry_is_not_judged() -> None:
    direct = {"gap_p99_ms": 21.0, "errors": 0, "concurrency": 64, "events_per_s": 3200.0}
    kept = {"gap_p99_ms": 22.0, "errors": 0, "concurrency": 64, "events_per_s": 3190.0}
    behind = {**kept, "events_per_s": 2800.0}  # its gap is fine, but it relayed 12% too few events
    assert paced.passes(kept, direct, rate=50) is True
    assert paced.passes(behind, direct, rate=50) is False
    late_direct = {**direct, "events_per_s": 2000.0, "gap_p99_ms": 70.0}
    assert paced.passes(kept, late_direct, rate=50) is None  # the client side could not carry it


def test_after_the_ladder_a_failing_first_step_is_halved_else_bisected() -> None:
    assert paced.next_step(None, 64, 16) == 32
    assert paced.next_step(None, 1, 16) is None
    assert paced.next_step(128, 256, 16) == 192
    assert paced.next_step(1024, None, 16) is None  # nothing failed: nothing to refine


def test_targets_compare_with_the_floor_and_litellm() -> None:
    runs = [
        _run("direct", 64, 20.0),
        _run("floor", 64, 21.0, cpu=30),
        _run("chatgate custom", 64, 25.0, cpu=36),
        _run("litellm", 64, 500.0),
        _run("direct", 2, 20.0),
        _run("litellm", 2, 21.0),
    ]
    lines = paced.targets(paced.medians(runs), [64], rate=0.1)  # 25 events/s keep 64 streams' pace
    custom = [line for line in lines if "chatgate custom" in line]
    assert custom[0].startswith("- PASS") and "1.20x the paced floor's at 64" in custom[0]
    assert custom[1].startswith("- PASS") and "capacity 64 streams, 1.00x the floor's 64" in custom[1]
    assert custom[2].startswith("- PASS") and "32.0x LiteLLM's 2" in custom[2]
    assert any(line.startswith("- n/a  chatgate v1") for line in lines)
    behind = paced.targets(paced.medians(runs), [64], rate=50.0)[0]  # 25 of 3,200 events/s due
    assert behind.startswith("- n/a  chatgate custom: CPU per relayed event 1.20x")
    assert behind.endswith("not judged: chatgate custom and floor fell behind the pace")


def test_a_saturated_client_core_is_named_beside_the_capacity() -> None:
    runs = [_run("direct", 64, 20.0), _run("floor", 64, 21.0)]
    runs[1]["summary"]["client_core_busy"] = 0.95
    lines = paced.capacity_lines(paced.capacities(paced.medians(runs)))
    assert lines == [
        "- floor: 64 streams (no step failed: at least this); the client core was saturated at 64: "
        "the capacity may be the client's"
    ]


class _Transport:
    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append((asyncio.get_running_loop().time(), data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_the_pacer_writes_one_event_per_interval_and_ends_the_stream() -> None:
    pacer = Pacer(UpstreamConfig(paced_tokens=4, paced_interval=0.01))
    t, cut = _Transport(), _Transport()

    async def main() -> None:
        pacer.start(t, close_after=True)  # type: ignore[arg-type]
        pacer.start(cut, close_after=False)  # type: ignore[arg-type]
        cut.closed = True  # the client left: nothing more is written to it
        for _ in range(200):  # until the stream ends (50 ms on an idle machine), at most 2 s
            await asyncio.sleep(0.01)
            if t.closed:
                break

    asyncio.run(main())
    frames = payload.sse_frames(4)
    assert [d for _, d in t.writes] == [
        payload.CHUNK_HEAD + b"\r\n" + frames[0],
        frames[1],
        frames[2],
        frames[3],
        frames[4] + frames[5] + payload.LAST_CHUNK,
    ]
    # Never early on the stream's schedule (to the pacer's 1 ms tick); late only if the loop was.
    start = t.writes[0][0]
    assert all(at >= start + i * 0.01 - 0.0011 for i, (at, _) in enumerate(t.writes)), t.writes
    assert t.closed
    assert len(cut.writes) == 1
    assert pacer.timer is None  # no streams left: the timer stops


class _FakeRunner(paced.Runner):
    """The ladder's choices, with a step that makes up its result: a path sustains up to `caps`."""

    def __init__(self, caps: dict[str, int], opts: paced.PacedOptions) -> None:
        class _Bench:
            paced_runs: list[dict[str, Any]] = []

        super().__init__(_Bench(), opts)  # type: ignore[arg-type]
        self.caps = caps
        self.steps: list[tuple[str, int]] = []

    def step(self, t: paced.PacedTarget, c: int, rep: int) -> dict[str, Any]:
        self.steps.append((t.name, c))
        gap = 20.0 if t.name == "direct" or c <= self.caps[t.name] else 50.0
        run = _run(t.name, c, gap)
        run["summary"]["events_per_s"] = c * self.opts.rate  # every path keeps the pace here
        self.b.paced_runs.append({**run, "rep": rep})
        return run["summary"]


def _target(name: str) -> paced.PacedTarget:
    return paced.PacedTarget(name, 1, "/", {}, "", [])


def test_the_ladder_stops_a_path_at_its_first_failure_then_refines_its_capacity() -> None:
    opts = paced.PacedOptions(concurrency=(64, 1024), ladder=(64, 128, 256, 512, 1024), reps=2, bisect=1)
    runner = _FakeRunner({"floor": 300, "chatgate custom": 20}, opts)
    runner.ladder([_target("floor"), _target("chatgate custom")], _target("direct"), opts.ladder, opts.concurrency, 16)
    floor = [c for name, c in runner.steps if name == "floor"]
    custom = [c for name, c in runner.steps if name == "chatgate custom"]
    # The floor: every step to its first failure (512), the kept 1,024 twice, then 384 between.
    assert floor == [64, 64, 128, 256, 512, 1024, 1024, 384]
    # Failing its first step, the route still runs the kept steps, then halves below the ladder.
    assert custom == [64, 64, 1024, 1024, 32, 16]
    caps = paced.capacities(paced.medians(runner.b.paced_runs))
    assert caps["floor"]["capacity"] == 256 and caps["floor"]["first_fail"] == 384
    assert caps["chatgate custom"]["capacity"] == 16 and caps["chatgate custom"]["first_fail"] == 32
