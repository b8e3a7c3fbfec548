"""API keys at rest: AES-256-GCM under a rotating key ring, and the masked form for display.

A stored key is `cg1:<kid>:<urlsafe-b64(nonce12 + ciphertext + tag16)>`, where `kid` is the first
8 hex characters of sha256(key). The authenticated data is `cg1:<kid>`, so a value cannot be
relabelled to another key. A value without the `cg1:` prefix is a plain-text row written by
chatbot-ui; it decrypts to itself and `needs_rotation` reports it so a sweep can encrypt it.

The `api_key` column holds at most 1000 characters. The stored form takes
13 + 4 * ceil((28 + n) / 3) characters for an n-byte UTF-8 plaintext, so the longest plaintext
that fits is 710 bytes (`MAX_PLAINTEXT_BYTES`); longer keys are refused with `BadRequest`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from chatgate.errors import BadRequest, ChatgateError

__all__ = [
    "MAX_PLAINTEXT_BYTES",
    "MAX_STORED_CHARS",
    "KeyDecryptError",
    "KeyRing",
    "key_id",
    "mask",
]

logger = logging.getLogger(__name__)

PREFIX = "cg1:"
MAX_STORED_CHARS = 1000
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_CHARS = len(PREFIX) + 8 + 1  # "cg1:" + kid + ":"
# Largest n with _HEADER_CHARS + 4 * ceil((12 + n + 16) / 3) <= 1000 (padded base64).
MAX_PLAINTEXT_BYTES = (MAX_STORED_CHARS - _HEADER_CHARS) // 4 * 3 - _NONCE_BYTES - _TAG_BYTES


class KeyDecryptError(ChatgateError):
    """A stored API key cannot be decrypted: unknown key id or tampered data.

    The message never contains the stored value; `kid` names the key it asked for, if any.
    """

    status = 500
    code = "key_decrypt_error"

    def __init__(self, message: str, *, kid: str | None = None) -> None:
        super().__init__(message)
        self.kid = kid


def key_id(key: bytes) -> str:
    """The public id of a key: the first 8 hex characters of its sha256."""
    return hashlib.sha256(key).hexdigest()[:8]


def _b64decode(text: str) -> bytes:
    """Decode urlsafe base64, tolerating missing padding; raise ValueError on garbage."""
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not urlsafe base64") from exc


def _decode_key(text: str, what: str) -> bytes:
    try:
        key = _b64decode(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        # Never echo the value: it is a secret.
        raise ValueError(f"{what} is not a urlsafe-base64 encoded 32-byte key")
    return key


class KeyRing:
    """One current key that encrypts, plus older keys kept only to decrypt."""

    def __init__(self, current: bytes, older: Iterable[bytes] = ()) -> None:
        keys = [current, *older]
        for key in keys:
            if len(key) != _KEY_BYTES:
                raise ValueError("every key must be 32 bytes")
        self._keys = {key_id(key): key for key in keys}
        self._ciphers = {kid: AESGCM(key) for kid, key in self._keys.items()}
        self._current = key_id(current)

    @classmethod
    def from_secret(cls, secret: str) -> KeyRing:
        """Build from one urlsafe-base64 key or a comma-separated list (the first is current)."""
        parts = [part.strip() for part in secret.split(",") if part.strip()]
        if not parts:
            raise ValueError("the secret key is empty")
        keys = [_decode_key(part, f"secret key entry {index + 1}") for index, part in enumerate(parts)]
        return cls(keys[0], keys[1:])

    @classmethod
    def load_or_create(cls, path: Path) -> KeyRing:
        """Read the key file at `path`, creating it (mode 0600) with a fresh key if missing."""
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        ring = cls(secrets.token_bytes(_KEY_BYTES))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = ring._write_temp(path)
        try:
            # link() never replaces: when another worker created the file first, we read theirs.
            os.link(tmp, path)
        except FileExistsError:
            return cls._load(path)
        finally:
            tmp.unlink()
        logger.info("created key file %s (key id %s)", path, ring.current_kid)
        return ring

    @classmethod
    def _load(cls, path: Path) -> KeyRing:
        data = json.loads(path.read_text(encoding="utf-8"))
        mode = path.stat().st_mode
        if mode & 0o077:
            logger.warning("key file %s is readable by other users; chmod 600 it", path)
        try:
            current_kid = data["current"]
            encoded = data["keys"]
            keys = {kid: _decode_key(text, f"key {kid} in {path}") for kid, text in encoded.items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"key file {path} is malformed") from exc
        for kid, key in keys.items():
            if key_id(key) != kid:
                raise ValueError(f"key file {path}: key {kid} does not match its id")
        if current_kid not in keys:
            raise ValueError(f"key file {path}: current key {current_kid} is missing")
        current = keys.pop(current_kid)
        return cls(current, keys.values())

    @property
    def current_kid(self) -> str:
        """The id of the key new values are encrypted with."""
        return self._current

    @property
    def kids(self) -> tuple[str, ...]:
        """Every key id in the ring, current first."""
        return (self._current, *(kid for kid in self._keys if kid != self._current))

    def add_new_key(self) -> str:
        """Make a fresh random key current (older ones stay, for decryption); return its id."""
        key = secrets.token_bytes(_KEY_BYTES)
        kid = key_id(key)
        self._keys[kid] = key
        self._ciphers[kid] = AESGCM(key)
        self._current = kid
        return kid

    def save(self, path: Path) -> None:
        """Write the key file atomically, mode 0600."""
        tmp = self._write_temp(path)
        try:
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _write_temp(self, path: Path) -> Path:
        """Write the ring to a new 0600 file beside `path` and return that file's path."""
        document = {
            "current": self._current,
            "keys": {kid: base64.urlsafe_b64encode(self._keys[kid]).decode() for kid in self.kids},
        }
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        # O_EXCL with mode 0600 from the start: there is never a moment the key is world-readable.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink()
            raise
        return tmp

    def encrypt(self, plaintext: str) -> str:
        """Encrypt an API key for storage; "" (no key) stays "". BadRequest if too long to store."""
        if not plaintext:
            return ""
        data = plaintext.encode("utf-8")
        if len(data) > MAX_PLAINTEXT_BYTES:
            raise BadRequest(f"api_key is too long: at most {MAX_PLAINTEXT_BYTES} bytes can be stored", param="api_key")
        header = f"{PREFIX}{self._current}"
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._ciphers[self._current].encrypt(nonce, data, header.encode("ascii"))
        return f"{header}:{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"

    def decrypt(self, stored: str) -> str:
        """Recover the API key from its stored form; plain-text (chatbot-ui) values pass through."""
        if not stored.startswith(PREFIX):
            return stored
        kid, sep, payload = stored[len(PREFIX) :].partition(":")
        if not sep:
            raise KeyDecryptError("stored API key is malformed")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise KeyDecryptError("stored API key was encrypted with a key this server does not have", kid=kid)
        try:
            blob = _b64decode(payload)
        except ValueError:
            raise KeyDecryptError("stored API key is malformed", kid=kid) from None
        if len(blob) < _NONCE_BYTES + _TAG_BYTES:
            raise KeyDecryptError("stored API key is malformed", kid=kid)
        header = f"{PREFIX}{kid}".encode("ascii")
        try:
            data = cipher.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], header)
            return data.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise KeyDecryptError("stored API key failed authentication", kid=kid) from None

    def needs_rotation(self, stored: str) -> bool:
        """True when `stored` is plain text or encrypted under a key other than the current one."""
        if not stored:
            return False
        if not stored.startswith(PREFIX):
            return True
        kid, _, _ = stored[len(PREFIX) :].partition(":")
        return kid != self._current


def mask(key: str) -> str:
    """The only form of an API key ever shown: `sk-…cdef` (known prefix, then the last 4)."""
    if not key:
        return ""
    if len(key) < 6:
        return "***"
    if len(key) < 12:
        return "…" + key[-2:]
    dash = key.find("-")
    # Keep a short vendor prefix such as "sk-"; anything longer may be secret material.
    prefix = key[: dash + 1] if 0 < dash <= 2 else ""
    return f"{prefix}…{key[-4:]}"
