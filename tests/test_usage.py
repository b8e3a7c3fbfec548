"""The usage recorder (usage.py): batched writes off the chat path, bounded, never raising."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.store import db
from chatgate.store.schema import models as models_table
from chatgate.store.schema import usage as usage_table
from chatgate.trace import ChatTrace
from chatgate.usage import COLUMNS, UsageRecord, UsageRecorder, query_usage, row_encoder, summarize_usage


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


def test_status_of_a_chat_the_client_left_early_and_a_long_error() -> None:
    def row(trace: ChatTrace) -> dict[str, Any]:
        return dict(zip(COLUMNS, row_encoder("postgresql")(trace), strict=True))

    assert row(finished(client_gone=True))["status"] == 499
    assert row(finished(error="x" * 5000))["error"] == "x" * 1000


def test_rows_written_past_sqlalchemy_read_back_as_they_were(database_url: str) -> None:
    """The recorder hands rows to the driver itself; SQLAlchemy must read every field back as
    written, and time filters must order them, on both backends (a whole second included: SQLite
    compares the stored text)."""
    on_the_second = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    traces = [
        finished(status=200, prompt_tokens=3, completion_tokens=5, bytes_out=42, ttfb=0.25),
        finished(status=502, error="upstream said no", started_at=on_the_second),
        finished(client_gone=True, started_at=on_the_second + timedelta(microseconds=1)),
        ChatTrace(endpoint="/api/chat/custom", status=404, started_at=on_the_second - timedelta(microseconds=1)),
    ]

    async def go() -> tuple[list[UsageRecord], list[UsageRecord]]:
        engine = db.create_engine(database_url)
        try:
            await db.upgrade(engine)
            recorder = UsageRecorder(engine, linger=0)
            recorder.start()
            for trace in traces:
                recorder.record(trace)
            await recorder.close()
            window = await query_usage(engine, since=on_the_second, until=on_the_second + timedelta(seconds=1))
            return await query_usage(engine), window
        finally:
            await engine.dispose()

    rows, window = asyncio.run(go())
    expected = {
        t.request_id: (
            t.endpoint,
            t.model_id,
            t.user_id,
            t.started_at,
            t.status or 499,
            t.ttfb,
            t.duration,
            t.prompt_tokens,
            t.completion_tokens,
            t.bytes_out,
            t.client_gone,
            t.error,
        )
        for t in traces
    }
    read = {
        r.request_id: (
            r.endpoint,
            r.model_id,
            r.user_id,
            r.started_at,
            r.status,
            r.ttfb,
            r.duration,
            r.prompt_tokens,
            r.completion_tokens,
            r.bytes_out,
            r.client_gone,
            r.error,
        )
        for r in rows
    }
    assert read == expected
    assert [r.request_id for r in window] == [traces[2].request_id, traces[1].request_id]


def test_count_tokens_takes_only_integers() -> None:
    trace = ChatTrace()
    trace.count_tokens({"prompt_tokens": 4, "completion_tokens": True})
    assert (trace.prompt_tokens, trace.completion_tokens) == (4, None)
    trace.count_tokens(None)
    trace.count_tokens({"completion_tokens": 6})
    assert (trace.prompt_tokens, trace.completion_tokens) == (4, 6)


def usage_row(
    model: uuid.UUID | None, started: datetime, status: int = 200, ttfb: float | None = 0.1, tokens: int | None = 1
) -> dict[str, Any]:
    return {
        "request_id": uuid.uuid4().hex,
        "endpoint": "/v1/chat/completions",
        "model_id": model,
        "user_id": None,
        "started_at": started,
        "status": status,
        "ttfb": ttfb,
        "duration": 1.0,
        "prompt_tokens": tokens,
        "completion_tokens": tokens,
        "bytes_out": 0,
        "client_gone": status == 499,
        "error": None,
    }


def model_row(model: uuid.UUID, user: uuid.UUID, name: str) -> dict[str, Any]:
    empty = {"api_key": "", "base_url": "", "description": ""}
    return {"id": model, "user_id": user, **empty, "model_id": "m", "name": name}


async def _store(engine: AsyncEngine, rows: list[dict[str, Any]], model: dict[str, Any]) -> None:
    """A migrated database holding these usage rows and this model."""
    await db.upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(usage_table.insert(), rows)
        await conn.execute(models_table.insert(), [model])


def test_summary_per_model_and_day_in_sql(database_url: str) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    day = datetime(2025, 3, 1, 12, tzinfo=UTC)
    rows = [usage_row(a, day, ttfb=t / 100) for t in range(1, 21)]
    rows += [usage_row(a, day, status=502, ttfb=None, tokens=None), usage_row(a, day, status=499)]
    # 23:30 at UTC-2 is the next day in UTC: days are UTC days (chatgate writes times in UTC).
    rows += [
        usage_row(b, day),
        usage_row(a, datetime(2025, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-2))).astimezone(UTC), tokens=None),
    ]

    async def go(engine: AsyncEngine) -> Any:
        await _store(engine, rows, model_row(a, uuid.uuid4(), "model-a"))
        return await summarize_usage(engine), await summarize_usage(engine, model=str(b))

    summaries, only_b = _with_engine(database_url, go)
    by_key = {(s.model, s.day.isoformat()): s for s in summaries}
    assert set(by_key) == {("model-a", "2025-03-01"), (str(b), "2025-03-01"), ("model-a", "2025-03-02")}
    first = by_key["model-a", "2025-03-01"]
    assert (first.requests, first.errors) == (22, 1)
    assert (first.prompt_tokens, first.completion_tokens) == (21, 21)
    assert first.ttfb_p50 == pytest.approx(0.1)  # nearest rank 11 of 0.01..0.20 and 0.1
    assert first.ttfb_p95 == pytest.approx(0.19)  # nearest rank 20 of 21
    assert by_key[str(b), "2025-03-01"].requests == 1
    later = by_key["model-a", "2025-03-02"]
    assert (later.requests, later.prompt_tokens, later.completion_tokens) == (1, None, None)
    assert [(s.model, s.requests) for s in only_b] == [(str(b), 1)]
    assert [s.day for s in summaries] == sorted(s.day for s in summaries)


def _with_engine(url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        engine = db.create_engine(url)
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_summary_keeps_exact_time_bounds_and_filters(database_url: str) -> None:
    """--since/--until may fall inside a day; a model may be named; the console asks for one user."""
    a = uuid.uuid4()
    me, other = uuid.uuid4(), uuid.uuid4()
    day = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [usage_row(a, day + timedelta(hours=h), ttfb=h / 10) | {"user_id": me} for h in range(24)]
    rows += [usage_row(a, day + timedelta(hours=12, minutes=30)) | {"user_id": other}]

    async def go(engine: AsyncEngine) -> Any:
        await _store(engine, rows, model_row(a, me, "mine"))
        since, until = day + timedelta(hours=6), day + timedelta(hours=18)
        return (
            await summarize_usage(engine, since=since, until=until),
            await summarize_usage(engine, model="mine", since=since, until=until, user_id=me),
            await summarize_usage(engine, model="nobody's", since=since, until=until),
        )

    window, mine, unknown = _with_engine(database_url, go)
    assert [(s.model, s.requests) for s in window] == [("mine", 13)]  # 06:00..17:00, and the other user's 12:30
    assert window[0].ttfb_p50 == pytest.approx(1.1)  # nearest rank 7 of 0.6..1.7 and 0.1
    assert [(s.model, s.requests, s.ttfb_p50, s.ttfb_p95) for s in mine] == [("mine", 12, 1.1, 1.7)]
    assert unknown == []


@pytest.mark.backends("sqlite")
def test_sqlite_report_walks_its_covering_index(database_url: str) -> None:
    """The report's expressions must be the index's, character for character, or SQLite sorts every
    row again (seconds for a million): the plan says which it does."""
    from sqlalchemy.dialects import sqlite

    from chatgate.usage import _sqlite_groups

    async def go(engine: AsyncEngine) -> list[str]:
        await db.upgrade(engine)
        plans: list[str] = []
        async with engine.connect() as conn:

            class Explaining:
                async def execute(self, query: Any) -> list[Any]:
                    sql = str(query.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
                    plans.extend(row[-1] for row in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                    return []

            await _sqlite_groups(Explaining(), None, datetime(2025, 3, 1, 5, tzinfo=UTC), datetime(2025, 3, 8), None)
        return plans

    plans = _with_engine(database_url, go)
    assert plans == ["SEARCH chatgate_usage USING COVERING INDEX idx_chatgate_usage_report (<expr>>? AND <expr><?)"]
