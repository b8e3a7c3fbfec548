"""A transport for driving a protocol object in-process: bytes in by calling its callbacks, bytes
out collected here (as uvicorn's own protocol tests do)."""

from __future__ import annotations

import asyncio
from typing import Any


class MockTransport(asyncio.Transport):
    """Collects what the protocol writes; closing is recorded, not done."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 8001)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after close"
        self.buffer += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data
