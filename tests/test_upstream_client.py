"""The upstream client: URLs, upstream error messages, and where it connects."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from chatgate.config import Settings
from chatgate.errors import BadRequest, ChatgateError
from chatgate.security.ssrf import GuardedResolver, UpstreamPolicy
from chatgate.upstream.client import (
    STREAM_FAILURES,
    Target,
    UpstreamClient,
    chat_completions_url,
    error_message,
    stream_error,
)
from chatgate.upstream.http11 import AnswerTimeout


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://h:1/v1", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1/", "http://h:1/v1/chat/completions"),
        ("", "https://api.openai.com/v1/chat/completions"),
        ("  ", "https://api.openai.com/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base_url: str, url: str) -> None:
    assert chat_completions_url(base_url) == url


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad key", "type": "x"}}', "bad key"),
        (b'{"error": {"message": ["a", "b"]}}', '["a","b"]'),
        (b'{"error": "model not found"}', "model not found"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b'{"detail": [{"loc": ["body"], "msg": "field required"}]}', '[{"loc":["body"],"msg":"field required"}]'),
        (b'{"message": "plain message"}', "plain message"),
        (b"Bad Gateway\n", "Bad Gateway"),
        (b"", None),
        (b"{}", None),
    ],
)
def test_error_message(body: bytes, message: str | None) -> None:
    assert error_message(body) == message


class ScriptedDNS:
    """A lookup whose answers the test sets; every question is recorded."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers


async def exchange(dns: ScriptedDNS, policy: UpstreamPolicy, url: str) -> bytes:
    client = UpstreamClient(Settings(connect_timeout=2, first_byte_timeout=2), GuardedResolver(policy, dns))
    await client.start()
    try:
        response = await client.open(Target(url, ""), b"{}")
        try:
            return await response.read()
        finally:
            response.release()
    finally:
        await client.close()


def test_the_relay_connects_to_the_address_the_guard_checked() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = f"http://rebind.example:{port}/v1/chat/completions"  # not in any real DNS
        try:
            # Allowed answer: the connection goes to exactly that address (no second lookup).
            allowed = ScriptedDNS(["127.0.0.1"])
            assert await exchange(allowed, UpstreamPolicy(allow=("127.0.0.1",)), url) == b"ok"
            assert allowed.asked == ["rebind.example"]
            # The same name now answers a private address (rebinding): refused at connect time.
            rebound = ScriptedDNS(["10.0.0.7"])
            with pytest.raises(BadRequest) as refused:
                await exchange(rebound, UpstreamPolicy(allow=("127.0.0.1",)), url)
            assert refused.value.param == "base_url"
            # Cloud metadata stays refused whatever the policy.
            metadata = ScriptedDNS(["169.254.169.254"])
            with pytest.raises(BadRequest):
                await exchange(metadata, UpstreamPolicy(allow_private=True), url)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


class Key(str):
    """A key that can be watched with a weak reference, to see that nothing keeps it."""


async def answer_with(answer: bytes, requests: list[bytes]) -> tuple[asyncio.Server, str]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            length = next(
                (int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
            )
            requests.append(head + await reader.readexactly(length))
            writer.write(answer)
            await writer.drain()

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


def local_client(**settings: Any) -> UpstreamClient:
    policy = UpstreamPolicy(allow=("127.0.0.1",))
    return UpstreamClient(
        Settings(connect_timeout=2, first_byte_timeout=2, **settings),
        GuardedResolver(policy, ScriptedDNS(["127.0.0.1"])),
    )


def test_requests_ask_for_identity_encoding_and_no_cache_keeps_the_key() -> None:
    requests: list[bytes] = []

    async def main() -> weakref.ref[Key]:
        server, url = await answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", requests)
        client = local_client()
        await client.start()
        key = Key("sk-deleted-model-key")
        watch = weakref.ref(key)
        response = await client.open(Target(url, key), b"{}", accept="application/json")
        assert await response.read() == b"{}"
        response.release()
        with pytest.raises(BadRequest):  # header injection is still refused
            await client.open(Target(url, "sk-1\r\nX-Injected: 1"), b"{}")
        del key
        await client.close()
        server.close()
        return watch

    watch = asyncio.run(main())
    gc.collect()
    assert watch() is None  # the model (and its key) is gone: nothing in the process holds the key
    head = requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert b"Accept-Encoding: identity" in head
    assert b"Authorization: Bearer sk-deleted-model-key" in head
    assert len(requests) == 1


@pytest.mark.parametrize(
    ("answer", "settings", "accept", "error", "status"),
    [
        # A body read whole beyond CHATGATE_MAX_RESPONSE_BYTES.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096,
            {"max_response_bytes": 2048},
            "application/json",
            "CHATGATE_MAX_RESPONSE_BYTES",
            502,
        ),
        # A head without end, trickled past 64 KiB.
        (b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 70_000, {}, "application/json", "64 KiB", 502),
        # 1xx, then a redirect: only a 2xx is an answer.
        (
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
            {},
            "text/event-stream",
            "redirect",
            502,
        ),
    ],
)
def test_what_comes_back_is_bounded_and_mapped(
    answer: bytes, settings: dict[str, Any], accept: str, error: str, status: int
) -> None:
    async def main() -> None:
        server, url = await answer_with(answer, [])
        client = local_client(**settings)
        await client.start()
        try:
            response = await client.open(Target(url, ""), b"{}", accept=accept)
            try:
                await response.read()
            except STREAM_FAILURES as exc:
                raise stream_error(exc, client._settings) from exc
            finally:
                response.release()
        except ChatgateError as exc:
            assert error in exc.message
            assert exc.status == status
        else:
            raise AssertionError("no error")
        finally:
            await client.close()
            server.close()

    asyncio.run(main())


def test_a_non_streamed_answer_that_trickles_is_cut_at_the_timeout() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        try:
            while True:
                await asyncio.sleep(0.05)
                writer.write(b" ")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
        client = local_client(completion_timeout=0.5, idle_timeout=5)
        await client.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.open(Target(url, ""), b"{}", accept="application/json", first_byte_timeout=0.5)
        try:
            with pytest.raises(AnswerTimeout) as caught:
                await response.read()
        finally:
            response.release()
        assert loop.time() - started < 1.5
        mapped = stream_error(caught.value, client._settings)
        assert mapped.status == 504
        await client.close()
        server.close()

    asyncio.run(main())
