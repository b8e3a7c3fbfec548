"""The usage recorder (usage.py): batched writes off the chat path, bounded, never raising."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.store import db
from chatgate.store.schema import usage as usage_table
from chatgate.trace import ChatTrace
from chatgate.usage import UsageRecord, UsageRecorder, percentile, query_usage, summarize


def run(tmp_path: Path, body: Callable[[AsyncEngine], Awaitable[Any]], *, migrate: bool = True) -> Any:
    async def go() -> Any:
        engine = db.create_engine(f"sqlite:///{tmp_path}/usage.db")
        try:
            if migrate:
                await db.upgrade(engine)
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def finished(**fields: Any) -> ChatTrace:
    trace = ChatTrace(endpoint="/v1/chat/completions", model_id=uuid.uuid4(), user_id=uuid.uuid4(), **fields)
    trace.finish()
    return trace


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(usage_table))).scalar_one())


def test_rows_are_written_in_batches_and_flushed_on_close(tmp_path: Path) -> None:
    async def body(engine: AsyncEngine) -> None:
        recorder = UsageRecorder(engine, linger=0.05, batch_size=3)
        recorder.start()
        traces = [finished(status=200, prompt_tokens=i, completion_tokens=2 * i) for i in range(7)]
        for trace in traces:
            recorder.record(trace)
        await recorder.close()
        assert await count(engine) == 7
        rows = await query_usage(engine)
        assert {r.request_id: r.prompt_tokens for r in rows} == {t.request_id: t.prompt_tokens for t in traces}

    run(tmp_path, body)


def test_recording_after_close_is_dropped(tmp_path: Path) -> None:
    async def body(engine: AsyncEngine) -> None:
        recorder = UsageRecorder(engine)
        recorder.start()
        await recorder.close()
        recorder.record(finished(status=200))
        assert recorder.dropped == 1

    run(tmp_path, body)


def test_a_full_queue_drops_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(engine: AsyncEngine) -> None:
        recorder = UsageRecorder(engine, max_pending=2)  # not started: nothing drains the queue
        for _ in range(5):
            recorder.record(finished(status=200))
        assert recorder.dropped == 3
        await recorder.close()

    with caplog.at_level(logging.WARNING, logger="chatgate.usage"):
        run(tmp_path, body)
    assert [r.getMessage() for r in caplog.records] == [
        "usage: 1 row(s) dropped so far: the writer is behind or stopped"
    ]


def test_a_failed_write_is_logged_and_the_writer_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(engine: AsyncEngine) -> None:
        recorder = UsageRecorder(engine, linger=0)
        recorder.start()
        recorder.record(finished(status=200))  # no table yet: this write fails
        await asyncio.sleep(0.2)
        await db.upgrade(engine)
        recorder.record(finished(status=200))
        await recorder.close()
        assert await count(engine) == 1

    with caplog.at_level(logging.WARNING, logger="chatgate.usage"):
        run(tmp_path, body, migrate=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "chatgate.usage"]
    assert len(warnings) == 1
    assert warnings[0].startswith("usage: 1 row(s) not recorded: OperationalError: ")
    assert "no such table: chatgate_usage" in warnings[0]


def test_status_of_a_chat_the_client_left_early() -> None:
    from chatgate.usage import usage_row

    trace = finished(client_gone=True)
    assert usage_row(trace)["status"] == 499
    assert usage_row(finished(error="x" * 5000))["error"] == "x" * 1000


def test_count_tokens_takes_only_integers() -> None:
    trace = ChatTrace()
    trace.count_tokens({"prompt_tokens": 4, "completion_tokens": True})
    assert (trace.prompt_tokens, trace.completion_tokens) == (4, None)
    trace.count_tokens(None)
    trace.count_tokens({"completion_tokens": 6})
    assert (trace.prompt_tokens, trace.completion_tokens) == (4, 6)


def record(
    model: str, started: datetime, status: int = 200, ttfb: float | None = 0.1, tokens: int | None = 1
) -> UsageRecord:
    return UsageRecord(
        request_id=uuid.uuid4().hex,
        endpoint="/v1/chat/completions",
        model_id=None,
        model_name=model,
        user_id=None,
        started_at=started,
        status=status,
        ttfb=ttfb,
        duration=1.0,
        prompt_tokens=tokens,
        completion_tokens=tokens,
        bytes_out=0,
        client_gone=status == 499,
        error=None,
    )


def test_summary_per_model_and_day() -> None:
    day = datetime(2025, 3, 1, 12, tzinfo=UTC)
    records = [record("a", day, ttfb=t / 100) for t in range(1, 21)]
    records += [record("a", day, status=502, ttfb=None, tokens=None), record("a", day, status=499)]
    records += [record("b", day), record("a", day + timedelta(days=1), tokens=None)]
    first, second, third = summarize(records)
    assert (first.model, first.day.isoformat(), first.requests, first.errors) == ("a", "2025-03-01", 22, 1)
    assert (first.prompt_tokens, first.completion_tokens) == (21, 21)
    assert first.ttfb_p50 == pytest.approx(0.1)  # median of 0.01..0.20 and 0.1
    assert first.ttfb_p95 == pytest.approx(0.19)
    assert (second.model, second.requests) == ("b", 1)
    assert (third.day.isoformat(), third.prompt_tokens, third.completion_tokens) == ("2025-03-02", None, None)


def test_percentile_is_a_value_that_occurred() -> None:
    assert percentile([], 0.95) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([float(v) for v in range(1, 101)], 0.95) == 95.0
    assert percentile([float(v) for v in range(1, 101)], 0.5) == 50.0
