"""GET /metrics after a known mix of chats: every count and histogram count, exactly, read with
prometheus_client's own parser; who may scrape; bounded model labels; request ids."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support import ChatgateServer, FakeUpstream, free_port, services, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]  # the figures do not depend on the database

SCRAPE_TOKEN = "scrape-token-0123456789"
CUSTOM = "/api/chat/custom"
OPENAI = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ChatgateServer, token: str = SCRAPE_TOKEN) -> Samples:
    with httpx.Client(base_url=server.url, trust_env=False) as client:
        response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def custom_body(model_id: str) -> dict[str, Any]:
    return {"chatSettings": {}, "messages": [{"role": "user", "content": "hi"}], "customModelId": model_id}


@pytest.fixture
def metered(make_chatgate: Callable[..., ChatgateServer]) -> ChatgateServer:
    return make_chatgate(
        first_byte_timeout=1, idle_timeout=1, connect_timeout=1, metrics_token=SCRAPE_TOKEN, metrics_max_models=3
    )


def test_counts_and_histograms_after_a_known_mix(metered: ChatgateServer, fake: FakeUpstream) -> None:
    ok, failing, cut, gone = (unique_name("m") for _ in range(4))
    fake.script(ok, {"steps": [{"role": "assistant"}, {"delta": "Hello"}, {"usage": True}, {"done": True}]})
    fake.script(failing, {"status": 500, "steps": [{"body": {"error": {"message": "boom"}}}]})
    fake.script(cut, {"steps": [{"delta": "partial"}, {"sleep": 0.05}, {"cut": True}]})
    gate = unique_name("gate")
    fake.script(gone, {"steps": [{"delta": "first"}, {"wait": gate}, {"done": True}]})
    ids = {name: metered.add_model(base_url=fake.base_url, model_id=name) for name in (ok, failing, cut, gone)}
    unreachable = metered.add_model(base_url=f"http://127.0.0.1:{free_port()}/v1", model_id=unique_name("m"))

    with metered.client() as client:
        for _ in range(2):
            assert client.post(CUSTOM, json=custom_body(ids[ok])).text == "Hello"
        v1 = client.post(
            OPENAI, json={"model": ids[ok], "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        assert v1.status_code == 200 and "[DONE]" in v1.text
        assert client.post(CUSTOM, json=custom_body(ids[failing])).status_code == 500
        assert client.post(CUSTOM, json=custom_body(str(uuid.uuid4()))).status_code == 404
        with pytest.raises(httpx.HTTPError), client.stream("POST", CUSTOM, json=custom_body(ids[cut])) as response:
            assert response.status_code == 200
            response.read()
        with client.stream("POST", CUSTOM, json=custom_body(ids[gone])) as response:
            chunks = response.iter_raw()
            assert next(chunks) == b"first"
        # The client left with the answer half-sent.
        try:
            wait_until(lambda: value(scrape(metered), "chatgate_client_disconnects_total", route=CUSTOM) == 1)
        finally:
            fake.release(gate)
        assert client.post(CUSTOM, json=custom_body(unreachable)).status_code == 502
    wait_until(lambda: sum(_requests(scrape(metered)).values()) == 8)
    samples = scrape(metered)

    # Five models under a cap of three: the fourth and fifth seen (`gone`, then the unreachable
    # one) are `other`; a chat that never found a model is `none`.
    assert _requests(samples) == {
        (CUSTOM, ok, "2xx"): 2,
        (OPENAI, ok, "2xx"): 1,
        (CUSTOM, failing, "5xx"): 1,
        (CUSTOM, "none", "4xx"): 1,
        (CUSTOM, cut, "5xx"): 1,
        (CUSTOM, "other", "5xx"): 1,
        (CUSTOM, "other", "4xx"): 1,
    }
    duration = "gen_ai_client_operation_duration_seconds_count"
    assert value(samples, duration, route=CUSTOM, model=ok) == 2
    assert value(samples, duration, route=OPENAI, model=ok) == 1
    assert value(samples, duration, route=CUSTOM, model="other") == 2
    first_chunk = "gen_ai_client_operation_time_to_first_chunk_seconds_count"
    assert value(samples, first_chunk, route=CUSTOM, model=ok) == 2
    assert value(samples, first_chunk, route=OPENAI, model=ok) == 1
    assert value(samples, first_chunk, route=CUSTOM, model=failing) == 0  # an error answer is no chunk
    assert value(samples, first_chunk, route=CUSTOM, model=cut) == 1
    assert value(samples, first_chunk, route=CUSTOM, model="other") == 1
    upstream = "chatgate_upstream_time_to_first_byte_seconds_count"
    assert value(samples, upstream, model=ok) == 3
    assert value(samples, upstream, model=failing) == 1
    assert value(samples, upstream, model=cut) == 1
    assert value(samples, upstream, model="other") == 1  # the unreachable one never answered
    # chatgate's own time: every chat that reached an upstream and began its answer.
    assert value(samples, "chatgate_added_seconds_count", route=CUSTOM) == 4
    assert value(samples, "chatgate_added_seconds_count", route=OPENAI) == 1
    # The fake's usage chunk: 7 prompt tokens, 3 completion tokens, per chat.
    tokens = "gen_ai_client_token_usage"
    assert value(samples, f"{tokens}_count", model=ok, gen_ai_token_type="input") == 3
    assert value(samples, f"{tokens}_sum", model=ok, gen_ai_token_type="input") == 21
    assert value(samples, f"{tokens}_count", model=ok, gen_ai_token_type="output") == 3
    failures = "chatgate_upstream_failures_total"
    assert value(samples, failures, kind="status") == 1
    assert value(samples, failures, kind="cut") == 1
    assert value(samples, failures, kind="connect") == 1
    assert value(samples, failures, kind="timeout") == 0
    assert value(samples, "chatgate_client_disconnects_total", route=CUSTOM) == 1
    assert value(samples, "chatgate_streams_in_flight") == 0
    opened = value(samples, "chatgate_upstream_connections", state="open")
    assert 0 <= value(samples, "chatgate_upstream_connections", state="idle") <= opened
    assert value(samples, "chatgate_build_info", version="0.1.0") == 1


def _requests(samples: Samples) -> dict[tuple[str, str, str], float]:
    found = {}
    for (name, labels), count in samples.items():
        if name == "chatgate_requests_total" and count:
            by = dict(labels)
            found[(by["route"], by["model"], by["status_class"])] = count
    return found


def test_a_timeout_and_streams_in_flight(metered: ChatgateServer, fake: FakeUpstream) -> None:
    slow, held = unique_name("m"), unique_name("m")
    gate = unique_name("gate")
    fake.script(slow, {"steps": [{"hang_before_headers": True}]})
    fake.script(held, {"steps": [{"delta": "a"}, {"wait": gate}, {"done": True}]})
    slow_id = metered.add_model(base_url=fake.base_url, model_id=slow)
    held_id = metered.add_model(base_url=fake.base_url, model_id=held)
    with metered.client() as client:
        assert client.post(CUSTOM, json=custom_body(slow_id)).status_code == 504
        with client.stream("POST", CUSTOM, json=custom_body(held_id)) as response:
            chunks = response.iter_raw()  # kept: a dropped iterator closes the connection
            assert next(chunks) == b"a"
            samples = scrape(metered)
            assert value(samples, "chatgate_streams_in_flight") == 1
            assert value(samples, "chatgate_upstream_connections", state="open") >= 1
            fake.release(gate)
            assert b"".join(chunks) == b""  # [DONE] ends it with no more text
    samples = wait_until(lambda: (s := scrape(metered)) and sum(_requests(s).values()) == 2 and s)
    assert value(samples, "chatgate_upstream_failures_total", kind="timeout") == 1
    assert value(samples, "chatgate_streams_in_flight") == 0


def test_who_may_scrape(metered: ChatgateServer) -> None:
    with httpx.Client(base_url=metered.url, trust_env=False) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        wrong = anonymous.get("/metrics", headers={"Authorization": "Bearer scrape-token-wrong"})
        assert wrong.status_code == 401
    with metered.client(metered.new_user()) as user:
        assert user.get("/metrics").status_code == 404  # not an admin
    with metered.client() as admin:
        assert admin.get("/metrics").status_code == 200
    assert scrape(metered)  # the scrape token, no user at all


def test_metrics_off_counts_no_chats(make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream) -> None:
    server = make_chatgate(metrics=False)
    name = unique_name("m")
    model_id = server.add_model(base_url=fake.base_url, model_id=name)
    with server.client() as client:
        assert client.post(CUSTOM, json=custom_body(model_id)).status_code == 200
        text = client.get("/metrics").text
    assert "chatgate_build_info" in text
    assert "chatgate_requests_total{" not in text


@pytest.fixture
def private_pg() -> Iterator[services.PrivatePostgres]:
    services.require("PostgreSQL's initdb", None if services.PrivatePostgres.binaries() else "no initdb found")
    pg = services.PrivatePostgres(free_port())
    try:
        pg.init().start()
        yield pg
    finally:
        pg.cleanup()


@pytest.mark.postgres
@pytest.mark.backends("postgresql")
def test_database_errors_are_counted_and_scraping_needs_no_database(
    private_pg: services.PrivatePostgres, make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_chatgate(database_url=private_pg.url, database_timeout=1, metrics_token=SCRAPE_TOKEN)
    name = unique_name("m")
    fake.script(name, {"steps": [{"delta": "Hi"}, {"done": True}]})
    model_id = server.add_model(base_url=fake.base_url, model_id=name)
    private_pg.stop("immediate")
    with server.client() as client:
        assert client.post(CUSTOM, json=custom_body(model_id)).status_code == 503
    # The scrape token is checked without the database: Prometheus sees the outage.
    samples = wait_until(lambda: (s := scrape(server)) and value(s, "chatgate_database_errors_total") == 1 and s)
    assert _requests(samples) == {(CUSTOM, "none", "5xx"): 1}


def test_the_models_wait_for_its_first_token_is_not_added_time(metered: ChatgateServer, fake: FakeUpstream) -> None:
    name = unique_name("m")
    # The head at once, the first token half a second later (as vLLM and llama.cpp do).
    fake.script(
        name, {"steps": [{"headers": True}, {"role": "assistant"}, {"sleep": 0.5}, {"delta": "late"}, {"done": True}]}
    )
    model_id = metered.add_model(base_url=fake.base_url, model_id=name)
    with metered.client() as client:
        assert client.post(CUSTOM, json=custom_body(model_id)).text == "late"
    samples = wait_until(
        lambda: (s := scrape(metered)) and value(s, "chatgate_added_seconds_count", route=CUSTOM) and s
    )
    assert value(samples, "gen_ai_client_operation_time_to_first_chunk_seconds_sum", route=CUSTOM, model=name) >= 0.5
    assert value(samples, "chatgate_upstream_time_to_first_byte_seconds_sum", model=name) < 0.25
    # chatgate's own part stays far under the model's half second.
    assert value(samples, "chatgate_added_seconds_bucket", route=CUSTOM, le="0.1") == 1
