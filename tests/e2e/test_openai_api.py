"""The OpenAI API (/v1/chat/completions, /v1/models) through the official `openai` SDK:
SDK → chatgate (uvicorn) → fake upstream, all real processes on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name
from tests.support import openai_shapes as shapes

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def sdk(gateway: ChatgateServer, token: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/v1",
        api_key=token or gateway.admin_token,
        max_retries=0,
        timeout=30.0,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def async_sdk(gateway: ChatgateServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gateway.url + "/v1",
        api_key=gateway.admin_token,
        max_retries=0,
        timeout=30.0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )


@pytest.fixture
def client(gateway: ChatgateServer) -> Iterator[openai.OpenAI]:
    with sdk(gateway) as c:
        yield c


def register(gateway: ChatgateServer, fake: FakeUpstream, script: Any = None, **fields: Any) -> tuple[str, str]:
    """A model whose upstream follows `script` (or the fake's normal answer); returns (its
    chatgate name, the upstream model name)."""
    upstream = unique_name("up")
    if script is not None:
        fake.script(upstream, script)
    name = fields.pop("name", None) or unique_name("alias")
    gateway.add_model(name=name, base_url=fake.base_url, model_id=upstream, **fields)
    return name, upstream


def post(gateway: ChatgateServer, payload: Any, token: str | None = None) -> httpx.Response:
    with gateway.client(token) as http:
        return http.post("/v1/chat/completions", json=payload)


def raw_stream(gateway: ChatgateServer, payload: dict[str, Any]) -> bytes:
    with gateway.client() as http, http.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        return b"".join(response.iter_raw())


# ----- chats --------------------------------------------------------------------------------


def test_non_streamed_chat(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, upstream = register(gateway, fake)
    completion = client.chat.completions.create(
        model=name, messages=MESSAGES, temperature=0.2, seed=7, max_tokens=20, stop=["\n\n"], user="u-1"
    )
    assert completion.choices[0].message.content == shapes.DEFAULT_REPLY
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, len(shapes.DEFAULT_DELTAS))
    (request,) = fake.requests(model=upstream)
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["accept"] == "application/json"
    assert request["body"] == {
        "model": upstream,
        "messages": MESSAGES,
        "temperature": 0.2,
        "seed": 7,
        "max_tokens": 20,
        "stop": ["\n\n"],
        "user": "u-1",
    }


def test_non_streamed_body_is_relayed_as_the_upstream_sent_it(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    answer = '{"id": "x",  "object": "chat.completion", "choices": [], "extra": {"kept": true}}'
    name, _ = register(gateway, fake, scripts.body(200, answer))
    response = post(gateway, {"model": name, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.content == answer.encode()
    assert response.headers["content-type"] == "application/json"
    assert len(response.headers["x-request-id"]) == 32


def test_non_streamed_answer_may_take_longer_than_the_first_byte_timeout(
    gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    # Its head comes only with the whole answer: CHATGATE_COMPLETION_TIMEOUT bounds it, not the 2 s.
    script = {"steps": [{"sleep": 2.5}, {"body": shapes.completion("m", "slow", shapes.usage())}]}
    name, _ = register(gateway, fake, script)
    response = post(gateway, {"model": name, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "slow"


def test_every_other_field_passes_through_untouched(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, upstream = register(gateway, fake)
    payload = {
        "model": name,
        "messages": MESSAGES,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 50,
        "temperature": 0,
        "top_p": 0.5,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "frequency_penalty": 0.1,
        "logit_bias": {"50256": -100},
        "parallel_tool_calls": False,
        "metadata": {"a": "b"},
        "some_server_specific_option": [1, {"x": None}],
        "stream": False,
    }
    assert post(gateway, payload).status_code == 200
    (request,) = fake.requests(model=upstream)
    assert request["body"] == {**payload, "model": upstream}


def test_streamed_chat(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, upstream = register(gateway, fake)
    with client.chat.completions.create(model=name, messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == shapes.DEFAULT_REPLY
    # chatgate asked for the token counts; the usage chunk is kept from a client that did not.
    assert all(c.choices for c in chunks)
    (request,) = fake.requests(model=upstream)
    assert request["body"]["stream_options"] == {"include_usage": True}
    assert request["headers"]["accept"] == "text/event-stream"


def test_streamed_chat_with_usage_asked_for(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, upstream = register(gateway, fake)
    stream = client.chat.completions.create(
        model=name, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 7
    (request,) = fake.requests(model=upstream)
    assert request["body"]["stream_options"] == {"include_usage": True}


def test_stream_bytes_are_the_upstreams(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    odd = {"id": "c", "choices": [{"index": 0, "delta": {"content": 'é "usage":{'}}], "x_vendor": {"k": [1, 2]}}
    steps = [
        {"role": "assistant"},
        {"send": ": ping\n\n"},
        {"event": odd},
        {"send": 'data: {"choices":[{"index":0,"delta":{"content":"b"}}],"usage":null}\n\n'},
        {"finish": "stop"},
        {"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        {"done": True},
    ]
    name, upstream = register(gateway, fake, {"steps": steps})
    received = raw_stream(gateway, {"model": name, "messages": MESSAGES, "stream": True})
    assert received == (
        shapes.sse(shapes.chunk(upstream, role="assistant"))
        + b": ping\n\n"
        + shapes.sse(odd)
        + b'data: {"choices":[{"index":0,"delta":{"content":"b"}}],"usage":null}\n\n'
        + shapes.sse(shapes.chunk(upstream, finish_reason="stop"))
        + shapes.DONE
    )


def test_each_event_reaches_the_client_before_the_next_is_sent(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    gates = [unique_name("gate") for _ in range(3)]
    steps: list[dict[str, Any]] = []
    for index, gate in enumerate(gates):
        steps += [{"delta": f"part{index}"}, {"wait": gate}]
    name, upstream = register(gateway, fake, {"steps": [*steps, {"done": True}]})
    payload = {"model": name, "messages": MESSAGES, "stream": True}
    with gateway.client() as http, http.stream("POST", "/v1/chat/completions", json=payload) as response:
        chunks = response.iter_raw()
        for index, gate in enumerate(gates):
            assert next(chunks) == shapes.sse(shapes.chunk(upstream, content=f"part{index}"))
            assert fake.gates()["waiting"].get(gate) == 1
            fake.release(gate)
        assert b"".join(chunks) == shapes.DONE


def test_event_split_across_reads_is_relayed_whole(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    usage = shapes.sse(shapes.usage_chunk("m", shapes.usage(11, 4)))
    first = shapes.sse(shapes.chunk("m", content="hello"))
    cut = first.index(b"hello") + 2
    steps = [
        {"send_hex": first[:cut].hex()},
        {"sleep": 0.05},
        {"send_hex": (first[cut:] + usage[:15]).hex()},
        {"sleep": 0.05},
        {"send_hex": usage[15:].hex()},
        {"done": True},
    ]
    name, _ = register(gateway, fake, {"steps": steps})
    received = raw_stream(gateway, {"model": name, "messages": MESSAGES, "stream": True})
    assert received == first + shapes.DONE  # the split usage chunk was found and kept back


def test_clean_end_without_done_gets_done(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, upstream = register(gateway, fake, scripts.stream("a", done=False))
    received = raw_stream(gateway, {"model": name, "messages": MESSAGES, "stream": True})
    assert received.endswith(shapes.sse(shapes.chunk(upstream, finish_reason="stop")) + shapes.DONE)


def test_done_in_the_middle_of_a_read_is_not_repeated(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    events = shapes.sse(shapes.chunk("m", content="a")) + shapes.DONE + b": trailing comment\n\n"
    name, _ = register(gateway, fake, {"steps": [{"send": events.decode()}]})
    received = raw_stream(gateway, {"model": name, "messages": MESSAGES, "stream": True})
    assert received.count(b"[DONE]") == 1


def test_async_client_streamed_and_not(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, _ = register(gateway, fake)

    async def chat() -> tuple[str | None, str]:
        async with async_sdk(gateway) as client:
            completion = await client.chat.completions.create(model=name, messages=MESSAGES)  # type: ignore[arg-type]
            stream = await client.chat.completions.create(model=name, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return completion.choices[0].message.content, "".join(pieces)

    assert asyncio.run(chat()) == (shapes.DEFAULT_REPLY, shapes.DEFAULT_REPLY)


def tool_call_chunk(index: int, **function: str) -> dict[str, Any]:
    call: dict[str, Any] = {"index": 0, "function": function}
    if "name" in function:
        call |= {"id": "call_1", "type": "function"}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": {"tool_calls": [call]}, "finish_reason": None}]}  # fmt: skip


def test_streamed_tool_calls_are_relayed(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    steps = [
        {"role": "assistant"},
        {"event": tool_call_chunk(0, name="get_weather", arguments="")},
        {"event": tool_call_chunk(0, arguments='{"city": ')},
        {"event": tool_call_chunk(0, arguments='"Paris"}')},
        {"finish": "tool_calls"},
        {"done": True},
    ]
    name, upstream = register(gateway, fake, {"steps": steps})
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    stream = client.chat.completions.create(model=name, messages=MESSAGES, tools=tools, stream=True)
    calls = [call for c in stream if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert "".join(c.function.arguments or "" for c in calls if c.function) == '{"city": "Paris"}'
    assert fake.requests(model=upstream)[0]["body"]["tools"] == tools


def test_non_streamed_tool_calls_are_relayed(
    client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    answer = shapes.completion("m", "", shapes.usage())
    answer["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}],
    }
    answer["choices"][0]["finish_reason"] = "tool_calls"
    name, _ = register(gateway, fake, scripts.body(200, answer))
    completion = client.chat.completions.create(model=name, messages=MESSAGES, tool_choice="required")
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.id, call.function.name, call.function.arguments) == ("call_9", "lookup", '{"q": "x"}')


def test_image_part_is_relayed(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, upstream = register(gateway, fake)
    content: Any = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}])
    (request,) = fake.requests(model=upstream)
    assert request["body"]["messages"] == [{"role": "user", "content": content}]


# ----- choosing the model -------------------------------------------------------------------


def test_model_by_chatgate_id(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    upstream = unique_name("up")
    model_id = gateway.add_model(base_url=fake.base_url, model_id=upstream)
    client.chat.completions.create(model=model_id, messages=MESSAGES)
    assert fake.requests(model=upstream)[0]["body"]["model"] == upstream


def test_ambiguous_name_is_a_400_that_says_so(
    client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    name, _ = register(gateway, fake)
    register(gateway, fake, name=name)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=name, messages=MESSAGES)
    assert "ambiguous" in caught.value.message
    assert caught.value.code == "ambiguous_model"


def test_name_resolves_among_the_models_the_caller_may_use(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, _ = register(gateway, fake)  # the admin's private model
    token = gateway.new_user()
    upstream = unique_name("up")
    gateway.add_model(token, name=name, base_url=fake.base_url, model_id=upstream)
    with sdk(gateway, token) as client:
        client.chat.completions.create(model=name, messages=MESSAGES)  # the admin's model is not theirs
    assert len(fake.requests(model=upstream)) == 1


def test_someone_elses_private_model_is_not_found(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    upstream = unique_name("up")
    name = unique_name("alias")
    model_id = gateway.add_model(name=name, base_url=fake.base_url, model_id=upstream)
    with sdk(gateway, gateway.new_user()) as client:
        for ref in (name, model_id):
            with pytest.raises(openai.NotFoundError) as caught:
                client.chat.completions.create(model=ref, messages=MESSAGES)
            assert caught.value.code == "model_not_found"
    assert fake.requests(model=upstream) == []


# ----- errors -------------------------------------------------------------------------------


def test_bad_token_is_an_authentication_error(gateway: ChatgateServer) -> None:
    with sdk(gateway, "cg_not-a-real-token") as client, pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="anything", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "authentication_error"


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=unique_name("nothing"), messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "does not exist" in caught.value.message


@pytest.mark.parametrize(
    ("status", "exception", "code"),
    [
        (400, openai.BadRequestError, "context_length_exceeded"),
        (401, openai.AuthenticationError, "invalid_api_key"),
        (404, openai.NotFoundError, "model_not_found"),
        (422, openai.UnprocessableEntityError, None),
        (429, openai.RateLimitError, "rate_limit_exceeded"),
        (500, openai.InternalServerError, None),
    ],
)
def test_upstream_errors_pass_through_with_their_status(
    client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream, status: int, exception: type, code: str | None
) -> None:
    name, _ = register(gateway, fake, scripts.error(status, f"upstream says {status}", code=code))
    for stream in (False, True):
        with pytest.raises(exception) as caught:
            client.chat.completions.create(model=name, messages=MESSAGES, stream=stream)
        assert caught.value.status_code == status
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["message"] == f"upstream says {status}"
        assert caught.value.code == code


def test_upstream_error_that_is_not_openai_shaped(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name, _ = register(gateway, fake, scripts.body(503, "overloaded"))
    response = post(gateway, {"model": name, "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json() == {
        "error": {"message": "overloaded", "type": "api_error", "param": None, "code": "upstream_error"}
    }


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": 7, "messages": MESSAGES}, "model"),
        ({"model": "x", "messages": MESSAGES, "stream": "yes"}, "stream"),
    ],
)
def test_malformed_request_is_a_bad_request(gateway: ChatgateServer, payload: Any, param: str) -> None:
    response = post(gateway, payload)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1]"])
def test_body_that_is_not_a_json_object(gateway: ChatgateServer, raw: bytes) -> None:
    with gateway.client() as http:
        response = http.post("/v1/chat/completions", content=raw)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unreachable_upstream_is_a_server_error(client: openai.OpenAI, gateway: ChatgateServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        name = unique_name("alias")
        gateway.add_model(name=name, base_url=f"http://127.0.0.1:{port}/v1")
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=name, messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"


def test_chatgates_own_rate_limit_is_a_rate_limit_error(make_chatgate: Callable[..., ChatgateServer]) -> None:
    limited = make_chatgate(rate_limit_per_minute=1)
    with sdk(limited) as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="first-request-counts", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="second", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"]
    assert caught.value.code == "rate_limited"


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ([{"cut": True}], "ended the stream before it was complete"),
        ([{"hang": True}], "sent nothing for 2 s"),
    ],
)
def test_failure_after_the_stream_began_is_an_error_event(
    client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream, tail: list[Any], message: str
) -> None:
    name, upstream = register(gateway, fake, {"steps": [{"delta": "partial"}, {"sleep": 0.05}, *tail]})
    received = raw_stream(gateway, {"model": name, "messages": MESSAGES, "stream": True})  # ends cleanly
    first, error_event = received.split(b"\n\n", 1)
    assert first + b"\n\n" == shapes.sse(shapes.chunk(upstream, content="partial"))
    assert error_event.startswith(b"data: ") and error_event.endswith(b"\n\n")
    error = json.loads(error_event[6:])["error"]
    assert message in error["message"]
    assert error["type"] == "api_error"
    if "cut" in tail[0]:  # and the SDK raises it (once is enough: the idle case waits 2 s)
        with pytest.raises(openai.APIError, match=message):
            list(client.chat.completions.create(model=name, messages=MESSAGES, stream=True))


def test_in_band_upstream_error_is_relayed(client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream) -> None:
    steps = [{"delta": "a"}, {"event": {"error": {"message": "model crashed", "type": "server_error"}}}]
    name, _ = register(gateway, fake, {"steps": steps})
    with pytest.raises(openai.APIError, match="model crashed"):
        list(client.chat.completions.create(model=name, messages=MESSAGES, stream=True))


# ----- stream_options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        scripts.error(400, "Unrecognized request argument supplied: stream_options"),
        scripts.body(422, {"detail": [{"loc": ["body", "stream_options"], "msg": "Extra inputs are not permitted"}]}),
    ],
)
def test_server_that_refuses_stream_options(
    client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream, refusal: Any
) -> None:
    name, upstream = register(gateway, fake, [refusal, scripts.stream("fine")])
    for _ in range(2):
        with client.chat.completions.create(model=name, messages=MESSAGES, stream=True) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "fine"
    first, retried, remembered = fake.requests(model=upstream)
    assert first["body"]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in retried["body"]
    assert "stream_options" not in remembered["body"]  # asked once per model, not per chat


def test_stream_options_the_client_sent_are_not_retried(
    client: openai.OpenAI, gateway: ChatgateServer, fake: FakeUpstream
) -> None:
    name, upstream = register(gateway, fake, scripts.error(400, "stream_options is not supported"))
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(
            model=name, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    assert len(fake.requests(model=upstream)) == 1


# ----- /v1/models ---------------------------------------------------------------------------


def test_models_list_round_trips(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    token = gateway.new_user()
    name, upstream = register(gateway, fake, token=token)
    twin = unique_name("twin")
    twin_ids = [gateway.add_model(token, name=twin, base_url=fake.base_url, model_id=upstream) for _ in range(2)]
    hidden = unique_name("hidden")
    gateway.add_model(name=hidden, base_url=fake.base_url)  # the admin's private model
    with sdk(gateway, token) as client:
        listed = {m.id: m for m in client.models.list()}
        assert listed[name].object == "model"
        assert listed[name].owned_by == "chatgate"
        assert isinstance(listed[name].created, int)
        assert set(twin_ids) <= set(listed)  # a shared name lists the ids
        assert twin not in listed
        assert hidden not in {getattr(m, "name", None) for m in listed.values()}
        for model_id in (name, *twin_ids):
            client.chat.completions.create(model=model_id, messages=MESSAGES)
            assert client.models.retrieve(model_id).id == model_id
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(hidden)
    assert len(fake.requests(model=upstream)) == 3


def test_models_need_a_credential(gateway: ChatgateServer) -> None:
    with sdk(gateway, "cg_wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()


# ----- a real model -------------------------------------------------------------------------


@pytest.mark.realmodel
@pytest.mark.xdist_group("llama")
@pytest.mark.backends("sqlite")
def test_sdk_against_a_real_model(make_chatgate: Callable[..., ChatgateServer], llama_server: str) -> None:
    # Its own server: the session gateway's 2 s first-byte timeout is too tight for a CPU model
    # that shares two cores with another test run's llama server.
    gateway = make_chatgate(first_byte_timeout=60, idle_timeout=60)
    name = unique_name("smollm2")
    gateway.add_model(name=name, base_url=llama_server, model_id="smollm2", api_key="")
    messages: Any = [
        {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    with sdk(gateway) as client:
        completion = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=30)
        assert "Paris" in (completion.choices[0].message.content or "")
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model=name, messages=messages, temperature=0, max_tokens=30, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "Paris" in "".join(pieces)
    assert len([p for p in pieces if p]) > 1  # token by token, not one buffered write
