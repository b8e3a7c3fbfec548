"""API keys at rest: AES-GCM round trips, rotation, the key file, the stored size, masking."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from pathlib import Path

import pytest

from chatgate.errors import BadRequest
from chatgate.security.crypto import (
    MAX_PLAINTEXT_BYTES,
    MAX_STORED_CHARS,
    KeyDecryptError,
    KeyRing,
    key_id,
    mask,
)

STORED = re.compile(r"cg1:[0-9a-f]{8}:[A-Za-z0-9_-]+=*")


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(secrets.token_bytes(32))


def test_round_trip_and_format(ring: KeyRing) -> None:
    stored = ring.encrypt("sk-abc123")
    assert STORED.fullmatch(stored)
    assert stored.split(":")[1] == ring.current_kid
    assert "sk-abc123" not in stored
    assert ring.decrypt(stored) == "sk-abc123"


def test_fresh_nonce_every_time(ring: KeyRing) -> None:
    assert ring.encrypt("same") != ring.encrypt("same")


def test_unicode_round_trip(ring: KeyRing) -> None:
    assert ring.decrypt(ring.encrypt("κλειδί-🔑")) == "κλειδί-🔑"


def test_empty_key_stays_empty(ring: KeyRing) -> None:
    assert ring.encrypt("") == ""
    assert ring.decrypt("") == ""
    assert not ring.needs_rotation("")


def test_key_id_is_sha256_prefix() -> None:
    key = secrets.token_bytes(32)
    assert key_id(key) == hashlib.sha256(key).hexdigest()[:8]
    assert KeyRing(key).current_kid == key_id(key)


def test_plain_text_rows_pass_through_and_need_rotation(ring: KeyRing) -> None:
    assert ring.decrypt("sk-plain-from-chatbot-ui") == "sk-plain-from-chatbot-ui"
    assert ring.needs_rotation("sk-plain-from-chatbot-ui")


def test_tampered_value_is_refused_without_echoing_it(ring: KeyRing) -> None:
    stored = ring.encrypt("sk-secret-value")
    kid, payload = stored[4:].split(":")
    blob = bytearray(base64.urlsafe_b64decode(payload))
    blob[-1] ^= 1
    tampered = f"cg1:{kid}:{b64(bytes(blob))}"
    with pytest.raises(KeyDecryptError) as info:
        ring.decrypt(tampered)
    assert info.value.status == 500
    assert tampered not in str(info.value)
    assert payload not in info.value.message


def test_unknown_kid_is_refused(ring: KeyRing) -> None:
    other = KeyRing(secrets.token_bytes(32))
    stored = other.encrypt("sk-x")
    with pytest.raises(KeyDecryptError) as info:
        ring.decrypt(stored)
    assert info.value.kid == other.current_kid
    assert stored not in info.value.message


def test_value_cannot_be_relabelled_to_another_key() -> None:
    first, second = secrets.token_bytes(32), secrets.token_bytes(32)
    ring = KeyRing(first, [second])
    stored = ring.encrypt("sk-x")
    relabelled = stored.replace(key_id(first), key_id(second))
    with pytest.raises(KeyDecryptError):
        ring.decrypt(relabelled)


@pytest.mark.parametrize("suffix", ["", ":", ":!!!not-base64!!!", ":" + b64(b"short")])
def test_malformed_values_are_refused(ring: KeyRing, suffix: str) -> None:
    with pytest.raises(KeyDecryptError):
        ring.decrypt(f"cg1:{ring.current_kid}{suffix}")


def test_rotation_keeps_old_values_readable(ring: KeyRing) -> None:
    old_kid = ring.current_kid
    old = ring.encrypt("sk-old")
    new_kid = ring.add_new_key()
    assert new_kid == ring.current_kid != old_kid
    assert ring.kids == (new_kid, old_kid)
    new = ring.encrypt("sk-new")
    assert new.split(":")[1] == new_kid
    assert ring.decrypt(old) == "sk-old"
    assert ring.decrypt(new) == "sk-new"
    assert ring.needs_rotation(old)
    assert not ring.needs_rotation(new)


def test_from_secret_single_and_list() -> None:
    first, second = secrets.token_bytes(32), secrets.token_bytes(32)
    single = KeyRing.from_secret(b64(first))
    assert single.current_kid == key_id(first)
    both = KeyRing.from_secret(f" {b64(first).rstrip('=')} , {b64(second)} ,")
    assert both.current_kid == key_id(first)
    assert both.kids == (key_id(first), key_id(second))
    assert both.decrypt(KeyRing(second).encrypt("sk-y")) == "sk-y"


@pytest.mark.parametrize("secret", ["", " , ", "not-a-key", b64(b"x" * 31), b64(b"x" * 33)])
def test_from_secret_refuses_bad_keys_without_echoing(secret: str) -> None:
    with pytest.raises(ValueError) as info:
        KeyRing.from_secret(secret)
    if secret.strip(" ,"):
        assert secret not in str(info.value)


def test_max_plaintext_is_computed_from_the_column() -> None:
    assert MAX_PLAINTEXT_BYTES == 710
    ring = KeyRing(secrets.token_bytes(32))
    assert len(ring.encrypt("k" * 700)) <= MAX_STORED_CHARS
    longest = ring.encrypt("k" * MAX_PLAINTEXT_BYTES)
    assert len(longest) <= MAX_STORED_CHARS
    assert ring.decrypt(longest) == "k" * MAX_PLAINTEXT_BYTES


@pytest.mark.parametrize("key", ["k" * (MAX_PLAINTEXT_BYTES + 1), "€" * 237])
def test_too_long_keys_are_a_bad_request(ring: KeyRing, key: str) -> None:
    with pytest.raises(BadRequest) as info:
        ring.encrypt(key)
    assert info.value.param == "api_key"
    assert "api_key" in info.value.message


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_load_or_create_makes_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys.json"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        ring = KeyRing.load_or_create(path)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600
    document = json.loads(path.read_text())
    assert document["current"] == ring.current_kid
    assert set(document["keys"]) == {ring.current_kid}
    assert key_id(base64.urlsafe_b64decode(document["keys"][ring.current_kid])) == ring.current_kid
    assert [p.name for p in path.parent.iterdir()] == ["keys.json"]

    again = KeyRing.load_or_create(path)
    assert again.current_kid == ring.current_kid
    assert again.decrypt(ring.encrypt("sk-z")) == "sk-z"


def test_save_after_rotation_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing.load_or_create(path)
    old = ring.encrypt("sk-old")
    new_kid = ring.add_new_key()
    ring.save(path)
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]
    loaded = KeyRing.load_or_create(path)
    assert loaded.current_kid == new_kid
    assert loaded.decrypt(old) == "sk-old"


def test_a_racing_creator_wins_and_we_read_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.json"
    theirs = KeyRing(secrets.token_bytes(32))
    real_load = KeyRing._load.__func__  # type: ignore[attr-defined]
    calls = []

    def load(cls: type[KeyRing], p: Path) -> KeyRing:
        calls.append(p)
        if len(calls) == 1:
            theirs.save(p)  # another worker creates the file between our read and our create
            raise FileNotFoundError(p)
        return real_load(cls, p)  # type: ignore[no-any-return]

    monkeypatch.setattr(KeyRing, "_load", classmethod(load))
    ring = KeyRing.load_or_create(path)
    assert ring.current_kid == theirs.current_kid
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]


def test_key_file_integrity_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = secrets.token_bytes(32)
    path.write_text(json.dumps({"current": "deadbeef", "keys": {"deadbeef": b64(key)}}))
    with pytest.raises(ValueError, match="does not match"):
        KeyRing.load_or_create(path)
    path.write_text(json.dumps({"current": "00000000", "keys": {key_id(key): b64(key)}}))
    with pytest.raises(ValueError, match="missing"):
        KeyRing.load_or_create(path)
    path.write_text(json.dumps(["not", "a", "key", "file"]))
    with pytest.raises(ValueError, match="malformed"):
        KeyRing.load_or_create(path)


def test_readable_key_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    KeyRing.load_or_create(path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="chatgate.security.crypto"):
        KeyRing.load_or_create(path)
    assert "readable by other users" in caplog.text


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("", ""),
        ("abc", "***"),
        ("abcde", "***"),
        ("abcdefgh", "…gh"),
        ("abcdefghijk", "…jk"),
        ("sk-proj-abcdefghijklmnopqrstuvwxyz", "sk-…wxyz"),
        ("sk-abcdefghijklmnop1234", "sk-…1234"),
        ("abcdefghijklmnop1234", "…1234"),
        ("verylongprefix-abcdefghij1234", "…1234"),
        ("-leadingdash-abcdefgh", "…efgh"),
    ],
)
def test_mask(key: str, shown: str) -> None:
    assert mask(key) == shown


def test_mask_never_reveals_more_than_four_trailing_characters() -> None:
    for length in range(0, 64):
        key = secrets.token_urlsafe(64)[:length]
        shown = mask(key)
        tail = shown.rpartition("…")[2]
        assert len(tail) <= 4
        assert shown.count("…") <= 1
