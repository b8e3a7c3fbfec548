"""An OpenAI-compatible fake upstream: a real HTTP/1.1 server in its own process, scripted per model.

Run it with ``python -m tests.support.fake_upstream --port 0 --port-file PATH``; it prints
``fake-upstream listening on http://HOST:PORT`` and writes the port to PATH once it accepts.

Built on asyncio.Protocol instead of aiohttp.web because the tests need what a server library
hides: each step its own write, a status line that never comes, a TCP reset mid-body, and the
exact moment the peer closed the connection (``connection_lost``), even while a handler sleeps.

Routes (any path prefix before ``/chat/completions`` and ``/models``):

- ``POST .../chat/completions``: follows the script posted for the body's ``model``; otherwise a
  normal answer (see ``default_script``).
- ``GET .../models``: an OpenAI model list (the default models and every scripted name).
- ``POST /_script/{name}``: a script (or a list of them) for the requests whose model is ``name``.
- ``POST /_release/{gate}``: release a gate; it stays open for later requests too.
- ``GET /_gates``: ``{"released": [...], "waiting": {gate: count}}``.
- ``GET /_requests``, ``GET /_connections``: the records, oldest first. ``GET /_requests?digest``
  gives each request without its body: ``raw_bytes`` and ``messages_sha256`` (see ``digest``)
  instead, for bodies too big to pass around.
- ``POST /_reset``: forget scripts, gates and records (blocked gates are released first).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import signal
import socket
import struct
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support import http11
from tests.support import openai_shapes as shapes
from tests.support.scripts import Script, ScriptError, Step, step_kind, validate


@dataclass
class ConnectionRecord:
    id: int
    opened: float
    closed: float | None = None
    # "peer" when the client closed or reset it, "server" when a script step or shutdown did.
    closed_by: str | None = None
    requests: list[int] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    # Connections whose first request was a control request are the tests' own; they are not listed.
    control: bool = False

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        del record["control"]
        record["peer_closed"] = self.closed_by == "peer"
        return record


class FakeState:
    """Scripts, gates and records, shared by every connection of the process."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Script]] = {}
        self.served: Counter[str] = Counter()
        self.gates: dict[str, asyncio.Event] = {}
        self.waiting: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.connections: list[ConnectionRecord] = []
        self.open: set[_Connection] = set()
        self.ids = itertools.count(1)  # ids stay unique across resets

    def next_script(self, model: str) -> Script | None:
        sequence = self.scripts.get(model)
        if not sequence:
            return None
        index = min(self.served[model], len(sequence) - 1)
        self.served[model] += 1
        return sequence[index]

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def reset(self) -> None:
        for event in self.gates.values():
            event.set()  # nothing stays blocked on a gate nobody can name any more
        self.scripts.clear()
        self.served.clear()
        self.gates.clear()
        self.requests.clear()
        self.connections = [record for record in self.connections if record.closed is None]
        for record in self.connections:
            record.requests.clear()
            record.models.clear()


def messages_digest(messages: Any) -> str:
    """SHA-256 of `messages` as canonical JSON: a test compares it with what it sent."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def digest(record: dict[str, Any]) -> dict[str, Any]:
    """A request record without its body, which it names by size and by its messages' digest."""
    summary = {key: value for key, value in record.items() if key not in ("body", "raw_body")}
    body = record["body"]
    summary["raw_bytes"] = len(record["raw_body"].encode())
    summary["messages_sha256"] = messages_digest(body.get("messages") if isinstance(body, dict) else None)
    return summary


def default_script(body: Any) -> Script:
    """A normal answer: a role chunk, a few deltas, finish, optional usage, [DONE]; or a completion."""
    model = body.get("model", "") if isinstance(body, dict) else ""
    if not (isinstance(body, dict) and body.get("stream")):
        return {"steps": [{"body": shapes.completion(model, shapes.DEFAULT_REPLY, shapes.usage())}]}
    steps: list[Step] = [{"role": "assistant"}]
    steps += [{"delta": text} for text in shapes.DEFAULT_DELTAS]
    steps.append({"finish": "stop"})
    if (body.get("stream_options") or {}).get("include_usage"):
        steps.append({"usage": True})
    steps.append({"done": True})
    return {"steps": steps}


# Steps that do not pull the headers out before them: a script may begin with silence or a reset.
PRE_HEADER_STEPS = frozenset({"hang_before_headers", "cut", "close", "informational"})


class _Closed(Exception):
    """The response ended the connection; stop serving it."""


class _Connection(asyncio.Protocol):
    """One TCP connection: reads requests, answers them one at a time (no pipelining)."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.incoming = http11.Incoming()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.record = ConnectionRecord(id=next(state.ids), opened=time.time())
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol callbacks: these run even while the handler sleeps, so close times are exact.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state.connections.append(self.record)
        self.state.open.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.incoming.feed(data)

    def eof_received(self) -> bool:
        self._mark_closed("peer")
        self.incoming.feed_eof()
        return False  # a half-closed peer is gone for our purposes: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closed("peer")  # unless we closed it first, this is a reset or an error
        self.state.open.discard(self)
        self.incoming.feed_eof()
        self._writable.set()
        if self.task is not None:
            self.task.cancel()

    def _mark_closed(self, by: str) -> None:
        if self.record.closed is None:
            self.record.closed = time.time()
            self.record.closed_by = by

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # Writing and closing.
    async def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            raise _Closed
        self.transport.write(data)
        await self._writable.wait()  # backpressure: a slow reader slows the script down

    def close(self, *, reset: bool = False) -> None:
        assert self.transport is not None
        self._mark_closed("server")
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0 makes the close an RST, as when a server process dies mid-answer.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        else:
            self.transport.close()

    # Serving.
    async def _serve(self) -> None:
        try:
            while True:
                request = await http11.read_request(self.incoming)
                if request is None:
                    break
                await self._dispatch(request)
                if not request.keep_alive:
                    break
            self.close()
        except http11.BadRequest as exc:
            await self._send_json(400, {"error": {"message": str(exc)}}, keep_alive=False)
            self.close()
        except _Closed:
            pass
        except Exception:
            # The one broad catch: a bug in the fake shows in its log and resets the connection,
            # instead of vanishing into "Task exception was never retrieved".
            traceback.print_exc()
            self.close(reset=True)

    async def _dispatch(self, request: http11.Request) -> None:
        path = request.path
        if path.startswith("/_"):
            if not self.record.requests:
                self.record.control = True
            await self._control(request)
            return
        body: Any = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError:
                body = None
        model = body.get("model") if isinstance(body, dict) else None
        request_id = next(self.state.ids)
        self.state.requests.append(
            {
                "id": request_id,
                "connection": self.record.id,
                "time": time.time(),
                "method": request.method,
                "path": path,
                "query": request.query,
                "headers": {name.lower(): request.header(name) for name, _ in request.headers},
                "body": body,
                "raw_body": request.body.decode("utf-8", "replace"),
                "model": model,
            }
        )
        self.record.requests.append(request_id)
        if isinstance(model, str):
            self.record.models.append(model)
        if request.method == "POST" and path.endswith("/chat/completions"):
            script = self.state.next_script(model) if isinstance(model, str) else None
            await _Responder(self, script or default_script(body), request.keep_alive).run(model or "")
        elif request.method == "GET" and path.endswith("/models"):
            script = self.state.next_script("_models")
            if script is not None:
                await _Responder(self, script, request.keep_alive).run("")
            else:
                names = [*shapes.DEFAULT_MODELS, *(n for n in self.state.scripts if not n.startswith("_"))]
                await self._send_json(200, shapes.model_list(names), request.keep_alive)
        else:
            missing = shapes.error(f"no route for {request.method} {path}")
            await self._send_json(404, missing, request.keep_alive)

    async def _control(self, request: http11.Request) -> None:
        state = self.state
        verb, _, name = request.path[2:].partition("/")
        if request.method == "POST" and verb == "script" and name:
            try:
                payload = json.loads(request.body)
                sequence = payload if isinstance(payload, list) else [payload]
                state.scripts[name] = [validate(script) for script in sequence]
            except (ValueError, ScriptError) as exc:  # ScriptError is a ValueError; JSON errors too
                await self._send_json(400, {"error": str(exc)}, request.keep_alive)
                return
            state.served[name] = 0
            await self._send_json(200, {"ok": True}, request.keep_alive)
        elif request.method == "POST" and verb == "release" and name:
            state.gate(name).set()
            await self._send_json(200, {"ok": True}, request.keep_alive)
        elif request.method == "POST" and verb == "reset":
            state.reset()
            await self._send_json(200, {"ok": True}, request.keep_alive)
        elif request.method == "GET" and verb == "requests":
            records = [digest(r) for r in state.requests] if request.query == "digest" else state.requests
            await self._send_json(200, records, request.keep_alive)
        elif request.method == "GET" and verb == "connections":
            listed = [record.to_json() for record in state.connections if not record.control]
            await self._send_json(200, listed, request.keep_alive)
        elif request.method == "GET" and verb == "gates":
            released = sorted(name for name, event in state.gates.items() if event.is_set())
            waiting = {name: count for name, count in state.waiting.items() if count}
            await self._send_json(200, {"released": released, "waiting": waiting}, request.keep_alive)
        else:
            await self._send_json(404, {"error": f"no control route {request.path}"}, request.keep_alive)

    async def _send_json(self, status: int, payload: Any, keep_alive: bool) -> None:
        data = json.dumps(payload).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        if not keep_alive:
            headers.append(("connection", "close"))
        await self.write(http11.response_head(status, headers) + data)


class _Responder:
    """Plays one script on one connection."""

    def __init__(self, connection: _Connection, script: Script, keep_alive: bool) -> None:
        self.conn = connection
        self.script = script
        self.framing = script.get("framing", "chunked")
        self.keep_alive = keep_alive and self.framing == "chunked"
        self.steps = script.get("steps", [])
        self.is_body = any("body" in step for step in self.steps)
        self.headers_sent = self.framing == "raw"

    async def run(self, model: str) -> None:
        explicit_headers = any("headers" in step for step in self.steps)
        for step in self.steps:
            kind = step_kind(step)
            if not (explicit_headers or self.is_body or kind in PRE_HEADER_STEPS):
                await self.send_headers()
            await self.play(kind, step[kind], self.script.get("answer_model", model))
        if self.is_body:
            return
        await self.send_headers()  # an empty script is an empty 200
        if self.framing == "chunked":
            await self.conn.write(http11.LAST_CHUNK)
        else:
            self.conn.close()
            raise _Closed

    def _headers(self, content_type: str, length: int | None) -> list[tuple[str, str]]:
        extra = self.script.get("headers", {})
        names = {name.lower() for name in extra}
        headers = [] if "content-type" in names else [("content-type", content_type)]
        if length is not None:
            headers.append(("content-length", str(length)))
        elif self.framing == "chunked":
            headers.append(("transfer-encoding", "chunked"))
        if not self.keep_alive:
            headers.append(("connection", "close"))
        if length is None and "cache-control" not in names:
            headers.append(("cache-control", "no-cache"))
        return headers + list(extra.items())

    async def send_headers(self) -> None:
        if not self.headers_sent:
            self.headers_sent = True
            head = self._headers("text/event-stream; charset=utf-8", None)
            await self.conn.write(http11.response_head(self.script.get("status", 200), head))

    async def send(self, data: bytes) -> None:
        await self.send_headers()
        if self.framing == "chunked":
            if data:
                await self.conn.write(http11.chunk(data))
        else:
            await self.conn.write(data)

    async def play(self, kind: str, arg: Any, model: str) -> None:
        if kind == "headers":
            await self.send_headers()
        elif kind == "send":
            await self.send(arg.encode())
        elif kind == "send_hex":
            await self.send(bytes.fromhex(arg))
        elif kind == "flood":
            text, total = arg
            piece = (text.encode() * (65536 // max(len(text), 1) + 1))[:65536]
            for start in range(0, int(total), len(piece)):
                await self.send(piece[: int(total) - start])
        elif kind == "delta":
            await self.send(shapes.sse(shapes.chunk(model, content=arg)))
        elif kind == "role":
            await self.send(shapes.sse(shapes.chunk(model, role=arg)))
        elif kind == "finish":
            await self.send(shapes.sse(shapes.chunk(model, finish_reason=arg)))
        elif kind == "usage":
            counts = arg if isinstance(arg, dict) else shapes.usage()
            await self.send(shapes.sse(shapes.usage_chunk(model, counts)))
        elif kind == "event":
            await self.send(shapes.sse(arg))
        elif kind == "done":
            await self.send(shapes.DONE)
        elif kind == "sleep":
            await asyncio.sleep(float(arg))
        elif kind == "wait":
            await self.wait(str(arg))
        elif kind in ("hang", "hang_before_headers"):
            await asyncio.Future()  # until the peer goes away and connection_lost cancels us
        elif kind in ("cut", "close"):
            self.conn.close(reset=kind == "cut")
            raise _Closed
        elif kind == "body":
            await self.send_body(arg)
        elif kind == "informational":
            # As a CDN sends 103 Early Hints: an interim head, then (later) the real one.
            await self.conn.write(http11.response_head(int(arg), [("link", "</hint.css>; rel=preload")]))
            await asyncio.sleep(0.1)  # the real head comes later, in another read

    async def wait(self, gate: str) -> None:
        state = self.conn.state
        event = state.gate(gate)
        state.waiting[gate] += 1
        try:
            await event.wait()
        finally:
            state.waiting[gate] -= 1

    async def send_body(self, content: Any) -> None:
        if isinstance(content, str):
            data = content.encode()
            try:
                json.loads(data)
                content_type = "application/json"
            except ValueError:
                content_type = "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(content).encode(), "application/json"
        self.headers_sent = True
        head = http11.response_head(self.script.get("status", 200), self._headers(content_type, len(data)))
        await self.conn.write(head + data)


async def serve(host: str, port: int, port_file: Path | None) -> None:
    """Serve until SIGTERM or SIGINT, then drop every connection and return."""
    loop = asyncio.get_running_loop()
    state = FakeState()
    server = await loop.create_server(lambda: _Connection(state), host, port)
    bound = server.sockets[0].getsockname()[1]
    if port_file is not None:
        # Write then rename, so a reader never sees a half-written port.
        partial = port_file.with_suffix(".partial")
        partial.write_text(str(bound))
        os.replace(partial, port_file)
    print(f"fake-upstream listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    tasks = [connection.task for connection in state.open if connection.task is not None]
    for connection in list(state.open):
        connection.close(reset=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()
    print("fake-upstream stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, default=None)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
