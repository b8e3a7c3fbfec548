"""`/api/usage`: recorded chats, and their daily summary per model (the console's charts)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from chatgate.api.deps import PrincipalDep, RuntimeDep
from chatgate.usage import DaySummary, query_usage, summarize_usage

router = APIRouter(prefix="/api/usage", tags=["usage"])

ModelQuery = Annotated[str | None, Query(description="A model's id, or a name (every model that has it)")]
SinceQuery = Annotated[datetime | None, Query(description="ISO time, inclusive; UTC when no offset")]
UntilQuery = Annotated[datetime | None, Query(description="ISO time, exclusive; UTC when no offset")]


@router.get("")
async def usage(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    model: ModelQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Recorded chats, newest first: every user's for an admin, the caller's own otherwise."""
    user_id = None if principal.is_admin else principal.user_id
    records = await query_usage(runtime.engine, model=model, user_id=user_id, since=since, until=until, limit=limit)
    rows = [record.public() for record in records]
    if user_id is not None and any(r.answered_model_id not in (None, r.model_id) for r in records):
        # A fallback may be another user's unlisted model, whose id lets one use it: shown only
        # when the caller could list it anyway (their own models and the public ones).
        listed = {str(m.id) for m in await runtime.registry.list(visible_to=user_id)}
        for row in rows:
            if row["answered_model_id"] not in (None, row["model_id"]) and row["answered_model_id"] not in listed:
                row["answered_model_id"] = "hidden"
    return {"data": rows}


@router.get("/summary")
async def usage_summary(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    model: ModelQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
) -> dict[str, Any]:
    """Per model and UTC day: requests, errors, tokens, time to first byte P50/P95 (seconds).
    Every user's for an admin, the caller's own otherwise."""
    user_id = None if principal.is_admin else principal.user_id
    days = await summarize_usage(runtime.engine, model=model, since=since, until=until, user_id=user_id)
    return {"data": [_day(summary) for summary in days]}


def _day(summary: DaySummary) -> dict[str, Any]:
    return {
        "model": summary.model,
        "day": summary.day.isoformat(),
        "requests": summary.requests,
        "errors": summary.errors,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "ttfb_p50": summary.ttfb_p50,
        "ttfb_p95": summary.ttfb_p95,
    }
