"""One chat end to end against a real model server: llama.cpp with SmolLM2-135M."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from tests.support import ChatgateServer

# One llama.cpp server for the run: every real-model test goes to the same xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.realmodel, pytest.mark.xdist_group("llama"), pytest.mark.backends("sqlite")]


def test_chat_custom_streams_a_real_models_answer(
    make_chatgate: Callable[..., ChatgateServer], llama_server: str
) -> None:
    # Its own server: a CPU model sharing two cores needs more than the session gateway's 2 s timeouts.
    gateway = make_chatgate(first_byte_timeout=60, idle_timeout=60)
    model_id = gateway.add_model(base_url=llama_server, model_id="smollm2", api_key="")
    payload = {
        "chatSettings": {"model": "smollm2", "temperature": 0},
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "customModelId": model_id,
    }
    pieces: list[bytes] = []
    arrivals: list[float] = []
    with (
        gateway.client(timeout=httpx.Timeout(120.0)) as client,
        client.stream("POST", "/api/chat/custom", json=payload) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        for chunk in response.iter_raw():
            pieces.append(chunk)
            arrivals.append(time.monotonic())
    answer = b"".join(pieces).decode()
    assert answer.strip(), "the model answered nothing"
    assert answer == answer.lstrip()  # the leading whitespace of the answer is trimmed
    assert "Paris" in answer
    # Streamed token by token, not buffered into one write.
    assert len(pieces) > 1
