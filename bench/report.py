"""Figures from the load generator's raw results: the tables, the target checks, JSON and the chart."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIRECT, FLOOR, LITELLM = "direct", "floor", "litellm"
SERVER_CORE, CLIENT_CORE = "0", "1"
CHATGATE_PATHS = ("chatgate custom", "chatgate v1")
PG_LABEL = " (pg+redis)"  # the same routes with PostgreSQL + Redis behind them (`--backends`)
# The same routes on a second chatgate with CHATGATE_METRICS=false, measured in turn with the first.
METRICS_OFF_LABEL = " (metrics off)"
METRICS_AA_LABEL = " (metrics on, A/A)"  # `--metrics-aa`: a second server like the first
METRICS_BUDGET = 1.03  # issue 11: CPU per request with metrics on within 3% of off
SCENARIOS = {"c1": "32 chunks, concurrency 1", "c64": "32 chunks, concurrency 64", "hold": "hold (slow upstream)"}
DOC_START, DOC_END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-run figures from one load generator result."""
    ttfb, total = sorted(raw["ttfb_ms"]), sorted(raw["total_ms"])
    completed = raw["completed"]
    out = {
        "completed": completed,
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "throughput_rps": raw["throughput_rps"],
        "ttfb_p50_ms": percentile(ttfb, 50),
        "ttfb_p99_ms": percentile(ttfb, 99),
        "total_p50_ms": percentile(total, 50),
        "total_p99_ms": percentile(total, 99),
        "cpu_ms_per_req": raw["server_cpu_s"] * 1000 / completed if completed else None,
        "server_core_busy": raw["server_cpu_s"] / raw["elapsed_s"],
        "peak_rss_mb": raw["peak_rss_kb"] / 1024,
        "client_core_busy": (raw["upstream_cpu_s"] + raw["loadgen_cpu_s"]) / raw["elapsed_s"],
        "other_load_server_core": raw["other_cpu_s"].get(SERVER_CORE, 0.0) / raw["elapsed_s"],
        "other_load_client_core": raw["other_cpu_s"].get(CLIENT_CORE, 0.0) / raw["elapsed_s"],
    }
    for key in ("streams", "held", "time_to_hold_s", "rss_idle_kb", "rss_hold_kb", "rss_per_stream_kb"):
        if key in raw:
            out[key] = raw[key]
    return out


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Figures:
    """Medians over the repetitions of one path and scenario."""

    path: str
    scenario: str
    reps: int
    values: dict[str, Any]

    def get(self, key: str) -> float | None:
        value = self.values.get(key)
        return float(value) if isinstance(value, int | float) else None


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str], Figures]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["path"], run["scenario"]), []).append(run["summary"])
    figures: dict[tuple[str, str], Figures] = {}
    for key, sums in grouped.items():
        values: dict[str, Any] = {}
        for field in sums[0]:
            if field == "error_kinds":
                kinds: dict[str, int] = {}
                for s in sums:
                    for kind, n in s[field].items():
                        kinds[kind] = kinds.get(kind, 0) + n
                values[field] = kinds
            elif field in ("errors", "completed"):
                values[field] = sum(s[field] for s in sums)
            else:
                values[field] = _median(s.get(field) for s in sums)
        figures[key] = Figures(key[0], key[1], len(sums), values)
    return figures


# Tables -------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def stream_table(figs: dict[tuple[str, str], Figures], paths: Sequence[str]) -> str:
    head = [
        "path", "scenario", "req/s", "TTFB P50 ms", "TTFB P99 ms", "+P50 vs direct", "+P99 vs direct",
        "total P50 ms", "CPU ms/req", "x floor", "server CPU %", "peak RSS MB", "errors",
    ]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for scenario in ("c1", "c64"):
        direct, floor = figs.get((DIRECT, scenario)), figs.get((FLOOR, scenario))
        for path in paths:
            f = figs.get((path, scenario))
            if f is None:
                continue
            add50 = add99 = ratio = None
            if direct is not None and path != DIRECT:
                add50 = _sub(f.get("ttfb_p50_ms"), direct.get("ttfb_p50_ms"))
                add99 = _sub(f.get("ttfb_p99_ms"), direct.get("ttfb_p99_ms"))
            if (
                floor is not None
                and path != DIRECT
                and (cpu := f.get("cpu_ms_per_req"))
                and (fc := floor.get("cpu_ms_per_req"))
            ):
                ratio = cpu / fc
            lines.append(
                _row(
                    [
                        path,
                        scenario,
                        _f(f.get("throughput_rps"), 0),
                        _f(f.get("ttfb_p50_ms"), 3),
                        _f(f.get("ttfb_p99_ms"), 3),
                        _f(add50, 3),
                        _f(add99, 3),
                        _f(f.get("total_p50_ms"), 3),
                        _f(f.get("cpu_ms_per_req"), 3),
                        _f(ratio, 2),
                        _f(None if (busy := f.get("server_core_busy")) is None else busy * 100, 0),
                        _f(f.get("peak_rss_mb"), 1),
                        _errors(f),
                    ]
                )
            )
    return "\n".join(lines)


def hold_table(figs: dict[tuple[str, str], Figures], paths: Sequence[str]) -> str:
    head = [
        "path", "streams", "held at once", "ramp s", "TTFB P50 ms", "TTFB P99 ms", "idle RSS MB",
        "RSS during hold MB", "KB/stream above idle", "peak RSS MB", "errors",
    ]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for path in paths:
        f = figs.get((path, "hold"))
        if f is None:
            continue
        lines.append(
            _row(
                [
                    path,
                    _f(f.get("streams"), 0),
                    _f(f.get("held"), 0),
                    _f(f.get("time_to_hold_s"), 1),
                    _f(f.get("ttfb_p50_ms"), 2),
                    _f(f.get("ttfb_p99_ms"), 2),
                    _mb(f.get("rss_idle_kb")),
                    _mb(f.get("rss_hold_kb")),
                    _f(f.get("rss_per_stream_kb"), 1),
                    _f(f.get("peak_rss_mb"), 1),
                    _errors(f),
                ]
            )
        )
    return "\n".join(lines)


def _errors(f: Figures) -> str:
    kinds: dict[str, int] = f.values.get("error_kinds") or {}
    if not kinds:
        return str(f.values["errors"])
    top = sorted(kinds, key=kinds.__getitem__, reverse=True)[:2]
    return f"{f.values['errors']} ({', '.join(top)})"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mb(kb: float | None) -> str:
    return _f(None if kb is None else kb / 1024, 1)


# Targets ------------------------------------------------------------------------------------------


def paired_ratio(runs: list[dict[str, Any]], path: str, other: str, scenario: str, field: str) -> float | None:
    """The median over repetitions of `path`'s `field` divided by `other`'s in the same repetition.
    Two servers measured in turn within each repetition see the same drift of the machine; a
    ratio per repetition cancels it, where a ratio of the two medians would mix repetitions."""
    by_rep: dict[int, dict[str, float]] = {}
    for run in runs:
        if run["scenario"] == scenario and run["path"] in (path, other):
            value = run["summary"].get(field)
            if isinstance(value, int | float) and value > 0:
                by_rep.setdefault(run["rep"], {})[run["path"]] = float(value)
    return _median(pair[path] / pair[other] for pair in by_rep.values() if len(pair) == 2)


def targets(figs: dict[tuple[str, str], Figures], hold_goal: int, runs: list[dict[str, Any]]) -> list[str]:
    """One line per target of issue 3, for each chatgate route measured: PASS, FAIL or n/a."""
    lines = []

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    for route in CHATGATE_PATHS:
        cg64 = figs.get((route, "c64"))
        if cg64 is None:
            lines.append(f"- n/a  {route}: not measured")
            continue
        fl = figs.get((FLOOR, "c64"))
        cpu, fcpu = cg64.get("cpu_ms_per_req"), fl.get("cpu_ms_per_req") if fl else None
        ratio = cpu / fcpu if cpu and fcpu else None
        lines.append(
            f"- {verdict(None if ratio is None else ratio <= 2.0)} {route}: CPU per 32-chunk completion "
            f"{_f(ratio)}x the floor's (c64; target ≤ 2.0x)"
        )
        cg1, d1 = figs.get((route, "c1")), figs.get((DIRECT, "c1"))
        if cg1 is not None and d1 is not None:
            a50 = _sub(cg1.get("ttfb_p50_ms"), d1.get("ttfb_p50_ms"))
            a99 = _sub(cg1.get("ttfb_p99_ms"), d1.get("ttfb_p99_ms"))
            ok = None if a50 is None or a99 is None else a50 <= 0.5 and a99 <= 1.5
            lines.append(
                f"- {verdict(ok)} {route}: added TTFB at c1 P50 {_f(a50, 3)} ms (≤ 0.5), P99 {_f(a99, 3)} ms (≤ 1.5)"
            )
        ll = figs.get((LITELLM, "c64"))
        tput, ltput = cg64.get("throughput_rps"), ll.get("throughput_rps") if ll else None
        x = tput / ltput if tput and ltput else None
        ok64 = None if x is None else x >= 25 and cg64.values["errors"] == 0
        lines.append(
            f"- {verdict(ok64)} {route}: c64 throughput {_f(x, 2)}x LiteLLM's "
            f"(target ≥ 25x), {cg64.values['errors']} errors"
        )
        hold = figs.get((route, "hold"))
        if hold is not None:
            held, tried, per = hold.get("held") or 0, hold.get("streams") or 0, hold.get("rss_per_stream_kb")
            ok = held >= tried and hold.values["errors"] == 0 and per is not None and per <= 50
            capped = f"; {hold_goal:,} asked, capped by the fd limit" if tried < hold_goal else ""
            lines.append(
                f"- {verdict(ok)} {route}: {held:,.0f} of {tried:,.0f} streams held at once{capped}, "
                f"{hold.values['errors']} errors, {_f(per, 1)} KB RSS per stream above idle (≤ 50)"
            )
    for route in CHATGATE_PATHS:
        on = figs.get((route, "c64"))
        for label in (METRICS_AA_LABEL, METRICS_OFF_LABEL):
            second = figs.get((route + label, "c64"))
            if on is None or second is None:
                continue
            cpu, second_cpu = on.get("cpu_ms_per_req"), second.get("cpu_ms_per_req")
            ratio = paired_ratio(runs, route, route + label, "c64", "cpu_ms_per_req")
            how = f"c64; median of {on.reps} paired repetitions"
            if label == METRICS_AA_LABEL:  # a control: no verdict
                lines.append(
                    f"- {verdict(None)} {route}: A/A control, two servers with metrics on: CPU per request "
                    f"{_f(cpu, 3)} and {_f(second_cpu, 3)} ms, {_f(ratio, 3)}x ({how}; the method's own difference)"
                )
            else:
                lines.append(
                    f"- {verdict(None if ratio is None else ratio <= METRICS_BUDGET)} {route}: CPU per request "
                    f"with metrics on {_f(cpu, 3)} ms, off {_f(second_cpu, 3)} ms: {_f(ratio, 3)}x "
                    f"({how}; target ≤ {METRICS_BUDGET}x)"
                )
    for route in CHATGATE_PATHS:
        for scenario in ("c1", "c64"):
            pg, lite = figs.get((route + PG_LABEL, scenario)), figs.get((route, scenario))
            if pg is None or lite is None:
                continue
            cpu, lcpu = pg.get("cpu_ms_per_req"), lite.get("cpu_ms_per_req")
            ratio = cpu / lcpu if cpu and lcpu else None
            lines.append(
                f"- {verdict(None if ratio is None else ratio <= 1.3)} {route}{PG_LABEL}: CPU per request "
                f"{_f(ratio)}x SQLite's ({scenario}; target ≤ 1.3x)"
            )
    return lines


# Outputs ------------------------------------------------------------------------------------------


def noise_notes(runs: list[dict[str, Any]]) -> list[str]:
    """What else used the machine while the bench measured, in one or two lines."""
    notes = []
    for key, where in (("other_load_server_core", "server's core"), ("other_load_client_core", "client core")):
        other = [r["summary"][key] for r in runs]
        noisy = [x for x in other if x > 0.1]
        if noisy:
            notes.append(
                f"other processes on this machine took {min(noisy):.0%}-{max(noisy):.0%} of the {where} in "
                f"{len(noisy)} of {len(other)} scenarios (median {statistics.median(other):.0%}): P99 and "
                "throughput are noisy; CPU per request is the figure least affected"
            )
    busy = sorted({r["path"] for r in runs if r["path"] != DIRECT and r["summary"]["client_core_busy"] > 0.9})
    if busy:
        notes.append(
            f"the client core (upstream + load generator) was over 90% busy in some scenarios of "
            f"{', '.join(busy)}: their throughput may be bounded by the client side"
        )
    return notes


def markdown(
    figs: dict[tuple[str, str], Figures],
    paths: Sequence[str],
    meta: dict[str, Any],
    hold_goal: int,
    runs: list[dict[str, Any]],
    paced_runs: Sequence[dict[str, Any]] = (),
) -> str:
    from bench import paced  # it imports this module's helpers

    notes = "\n".join(f"- {n}" for n in [*meta.get("notes", []), *noise_notes([*runs, *paced_runs])])
    streams = [
        "**Streams of 32 chunks** (TTFB = first body byte; CPU = serving process utime+stime per completed request)",
        "",
        stream_table(figs, paths),
        "",
    ]
    held = [
        f"**Held streams** (slow upstream: one delta every {meta['options']['slow_delay']:g} s until released)",
        "",
        hold_table(figs, paths),
        "",
    ]
    paced_md = [paced.markdown(list(paced_runs), meta), ""] if paced_runs else []
    paced_opts = meta["options"]["paced"]
    paced_targets = paced.targets(paced.medians(paced_runs), paced_opts["concurrency"], paced_opts["rate"])
    return "\n".join(
        [
            f"Run {meta['started']} on {meta['machine']} — {meta['reps']} repetition(s), medians shown, "
            f"wall time {meta['wall_s']:.0f} s"
            + (
                ", idle cores polling (PM QoS latency 0)." if meta.get("poll_idle") else ", idle cores allowed to halt."
            ),
            "",
            *(streams if any(s in ("c1", "c64") for _, s in figs) else []),
            *(held if any(s == "hold" for _, s in figs) else []),
            *paced_md,
            "**Targets**",
            "",
            *(targets(figs, hold_goal, runs) if figs else []),
            *(paced_targets if paced_runs else []),
            *(["", "**Notes**", "", notes] if notes else []),
            "",
            "![latency and CPU per path](latest.png)",
            "",
        ]
    )


def chart(figs: dict[tuple[str, str], Figures], paths: Sequence[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, cpu) = plt.subplots(1, 2, figsize=(13, 5))
    for path in paths:
        xs, p50, p99 = [], [], []
        for scenario in ("c1", "c64", "hold"):
            f = figs.get((path, scenario))
            if f is None or f.get("ttfb_p50_ms") is None:
                continue
            xs.append(1 if scenario == "c1" else 64 if scenario == "c64" else f.get("streams") or 10_000)
            p50.append(f.get("ttfb_p50_ms"))
            p99.append(f.get("ttfb_p99_ms"))
        if xs:
            (line,) = lat.plot(xs, p50, "o-", label=f"{path} P50")
            lat.plot(xs, p99, "x--", color=line.get_color(), label=f"{path} P99")
    lat.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="time to first byte (ms)")
    lat.set_title("Time to first byte vs concurrency")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=7)

    width = 0.38
    for i, scenario in enumerate(("c1", "c64")):
        vals = [(figs[(p, scenario)].get("cpu_ms_per_req") if (p, scenario) in figs else None) for p in paths]
        xs = [j + (i - 0.5) * width for j in range(len(paths))]
        bars = cpu.bar(xs, [v or 0 for v in vals], width, label=f"concurrency {scenario[1:]}")
        cpu.bar_label(bars, labels=[_f(v, 3) if v else "" for v in vals], fontsize=7)
    cpu.set_xticks(range(len(paths)), list(paths), rotation=15)
    cpu.set(yscale="log", ylabel="CPU ms per completed request (serving process)")
    cpu.set_title("CPU per 32-chunk streamed completion")
    cpu.grid(True, axis="y", which="both", alpha=0.3)
    cpu.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_all(
    out_dir: Path,
    runs: list[dict[str, Any]],
    paths: Sequence[str],
    meta: dict[str, Any],
    hold_goal: int,
    doc: Path | None,
    name: str = "latest",
    paced_runs: Sequence[dict[str, Any]] = (),
) -> str:
    """Write `<timestamp>.json`, `<name>.md`, `<name>.png` (and the doc's results block); return the md."""
    figs = aggregate(runs)
    md = markdown(figs, paths, meta, hold_goal, runs, paced_runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = md.replace("](latest.png)", f"]({name}.png)")
    (out_dir / f"{name}.md").write_text(f"# chatgate benchmark — {name} run\n\n" + md)
    medians = {f"{p} {s}": f.values for (p, s), f in figs.items()}
    stamp = meta["started"].replace(":", "").replace("-", "")
    (out_dir / f"{stamp}.json").write_text(
        json.dumps({"meta": meta, "medians": medians, "runs": runs, "paced_runs": list(paced_runs)})
    )
    try:
        if figs:  # the chart is of the c1/c64/hold scenarios
            chart(figs, paths, out_dir / f"{name}.png")
    except ImportError as exc:
        print(f"no chart: {exc} (pip install -e '.[bench]')")
    if doc is not None and doc.exists():
        text = doc.read_text()
        block = f"{DOC_START}\n{md.replace(f']({name}.png)', f'](../bench/results/{name}.png)')}\n{DOC_END}"
        pattern = re.compile(re.escape(DOC_START) + ".*?" + re.escape(DOC_END), re.S)
        if pattern.search(text):
            doc.write_text(pattern.sub(lambda _: block, text))
    return md
