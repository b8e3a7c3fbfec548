"""The SQLite token reader behind authentication on the hot path."""

from __future__ import annotations

from typing import Any


def test_token_reader_answers_change_with_any_commit(tmp_path: Any) -> None:
    import sqlite3
    import uuid

    from chatgate.accounts import SQLiteTokenReader

    path = str(tmp_path / "t.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE chatgate_users (id TEXT, name TEXT, is_admin INTEGER)")
    db.execute("CREATE TABLE chatgate_tokens (token_hash TEXT, user_id TEXT, revoked_at TEXT)")
    user = uuid.uuid4()
    db.execute("INSERT INTO chatgate_users VALUES (?, 'u', 0)", (user.hex,))
    db.execute("INSERT INTO chatgate_tokens VALUES ('h', ?, NULL)", (user.hex,))
    reader = SQLiteTokenReader(path)
    try:
        assert reader.lookup("h") == ("h", user, "u", False)
        assert reader.lookup("h") == ("h", user, "u", False)  # kept
        db.execute("UPDATE chatgate_tokens SET revoked_at = 'now'")  # another connection commits
        assert reader.lookup("h") is None
        assert reader.lookup("unknown") is None
    finally:
        reader.close()
        db.close()
