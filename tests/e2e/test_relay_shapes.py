"""Answers in the shapes model servers write them, relayed whole, through real processes.

While a chat streams, chatgate writes each upstream event from the upstream connection's own
callback (`Response.pump`), and hands anything else (the end, an event to look into, a client
slow to read) back to the relay's loop. These tests hold both ways to the same bytes: hundreds
of events one per write, with the odd event the pump must decline among them, to a client that
reads as fast as it can and to one that reads slower than the model writes.
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

import pytest
from tests.support import ChatgateServer, FakeUpstream, unique_name

# The relay does not touch the database: one backend is enough.
pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]

MESSAGES = [{"role": "user", "content": "hi"}]
# JavaScript's trimStart whitespace, as the custom route trims the start of an answer.
JS_WHITESPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"  # noqa: E501


def deltas(count: int, size: int, seed: int) -> list[str]:
    """`count` delta texts of about `size` characters: words, escapes, non-ASCII, empty ones."""
    rng = random.Random(seed)
    pieces = [" word", "\n", '"quoted"', "back\\slash", "\u00e9t\u00e9", " \u2014 ", "\U0001f600", "\t", "x"]
    texts = []
    for i in range(count):
        if i % 37 == 5:
            texts.append("")  # some servers send empty content between tokens
            continue
        text = ""
        while len(text) < size:
            text += rng.choice(pieces)
        texts.append(text)
    return texts


def script(texts: list[str], *, odd_events: bool) -> dict[str, Any]:
    """One event per write; with `odd_events`, every so often an event the pump declines (a
    comment, an event with an extra field), one with `"usage":null` (which it takes), or a pause;
    and the usage chunk at the end."""
    steps: list[dict[str, Any]] = [{"role": "assistant"}]
    for i, text in enumerate(texts):
        if odd_events and i % 10 == 3:  # as OpenAI writes every chunk once usage is asked for
            steps.append({"event": {**_chunk(text), "usage": None}})
        else:
            steps.append({"delta": text})
        if odd_events and i % 50 == 7:
            steps.append({"send": ": keep-alive\n\n"})
        if odd_events and i % 50 == 23:
            steps.append({"send": "event: message\n" + _delta_event(text) + "\n\n"})
        if odd_events and i % 100 == 42:
            steps.append({"sleep": 0.01})
    steps += [{"finish": "stop"}, {"usage": True}, {"done": True}]
    return {"steps": steps}


def _chunk(text: str) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def _delta_event(text: str) -> str:
    return "data: " + json.dumps(_chunk(text), separators=(",", ":"))


def expected_text(texts: list[str], *, odd_events: bool) -> str:
    """The answer's text; the `event: message` copies carry their delta a second time."""
    if odd_events:
        texts = [t for i, text in enumerate(texts) for t in ([text, text] if i % 50 == 23 else [text])]
    return "".join(texts)


def raw_chat(gateway: ChatgateServer, path: str, payload: dict[str, Any], *, slow: bool) -> bytes:
    """POST on a plain socket and read the whole response; `slow` reads 4 KiB every 2 ms through a
    small receive buffer, so that chatgate's writes to it back up."""
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: chatgate\r\nAuthorization: Bearer {gateway.admin_token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.socket() as sock:
        if slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(head + body)
        parts = []
        while data := sock.recv(4096 if slow else 1 << 16):
            parts.append(data)
            if slow:
                time.sleep(0.002)
    return b"".join(parts)


# Answer shapes: events, characters per delta, odd events among them, a slow reader.
SHAPES = pytest.mark.parametrize(
    ("count", "size", "odd_events", "slow"),
    [(600, 8, True, False), (600, 8, True, True), (1500, 2048, False, True)],
    ids=["600 tokens", "600 tokens, slow reader", "3 MB, slow reader"],
)


def register(gateway: ChatgateServer, fake: FakeUpstream, texts: list[str], *, odd_events: bool) -> str:
    """A model whose upstream streams `texts`, one event per write; its chatgate id."""
    name = unique_name("shapes")
    fake.script(name, script(texts, odd_events=odd_events))
    return gateway.add_model(base_url=fake.base_url, model_id=name, api_key="sk-shapes")


def dechunk(response: bytes) -> tuple[bytes, bytes]:
    """The head and the de-chunked body; fails unless the body ends with its last chunk."""
    head, _, rest = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", "bytes after the last chunk"
            return head, bytes(body)
        body += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


@SHAPES
def test_a_custom_answer_one_event_per_write_arrives_whole(
    gateway: ChatgateServer, fake: FakeUpstream, count: int, size: int, odd_events: bool, slow: bool
) -> None:
    texts = deltas(count, size, seed=count + size)
    texts[0] = "  \u3000 " + texts[0]  # the leading whitespace is trimmed, as chatbot-ui did
    model_id = register(gateway, fake, texts, odd_events=odd_events)
    payload = {"chatSettings": {}, "messages": MESSAGES, "customModelId": model_id}
    head, body = dechunk(raw_chat(gateway, "/api/chat/custom", payload, slow=slow))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body.decode() == expected_text(texts, odd_events=odd_events).lstrip(JS_WHITESPACE)


@SHAPES
def test_a_v1_stream_one_event_per_write_arrives_whole(
    gateway: ChatgateServer, fake: FakeUpstream, count: int, size: int, odd_events: bool, slow: bool
) -> None:
    texts = deltas(count, size, seed=count * size)
    model_id = register(gateway, fake, texts, odd_events=odd_events)
    payload = {"model": model_id, "messages": MESSAGES, "stream": True}
    head, body = dechunk(raw_chat(gateway, "/v1/chat/completions", payload, slow=slow))
    assert head.startswith(b"HTTP/1.1 200 ")
    events = [block for block in body.decode().split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    contents = []
    for event in events[:-1]:
        data = [line[6:] for line in event.split("\n") if line.startswith("data: ")]
        if not data:
            assert event == ": keep-alive"  # comments pass through
            continue
        chunk = json.loads(data[0])
        assert "usage" not in chunk or chunk["choices"], "the usage chunk was not asked for"
        contents += [c["delta"].get("content") or "" for c in chunk["choices"] if "delta" in c]
    expected = expected_text(texts, odd_events=odd_events)
    assert "".join(contents) == expected
