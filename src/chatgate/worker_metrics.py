"""The metrics of `serve --workers N`: every worker's figures, summed by whichever worker answers
the scrape, without a `pid` label.

Each worker keeps its counts as a single process does (`Metrics`, plain dicts, nothing more per
chat) and writes them, with its three gauges, to its own file in the supervisor's run directory:
50 ms after a chat ends (one write for every chat that ended meanwhile), every second (for the
gauges), at a scrape and at exit. A scrape first writes the answering worker's own file, then
sums every file: counters and histograms over all of them, gauges over the workers still alive.

Counters never go backwards. A file is replaced whole (`os.replace`) and only ever grows, since
the worker that restarts in a slot starts from the file its predecessor left there. Every scrape
reads files only (its own just written), so two scrapes answered by different workers agree. What
a worker killed outright (SIGKILL) counted in its last 50 ms is lost, never subtracted.

Cost: a chat costs what it costs in one process. A worker writes its file at most 1/SOON + 1/EVERY
= 21 times a second, ~50 µs of CPU each in the supervisor's tmpfs directory (/dev/shm): about
1 ms of CPU a second under any load, 0.1% of a core. A scrape (write, read, sum, render) ~7 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from chatgate.metrics import _REQUESTS, NO_MODEL, OTHER_MODELS, Counts, Gauges, Histograms, Metrics, _Histogram
from chatgate.trace import ChatTrace

log = logging.getLogger("chatgate")

SOON = 0.05  # seconds from a chat's end to the write of its worker's file
EVERY = 1.0  # seconds between writes in any case (the gauges change without a chat ending)


def _path(run_dir: Path, slot: int) -> Path:
    return run_dir / f"worker-{slot}.json"


class SharedMetrics(Metrics):
    """`Metrics` of one worker of several: a file of its own in `run_dir`, all files summed at a scrape."""

    def __init__(self, run_dir: Path, slot: int, *, max_models: int = 50) -> None:
        super().__init__(max_models=max_models)
        self.run_dir = run_dir
        self.slot = slot
        self._path = _path(run_dir, slot)
        self._soon: asyncio.TimerHandle | None = None
        self._every: asyncio.TimerHandle | None = None
        self._inherit()

    def _inherit(self) -> None:
        """Start from the counts the slot's previous worker left, so that the sum never shrinks."""
        try:
            left = orjson.loads(self._path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("worker %d: unreadable metrics file %s (%s): counting from 0", self.slot, self._path, exc)
            return
        counts, histograms = _figures(left)
        self.counts.update(counts)
        self.histograms.update(histograms)
        # The model labels already given out stay this slot's, so the bound holds across restarts.
        for name, labels in counts:
            if name == _REQUESTS and labels[1] not in (NO_MODEL, OTHER_MODELS):
                self._models.add(labels[1])

    def start(self) -> None:
        """Write the file now and every `EVERY` seconds (call on the event loop)."""
        self._write()
        self._every = asyncio.get_running_loop().call_later(EVERY, self._tick)

    def close(self) -> None:
        """The last write, with no stream in flight (call at shut-down)."""
        for handle in (self._soon, self._every):
            if handle is not None:
                handle.cancel()
        self._soon = self._every = None
        self._write(final=True)

    def observe(self, trace: ChatTrace) -> None:
        super().observe(trace)
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(SOON, self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = None
        self._write()

    def _tick(self) -> None:
        self._write()
        self._every = asyncio.get_running_loop().call_later(EVERY, self._tick)

    def _write(self, *, final: bool = False) -> None:
        gauges = (0, 0, 0) if final else (Metrics.gauges(self) or (0, 0, 0))
        data = {
            "pid": os.getpid(),
            "counts": [[name, labels, count] for (name, labels), count in self.counts.items()],
            "histograms": [[name, labels, h.counts, h.total] for (name, labels), h in self.histograms.items()],
            "gauges": gauges,
        }
        temporary = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        try:
            temporary.write_bytes(orjson.dumps(data))
            os.replace(temporary, self._path)
        except OSError as exc:
            # The scrape then shows this worker's last good file: short, never backwards.
            log.warning("worker %d: cannot write its metrics file %s: %s", self.slot, self._path, exc)

    def figures(self) -> tuple[Counts, Histograms]:
        self._write()
        counts: Counts = {}
        histograms: Histograms = {}
        for data in self._files():
            more_counts, more_histograms = _figures(data)
            for key, count in more_counts.items():
                counts[key] = counts.get(key, 0) + count
            for key, more in more_histograms.items():
                kept = histograms.get(key)
                if kept is None:
                    histograms[key] = more
                else:
                    kept.counts = [a + b for a, b in zip(kept.counts, more.counts, strict=True)]
                    kept.total += more.total
        return counts, histograms

    def gauges(self) -> Gauges | None:
        in_flight = open_ = idle = 0
        for data in self._files():
            pid = data.get("pid")
            if pid != os.getpid() and not _alive(pid):
                continue  # a dead worker has no streams and no connections
            a, b, c = data.get("gauges") or (0, 0, 0)
            in_flight, open_, idle = in_flight + a, open_ + b, idle + c
        return in_flight, open_, idle

    def _files(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.run_dir.glob("worker-*.json")):
            with contextlib.suppress(FileNotFoundError):
                try:
                    found.append(orjson.loads(path.read_bytes()))
                except (OSError, orjson.JSONDecodeError) as exc:
                    log.warning("worker %d: skipping the unreadable metrics file %s: %s", self.slot, path, exc)
        return found


def _figures(data: dict[str, Any]) -> tuple[Counts, Histograms]:
    counts: Counts = {(name, tuple(labels)): int(count) for name, labels, count in data.get("counts", ())}
    histograms: Histograms = {}
    for name, labels, bucket_counts, total in data.get("histograms", ()):
        histogram = _Histogram(len(bucket_counts) - 1)
        histogram.counts = [int(c) for c in bucket_counts]
        histogram.total = float(total)
        histograms[(name, tuple(labels))] = histogram
    return counts, histograms


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
