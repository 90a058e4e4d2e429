"""An echo upstream: answers every request with what it received (method, path, headers) as JSON."""

from __future__ import annotations

import json

from authplane.devtools.httpserver import BackgroundServer, Handler


class _Echo(Handler):
    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode(errors="replace") if length else ""
        data = {"method": self.command, "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
        self.send(200, json.dumps(data, indent=1), {"content-type": "application/json"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer


class EchoServer(BackgroundServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_Echo, host, port)
