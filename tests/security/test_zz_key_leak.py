"""No key ever appears in a log line, an error message, a response or a traceback.

A realistic scenario through real servers (debug logging on, so every log line chatgate and
its libraries would write is written): keys registered through the API, the CLI and straight
into the table; chats that succeed; upstream errors that echo the key back; unreachable and
silent upstreams; an upstream that fails mid-stream; invalid writes; a key rotation. Everything
the test received (bodies, headers, CLI output) and every server log is then searched for every
key. The fake upstream's own records are the control: the keys really were in play.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx
import pytest
from tests.security.helpers import chat_body, db_bytes, insert_model_row
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name

pytestmark = pytest.mark.backends("sqlite")


def secret(label: str) -> str:
    return f"sk-{label}-{unique_name('leak')}-{'q' * 12}"


def test_no_key_appears_in_any_log_or_answer(make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream) -> None:
    server = make_chatgate(log_level="debug", first_byte_timeout=1, idle_timeout=1, connect_timeout=1)
    seen: list[str] = []  # everything the clients received

    def record(response: httpx.Response) -> httpx.Response:
        seen.append(f"{response.status_code} {response.headers} {response.text}")
        return response

    alice, bob = server.new_user(), server.new_user()
    keys: dict[str, str] = {}

    def model(label: str, script: object, *, token: str = alice, sharing: str = "public") -> tuple[str, str]:
        keys[label] = secret(label)
        name = unique_name(label)
        fake.script(name, script)
        with server.client(token) as client:
            created = record(
                client.post(
                    "/api/models",
                    json={
                        "name": name,
                        "base_url": fake.base_url,
                        "model_id": name,
                        "api_key": keys[label],
                        "sharing": sharing,
                    },
                )
            )
        assert created.status_code == 201
        return created.json()["id"], name

    def chat(model_id: str, name: str, token: str = bob) -> httpx.Response:
        with server.client(token) as client:
            return record(client.post("/api/chat/custom", json=chat_body(model_id, name)))

    ok = model("ok", {"steps": [{"delta": "fine"}, {"done": True}]})
    assert chat(*ok).text == "fine"
    for label, status, message in [
        ("incorrect", 401, "Incorrect API key provided: {key}. You can find your API key at ..."),
        ("echo403", 403, "key {key} may not use this model"),
        ("echo400", 400, "bad request for key={key}"),
    ]:
        refs = model(label, scripts.body(status, message.replace("{key}", keys.get(label, ""))))
        # The script was written before the key existed: rewrite it with the real key.
        fake.script(refs[1], scripts.body(status, message.replace("{key}", keys[label])))
        answer = chat(*refs)
        assert answer.status_code == status
    midstream = model("midstream", {"steps": [{"delta": "partial "}, {"event": {"error": {"message": "x"}}}]})
    fake.script(midstream[1], {"steps": [{"delta": "partial "}, {"event": {"error": {"message": keys["midstream"]}}}]})
    with (
        server.client(bob) as client,
        client.stream("POST", "/api/chat/custom", json=chat_body(*midstream)) as streamed,
    ):
        try:
            seen.append(streamed.read().decode())
        except httpx.HTTPError as exc:
            seen.append(repr(exc))
    inband = model("inband", {"steps": [{"role": "assistant"}]})
    fake.script(inband[1], {"steps": [{"role": "assistant"}, {"event": {"error": {"message": keys["inband"]}}}]})
    assert chat(*inband).status_code == 502
    hang = model("hang", {"steps": [{"hang_before_headers": True}]})
    assert chat(*hang).status_code == 504
    cut = model("cut", {"steps": [{"cut": True}]})
    assert chat(*cut).status_code == 502
    notjson = model("notjson", {"steps": [{"send": "data: {not json\n\n"}]})
    assert chat(*notjson).status_code == 502

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        keys["unreachable"] = secret("unreachable")
        with server.client(alice) as client:
            created = record(
                client.post(
                    "/api/models",
                    json={
                        "name": "gone",
                        "base_url": f"http://127.0.0.1:{probe.getsockname()[1]}/v1",
                        "model_id": "m",
                        "api_key": keys["unreachable"],
                    },
                )
            )
        assert chat(created.json()["id"], "m", alice).status_code == 502

    # Writes that fail, with a key in the body.
    keys["badwrite"] = secret("badwrite")
    keys["toolong"] = secret("toolong") + "x" * 800
    with server.client(alice) as client:
        for body in [
            {"name": "x", "base_url": "http://169.254.169.254/", "model_id": "m", "api_key": keys["badwrite"]},
            {"name": "x", "base_url": "ftp://x/", "model_id": "m", "api_key": keys["badwrite"]},
            {"name": "", "base_url": "", "model_id": "m", "api_key": keys["badwrite"], "extra": keys["badwrite"]},
            {"name": "x", "base_url": "", "model_id": "m", "api_key": keys["toolong"]},
            {"name": "x", "base_url": "", "model_id": "m", "api_key": keys["badwrite"] + "\nX-Injected: 1"},
        ]:
            assert 400 <= record(client.post("/api/models", json=body)).status_code < 500
        patched_key = secret("patched")
        keys["patched"] = patched_key
        assert record(client.patch(f"/api/models/{ok[0]}", json={"api_key": patched_key})).status_code == 200
        record(client.get("/api/models"))
        record(client.get(f"/api/models/{ok[0]}"))
    with server.client(bob) as client:
        assert record(client.patch(f"/api/models/{ok[0]}", json={"api_key": "sk-bob"})).status_code == 404

    # A key containing a control character, in a row chatgate did not write (chatbot-ui's table).
    keys["control"] = secret("control") + "\x00tail"
    raw_name = unique_name("raw")
    fake.script(raw_name, {"steps": [{"delta": "never"}, {"done": True}]})
    raw_id = insert_model_row(server, base_url=fake.base_url, model_id=raw_name, api_key=keys["control"])
    control_answer = chat(raw_id, raw_name, server.admin_token)
    assert control_answer.status_code == 400

    # The CLI: add with a key from the environment, list, show, rotate.
    keys["cli"] = secret("cli")
    added = server.cli(
        "models",
        "add",
        "--name",
        "cli",
        "--base-url",
        fake.base_url,
        "--model-id",
        "m",
        "--api-key-env",
        "MY_KEY",
        env_extra={"MY_KEY": keys["cli"]},
    )
    assert added.returncode == 0, added.stderr
    outputs = [added, server.cli("models", "list"), server.cli("models", "show", added.stdout.strip())]
    outputs.append(server.cli("keys", "rotate"))
    time.sleep(0.1)
    assert chat(*ok).text == "fine"  # after rotation, with the patched key
    seen += [o.stdout + o.stderr for o in outputs]

    # The control: the keys were really sent upstream (so not finding them below means something).
    sent = {r["headers"].get("authorization", "") for r in fake.requests()}
    for label in ("ok", "incorrect", "echo403", "midstream", "patched"):
        assert f"Bearer {keys[label]}" in sent, label

    log = server.log_text()
    assert "Traceback" not in log or all(k not in log for k in keys.values())
    everything = "\n".join(seen) + "\n" + log
    leaked = {label for label, key in keys.items() if key in everything or key[3:-12] in everything}
    assert not leaked, f"keys leaked: {sorted(leaked)}"
    on_disk = db_bytes(server)
    assert not {label for label, key in keys.items() if label != "control" and key.encode() in on_disk}
