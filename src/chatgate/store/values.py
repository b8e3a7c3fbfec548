"""Column values as the store hands them back, made uniform across SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any


def as_uuid(value: Any) -> uuid.UUID:
    """A UUID column: asyncpg gives `uuid.UUID`, SQLite a 32-character hex string."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def as_utc(value: datetime) -> datetime:
    """A timestamp in UTC: naive means UTC, as chatgate writes it and SQLite hands it back."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
