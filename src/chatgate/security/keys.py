"""The key ring a process uses for API keys at rest, and its rotation.

In the embedded setup the ring lives in a key file; `chatgate keys rotate` (another process)
adds a new key to the file and re-encrypts every row. A running server that then meets a key
id it does not know reloads the file once, so rotation needs no restart and no downtime.
"""

from __future__ import annotations

import logging
from pathlib import Path

from chatgate.config import Settings
from chatgate.security.crypto import KeyDecryptError, KeyRing

log = logging.getLogger("chatgate.keys")


class Keys:
    """Encrypts and decrypts API keys for the registry (`registry.KeyCipher`)."""

    def __init__(self, ring: KeyRing, *, path: Path | None = None, encrypt_writes: bool = True) -> None:
        self._ring = ring
        self._path = path
        self._encrypt_writes = encrypt_writes

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        """`CHATGATE_SECRET_KEY` when set, else the key file in the data directory (created on first use)."""
        secret = settings.secret_key.get_secret_value()
        if secret:
            return cls(KeyRing.from_secret(secret), encrypt_writes=settings.encrypt_api_keys)
        path = settings.data_dir / "chatgate.key"
        return cls(KeyRing.load_or_create(path), path=path, encrypt_writes=settings.encrypt_api_keys)

    @property
    def ring(self) -> KeyRing:
        return self._ring

    @property
    def path(self) -> Path | None:
        return self._path

    def encrypt(self, plaintext: str) -> str:
        return self._ring.encrypt(plaintext) if self._encrypt_writes else plaintext

    def decrypt(self, stored: str) -> str:
        try:
            return self._ring.decrypt(stored)
        except KeyDecryptError as exc:
            if exc.kid is None or self._path is None or exc.kid in self._ring.kids:
                raise
            log.info("stored key names key id %s: reloading %s", exc.kid, self._path)
            self._ring = KeyRing.load_or_create(self._path)
            return self._ring.decrypt(stored)
