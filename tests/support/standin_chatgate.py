"""A stand-in for `python -m chatgate`, to test the ChatgateServer launcher before chatgate exists.

`serve` answers `GET /healthz` on CHATGATE_HOST:CHATGATE_PORT with the CHATGATE_* environment it
was given; any other command prints its arguments and that environment as JSON and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


def chatgate_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("CHATGATE_")}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, payload = (200, chatgate_env()) if self.path == "/healthz" else (404, {})
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str]) -> None:
    if argv[:1] != ["serve"]:
        print(json.dumps({"args": argv, "env": chatgate_env()}))
        return
    server = ThreadingHTTPServer((os.environ["CHATGATE_HOST"], int(os.environ["CHATGATE_PORT"])), _Handler)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds serve_forever in the main thread

    signal.signal(signal.SIGTERM, stop)
    print("standin serving", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("standin stopped", flush=True)
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
