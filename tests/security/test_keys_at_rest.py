"""Keys at rest: AES-256-GCM in the database, rotation under a running server, plain-text rows."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable

import pytest
from tests.security.helpers import chat, db_bytes, insert_model_row, stored_api_key
from tests.support import ChatgateServer, FakeUpstream, unique_name

pytestmark = pytest.mark.backends("sqlite")  # these read the database file itself

STREAM = {"steps": [{"delta": "ok"}, {"done": True}]}


def test_the_database_holds_no_plain_text_key(make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream) -> None:
    server = make_chatgate()
    key_file = server.data_dir / "chatgate.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # generated on first start, owner only
    name, key = unique_name("m"), "sk-" + unique_name("at-rest")
    fake.script(name, STREAM)
    model_id = server.add_model(base_url=fake.base_url, model_id=name, api_key=key)
    patched_key = "sk-" + unique_name("patched")
    with server.client() as client:
        assert client.patch(f"/api/models/{model_id}", json={"api_key": patched_key}).status_code == 200
    assert chat(server, None, model_id, name).status_code == 200
    stored = stored_api_key(server, model_id)
    kid = server.log_text().split("key id ")[1][:8]
    assert stored.startswith(f"cg1:{kid}:")  # versioned, and names its key
    on_disk = db_bytes(server)
    for secret in (key, patched_key):
        assert secret.encode() not in on_disk
        assert secret[3:].encode() not in on_disk
    (request,) = fake.requests(name)
    assert request["headers"]["authorization"] == f"Bearer {patched_key}"


def test_plain_text_rows_of_a_chatbot_ui_table_still_work(
    make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_chatgate()
    name, key = unique_name("m"), "sk-" + unique_name("plain")
    fake.script(name, STREAM)
    model_id = insert_model_row(server, base_url=fake.base_url, model_id=name, api_key=key)
    assert chat(server, None, model_id, name).text == "ok"
    assert fake.requests(name)[0]["headers"]["authorization"] == f"Bearer {key}"
    with server.client() as client:
        assert key not in client.get(f"/api/models/{model_id}").text


def test_rotation_under_a_running_server_needs_no_restart(
    make_chatgate: Callable[..., ChatgateServer], fake: FakeUpstream
) -> None:
    server = make_chatgate(model_cache_ttl=0.2)
    pid = server.process.proc.pid if server.process and server.process.proc else None
    names = [unique_name("m") for _ in range(2)]
    keys = ["sk-" + unique_name("rotate") for _ in names]
    ids = []
    for name, key in zip(names, keys, strict=True):
        fake.script(name, STREAM)
        ids.append(server.add_model(base_url=fake.base_url, model_id=name, api_key=key))
    plain_id = insert_model_row(server, base_url=fake.base_url, model_id=names[0], api_key=keys[0])
    before = [stored_api_key(server, i) for i in ids]
    old_kid = before[0].split(":")[1]
    assert chat(server, None, ids[0], names[0]).status_code == 200

    rotated = server.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 2 stored API key(s)" in rotated.stdout
    after = [stored_api_key(server, i) for i in ids]
    new_kid = after[0].split(":")[1]
    assert new_kid != old_kid and all(a.startswith(f"cg1:{new_kid}:") for a in after)
    assert stored_api_key(server, plain_id) == keys[0]  # plain rows are left for chatbot-ui

    time.sleep(0.3)  # past the model cache: the next chats read the re-encrypted rows
    for model_id, name, key in zip(ids, names, keys, strict=True):
        response = chat(server, None, model_id, name)
        assert (response.status_code, response.text) == (200, "ok")
        assert fake.requests(name)[-1]["headers"]["authorization"] == f"Bearer {key}"
    assert f"stored key names key id {new_kid}: reloading" in server.log_text()
    assert server.process is not None and server.process.proc is not None and server.process.proc.pid == pid
    assert all(key.encode() not in db_bytes(server) for key in keys[1:])
