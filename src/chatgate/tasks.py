"""Background tasks (a listener's loop, a lease renewer): how one is stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (none: nothing to do) and wait until it has ended, so that nothing of it runs
    after the caller goes on; its CancelledError is its own, not raised to the caller."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
