"""``authplane test`` and ``authplane explain``: requests through a real Envoy running the compiled
configuration of a fleet, and what happened to them, read back from Envoy.

One ``Harness`` per run: the policy set is transformed for the run (never its files): every Backend
points at an echo upstream, Backends named in a PolicyTest's ``stubs`` at a stub ext_authz service
that allows or denies, every JWT provider at an inline JWKS of a key generated for the run. The
builtin decision service runs in this process; Envoy runs the fleet's static bootstrap on loopback
ports the OS chooses, with a file access log (route name, response code details, upstream host)
that, with the IR (route → checks in ``compiler/filters`` ORDER, each with its policy position),
tells which check decided. With a client certificate (``explain --client-cert``) the request goes
over TLS to the fleet's first ``https`` listener (one verifying client certificates if any does),
presenting the certificate, so ``when.clientCert`` rules are explained like any other.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

import grpc
from aiohttp import web
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from joserfc import jwt
from joserfc.jwk import ECKey

from authplane.authz.decider import Decider
from authplane.authz.evaluate import Decision
from authplane.authz.service import AuthzService
from authplane.compiler import translate
from authplane.compiler.filters import ORDER
from authplane.compiler.ir import Checks, CompileOptions, ListenerIR, RouteIR
from authplane.compiler.protos import pack
from authplane.compiler.render import dump, static_bootstrap, to_dict
from authplane.compiler.resources import GUARD_ROUTE
from authplane.compiler.snapshot import compile_policies
from authplane.contract import RBAC_DENIED, RBAC_ENFORCED_RESULT, RBAC_ENFORCED_RULE, enforced_prefix
from authplane.devtools.echo import EchoServer
from authplane.envoy_bin import EnvoyProcess, Running
from authplane.policy.documents import Located, PolicySet
from authplane.policy.model import (
    AuthPolicy,
    AuthPolicySpec,
    Backend,
    Jwks,
    JwtProvider,
    PolicyTest,
    PolicyTestCase,
    PolicyTestJwt,
    PolicyTestRequest,
)


class RunError(Exception):
    """The run cannot start (unknown fleet, a BYO ext_authz Backend without a stub ...)."""


CASE_HEADER = "x-authplane-test-case"
"""Sent with every request: the access log line of a case carries it."""

_SECTIONS: dict[str, tuple[str, ...]] = {
    "envoy.filters.http.oauth2": ("oidc",),
    "envoy.filters.http.jwt_authn": ("jwt", "oidc"),
    "envoy.filters.http.basic_auth": ("basic_auth",),
    "envoy.filters.http.api_key_auth": ("api_key",),
    "envoy.filters.http.rbac": ("authorization",),
    "envoy.filters.http.ext_authz": ("ext_auth",),
}
"""Envoy filter (``ORDER``) → the AuthPolicy sections it checks (the first one set is the check)."""

_YAML_KEYS = {"basic_auth": "basicAuth", "api_key": "apiKey", "ext_auth": "extAuth"}

_DENIED_BY: tuple[tuple[str, str], ...] = (
    ("jwt_authn", "envoy.filters.http.jwt_authn"),
    ("rbac_", "envoy.filters.http.rbac"),
    ("ext_authz", "envoy.filters.http.ext_authz"),
    ("basic_auth", "envoy.filters.http.basic_auth"),
    ("api_key_auth", "envoy.filters.http.api_key_auth"),
    ("oauth", "envoy.filters.http.oauth2"),
)
"""Prefix of Envoy's ``%RESPONSE_CODE_DETAILS%`` for a local reply → the filter that sent it."""


# --- what happened to a request ----------------------------------------------------------------


@dataclass
class Step:
    """One check on a request's path, in the order Envoy runs them."""

    check: str
    """The Envoy filter, short (``jwt_authn``, ``rbac`` ...)."""
    level: str
    policy: str
    where: str
    """``file:line`` of the policy section that configured the check."""
    outcome: str = "not run"
    """``pass``, ``deny (<Envoy's details>)`` or ``not run`` (an earlier check answered)."""
    filter: str = field(default="", repr=False)


@dataclass
class Outcome:
    """What a request got, as Envoy's access log and the IR tell it."""

    status: int
    route: str
    details: str
    upstream_headers: dict[str, str] | None
    """What the upstream received; None when the request did not reach it."""
    steps: list[Step]
    decided_by: str
    """The check (or route) that decided, with its ``file:line``."""
    route_where: str = ""


@dataclass
class CaseResult:
    doc: str
    case: PolicyTestCase
    where: str
    outcome: Outcome
    problems: list[str]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.problems


# --- stubs for your own ext_authz services -----------------------------------------------------


def _stub_grpc_handler(allow: bool) -> grpc.GenericRpcHandler:
    if allow:
        answer = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0),
                                                 ok_response=external_auth_pb2.OkHttpResponse())
    else:
        answer = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=7), denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden), body="denied by stub"))
    data = answer.SerializeToString(deterministic=True)

    async def check(request: bytes, context: Any) -> bytes:
        return data

    return grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {
        "Check": grpc.unary_unary_rpc_method_handler(check)})


class _Recorder(Decider):
    """The decision service's ``Decider``, remembering each (policy, decision) it counts."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[tuple[str, Decision]] = []

    def count(self, policy: str, decision: Decision) -> None:
        self.seen.append((policy, decision))
        super().count(policy, decision)


# --- the policy set, transformed for a run -----------------------------------------------------


def _byo_services(policies: PolicySet) -> dict[str, str]:
    """Backend name → protocol of every BYO ext_authz service the policies name."""
    out: dict[str, str] = {}
    for pol in policies.auth_policies.values():
        ext = pol.resource.spec.ext_auth
        if ext is not None and ext.service != "builtin":
            if out.setdefault(ext.service, ext.protocol or "grpc") != (ext.protocol or "grpc"):
                raise RunError(f"Backend {ext.service!r} is used as ext_authz over both gRPC and HTTP: "
                                   "a stub can be one of them")
            out[ext.service] = ext.protocol or "grpc"
    return out


def _rekeyed(spec: AuthPolicySpec, jwks: dict[str, Any]) -> AuthPolicySpec:
    if spec.jwt is None:
        return spec
    providers = [p.model_copy(update={"jwks": Jwks(inline=jwks)}) for p in spec.jwt.providers]
    return spec.model_copy(update={"jwt": spec.jwt.model_copy(update={"providers": providers})})


def for_run(policies: PolicySet, jwks: dict[str, Any], upstream: str, stubs: dict[str, str]) -> PolicySet:
    """``policies`` with every Backend at ``upstream`` (those in ``stubs``, backend → address, at
    their stub) and every JWT provider keyed to ``jwks``; positions are kept."""
    backends: dict[str, Located[Backend]] = {}
    for name, item in policies.backends.items():
        update: dict[str, Any] = {"endpoints": [stubs.get(name, upstream)], "tls": False}
        if name not in stubs:
            update["protocol"] = "http1"  # the echo upstream speaks HTTP/1.1
        spec = item.resource.spec.model_copy(update=update)
        backends[name] = Located(item.resource.model_copy(update={"spec": spec}), item.source)
    auth: dict[str, Located[AuthPolicy]] = {}
    for name, pol in policies.auth_policies.items():
        spec = _rekeyed(pol.resource.spec, jwks)
        auth[name] = Located(pol.resource.model_copy(update={"spec": spec}), pol.source)
    return replace(policies, backends=backends, auth_policies=auth, tests={})


# --- the harness -------------------------------------------------------------------------------


def _access_log(path: str) -> accesslog_pb2.AccessLog:
    fmt = struct_pb2.Struct()
    fmt.update({"case": f"%REQ({CASE_HEADER})%", "route": "%ROUTE_NAME%", "status": "%RESPONSE_CODE%",
                "details": "%RESPONSE_CODE_DETAILS%", "upstream": "%UPSTREAM_HOST%",
                "rbac": "%DYNAMIC_METADATA(envoy.filters.http.rbac)%",
                "ext_authz": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%"})
    log = file_pb2.FileAccessLog(path=path)
    log.log_format.json_format.CopyFrom(fmt)
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=pack(log))


class Harness(Running):
    """Envoy with a fleet's compiled configuration, the decision service, an echo upstream and
    the ext_authz stubs, all on loopback ports the OS chose; ``stop`` ends every one of them."""

    def __init__(self, policies: PolicySet, fleet: str, stubs: dict[str, str] | None = None,
                 client_tls: ssl.SSLContext | None = None) -> None:
        """``client_tls``: requests go to the fleet's https listener over TLS with this context
        (``client_context``: the client certificate to present)."""
        self.policies, self.fleet, self.stubs = policies, fleet, dict(stubs or {})
        self.client_tls = client_tls
        known = {g.resource.spec.fleet for g in policies.gateways.values()}
        if fleet not in known:
            raise RunError(f"unknown fleet {fleet!r} (fleets: {', '.join(sorted(known)) or 'none'})")
        byo = _byo_services(policies)
        for name in self.stubs:
            if name not in byo:
                raise RunError(f"stubs: {name!r} is not a Backend used as an ext_authz service "
                                   f"({', '.join(sorted(byo)) or 'none is'})")
        missing = sorted(set(byo) - set(self.stubs))
        if missing:
            raise RunError(f"ext_authz Backend {missing[0]!r} needs a stub: stubs: {{{missing[0]}: allow}} "
                               "(or deny)")
        self.byo = byo
        self.key = ECKey.generate_key("P-256", parameters={"kid": "authplane-test", "alg": "ES256", "use": "sig"})
        self.jwks = {"keys": [self.key.as_dict(private=False)]}
        self._dir = tempfile.mkdtemp(prefix="authplane-test-")
        self.log_path = os.path.join(self._dir, "access.log")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.svc = AuthzService()
        self.recorder = _Recorder(self.svc.metrics)
        self.svc.decider = self.recorder
        self.echo: EchoServer | None = None
        self.envoy: EnvoyProcess | None = None
        self._grpc: list[grpc.aio.Server] = []
        self._http: list[asyncio.AbstractServer] = []
        self._conn: http.client.HTTPConnection | None = None
        self._conn_host = ""
        self._lines: dict[str, dict[str, Any]] = {}
        self._read = 0
        self.run_policies = policies
        self.listener: ListenerIR | None = None
        self.port = 0

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _stub(self, allow: bool, protocol: str) -> str:
        if protocol == "grpc":
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([_stub_grpc_handler(allow)])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self._grpc.append(server)
        else:
            async def answer(request: web.BaseRequest) -> web.Response:
                return web.Response(status=200 if allow else 403, text="" if allow else "denied by stub")

            site = await self.loop.create_server(web.Server(answer), "127.0.0.1", 0)
            self._http.append(site)
            port = site.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def start(self) -> Harness:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._thread.start()
        self.echo = EchoServer()
        # it writes the head and the body apart: with Nagle, the body waits for Envoy's delayed ACK
        handler = self.echo.httpd.RequestHandlerClass
        self.echo.httpd.RequestHandlerClass = type("NoDelayEcho", (handler,), {"disable_nagle_algorithm": True})
        self.echo.start()
        stubs = {name: self._run(self._stub(verdict == "allow", self.byo[name]))
                 for name, verdict in self.stubs.items()}
        self.run_policies = for_run(self.policies, self.jwks, f"127.0.0.1:{self.echo.port}", stubs)
        self._run(self.svc.start("127.0.0.1:0", "127.0.0.1:0"))
        self.loop.call_soon_threadsafe(self.svc.update, self.run_policies, "test")
        self._run(asyncio.sleep(0))
        opts = CompileOptions(authz_grpc=self.svc.grpc_address or "", authz_http=self.svc.http_address or "")
        fleet_ir = translate.build(self.run_policies, opts)[self.fleet]
        # plain HTTP: the first listener that serves it (not https, not a redirect); with a client
        # certificate, or when there is no such listener, HTTPS (a listener verifying client certificates first)
        plain = [lst for lst in fleet_ir.listeners if lst.tls is None and lst.redirect_port is None]
        secure = sorted((lst for lst in fleet_ir.listeners if lst.tls is not None),
                        key=lambda lst: lst.tls is None or lst.tls.spec.client_validation is None)
        if self.client_tls is None and not plain and secure:
            self.client_tls = client_context()
        if self.client_tls is not None and not secure:
            raise RunError(f"--client-cert: fleet {self.fleet!r} has no https listener")
        self.listener = secure[0] if self.client_tls is not None else (plain or fleet_ir.listeners)[0]
        boot = static_bootstrap(compile_policies(self.run_policies, opts)[self.fleet], "authplane-test")
        boot.admin.address.socket_address.address = "127.0.0.1"
        boot.admin.address.socket_address.port_value = 0
        for lst in boot.static_resources.listeners:
            lst.address.socket_address.address = "127.0.0.1"
            lst.address.socket_address.port_value = 0
            chains = [*lst.filter_chains, *([lst.default_filter_chain] if lst.HasField("default_filter_chain") else [])]
            for f in (f for chain in chains for f in chain.filters):
                manager = hcm.HttpConnectionManager()
                f.typed_config.Unpack(manager)
                manager.access_log.append(_access_log(self.log_path))
                f.typed_config.CopyFrom(pack(manager))
        path = os.path.join(self._dir, "bootstrap.yaml")
        with open(path, "w") as out:
            out.write(dump(to_dict(boot)))
        self.envoy = EnvoyProcess(path, os.path.join(self._dir, "envoy.log"), with_parent=True,
                                  extra_args=["--file-flush-interval-msec", "20"])
        self.envoy.start()
        self.envoy.wait_ready()
        self.port = self.envoy.listener_port(self.listener.name)

    def stop(self) -> None:
        """Stop everything started, whatever state ``start`` reached."""
        if self._conn is not None:
            self._conn.close()
        if self.envoy is not None:
            self.envoy.stop()
        if self.echo is not None:
            self.echo.stop()
        if self._thread.is_alive():
            async def close() -> None:
                await self.svc.stop(0)
                for server in self._grpc:
                    await server.stop(None)
                for site in self._http:
                    site.close()

            try:
                self._run(close(), 10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # --- requests ------------------------------------------------------------------------------

    def default_host(self) -> str:
        assert self.listener is not None
        hosts = self.listener.virtual_hosts
        return hosts[0].domains[0].replace("*", "test") if hosts else "test"

    def _provider(self, token: PolicyTestJwt) -> JwtProvider:
        for pol in self.policies.auth_policies.values():
            jwt_spec = pol.resource.spec.jwt
            if jwt_spec is None or (token.policy and pol.name != token.policy):
                continue
            for prov in jwt_spec.providers:
                if prov.name == token.provider:
                    return prov
        where = f" in AuthPolicy {token.policy!r}" if token.policy else ""
        raise RunError(f"no jwt provider {token.provider!r}{where}")

    def mint(self, token: PolicyTestJwt) -> tuple[JwtProvider, str]:
        prov = self._provider(token)
        now = int(time.time())
        claims: dict[str, Any] = {"iat": now, "exp": now + 3600}
        if prov.issuer:
            claims["iss"] = prov.issuer
        if prov.audiences:
            claims["aud"] = prov.audiences[0]
        claims.update(token.claims)
        return prov, jwt.encode({"alg": "ES256", "kid": "authplane-test"}, claims, self.key)

    def send(self, request: PolicyTestRequest,
             context: ssl.SSLContext | None = None) -> tuple[str, int, dict[str, str] | None]:
        """Send one request to Envoy; (case id, status, what the upstream received or None).
        ``context``: over its own TLS connection with this client (a PolicyTest's ``clientCert``)."""
        case_id = uuid.uuid4().hex
        headers = {"host": request.host or self.default_host(), **request.headers, CASE_HEADER: case_id}
        path = request.path
        if request.jwt is not None:
            prov, token = self.mint(request.jwt)
            src = prov.from_[0] if prov.from_ else None
            if src is None:
                headers["authorization"] = f"Bearer {token}"
            elif src.header:
                headers[src.header] = (src.prefix or "") + token
            elif src.cookie:
                cookie = headers.get("cookie")
                headers["cookie"] = (cookie + "; " if cookie else "") + f"{src.cookie}={token}"
            else:
                path += ("&" if "?" in path else "?") + f"{quote(src.query or '')}={token}"
        if self._conn is not None and (context is not None or self._conn_host != headers["host"]):
            self._conn.close()  # over TLS the SNI is the host: a new host, a new connection
            self._conn = None
        if self._conn is None:
            self._conn_host = headers["host"]
            tls = context or self.client_tls
            self._conn = (http.client.HTTPConnection("127.0.0.1", self.port, timeout=30) if tls is None
                          else _TlsConnection(self.port, tls, headers["host"].rsplit(":", 1)[0]))
        try:
            self._conn.request(request.method, path, headers=headers)
            resp = self._conn.getresponse()
            body = resp.read()
        except (ssl.SSLError, ConnectionError, http.client.HTTPException) as e:
            if self.client_tls is None:
                raise
            self._conn.close()
            self._conn = None
            assert self.listener is not None
            raise RunError(f"listener {self.listener.name} refused the TLS connection ({e}): is the client "
                           "certificate (--client-cert) signed by its clientValidation CA?") from None
        if resp.will_close or context is not None:
            self._conn.close()
            self._conn = None
        upstream = None
        if resp.getheader("content-type") == "application/json":
            try:
                data = json.loads(body)
                if isinstance(data, dict) and isinstance(data.get("headers"), dict):
                    upstream = {str(k): str(v) for k, v in data["headers"].items()}
            except ValueError:
                pass
        return case_id, resp.status, upstream

    def log_lines(self, case_ids: Iterable[str], timeout: float = 15) -> dict[str, dict[str, Any]]:
        """The access log line of each case, once Envoy has written them all."""
        wanted = set(case_ids)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._read)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            end = data.rfind(b"\n") + 1
            self._read += end
            for line in data[:end].splitlines():
                entry = json.loads(line)
                self._lines[str(entry.get("case"))] = entry
            if wanted <= self._lines.keys():
                return {c: self._lines.pop(c) for c in wanted}
            if time.monotonic() > deadline:
                raise RunError(f"Envoy wrote no access log line for {len(wanted - self._lines.keys())} "
                                   "request(s)")
            time.sleep(0.01)

    # --- explaining ----------------------------------------------------------------------------

    def _where(self, policy: str, *path: str | int) -> str:
        item = self.policies.auth_policies.get(policy)
        if item is None:
            return "?"
        line, _ = item.source.at(("spec", *path), key=isinstance(path[-1], str))  # a section: its key's line
        return f"{item.source.path}:{line}"

    def _rule_where(self, route: RouteIR) -> str:
        item = self.policies.routes.get(route.origin.name)
        rule = route.name.partition("/")[2]
        if item is None or rule not in item.resource.spec.rule_names():
            return f"{route.origin.path}:{route.origin.line}"
        line, _ = item.source.at(("spec", "rules", item.resource.spec.rule_names().index(rule)))
        return f"{item.source.path}:{line}"

    def route_ir(self, name: str) -> RouteIR | None:
        assert self.listener is not None
        base = name.split("[", 1)[0]
        for vh in self.listener.virtual_hosts:
            for r in vh.routes:
                if r.name == base:
                    return r
        return None

    def steps(self, route: RouteIR) -> list[Step]:
        """Every check on the route's path, in Envoy's order (``ORDER``, gateway level first)."""
        assert self.listener is not None
        if route.public:
            return []
        out = []
        for filt in ORDER:
            for checks in (self.listener.checks, route.checks):
                section = self._section(filt.prefix, checks)
                if checks is not None and section is not None:
                    out.append(Step(filt.prefix.rsplit(".", 1)[-1], checks.level, checks.policy,
                                    self._where(checks.policy, _YAML_KEYS.get(section, section)),
                                    filter=filt.prefix))
        return out

    @staticmethod
    def _section(prefix: str, checks: Checks | None) -> str | None:
        if checks is None:
            return None
        return next((s for s in _SECTIONS.get(prefix, ()) if getattr(checks.spec, s) is not None), None)

    def outcome(self, entry: dict[str, Any], status: int, upstream: dict[str, str] | None,
                decisions: list[tuple[str, Decision]]) -> Outcome:
        route_name = str(entry.get("route") or "")
        details = str(entry.get("details") or "")
        route = self.route_ir(route_name) if route_name else None
        steps = self.steps(route) if route is not None else []
        route_where = self._rule_where(route) if route is not None else ""
        out = Outcome(status, route_name or "(none)", details, upstream, steps, "", route_where)
        denier = next((f for prefix, f in _DENIED_BY if details.startswith(prefix)), None)
        if route is None:
            out.decided_by = ("the ambiguous-path guard (gateway pathMatching.rejectAmbiguous)"
                              if route_name == GUARD_ROUTE else "no route matched")
            return out
        candidates = [s for s in steps if s.filter == denier]
        if denier is None or not candidates:
            for s in steps:
                s.outcome = "pass"
            if route.public:
                pol = route_name.split("/")[0]
                where = next((f"{p.source.path}:{p.source.at(('spec', 'public'))[0]}"
                              for p in self.policies.auth_policies.values()
                              if p.resource.spec.public and p.resource.spec.target_ref.name == pol), route_where)
                out.decided_by = f"public route {route_name} ({where})"
            elif upstream is None and details.startswith("direct_response"):
                last = steps[-1] if steps else None
                out.decided_by = (f"route {route_name} answers itself ({route_where})" if last is None else
                                  f"{last.check} ({last.level}) of policy {last.policy} at {last.where}")
                for s in steps:
                    s.outcome = "not run"
            elif steps:
                last = steps[-1]
                where = last.where
                ext = self.policies.auth_policies[last.policy].resource.spec.ext_auth
                names = [r.name for r in (ext.rules or [])] if ext and last.check == "ext_authz" else []
                rule = next((d.rule for p, d in decisions if p == last.policy and d.allow), None)
                if rule in names:
                    where = self._where(last.policy, "extAuth", "rules", names.index(rule))
                where = self._allowing_rule(last, entry) or where
                out.decided_by = f"{last.check} ({last.level}) of policy {last.policy} at {where}"
            else:
                out.decided_by = f"route {route_name} has no checks ({route_where})"
            return out
        deciding, where = self._deciding(candidates, entry, decisions)
        index = steps.index(deciding)
        for i, s in enumerate(steps):
            s.outcome = "pass" if i < index else "not run"
        deciding.outcome = f"deny ({details})"
        out.decided_by = f"{deciding.check} ({deciding.level}) of policy {deciding.policy} at {where}"
        return out

    def _deciding(self, candidates: list[Step], entry: dict[str, Any],
                  decisions: list[tuple[str, Decision]]) -> tuple[Step, str]:
        """Which of the steps of the denying filter denied, and the position of what denied."""
        first, details = candidates[0], str(entry.get("details") or "")
        if first.filter == "envoy.filters.http.rbac":
            # each RBAC instance records its enforced result under contract.enforced_prefix (rules_stat_prefix)
            result = entry.get("rbac") or {}
            s = next((c for c in candidates if result.get(
                enforced_prefix(c.policy) + RBAC_ENFORCED_RESULT) == RBAC_DENIED), first)
            authz = self.policies.auth_policies[s.policy].resource.spec.authorization
            matched = details.partition("[")[2].rstrip("]").split("#")[0]
            for i, rule in enumerate(authz.rules if authz else []):
                if rule.action == "deny" and rule.name == matched:
                    return s, self._where(s.policy, "authorization", "rules", i)
            # default deny: no allow rule matched, or a deny rule did (folded into the allow policies)
            return s, self._where(s.policy, "authorization", "default")
        if first.filter == "envoy.filters.http.ext_authz":
            denied = [(p, d) for p, d in decisions if not d.allow]
            for s in candidates:
                for policy, decision in denied:
                    if policy != s.policy:
                        continue
                    ext = self.policies.auth_policies[s.policy].resource.spec.ext_auth
                    names = [r.name for r in (ext.rules or [])] if ext else []
                    if decision.rule in names:
                        return s, self._where(s.policy, "extAuth", "rules", names.index(decision.rule))
                    return s, s.where
            byo = [s for s in candidates if self._byo(s.policy)]
            return (byo or candidates)[0], (byo or candidates)[0].where
        return first, first.where

    def _byo(self, policy: str) -> bool:
        ext = self.policies.auth_policies[policy].resource.spec.ext_auth
        return ext is not None and ext.service != "builtin"

    def _allowing_rule(self, step: Step, entry: dict[str, Any]) -> str | None:
        """``file:line`` of the authorization rule that allowed (Envoy's effective policy id)."""
        if step.filter != "envoy.filters.http.rbac":
            return None
        matched = str((entry.get("rbac") or {}).get(enforced_prefix(step.policy) + RBAC_ENFORCED_RULE) or "")
        authz = self.policies.auth_policies[step.policy].resource.spec.authorization
        for i, rule in enumerate(authz.rules if authz else []):
            if rule.action == "allow" and rule.name == matched.split("#")[0]:
                return self._where(step.policy, "authorization", "rules", i)
        return None

    def explain(self, request: PolicyTestRequest) -> Outcome:
        start = len(self.recorder.seen)
        case_id, status, upstream = self.send(request)
        entry = self.log_lines([case_id])[case_id]
        return self.outcome(entry, status, upstream, self.recorder.seen[start:])


class _TlsConnection(http.client.HTTPSConnection):
    """HTTPS to Envoy on loopback with ``server_name`` as SNI (it picks the listener's filter chain)."""

    def __init__(self, port: int, context: ssl.SSLContext, server_name: str) -> None:
        super().__init__("127.0.0.1", port, timeout=30, context=context)
        self.server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)  # type: ignore[attr-defined]


def client_context(cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client presenting ``cert`` (a PEM chain, with its key in the same file or in ``key``;
    no certificate without it). Envoy's own certificate is not verified: it is the run's own Envoy
    on loopback, and which CA signed the listener's certificate is not what explain is asked about."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is None:
        return ctx
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise RunError(f"--client-cert: cannot read {e.filename or cert}: {e.strerror}") from None
    except (OSError, ssl.SSLError):
        raise RunError(f"--client-cert {cert}: not a PEM certificate with its private key "
                       f"({'--client-key ' + key if key else 'in the same file, or give --client-key'})") from None
    return ctx


# --- authplane test ----------------------------------------------------------------------------


def _check(case: PolicyTestCase, out: Outcome) -> list[str]:
    problems = []
    if out.status != case.expect.status:
        problems.append(f"status: expected {case.expect.status}, got {out.status}")
    for name, want in case.expect.upstream_headers.items():
        got = None if out.upstream_headers is None else out.upstream_headers.get(name.lower())
        if got != want:
            shown = "(absent)" if want is None else repr(want)
            seen = ("(request not sent upstream)" if out.upstream_headers is None
                    else "(absent)" if got is None else repr(got))
            problems.append(f"upstream header {name}: expected {shown}, got {seen}")
    return problems


def _case_context(doc: Located[PolicyTest], request: PolicyTestRequest) -> ssl.SSLContext | None:
    """The TLS client of a case with ``clientCert`` (paths relative to the test's file)."""
    if request.client_cert is None:
        return None
    base = os.path.dirname(doc.source.path)
    return client_context(os.path.join(base, request.client_cert),
                          os.path.join(base, request.client_key) if request.client_key else None)


def run_tests(policies: PolicySet, tests: list[Located[PolicyTest]]) -> list[CaseResult]:
    """Every case of ``tests``, one Harness (one Envoy) per fleet, set of stubs and kind of
    listener (cases with ``clientCert`` go to an https listener)."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...], bool], list[tuple[Located[PolicyTest], int]]] = {}
    for doc in tests:
        spec = doc.resource.spec
        for i, case in enumerate(spec.cases):
            key = (spec.fleet, tuple(sorted(spec.stubs.items())), case.request.client_cert is not None)
            groups.setdefault(key, []).append((doc, i))
    results: list[CaseResult] = []
    for (fleet, stubs, https), cases in groups.items():
        with Harness(policies, fleet, dict(stubs), client_context() if https else None) as h:
            sent = []
            for doc, i in cases:
                case = doc.resource.spec.cases[i]
                started = time.monotonic()
                seen = len(h.recorder.seen)
                case_id, status, upstream = h.send(case.request, _case_context(doc, case.request))
                line, _ = doc.source.at(("spec", "cases", i))
                sent.append((doc, case, f"{doc.source.path}:{line}", case_id, status, upstream,
                             h.recorder.seen[seen:], time.monotonic() - started))
            lines = h.log_lines(s[3] for s in sent)
            for doc, case, where, case_id, status, upstream, decisions, seconds in sent:
                out = h.outcome(lines[case_id], status, upstream, decisions)
                results.append(CaseResult(doc.name, case, where, out, _check(case, out), seconds))
    return results


def report(results: list[CaseResult]) -> str:
    lines = []
    for r in results:
        if r.passed:
            continue
        lines.append(f"FAIL {r.doc}: {r.case.name} ({r.where})")
        lines += [f"  {p}" for p in r.problems]
        lines.append(f"  route: {r.outcome.route}; decided by {r.outcome.decided_by}")
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results)} case{'s' if len(results) != 1 else ''}: {len(results) - failed} passed, "
                 f"{failed} failed")
    return "\n".join(lines) + "\n"


def junit_xml(results: list[CaseResult], seconds: float) -> str:
    """JUnit XML: a testsuite per PolicyTest document, a testcase per case."""
    root = ElementTree.Element("testsuites", name="authplane test", tests=str(len(results)),
                               failures=str(sum(not r.passed for r in results)), time=f"{seconds:.3f}")
    suites: dict[str, ElementTree.Element] = {}
    for r in results:
        suite = suites.get(r.doc)
        if suite is None:
            suite = suites[r.doc] = ElementTree.SubElement(root, "testsuite", name=r.doc, tests="0", failures="0")
        suite.set("tests", str(int(suite.get("tests", "0")) + 1))
        case = ElementTree.SubElement(suite, "testcase", name=r.case.name, classname=r.doc, file=r.where,
                                      time=f"{r.seconds:.3f}")
        if not r.passed:
            suite.set("failures", str(int(suite.get("failures", "0")) + 1))
            failure = ElementTree.SubElement(case, "failure", message="; ".join(r.problems))
            failure.text = "\n".join([*r.problems, f"route: {r.outcome.route}",
                                      f"decided by {r.outcome.decided_by}"])
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def format_explain(out: Outcome) -> str:
    lines = [f"route: {out.route}" + (f" ({out.route_where})" if out.route_where else "")]
    if out.steps:
        lines.append("checks, in the order Envoy runs them:")
        width = max(len(s.check) for s in out.steps)
        pwidth = max(len(s.policy) for s in out.steps)
        for i, s in enumerate(out.steps, 1):
            lines.append(f"  {i}. {s.check:<{width}}  {s.level:<7}  {s.policy:<{pwidth}}  {s.where}  {s.outcome}")
    else:
        lines.append("checks: none")
    reached = "reached the upstream" if out.upstream_headers is not None else "answered by Envoy"
    lines.append(f"status: {out.status} ({reached}; {out.details})")
    lines.append(f"decided by: {out.decided_by}")
    return "\n".join(lines) + "\n"


# --- the commands ------------------------------------------------------------------------------


def _tests_of(policies: PolicySet, tests_path: str | None, max_file_size: int) -> list[Located[PolicyTest]]:
    if tests_path is None:
        return list(policies.tests.values())
    from authplane.policy.loader import load_dir

    return list(load_dir(tests_path, max_file_size).tests.values())


def cmd_test(dir: str, tests_path: str | None, junit: str | None, max_file_size: int) -> int:
    """``authplane test``: 0 when every case passes, 1 otherwise (or invalid policies), 2 when the
    run cannot start."""
    import sys

    from authplane.policy.loader import load_dir

    policies = load_dir(dir, max_file_size)
    tests = _tests_of(policies, tests_path, max_file_size)
    if not tests:
        print(f"authplane test: no PolicyTest documents in {tests_path or dir}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        results = run_tests(policies, tests)
    except RunError as e:
        print(f"authplane test: {e}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - started
    if junit:
        with open(junit, "w") as f:
            f.write(junit_xml(results, seconds))
    text = report(results)
    failed = any(not r.passed for r in results)
    (sys.stderr if failed else sys.stdout).write(text.replace(" failed\n", f" failed ({seconds:.2f}s)\n"))
    return 1 if failed else 0


def _request(method: str, url: str, headers: list[str]) -> PolicyTestRequest:
    from urllib.parse import urlsplit

    host = None
    if not url.startswith("/"):
        parts = urlsplit(url if "//" in url else f"http://{url}")
        host, url = parts.netloc or None, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out: dict[str, str] = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise RunError(f"-H {h!r}: expected 'name: value'")
        out[name.strip().lower()] = value.strip()
    return PolicyTestRequest.model_validate({"method": method.upper(), "path": url, "host": host, "headers": out})


def cmd_explain(dir: str, fleet: str, method: str, url: str, headers: list[str], claims: str | None,
                client_cert: str | None, max_file_size: int, client_key: str | None = None) -> int:
    """``authplane explain``: the route, each check with its outcome and position, the status;
    with ``client_cert``, over TLS to an https listener presenting it."""
    import sys

    import pydantic

    from authplane.policy.loader import load_dir

    policies = load_dir(dir, max_file_size)
    try:
        if client_key is not None and client_cert is None:
            raise RunError("--client-key needs --client-cert")
        tls = client_context(client_cert, client_key) if client_cert is not None else None
        request = _request(method, url, headers)
        token = json.loads(claims) if claims is not None else None
        if token is not None and not isinstance(token, dict):
            raise RunError("--claims: expected a JSON object")
        with Harness(policies, fleet, {name: "allow" for name in _byo_services(policies)}, tls) as h:
            out = h.explain(request)
            if token is not None:
                # the token is for the first JWT check on the route the request takes
                route = h.route_ir(out.route)
                step = next((s for s in (h.steps(route) if route else []) if s.check == "jwt_authn"), None)
                if step is None:
                    raise RunError(f"--claims: route {out.route} has no JWT check")
                jwt_spec = policies.auth_policies[step.policy].resource.spec.jwt
                if jwt_spec is None:
                    raise RunError(f"--claims: policy {step.policy} signs in with oidc, not a bearer token")
                minted = PolicyTestJwt(provider=jwt_spec.providers[0].name, policy=step.policy, claims=token)
                out = h.explain(request.model_copy(update={"jwt": minted}))
    except (RunError, ValueError, pydantic.ValidationError) as e:
        message = str(e).splitlines()[0] if not isinstance(e, pydantic.ValidationError) else \
            "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        print(f"authplane explain: {message}", file=sys.stderr)
        return 2
    sys.stdout.write(format_explain(out))
    return 0
