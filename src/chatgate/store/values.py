"""Column values as the store hands them back, made uniform across SQLite and PostgreSQL, and
as a driver takes them when a hot write skips SQLAlchemy's per-row type processing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def as_uuid(value: Any) -> uuid.UUID:
    """A UUID column: asyncpg gives `uuid.UUID`, SQLite a 32-character hex string."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def as_utc(value: datetime) -> datetime:
    """A timestamp in UTC: naive means UTC, as chatgate writes it and SQLite hands it back."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def uuid_for(dialect: str) -> Callable[[uuid.UUID | None], Any]:
    """The driver value of a nullable UUID column: asyncpg takes `uuid.UUID`, SQLite (as
    SQLAlchemy stores it) the 32-character hex string."""
    if dialect == "sqlite":
        return lambda value: None if value is None else value.hex
    return lambda value: value


def datetime_for(dialect: str) -> Callable[[datetime], Any]:
    """The driver value of a timestamp column: asyncpg takes the datetime, SQLite the text
    SQLAlchemy would have written for it in UTC."""
    if dialect != "sqlite":
        return lambda value: value

    def sqlite_text(value: datetime) -> str:
        # SQLAlchemy writes "%Y-%m-%d %H:%M:%S.%f", and stored text sorts in time order only if
        # every value has that shape, microseconds included when zero. isoformat with fixed
        # microseconds gives it, plus an offset to cut off, at half strftime's cost.
        utc = value if value.tzinfo is UTC else value.astimezone(UTC)
        return utc.isoformat(" ", "microseconds")[:26]

    return sqlite_text
