"""The model check (checks.py) through chatgate's own upstream client, against the fake upstream process."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from tests.support import FakeUpstream, free_port, scripts, unique_name

from chatgate.checks import CheckResult, Verdict, check_model
from chatgate.config import Settings
from chatgate.registry import ModelRecord
from chatgate.runtime import upstream_policy
from chatgate.security.ssrf import GuardedResolver
from chatgate.upstream.client import UpstreamClient

KEY = "sk-check-secret-key-4242"


def check(record: ModelRecord, *, allow_private: bool = True) -> CheckResult:
    settings = Settings(allow_private_upstreams=allow_private, connect_timeout=2)

    async def go() -> CheckResult:
        upstream = UpstreamClient(settings, GuardedResolver(upstream_policy(settings)))
        await upstream.start()
        try:
            return await check_model(upstream, settings, record, wait=5)
        finally:
            await upstream.close()

    return asyncio.run(go())


def model(base_url: str, model_id: str) -> ModelRecord:
    return ModelRecord(
        id=uuid.uuid4(), user_id=uuid.uuid4(), name="m", base_url=base_url, model_id=model_id, api_key=KEY
    )


def test_a_listed_model_that_answers_is_ok(fake: FakeUpstream) -> None:
    name = unique_name("check")
    fake.script(name, scripts.body(200, {"choices": [{"message": {"role": "assistant", "content": "OK"}}]}))
    prefix = unique_name("path")
    result = check(model(f"{fake.root_url}/{prefix}/v1", name))

    assert result.verdict is Verdict.OK
    assert (result.models.ok, result.listed, result.chat.ok) == (True, True, True)
    assert result.models.latency > 0 and result.chat.latency > 0
    listing, chat = sorted((r for r in fake.requests() if prefix in r["path"]), key=lambda r: r["id"])
    # The list is a GET without a body, so without a Content-Length; the chat asks for one token.
    assert (listing["method"], listing["path"]) == ("GET", f"/{prefix}/v1/models")
    assert "content-length" not in listing["headers"]
    assert listing["headers"]["authorization"] == f"Bearer {KEY}"
    assert (chat["method"], chat["path"]) == ("POST", f"/{prefix}/v1/chat/completions")
    assert chat["body"]["max_tokens"] == 1 and chat["body"]["stream"] is False
    assert result.public()["models"]["listed"] is True


def test_a_model_the_server_does_not_list_is_a_warning(fake: FakeUpstream) -> None:
    unlisted = unique_name("unlisted")  # never scripted: the fake answers it but does not list it
    result = check(model(fake.base_url, unlisted))
    assert result.verdict is Verdict.WARNING
    assert (result.listed, result.chat.ok) == (False, True)


def test_an_upstream_error_is_reported_in_its_words_with_the_key_masked(fake: FakeUpstream) -> None:
    name = unique_name("badkey")
    fake.script(name, scripts.error(401, f"Incorrect API key provided: {KEY}", code="invalid_api_key"))
    result = check(model(fake.base_url, name))

    assert result.verdict is Verdict.FAILED
    assert result.chat.status == 401
    assert result.chat.error == "HTTP 401: Incorrect API key provided: sk-…4242"
    assert KEY not in str(result.public())


def test_an_unreachable_server_fails_both_steps() -> None:
    result = check(model(f"http://127.0.0.1:{free_port()}/v1", "m"))
    assert result.verdict is Verdict.FAILED
    assert result.listed is None
    assert result.models.status == 502
    assert result.chat.error is not None and "could not be reached" in result.chat.error


def test_the_ssrf_guard_applies() -> None:
    result = check(model(f"http://localhost:{free_port()}/v1", "m"), allow_private=False)
    assert result.verdict is Verdict.FAILED
    assert result.chat.status == 400


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("not json", "The model server's chat answer is not JSON"),
        ({"object": "list"}, "The model server's chat answer has no `choices`"),
    ],
)
def test_an_answer_that_is_no_chat_completion_fails(fake: FakeUpstream, body: object, error: str) -> None:
    name = unique_name("odd")
    fake.script(name, scripts.body(200, body))  # type: ignore[arg-type]
    result = check(model(fake.base_url, name))
    assert result.verdict is Verdict.FAILED
    assert result.chat.error == error
