"""The ``authplane`` command line. Exit codes: 0 ok, 1 invalid policies or failed check, 2 misuse."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from authplane.errors import CompileError, PolicyError

DEFAULT_DIR = "policies"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr)
    return code


def _load(directory: str):  # -> Policies
    from authplane.policy.loader import load_dir

    return load_dir(directory)


def _options(args: argparse.Namespace):  # -> CompileOptions
    from authplane.compiler.ir import CompileOptions

    return CompileOptions(authz_grpc=args.authz_grpc, authz_http=args.authz_http)


def cmd_validate(args: argparse.Namespace) -> int:
    from authplane.compiler.render import dump, static_bootstrap, to_dict
    from authplane.compiler.snapshot import compile_policies

    policies = _load(args.dir)
    snapshots = compile_policies(policies, _options(args))
    for w in policies.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.envoy:
        from authplane.envoy_bin import validate_config

        for fleet, snap in snapshots.items():
            ok, out = validate_config(dump(to_dict(static_bootstrap(snap))))
            if not ok:
                lines = [ln for ln in out.splitlines() if ln.strip()]
                return _fail(f"{args.dir}: fleet {fleet!r}: Envoy rejected the configuration: "
                             f"{lines[-1] if lines else out}")
    counts = (f"{len(policies.gateways)} gateways, {len(policies.routes)} routes, "
              f"{len(policies.backends)} backends, {len(policies.policies)} policies")
    fleets = ", ".join(f"{f} ({s.version})" for f, s in snapshots.items()) or "none"
    checked = "; Envoy accepts every fleet" if args.envoy else ""
    print(f"{args.dir}: valid: {counts}; fleets: {fleets}{checked}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from authplane.compiler.render import dump, snapshot_dict, static_bootstrap, to_dict
    from authplane.compiler.snapshot import compile_policies

    snapshots = compile_policies(_load(args.dir), _options(args))
    if args.fleet not in snapshots:
        known = ", ".join(snapshots) or "none"
        return _fail(f"authplane render: unknown fleet {args.fleet!r} (fleets in {args.dir}: {known})")
    snap = snapshots[args.fleet]
    data = to_dict(static_bootstrap(snap)) if args.static else snapshot_dict(snap)
    sys.stdout.write(dump(data, args.format))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from authplane.policy.schema import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _compile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--authz-grpc", default="127.0.0.1:9001", metavar="HOST:PORT",
                   help="address Envoy uses for the builtin decision service over gRPC")
    p.add_argument("--authz-http", default="127.0.0.1:9002", metavar="HOST:PORT",
                   help="address Envoy uses for the builtin decision service over HTTP")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="authplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="check policy files (exit 1 with path:line:col per problem)")
    p.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    p.add_argument("--envoy", action="store_true", help="also run envoy --mode validate on the result")
    _compile_flags(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the Envoy resources a fleet would receive")
    p.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    p.add_argument("--fleet", required=True)
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.add_argument("--static", action="store_true",
                   help="print a static Envoy bootstrap (routes inlined) instead of xDS resources")
    _compile_flags(p)
    p.set_defaults(func=cmd_render)

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
