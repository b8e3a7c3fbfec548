"""The completion every path streams: N short token deltas, pre-encoded once.

The upstream, the floor app and the load generator's checks share these bytes so that every path
moves the same payload.
"""

from __future__ import annotations

import json

MODEL = "bench-model"
CHUNK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"


def token(i: int) -> str:
    """The text of delta number `i` (about one token)."""
    return f"tok{i} "


def chunk_texts(n: int) -> list[str]:
    """The N delta texts of a completion, in order."""
    return [token(i) for i in range(n)]


def sse_event(content: str | None, *, first: bool = False, finish: bool = False) -> bytes:
    """One OpenAI `chat.completion.chunk` event as `data: ...\\n\\n` bytes."""
    delta: dict[str, str] = {}
    if first:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if finish else None}],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


def http_chunk(data: bytes) -> bytes:
    """Frame `data` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def sse_frames(n: int) -> list[bytes]:
    """The chunk-framed SSE events of an N-delta stream, ending with the stop event and [DONE]."""
    events = [sse_event(text, first=i == 0) for i, text in enumerate(chunk_texts(n))]
    events.append(sse_event(None, finish=True))
    events.append(DONE_EVENT)
    return [http_chunk(e) for e in events]


def completion_json(n: int) -> bytes:
    """A non-streamed completion carrying the same text, for clients that ask for one."""
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(chunk_texts(n))},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
    }
    return json.dumps(obj, separators=(",", ":")).encode()
