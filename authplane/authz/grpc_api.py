"""envoy.service.auth.v3.Authorization/Check over grpc.aio.

The handler works on raw bytes (no grpcio (de)serializer round trip) and caches the serialized
CheckResponse, so a cached decision costs one parse, one hash and one dict lookup.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from authplane.authz.decider import Decider
from authplane.authz.evaluate import Decision, Request, deny, deny_report, shadow_report
from authplane.contract import JWT_FILTER, JWT_PAYLOAD_KEY, POLICY_KEY

log = logging.getLogger("authplane.authz")
SERVICE = "envoy.service.auth.v3.Authorization"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_OK, _PERMISSION_DENIED, _UNAUTHENTICATED = 0, 7, 16


def _headers(pairs: tuple[tuple[str, str], ...]) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v),
                                       append_action=_OVERWRITE) for k, v in pairs]


@functools.lru_cache(maxsize=4096)
def encode(d: Decision, policy: str = "") -> bytes:
    """The serialized CheckResponse; memoized, as most decisions repeat (same rule, same identity).
    A denial by a rule of ``policy`` names it in the dynamic metadata (``contract.DENIED``)."""
    if d.allow:
        out = pb.CheckResponse(status=status_pb2.Status(code=_GRPC_OK), ok_response=pb.OkHttpResponse(
            headers=_headers(d.upstream), headers_to_remove=list(d.remove),
            response_headers_to_add=_headers(d.headers)))
        if d.would_deny:  # Envoy puts it in its dynamic metadata (namespace EXT_AUTHZ_FILTER)
            out.dynamic_metadata.update(shadow_report(d))
    else:
        code = _UNAUTHENTICATED if d.status == 401 else _PERMISSION_DENIED
        out = pb.CheckResponse(
            status=status_pb2.Status(code=code, message=d.reason),
            denied_response=pb.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=d.status),  # type: ignore[arg-type]
                headers=_headers(d.headers), body=d.body))
        if policy and d.rule:  # Envoy logs it; the client never sees dynamic metadata
            out.dynamic_metadata.update(deny_report(policy, d))
    return out.SerializeToString()


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return {k: _value(v) for k, v in s.fields.items()}


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() else n
    if kind in ("string_value", "bool_value"):
        return getattr(v, kind)
    return None


class GrpcFrontend:
    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self._timer = decider.metrics.timer("grpc")

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(self.check)  # bytes in, bytes out
        return grpc.method_handlers_generic_handler(SERVICE, {"Check": method})

    async def check(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        start = time.perf_counter()
        try:
            out = self.answer(raw)
        except Exception:  # never crash on input; fail closed
            log.exception("check failed")
            self.decider.metrics.failed("grpc")
            out = encode(deny("internal error in the decision service", 500))
        self._timer.observe(time.perf_counter() - start)
        return out

    def answer(self, raw: bytes) -> bytes:
        try:
            check = pb.CheckRequest.FromString(raw)
        except DecodeError:
            return encode(deny("malformed CheckRequest", 400))
        attrs = check.attributes
        pol = self.decider.policy(attrs.context_extensions.get(POLICY_KEY))
        if isinstance(pol, Decision):
            return encode(pol)
        http = attrs.request.http
        meta = attrs.metadata_context.filter_metadata
        payload = None
        if JWT_FILTER in meta and JWT_PAYLOAD_KEY in meta[JWT_FILTER].fields:
            payload = meta[JWT_FILTER].fields[JWT_PAYLOAD_KEY].struct_value
        req = Request(method=http.method, path=http.path, headers=http.headers,
                      source=attrs.source.address.socket_address.address, host=http.host,
                      scheme=http.scheme or "http",
                      claims_raw=payload.SerializeToString(deterministic=True) if payload else b"")
        key, hit = self.decider.lookup(pol, req, "grpc")
        if hit is None:
            req.claims = struct_to_dict(payload) if payload is not None else None
            decision = self.decider.decide(pol, req)
            hit = (decision, encode(decision, pol.name))
            self.decider.remember(key, pol, decision, hit)
        self.decider.count(pol.name, hit[0])
        return hit[1]
