"""The ``authplane`` command line. Exit codes: 0 ok, 1 invalid policies or failed check, 2 misuse."""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Sequence

from authplane.errors import CompileError, PolicyError
from authplane.policy.gcpause import paused_gc

DEFAULT_DIR = "policies"


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, no usage dump
        m = _INVALID_CHOICE.search(message)
        if m:
            choices = [c.strip(" '") for c in m[2].split(",")]
            close = difflib.get_close_matches(m[1], choices, n=1)
            message = f"unknown command {m[1]!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                      f"; commands: {', '.join(choices)}")
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr)
    return code


def _load(args: argparse.Namespace):  # -> PolicySet
    from authplane.policy.loader import load_dir

    return load_dir(args.dir, args.max_file_size)


def _options(args: argparse.Namespace):  # -> CompileOptions
    from authplane.compiler.ir import CompileOptions
    from authplane.controlplane.bootstrap import XDS_CLUSTER

    return CompileOptions(authz_grpc=args.authz_grpc, authz_http=args.authz_http, authz_tls=_authz_tls(args),
                          decision_log_cluster=XDS_CLUSTER if getattr(args, "decision_log", None) else None,
                          **_decision_log_filter(args))


def _authz_tls(args: argparse.Namespace):  # -> AuthzTls | None
    """TLS to the builtin decision service, if a flag asks for it (``serve --authz-tls-cert``, or
    ``--authz-tls-ca``/``--authz-tls-server-name`` for a service running elsewhere)."""
    from authplane.compiler.ir import AuthzTls
    from authplane.policy.certificates import CertificateError, ca_bundle

    client = bool(getattr(args, "authz_client_ca", None))
    if not (getattr(args, "authz_tls_cert", None) or args.authz_tls_ca or args.authz_tls_server_name or client):
        return None
    ca = None
    if args.authz_tls_ca:
        try:
            with open(args.authz_tls_ca, encoding="utf-8") as f:
                ca = ca_bundle(f.read(), args.authz_tls_ca)
        except (OSError, UnicodeDecodeError, CertificateError) as e:
            raise SystemExit(_fail(f"authplane: --authz-tls-ca: {getattr(e, 'strerror', None) or e}")) from None
    return AuthzTls(ca, args.authz_tls_server_name, client_cert=client)


@paused_gc()  # the whole command: a collection would walk every object loaded (see gcpause.py)
def cmd_validate(args: argparse.Namespace) -> int:
    from authplane.compiler.render import dump, static_bootstrap, to_dict
    from authplane.compiler.snapshot import compile_policies

    policies = _load(args)
    snapshots = compile_policies(policies, _options(args))
    for w in policies.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in policies.notes:
        print(f"info: {n}", file=sys.stderr)
    if args.report:
        from authplane.compiler.report import report
        from authplane.compiler.translate import build

        sys.stdout.write(report(policies, build(policies, _options(args))))
    if args.strict and policies.warnings:
        n = len(policies.warnings)
        return _fail(f"{args.dir}: {n} warning{'s' if n != 1 else ''} (--strict)")
    if args.envoy:
        from authplane.envoy_bin import validate_config

        for fleet, snap in snapshots.items():
            ok, out = validate_config(dump(to_dict(static_bootstrap(snap))))
            if not ok:
                lines = [ln for ln in out.splitlines() if ln.strip()]
                return _fail(f"{args.dir}: fleet {fleet!r}: Envoy rejected the configuration: "
                             f"{lines[-1] if lines else out}")
    counts = (f"{len(policies.gateways)} gateways, {len(policies.routes)} routes, "
              f"{len(policies.backends)} backends, {len(policies.auth_policies)} policies")
    fleets = ", ".join(f"{f} ({s.version})" for f, s in snapshots.items()) or "none"
    checked = "; Envoy accepts every fleet" if args.envoy else ""
    print(f"{args.dir}: valid: {counts}; fleets: {fleets}{checked}")
    return 0


@paused_gc()
def cmd_render(args: argparse.Namespace) -> int:
    from authplane.compiler.render import dump, snapshot_dict, static_bootstrap, to_dict
    from authplane.compiler.snapshot import compile_policies

    snapshots = compile_policies(_load(args), _options(args))
    if not snapshots:
        return _fail(f"authplane render: no fleet in {args.dir}: it has no Gateway, so no Envoy gets "
                     "configuration (routes without a gateway are for forward auth only)")
    if args.fleet not in snapshots:
        known = ", ".join(snapshots)
        return _fail(f"authplane render: unknown fleet {args.fleet!r} (fleets in {args.dir}: {known})")
    snap = snapshots[args.fleet]
    if args.static:
        data = to_dict(static_bootstrap(snap), show_secrets=args.show_secrets)
    else:
        data = snapshot_dict(snap, show_secrets=args.show_secrets)
    sys.stdout.write(dump(data, args.format))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from authplane.policy.schema import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os

    from authplane.controlplane.app import ControlPlane, ServeConfig

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if (args.xds_tls_cert is None) != (args.xds_tls_key is None) or (args.xds_client_ca and not args.xds_tls_cert):
        return _fail("authplane serve: --xds-tls-cert and --xds-tls-key go together (and --xds-client-ca needs them)",
                     2)
    if (args.authz_tls_cert is None) != (args.authz_tls_key is None) or (args.authz_client_ca and
                                                                        not args.authz_tls_cert):
        return _fail("authplane serve: --authz-tls-cert and --authz-tls-key go together (and --authz-client-ca "
                     "needs them)", 2)
    if _decision_log_filter(args) and not args.decision_log:
        return _fail("authplane serve: --decision-log-verdicts, --decision-log-sample and --decision-log-transport "
                     "need --decision-log", 2)
    cp = ControlPlane(ServeConfig(args.dir, _options(args), args.xds, args.admin, args.address_file,
                                  decision_log=args.decision_log, decision_log_queue=args.decision_log_queue))
    cp.store.max_file_size = args.max_file_size
    if args.xds_tls_cert:
        from authplane.controlplane.tls import TlsFiles

        cp.xds.tls = TlsFiles(args.xds_tls_cert, args.xds_tls_key, args.xds_client_ca)
    grpc_listen = None if args.no_authz else args.authz_grpc_listen or args.authz_grpc
    http_listen = None if args.no_authz else args.authz_http_listen or args.authz_http
    if grpc_listen or http_listen:
        from authplane.authz.component import decision_service
        from authplane.policy.tlsfiles import TlsFiles as AuthzFiles

        tls = AuthzFiles(args.authz_tls_cert, args.authz_tls_key, args.authz_client_ca) if args.authz_tls_cert else None
        authz = decision_service(args.authz_workers, grpc_listen, http_listen, tls)
        cp.add_component(authz, registry=authz.registry, on_revision=authz.on_revision)
    cp.load(allow_empty=args.allow_empty)  # PolicyError: problems printed by main(), exit 1
    try:
        code = asyncio.run(cp.serve_forever())
    except OSError as e:
        return _fail(f"authplane serve: {e}")
    if cp.store.abandoned_build():  # stopped mid-reload; everything else is closed already
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from authplane.controlplane.bootstrap import XdsClientTls, bootstrap_yaml

    if (args.xds_client_cert is None) != (args.xds_client_key is None):
        return _fail("authplane bootstrap: --xds-client-cert and --xds-client-key go together", 2)
    if (args.xds_client_cert or args.xds_server_name) and not args.xds_ca:
        return _fail("authplane bootstrap: --xds-client-cert and --xds-server-name need --xds-ca", 2)
    xds: list[str] = args.xds or ["127.0.0.1:18000"]
    tls = None
    if args.xds_ca:
        hosts = {a.rpartition(":")[0].strip("[]") for a in xds}
        if args.xds_server_name is None and len(hosts) > 1:
            return _fail("authplane bootstrap: replicas on different hosts need --xds-server-name "
                         "(the name every replica's certificate carries)", 2)
        tls = XdsClientTls(args.xds_ca, args.xds_server_name or hosts.pop(), args.xds_client_cert,
                           args.xds_client_key)
    sys.stdout.write(bootstrap_yaml(args.node_id, args.fleet, xds, args.admin_port, not args.sotw, tls,
                                    args.native_decision_log))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from authplane.testrun import cmd_test as run

    return run(args.dir, args.tests, args.junit, args.max_file_size)


def cmd_explain(args: argparse.Namespace) -> int:
    from authplane.testrun import cmd_explain as run

    return run(args.dir, args.fleet, args.method, args.url, args.headers, args.claims, args.client_cert,
               args.max_file_size, args.client_key)


def cmd_status(args: argparse.Namespace) -> int:
    from authplane.controlplane.admin import fetch_status, format_status

    try:
        doc = fetch_status(args.admin)
    except OSError as e:
        return _fail(f"authplane status: {e}")
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else format_status(doc))
    if args.check:
        problems = status_problems(doc)
        for problem in problems:
            print(f"authplane status --check: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


def status_problems(doc: dict) -> list[str]:
    """Why ``status --check`` fails: the last change was rejected, or a connected node does not run
    its fleet's current version (disconnected nodes are left out: they may be gone for good)."""
    out = []
    if doc.get("last_reload_error"):
        out.append(f"the last policy change was rejected at {doc['last_reload_error']['at']}")
    out += [f"node {n['id']} (fleet {n['fleet']}) is {n['state']}" for n in doc["nodes"]
            if n["connected"] and n["state"] != "in sync"]
    return out


def _address(value: str) -> str:
    from authplane.addresses import split_address

    try:
        split_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: expected 0-65535")
    return int(value)


def _workers(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}: expected 0-64")
    return int(value)


_VERDICTS = ("allow", "deny", "would-deny")  # compiler.resources.VERDICTS (not imported: CLI start-up)


def _verdicts(value: str) -> tuple[str, ...]:
    given = {v.strip() for v in value.split(",")}
    if not given <= set(_VERDICTS):
        raise argparse.ArgumentTypeError(f"invalid verdicts {value!r}: expected a comma list of {', '.join(_VERDICTS)}")
    return tuple(v for v in _VERDICTS if v in given)


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"invalid fraction {value!r}: expected a number in (0, 1], e.g. 0.1")
    return number


def _decision_log_filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decision-log-verdicts", type=_verdicts, metavar="LIST",
                   help="report only these verdicts (comma list of allow, deny, would-deny; default all): Envoy "
                   "tells them apart itself and never sends the others")
    p.add_argument("--decision-log-sample", type=_fraction, metavar="FRACTION",
                   help="report this fraction of the allow entries (by request id; denials and would-denials "
                   "are all reported; default 1)")
    p.add_argument("--decision-log-transport", choices=("grpc", "native"),
                   help="grpc (default): Envoy's gRPC access log; native: authplane's Envoy module gathers a few "
                   "fields per request and sends them in batches (Envoys need the module and a bootstrap from "
                   "authplane bootstrap --native-decision-log): a fraction of the CPU per request")


def _decision_log_filter(args: argparse.Namespace) -> dict[str, object]:
    """The CompileOptions of ``--decision-log-verdicts``/``--decision-log-sample``, when given."""
    out: dict[str, object] = {}
    if getattr(args, "decision_log_verdicts", None):
        out["decision_log_verdicts"] = args.decision_log_verdicts
    if getattr(args, "decision_log_sample", None) is not None:
        out["decision_log_sample"] = args.decision_log_sample
    if getattr(args, "decision_log_transport", None) == "native":
        out["decision_log_native"] = True
    return out


def _count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 10_000_000:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}: expected 1-10000000")
    return int(value)


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


_SIZE_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def _size(value: str) -> int:
    number = value.rstrip("kKmMgGiIbB")
    unit = value[len(number):].lower()
    if not number.isdigit() or unit not in _SIZE_UNITS or int(number) == 0:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: expected bytes, or a number with KiB, MiB or GiB")
    return int(number) * _SIZE_UNITS[unit]


def _compile_flags(p: argparse.ArgumentParser, decision_log: bool = False) -> None:
    """The flags every command that compiles takes; ``decision_log``: also ``--decision-log`` (the
    access log ``serve --decision-log`` adds, for ``validate`` and ``render``)."""
    from authplane.policy.files import DEFAULT_MAX_FILE_SIZE

    if decision_log:
        p.add_argument("--decision-log", action="store_true",
                       help="include the access log that serve --decision-log adds to every listener")
        _decision_log_filter_flags(p)

    p.add_argument("--max-file-size", type=_size, default=DEFAULT_MAX_FILE_SIZE, metavar="SIZE",
                   help="refuse policy, JWKS, key and secret files larger than this (default 4MiB)")
    p.add_argument("--authz-grpc", default="127.0.0.1:9001", metavar="HOST:PORT",
                   help="address Envoy uses for the builtin decision service over gRPC")
    p.add_argument("--authz-http", default="127.0.0.1:9002", metavar="HOST:PORT",
                   help="address Envoy uses for the builtin decision service over HTTP")
    p.add_argument("--authz-tls-ca", metavar="PEM", help="Envoys reach the decision service over TLS, trusting "
                   "this CA (read here, sent over SDS; default with serve --authz-tls-cert: the system store)")
    p.add_argument("--authz-tls-server-name", metavar="NAME", help="SNI and the name the decision service's "
                   "certificate must carry (implies TLS; default: the --authz-grpc/--authz-http host)")


def _dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=DEFAULT_DIR, help="policy directory (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = _Parser(prog="authplane", description=(__doc__ or "").replace("``", ""))
    parser.add_argument("--version", action="version", version=f"authplane {version('authplane')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="check policy files (exit 1 with path:line:col per problem)")
    _dir_argument(p)
    p.add_argument("--envoy", action="store_true", help="also run envoy --mode validate on the result")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too (static checks: "
                   "rules that never match or are shadowed, routes reachable with no credential ...)")
    p.add_argument("--report", action="store_true", help="print, per fleet, listener, host and route, the "
                   "checks of each level with their file:line and whether it is reachable anonymously")
    _compile_flags(p, decision_log=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the Envoy resources a fleet would receive")
    _dir_argument(p)
    p.add_argument("--fleet", required=True, metavar="F", help="the fleet (Gateway spec.fleet) to render")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format (default: %(default)s)")
    p.add_argument("--static", action="store_true",
                   help="print a static Envoy bootstrap (routes inlined) instead of xDS resources")
    p.add_argument("--show-secrets", action="store_true",
                   help="print client secrets, HMAC keys, API keys, passwords and TLS private keys "
                        "(redacted by default)")
    _compile_flags(p, decision_log=True)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("serve", help="serve the policies to Envoy fleets over ADS, reloading on every save")
    _dir_argument(p)
    p.add_argument("--xds", default="127.0.0.1:18000", type=_address, metavar="HOST:PORT",
                   help="ADS (gRPC) listen address")
    p.add_argument("--admin", default="127.0.0.1:9100", type=_address, metavar="HOST:PORT",
                   help="admin HTTP listen address (/status, /metrics, /healthz)")
    p.add_argument("--allow-empty", action="store_true",
                   help="start even if the directory is invalid, serving nothing until it is fixed")
    p.add_argument("--address-file", metavar="PATH",
                   help="write the bound addresses as JSON once listening (useful with port 0)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    _compile_flags(p)
    p.add_argument("--authz-grpc-listen", type=_address, metavar="HOST:PORT",
                   help="where the decision service listens for gRPC ext_authz (default: --authz-grpc)")
    p.add_argument("--authz-http-listen", type=_address, metavar="HOST:PORT",
                   help="where it listens for HTTP ext_authz and forward-auth (default: --authz-http)")
    p.add_argument("--authz-workers", type=_workers, default=1, metavar="N",
                   help="run the decision service in N processes sharing its ports (default 1; 0: in this "
                   "process, where checks wait while a reload holds it)")
    p.add_argument("--no-authz", action="store_true", help="do not run the decision service")
    p.add_argument("--authz-tls-cert", metavar="PEM", help="the decision service serves gRPC and HTTP over TLS "
                   "with this certificate chain (re-read when it changes); Envoys then connect over TLS")
    p.add_argument("--authz-tls-key", metavar="PEM", help="the private key of --authz-tls-cert")
    p.add_argument("--authz-client-ca", metavar="PEM", help="the decision service requires client certificates "
                   "signed by this CA; Envoys present their fleet certificate (authplane bootstrap --xds-client-cert)")
    p.add_argument("--decision-log", metavar="PATH", help="Envoys report each decided request over the xDS "
                   "connection; write them here as JSON lines ('-': stdout; SIGHUP reopens PATH, for rotation) "
                   "and count them on /metrics and /status")
    p.add_argument("--decision-log-queue", type=_count, default=50_000, metavar="N",
                   help="entries that may wait for a slow decision-log writer; more are dropped and counted "
                   "(authplane_decision_log_entries_total{result=\"dropped\"}, default %(default)s)")
    _decision_log_filter_flags(p)
    p.add_argument("--xds-tls-cert", metavar="PEM", help="serve ADS over TLS with this certificate chain "
                   "(re-read when it changes)")
    p.add_argument("--xds-tls-key", metavar="PEM", help="the private key of --xds-tls-cert")
    p.add_argument("--xds-client-ca", metavar="PEM", help="require client certificates signed by this CA; "
                   "each Envoy gets only the fleets its certificate names (URI SAN .../fleet/<fleet>)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bootstrap", help="print the Envoy bootstrap of one fleet member")
    p.add_argument("--node-id", required=True, type=_nonempty, metavar="ID", help="node.id: names this Envoy in status")
    p.add_argument("--fleet", required=True, type=_nonempty, metavar="F", help="node.cluster: selects its gateways")
    p.add_argument("--xds", action="append", type=_address, metavar="HOST:PORT",
                   help="where authplane serve listens (default 127.0.0.1:18000); repeat it for replicas: "
                   "Envoy holds one ADS stream and reconnects to another when that one fails")
    p.add_argument("--admin-port", type=_port, default=9901, metavar="N",
                   help="Envoy admin port on 127.0.0.1 (0: OS-chosen)")
    protocol = p.add_mutually_exclusive_group()
    protocol.add_argument("--delta", action="store_true", help="incremental ADS (the default)")
    protocol.add_argument("--sotw", action="store_true", help="state-of-the-world ADS")
    p.add_argument("--xds-ca", metavar="PEM", help="connect over TLS, trusting this CA for authplane's certificate "
                   "(a path Envoy reads)")
    p.add_argument("--xds-server-name", metavar="NAME",
                   help="SNI and the name authplane's certificate must carry (default: the --xds host)")
    p.add_argument("--xds-client-cert", metavar="PEM", help="this Envoy's fleet certificate (mutual TLS)")
    p.add_argument("--xds-client-key", metavar="PEM", help="the private key of --xds-client-cert")
    p.add_argument("--native-decision-log", action="store_true",
                   help="load authplane's Envoy module to send the decision log in batches (for serve "
                   "--decision-log-transport native; the module must be on ENVOY_DYNAMIC_MODULES_SEARCH_PATH)")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("status", help="which Envoy runs which version, and what it rejected")
    p.add_argument("--admin", default="127.0.0.1:9100", type=_address, metavar="HOST:PORT",
                   help="authplane serve admin address")
    p.add_argument("--json", action="store_true", help="print the /status document")
    p.add_argument("--check", action="store_true", help="exit 1 if the last policy change was rejected or a "
                   "connected Envoy does not run its fleet's current version (for scripts and CI)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("test", help="run the PolicyTest cases through a real Envoy (exit 1 with each failing case)")
    _dir_argument(p)
    p.add_argument("--tests", metavar="PATH", help="read the PolicyTest documents here (file or directory) "
                   "instead of the policy directory")
    p.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    _compile_flags(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("explain", help="send one request through a real Envoy: its route, each check and "
                       "the policy line behind it, the status")
    p.add_argument("dir", help="policy directory")
    p.add_argument("--fleet", required=True, metavar="F", help="the fleet (Gateway spec.fleet) to ask")
    p.add_argument("method", metavar="METHOD", help="HTTP method")
    p.add_argument("url", metavar="URL", help="http://host/path?query, or a path")
    p.add_argument("-H", dest="headers", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a request header (repeatable)")
    p.add_argument("--claims", metavar="JSON", help="send a JWT with these claims, minted for the first JWT "
                   "check on the route (its provider is re-keyed for the run)")
    p.add_argument("--client-cert", metavar="PEM", help="send the request over TLS to the fleet's https listener, "
                   "presenting this client certificate (PEM, with its key unless --client-key)")
    p.add_argument("--client-key", metavar="PEM", help="the private key of --client-cert")
    _compile_flags(p)
    p.set_defaults(func=cmd_explain)

    from authplane import demo

    demo.add_parser(sub)
    demo.add_init_parser(sub)

    p = sub.add_parser("schema", help="print the JSON Schema of the policy files")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        n = len(e.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
        return 1
    except CompileError as e:
        return _fail(f"authplane: cannot compile: {e}")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
