"""The console's static files, read once from the package and served from memory.

They are small (about 500 kB, 150 kB gzipped), so each is kept with its gzip form and an ETag:
a request costs a dictionary lookup. Vendored libraries sit in directories named for their
version and are cached for a year; the console's own files and the page are revalidated
(`no-cache` plus the ETag, answered 304) so that an upgrade of chatgate shows at once.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["CSP", "Asset", "Assets"]

# The page runs only its own files: no inline script or style, nothing from elsewhere, and it
# cannot be framed. Images may be data:/blob: URLs (attachments the user picks or pastes).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE files
}
_COMPRESSIBLE = ("text/", "image/svg+xml")
_MIN_GZIP = 1024
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    content_type: str
    etag: str
    cache_control: str


class Assets:
    """Every file under `static/`, by its path below it ("index.html", "app/app.js", ...)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._assets = {path: _asset(path, body) for path, body in files.items() if _type(path) is not None}

    @classmethod
    def from_package(cls) -> Assets:
        root = resources.files("chatgate.console") / "static"
        files: dict[str, bytes] = {}
        stack = [(root, "")]
        while stack:
            folder, prefix = stack.pop()
            for entry in folder.iterdir():
                if entry.is_dir():
                    stack.append((entry, f"{prefix}{entry.name}/"))
                else:
                    files[prefix + entry.name] = entry.read_bytes()
        return cls(files)

    def get(self, path: str) -> Asset | None:
        return self._assets.get(path)


def _type(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1]
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return _TYPES.get(suffix)


def _asset(path: str, body: bytes) -> Asset:
    content_type = _type(path) or "application/octet-stream"
    compress = content_type.startswith(_COMPRESSIBLE) and len(body) >= _MIN_GZIP
    # mtime=0: the same bytes on every start, so the gzip form matches its ETag everywhere.
    gzipped = gzip.compress(body, compresslevel=9, mtime=0) if compress else None
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    cache_control = IMMUTABLE if path.startswith("vendor/") else REVALIDATE
    return Asset(body, gzipped, content_type, etag, cache_control)
