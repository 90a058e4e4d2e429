"""A BYO ext_authz service with the semantics of Istio's ext-authz sample, over gRPC and HTTP.

Allows a request carrying ``x-ext-authz: allow``; otherwise 403 with a fixed body and
``x-ext-authz-check-result: denied``. Allowed requests reach the upstream with
``x-ext-authz-check-result: allowed``. Used by the demo and the tests as "your own" service.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from authplane.devtools.httpserver import BackgroundServer, Handler

HEADER, ALLOW = "x-ext-authz", "allow"
RESULT = "x-ext-authz-check-result"
DENY_BODY = f"denied by ext_authz for not found header `{HEADER}: {ALLOW}` in the request"


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))


class _Servicer(pb_grpc.AuthorizationServicer):
    def __init__(self) -> None:
        self.checks = 0

    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        self.checks += 1
        if request.attributes.request.http.headers.get(HEADER) == ALLOW:
            return pb.CheckResponse(status=status_pb2.Status(code=0), ok_response=pb.OkHttpResponse(
                headers=[_header(RESULT, "allowed")]))
        return pb.CheckResponse(status=status_pb2.Status(code=7), denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=[_header(RESULT, "denied")], body=DENY_BODY))


class SampleAuthzGrpc:
    """The gRPC flavour, in a thread pool; ``port`` 0 picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.servicer = _Servicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_AuthorizationServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")

    def start(self) -> SampleAuthzGrpc:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)


class _Http(Handler):
    def _answer(self) -> None:
        allowed = self.headers.get(HEADER) == ALLOW
        self.send(200 if allowed else 403, "" if allowed else DENY_BODY,
                  {RESULT: "allowed" if allowed else "denied"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer


class SampleAuthzHttp(BackgroundServer):
    """The HTTP flavour (Envoy's ext_authz ``http_service``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_Http, host, port)
