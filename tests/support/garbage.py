"""Counting what only Python's cycle collector would free: objects in reference cycles.

A server holds thousands of streams that live for seconds, long enough to reach the collector's
oldest generation; what dies there in a cycle waits for a full collection, which scans every
tracked object in the process and stops the event loop while it does (tens of milliseconds at a
few hundred streams). Per request or per connection, chatgate should leave none."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


class Garbage:
    count = 0


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[Garbage]:
    """The objects in cycles that became garbage inside the block, in `.count` once it ends. The
    collector is kept off meanwhile, so none is freed before it is counted."""
    found = Garbage()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield found
        found.count = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
