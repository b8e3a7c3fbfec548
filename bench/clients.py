"""Upstream HTTP clients compared on the relay's job: one POST, a 32-chunk stream read to the end.

    python -m bench.clients [--requests N]

Starts the bench upstream on core 1, runs each client on core 0 in this process, and prints the
CPU time per request (the figure that decided chatgate's upstream client; see docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import orjson
import uvloop

from bench import procs
from chatgate.upstream.http11 import Pool

BODY = orjson.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "stream": True})


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, one: Callable[[], Awaitable[int]], n: int) -> tuple[str, float, float]:
    for _ in range(100):
        await one()
    rounds = []
    for _ in range(5):
        c0, t0 = cpu(), time.perf_counter()
        for _ in range(n // 5):
            assert await one() > 0
        rounds.append((cpu() - c0, time.perf_counter() - t0))
    per = 5 / n
    return (
        name,
        1e6 * statistics.median(r[0] for r in rounds) * per,
        1e6 * statistics.median(r[1] for r in rounds) * per,
    )


async def run(port: int, n: int) -> list[tuple[str, float, float]]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results = []

    async with aiohttp.ClientSession() as session:

        async def with_aiohttp() -> int:
            size = 0
            async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as response:
                async for chunk in response.content.iter_any():
                    size += len(chunk)
            return size

        results.append(await measure("aiohttp", with_aiohttp, n))

    async with httpx.AsyncClient() as client:

        async def with_httpx() -> int:
            size = 0
            async with client.stream("POST", url, content=BODY, headers={"Content-Type": "application/json"}) as r:
                async for chunk in r.aiter_raw():
                    size += len(chunk)
            return size

        results.append(await measure("httpx", with_httpx, n))

    async def resolve(host: str, _port: int) -> list[str]:
        return [host]

    pool = Pool(resolve, connect_timeout=5, idle_timeout=30)
    headers = b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"

    async def with_http11() -> int:
        size = 0
        response = await pool.request(url, headers, BODY, first_byte_timeout=30)
        try:
            while (chunk := await response.next_chunk()) is not None:
                size += len(chunk)
        finally:
            response.release()
        return size

    results.append(await measure("chatgate http11", with_http11, n))
    await pool.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    port = procs.free_port()
    with tempfile.TemporaryDirectory() as logs:
        upstream = procs.start(
            "upstream",
            [sys.executable, "-m", "bench.upstream", "--port", str(port)],
            port=port,
            core="1",
            log_dir=Path(logs),
        )
        try:
            upstream.wait_ready("/healthz", 15)
            os.sched_setaffinity(0, {0})
            results = uvloop.run(run(port, args.requests))
        finally:
            upstream.stop()
    print("| client | CPU µs/request | wall µs/request |")
    print("| --- | --- | --- |")
    for name, cpu_us, wall_us in results:
        print(f"| {name} | {cpu_us:.0f} | {wall_us:.0f} |")


if __name__ == "__main__":
    main()
