"""Running the decision service (and misbehaving stand-ins for it) beside the tests' real Envoy."""

from __future__ import annotations

import asyncio
import socket
import textwrap
import threading
from collections.abc import Coroutine
from typing import Any

import grpc
from aiohttp import web

from authplane.authz.grpc_api import SERVICE
from authplane.authz.service import AuthzService
from authplane.compiler.ir import CompileOptions
from authplane.policy.loader import load_dir


class LoopThread:
    """An asyncio loop in a background thread; ``run`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class ServiceThread(LoopThread):
    """``AuthzService`` on OS-chosen loopback ports, fed from a policy directory."""

    def __init__(self, policy_dir: str | None = None, **kw: Any) -> None:
        super().__init__()
        self.svc = AuthzService(**kw)
        self.run(self.svc.start("127.0.0.1:0", "127.0.0.1:0"))
        if policy_dir:
            self.reload(policy_dir, "v1")

    def reload(self, policy_dir: str, version: str) -> None:
        policies = load_dir(policy_dir)
        self.loop.call_soon_threadsafe(self.svc.update, policies, version)
        self.run(asyncio.sleep(0))  # the swap has happened once this returns

    @property
    def opts(self) -> CompileOptions:
        return CompileOptions(authz_grpc=f"127.0.0.1:{self.svc.grpc_port}",
                              authz_http=f"127.0.0.1:{self.svc.http_port}")

    def close(self) -> None:
        self.run(self.svc.stop(0))
        super().close()


class SlowService(LoopThread):
    """A decision service that answers (allow) only after ``delay`` seconds, over HTTP and gRPC."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

        async def slow_http(request: web.BaseRequest) -> web.Response:
            await asyncio.sleep(self.delay)
            return web.Response(text="too late")

        async def slow_grpc(raw: bytes, context: Any) -> bytes:
            await asyncio.sleep(self.delay)
            return b""  # an empty CheckResponse

        async def start() -> tuple[int, int]:
            self._http = await self.loop.create_server(web.Server(slow_http), "127.0.0.1", 0)
            self._grpc = grpc.aio.server()
            self._grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(slow_grpc)})])
            port = self._grpc.add_insecure_port("127.0.0.1:0")
            await self._grpc.start()
            return self._http.sockets[0].getsockname()[1], port

        self.http_port, self.grpc_port = self.run(start())

    @property
    def opts(self) -> CompileOptions:
        return CompileOptions(authz_grpc=f"127.0.0.1:{self.grpc_port}",
                              authz_http=f"127.0.0.1:{self.http_port}")

    def close(self) -> None:
        self._http.close()
        self.run(self._grpc.stop(0))
        super().close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Unreachable:
    """Where no decision service listens."""

    def __init__(self) -> None:
        port = closed_port()
        self.opts = CompileOptions(authz_grpc=f"127.0.0.1:{port}", authz_http=f"127.0.0.1:{port}")

    def close(self) -> None:
        pass


def app_gateway(backend_port: int) -> str:
    """Gateway ``edge`` (fleet edge), Backend ``app`` on ``backend_port``, Route ``app`` for every path."""
    return textwrap.dedent(f"""\
        kind: Gateway
        metadata: {{name: edge}}
        spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
        ---
        kind: Backend
        metadata: {{name: app}}
        spec: {{endpoints: ["127.0.0.1:{backend_port}"]}}
        ---
        kind: Route
        metadata: {{name: app}}
        spec: {{gateway: edge, rules: [{{name: main, match: {{pathPrefix: /}}, backend: app}}]}}
        """)


def app_policy(ext: str, jwt: str = "", name: str = "app", route: str = "app") -> str:
    """An AuthPolicy on Route ``route``; ``ext`` and ``jwt`` are the YAML of its extAuth and jwt."""
    doc = f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Route, name: {route}}}\n"
    for key, body in (("jwt", jwt), ("extAuth", ext)):
        if body:
            doc += f"  {key}:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"
    return doc


DEV_JWT = """
    required: false
    providers:
      - name: dev
        issuer: https://idp.authplane.test
        audiences: [api]
        jwks: {file: jwks.json}
        from: [{cookie: session}, {header: authorization, prefix: "Bearer "}]
"""
"""The ``jwt`` section for tokens of the tests' ``idp`` fixture (JWKS in ``jwks_file``)."""
