"""Logging set-up for the server and the CLI: one format for all, on stderr.

`text` is for a person; `json` is one object per line for a log pipeline, with the request id
and the access line's fields as keys of their own.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Literal

import orjson

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the record's `fields`
    (and `worker`, the worker's number, under `serve --workers`)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, fmt: Literal["text", "json"] = "text", *, worker: int | None = None) -> None:
    """Log to stderr at `level`; a worker of `serve --workers` names itself on every line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter(worker))
    else:
        tag = "" if worker is None else f" [worker {worker}]"
        handler.setFormatter(logging.Formatter(FORMAT.replace(" %(name)s", " %(name)s" + tag)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
