"""Usage accounting: one row per chat, written in batches off the chat path, and the reports.

Recording never delays or breaks a chat: `UsageRecorder.record` only appends to a bounded
in-memory queue (a full queue drops the row with a warning rather than grow without bound), and
a background task writes what has gathered in one multi-row insert. A failed write is logged and
the rows are dropped; the chat they describe went on regardless.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.errors import ChatgateError
from chatgate.store.schema import models as models_table
from chatgate.store.schema import usage as usage_table
from chatgate.store.values import as_utc, as_uuid, datetime_for, uuid_for
from chatgate.trace import ChatTrace

log = logging.getLogger("chatgate.usage")

CLIENT_GONE = 499  # nginx's "client closed request": the status of a chat the client left
_ERROR_MAX = 1000
_STOP = object()


# The columns of a usage row, in the order `row_encoder` gives them (checked against the
# compiled insert when a recorder starts).
COLUMNS = (
    "request_id",
    "endpoint",
    "model_id",
    "user_id",
    "started_at",
    "status",
    "ttfb",
    "duration",
    "prompt_tokens",
    "completion_tokens",
    "bytes_out",
    "client_gone",
    "error",
    "attempts",
    "answered_model_id",
)


def row_encoder(dialect: str) -> Callable[[ChatTrace], tuple[Any, ...]]:
    """The row that records a finished chat, as the dialect's driver takes it.

    Rows go to the driver as they are (`exec_driver_sql`): SQLAlchemy's per-row parameter
    processing cost three times the insert itself, all of it on the event loop at once."""
    uuid_value, datetime_value = uuid_for(dialect), datetime_for(dialect)

    def encode(trace: ChatTrace) -> tuple[Any, ...]:
        return (
            trace.request_id,
            trace.endpoint,
            uuid_value(trace.model_id),
            uuid_value(trace.user_id),
            datetime_value(trace.started_at),
            trace.status or (CLIENT_GONE if trace.client_gone else 0),
            trace.ttfb,
            trace.duration,
            trace.prompt_tokens,
            trace.completion_tokens,
            trace.bytes_out,
            trace.client_gone,
            trace.error[:_ERROR_MAX] if trace.error else None,
            trace.attempts or None,
            uuid_value(trace.answered_id),
        )

    return encode


class UsageRecorder:
    """Takes finished chats on the chat path and writes them in batches in the background."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_pending: int = 10_000,
        batch_size: int = 500,
        linger: float = 0.2,
        write_timeout: float = 10.0,
    ) -> None:
        self._engine = engine
        insert = usage_table.insert().compile(dialect=engine.dialect)
        if tuple(insert.positiontup or ()) != COLUMNS:
            raise RuntimeError(f"usage: the insert's columns {insert.positiontup} are not {COLUMNS}")
        self._insert = str(insert)
        self._encode = row_encoder(engine.dialect.name)
        self._max_pending = max_pending
        self._batch_size = batch_size
        self._linger = linger
        self._write_timeout = write_timeout
        # Unbounded as a queue; `record` enforces the bound, so the stop marker always fits.
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        self._last_warning = -math.inf

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="chatgate-usage")
        self._task.add_done_callback(_report_crash)

    def record(self, trace: ChatTrace) -> None:
        """Queue a finished chat for writing; never blocks, never raises. The row is encoded
        here, a few microseconds per chat, rather than for a whole batch at once later."""
        if self._closed or self._queue.qsize() >= self._max_pending:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_warning > 10:  # one line per 10 s, not one per dropped chat
                self._last_warning = now
                log.warning("usage: %d row(s) dropped so far: the writer is behind or stopped", self.dropped)
            return
        self._queue.put_nowait(self._encode(trace))

    async def close(self) -> None:
        """Write what is queued, then stop (waits at most about `write_timeout`)."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is None or task.done():
            return
        self._queue.put_nowait(_STOP)
        try:
            await asyncio.wait_for(task, self._write_timeout + 1)
        except TimeoutError:
            log.warning("usage: %d row(s) not written at shutdown", self._queue.qsize())

    async def _run(self) -> None:
        queue = self._queue
        while True:
            item = await queue.get()
            if item is _STOP:
                return
            if self._linger and not self._closed:
                await asyncio.sleep(self._linger)  # let a burst gather into one insert
            batch = [item]
            stop = False
            while len(batch) < self._batch_size and not queue.empty():
                item = queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            await self._write(batch)
            if stop:
                return

    async def _write(self, rows: list[Any]) -> None:
        try:
            async with asyncio.timeout(self._write_timeout), self._engine.begin() as conn:
                await conn.exec_driver_sql(self._insert, rows)
        except (SQLAlchemyError, ChatgateError, OSError, TimeoutError) as exc:
            cause = exc.__cause__ if isinstance(exc, ChatgateError) and exc.__cause__ is not None else exc
            detail = str(cause).strip().splitlines()
            log.warning(
                "usage: %d row(s) not recorded: %s: %s", len(rows), type(cause).__name__, detail[0] if detail else ""
            )


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("usage: the writer stopped on a bug; chats are no longer recorded", exc_info=task.exception())


# ----- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One recorded chat, with the model's name when the model still exists."""

    request_id: str
    endpoint: str
    model_id: uuid.UUID | None
    model_name: str | None
    user_id: uuid.UUID | None
    started_at: datetime
    status: int
    ttfb: float | None
    duration: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    bytes_out: int
    client_gone: bool
    error: str | None
    attempts: int | None = None
    answered_model_id: uuid.UUID | None = None

    @property
    def failed(self) -> bool:
        """An error answer (a client that went away is not one)."""
        return self.status >= 400 and self.status != CLIENT_GONE

    def public(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model_id": str(self.model_id) if self.model_id else None,
            "model_name": self.model_name,
            "user_id": str(self.user_id) if self.user_id else None,
            "started_at": self.started_at.isoformat(),
            "status": self.status,
            "ttfb": self.ttfb,
            "duration": self.duration,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "bytes_out": self.bytes_out,
            "client_gone": self.client_gone,
            "error": self.error,
            "attempts": self.attempts,
            "answered_model_id": str(self.answered_model_id) if self.answered_model_id else None,
        }


async def query_usage(
    engine: AsyncEngine,
    *,
    model: str | None = None,
    user_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[UsageRecord]:
    """Recorded chats, newest first. `model` is a model's id or name (a name matches every model
    that has it); `since` is inclusive and `until` exclusive."""
    u = usage_table
    query = sa.select(u, models_table.c.name.label("model_name")).select_from(
        u.outerjoin(models_table, u.c.model_id == models_table.c.id)
    )
    if model is not None:
        try:
            query = query.where(u.c.model_id == uuid.UUID(model))
        except ValueError:
            named = sa.select(models_table.c.id).where(models_table.c.name == model)
            query = query.where(u.c.model_id.in_(named))
    if user_id is not None:
        query = query.where(u.c.user_id == user_id)
    if since is not None:
        query = query.where(u.c.started_at >= as_utc(since))
    if until is not None:
        query = query.where(u.c.started_at < as_utc(until))
    query = query.order_by(u.c.started_at.desc(), u.c.request_id)
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        UsageRecord(
            request_id=row.request_id,
            endpoint=row.endpoint,
            model_id=None if row.model_id is None else as_uuid(row.model_id),
            model_name=row.model_name,
            user_id=None if row.user_id is None else as_uuid(row.user_id),
            started_at=as_utc(row.started_at),
            status=row.status,
            ttfb=row.ttfb,
            duration=row.duration,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            bytes_out=row.bytes_out,
            client_gone=bool(row.client_gone),
            error=row.error,
            attempts=row.attempts,
            answered_model_id=None if row.answered_model_id is None else as_uuid(row.answered_model_id),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class DaySummary:
    """One model's chats on one (UTC) day. Token sums cover the chats whose counts are known."""

    model: str
    day: date
    requests: int
    errors: int
    prompt_tokens: int | None
    completion_tokens: int | None
    ttfb_p50: float | None
    ttfb_p95: float | None


def _filtered(
    query: Any,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    user_id: uuid.UUID | None = None,
) -> Any:
    u = usage_table
    if user_id is not None:
        query = query.where(u.c.user_id == user_id)
    if model is not None:
        try:
            query = query.where(u.c.model_id == uuid.UUID(model))
        except ValueError:
            query = query.where(u.c.model_id.in_(sa.select(models_table.c.id).where(models_table.c.name == model)))
    if since is not None:
        query = query.where(u.c.started_at >= as_utc(since))
    if until is not None:
        query = query.where(u.c.started_at < as_utc(until))
    return query


async def summarize_usage(
    engine: AsyncEngine,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    user_id: uuid.UUID | None = None,
) -> list[DaySummary]:
    """Per model and (UTC) day: requests, errors, tokens, and the nearest-rank median and p95 of
    the time to first byte, computed by the database (a report never loads every row).
    `user_id` keeps one user's chats only."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            groups = await _postgres_groups(conn, model, since, until, user_id)
        else:
            groups = await _sqlite_groups(conn, model, since, until, user_id)
        names = {row.id: row.name for row in await conn.execute(sa.select(models_table.c.id, models_table.c.name))}
    summaries = [
        DaySummary(
            model=names.get(model_id) or (str(model_id) if model_id is not None else "(no model)"),
            day=day,
            requests=requests,
            errors=errors,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttfb_p50=p50,
            ttfb_p95=p95,
        )
        for (model_id, day), (requests, errors, prompt, completion, p50, p95) in groups.items()
    ]
    return sorted(summaries, key=lambda summary: (summary.day, summary.model))


# (model id, day) -> requests, errors, prompt tokens, completion tokens, TTFB p50, TTFB p95
_Groups = dict[tuple[uuid.UUID | None, date], tuple[int, int, int | None, int | None, float | None, float | None]]
_FAILED = sa.and_(usage_table.c.status >= 400, usage_table.c.status != CLIENT_GONE)


async def _postgres_groups(
    conn: Any, model: str | None, since: datetime | None, until: datetime | None, user_id: uuid.UUID | None
) -> _Groups:
    u = usage_table
    day = sa.cast(sa.func.timezone("UTC", u.c.started_at), sa.Date).label("day")
    query = sa.select(
        u.c.model_id,
        day,
        sa.func.count(),
        sa.func.sum(sa.case((_FAILED, 1), else_=0)),
        sa.func.sum(u.c.prompt_tokens),
        sa.func.sum(u.c.completion_tokens),
        sa.func.percentile_disc(0.5).within_group(u.c.ttfb),
        sa.func.percentile_disc(0.95).within_group(u.c.ttfb),
    )
    rows = await conn.execute(_filtered(query, model, since, until, user_id).group_by(u.c.model_id, day))
    return {(row[0], row[1]): (row[2], int(row[3]), row[4], row[5], row[6], row[7]) for row in rows}


# The SQLite report's group keys, character for character the expressions of the covering index
# `idx_chatgate_usage_report` (migration 0007): SQLite uses an expression index only for the same
# text. The day is the UTC date of the stored UTC text "YYYY-MM-DD HH:MM:SS.ffffff"; the time to first
# byte is rounded to the millisecond the report shows (10 ms from 1 s, 100 ms from 10 s), so a group
# has at most a few thousand buckets whatever its size.
USAGE_DAY = "substr(started_at, 1, 10)"
USAGE_TTFB_MS = (
    "CASE WHEN ttfb < 1 THEN CAST(ttfb * 1000 + 0.5 AS INTEGER)"
    " WHEN ttfb < 10 THEN CAST(ttfb * 100 + 0.5 AS INTEGER) * 10"
    " ELSE CAST(ttfb * 10 + 0.5 AS INTEGER) * 100 END"
)


async def _sqlite_groups(
    conn: Any, model: str | None, since: datetime | None, until: datetime | None, user_id: uuid.UUID | None
) -> _Groups:
    """SQLite has no percentile aggregate, and sorting a million rows for a GROUP BY took 2 to 4 s.
    So one GROUP BY (day, model, TTFB millisecond) does it all, in the order of the covering index
    `idx_chatgate_usage_report`, which SQLite walks without sorting (0.75 s a million rows, measured loaded); the
    nearest ranks are then read off each group's histogram here. The time range is given twice: as
    days, which the index can seek, and exactly, on `+started_at` (the `+` keeps SQLite from
    choosing the plain `started_at` index and sorting again)."""
    u = usage_table
    day = sa.literal_column(USAGE_DAY, sa.String)
    bucket = sa.literal_column(USAGE_TTFB_MS, sa.Integer)
    started = sa.literal_column("+started_at", u.c.started_at.type)
    model_id = sa.type_coerce(u.c.model_id, sa.String)  # its stored hex: one UUID made per group, not per row
    query = sa.select(
        day,
        model_id,
        bucket,
        sa.func.count(),
        sa.func.sum(sa.case((_FAILED, 1), else_=0)),
        sa.func.sum(u.c.prompt_tokens),
        sa.func.sum(u.c.completion_tokens),
        sa.func.count(u.c.prompt_tokens),
        sa.func.count(u.c.completion_tokens),
    ).select_from(u)
    query = _filtered(query, model, None, None, user_id)
    if since is not None:
        query = query.where(day >= as_utc(since).date().isoformat(), started >= as_utc(since))
    if until is not None:
        query = query.where(day <= as_utc(until).date().isoformat(), started < as_utc(until))
    # Grouped and ordered as the index is: no sort, and each group's rows come together, by rising TTFB.
    query = query.group_by(day, model_id, bucket).order_by(day, model_id, bucket)
    groups: _Groups = {}
    for (d, model_hex), rows in itertools.groupby(await conn.execute(query), key=lambda row: (row[0], row[1])):
        histogram = []
        count = errors = prompt = completion = prompt_known = completion_known = 0
        for _, _, b, n, failed, p, c, p_known, c_known in rows:
            count += n
            errors += failed
            prompt += p or 0
            completion += c or 0
            prompt_known += p_known
            completion_known += c_known
            if b is not None:
                histogram.append((b, n))
        groups[(None if model_hex is None else as_uuid(model_hex), date.fromisoformat(d))] = (
            count,
            errors,
            prompt if prompt_known else None,
            completion if completion_known else None,
            _nearest_rank(histogram, 0.5),
            _nearest_rank(histogram, 0.95),
        )
    return groups


def _nearest_rank(histogram: list[tuple[int, int]], fraction: float) -> float | None:
    """The value at rank ceil(fraction * n) of a sorted (milliseconds, count) histogram, in seconds."""
    total = sum(count for _, count in histogram)
    if not total:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for milliseconds, count in histogram:
        seen += count
        if seen >= rank:
            return milliseconds / 1000
    return histogram[-1][0] / 1000
