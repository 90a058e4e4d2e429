"""A threaded HTTP server in the background, shared by the development servers."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body of every answer on a
    # kept-alive connection waited for the client's delayed ACK (~40 ms per request through Envoy).
    disable_nagle_algorithm = True

    def send(self, status: int, body: bytes | str, headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request (Envoy resetting its upstream connections while it
        stops) is routine: no traceback. Anything else gets one line, never a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        print(f"{type(self).__name__}: error serving {client_address}: {error!r}", file=sys.stderr)


class BackgroundServer:
    """Serves ``handler`` in a daemon thread; ``port`` 0 picks a free port."""

    def __init__(self, handler: type[Handler], host: str = "127.0.0.1", port: int = 0):
        self.httpd = _Server((host, port), handler)
        self.port: int = self.httpd.server_address[1]

    def start(self) -> BackgroundServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
