"""``authplane demo``: the whole stack on loopback with a printed walk-through.

Starts the development servers (echo upstream, identity provider, a BYO ext_authz sample) in this
process, ``authplane serve`` and two Envoys of fleet ``edge`` as child processes, prints copy-paste
commands mirroring the user stories, and stops everything it started on Ctrl-C, SIGTERM or SIGHUP
(at start-up too). The children die with it even if it is killed (``PR_SET_PDEATHSIG``).

The example policies ship in the package (``authplane/examples``); the demo writes them into
``./authplane-demo/`` for the user to edit, and ``authplane init`` writes them anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from authplane.envoy_bin import EnvoyProcess, die_with_parent

# Fixed by the example policies (Backends and Gateway listeners).
ECHO_PORT, SAMPLE_AUTHZ_PORT, IDP_PORT = 9080, 9500, 9400
EDGE_PORT, LLM_PORT = 10000, 10001


@dataclass
class Ports:
    xds: int = 18000
    admin: int = 9100
    authz_grpc: int = 9001
    authz_http: int = 9002
    envoy_admin: tuple[int, ...] = (9901, 9902)

    def all(self) -> dict[int, str]:
        return {
            ECHO_PORT: "echo upstream (Backend echo in policies/gateway.yaml)",
            SAMPLE_AUTHZ_PORT: "sample ext_authz (Backend sample-ext-authz in policies/byo-ext-authz/llm.yaml)",
            IDP_PORT: "identity provider (issuer in policies/jwt/api.yaml)",
            EDGE_PORT: "Envoy listener edge/http (policies/gateway.yaml)",
            LLM_PORT: "Envoy listener llm/http (policies/byo-ext-authz/llm.yaml)",
            self.xds: "xDS (--xds-port)",
            self.admin: "admin (--admin-port)",
            self.authz_grpc: "decision service gRPC (--authz-grpc-port)",
            self.authz_http: "decision service HTTP (--authz-http-port)",
            **{p: f"Envoy edge-{i} admin (--envoy-admin-ports)" for i, p in enumerate(self.envoy_admin, 1)},
        }


def busy_ports(ports: dict[int, str]) -> list[str]:
    busy = []
    for port, what in sorted(ports.items()):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not busy
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"port {port} is busy: {what}")
    return busy


def _cli_name() -> str:
    """``authplane`` if the shell finds this installation's, else its path (``.venv/bin/authplane``
    when the venv is not activated)."""
    own = os.path.join(os.path.dirname(sys.executable), "authplane")
    if shutil.which("authplane") == own or not os.path.exists(own):
        return "authplane"
    rel = os.path.relpath(own)
    return rel if not rel.startswith("..") else own


def example_files() -> dict[str, bytes]:
    """The example policy set shipped in the package: relative path → content."""
    out: dict[str, bytes] = {}

    def walk(node: importlib.resources.abc.Traversable, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            elif not child.name.startswith("."):
                out[rel] = child.read_bytes()

    walk(importlib.resources.files("authplane") / "examples", "")
    return dict(sorted(out.items()))


def write_examples(directory: str) -> list[str]:
    """Write the example set into ``directory``; refuses (FileExistsError) if any file exists."""
    files = example_files()
    clash = [rel for rel in files if os.path.lexists(os.path.join(directory, rel))]
    if clash:
        raise FileExistsError(f"{os.path.join(directory, clash[0])} already exists")
    for rel, data in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
    return list(files)


def walkthrough(policy_dir: str, ports: Ports) -> str:
    """Copy-paste commands; request lines end with ``# expect <status>`` or ``# expect body <text>``
    (the demo's end-to-end test runs them and checks)."""
    edge, llm, idp = f"localhost:{EDGE_PORT}", f"localhost:{LLM_PORT}", f"localhost:{IDP_PORT}"
    code = "curl -s -o /dev/null -w '%{http_code}\\n'"
    pol = os.path.abspath(policy_dir)
    cli = _cli_name()
    heredoc_end = "YAML"
    return f"""
authplane demo is running: two Envoys of fleet "edge" (edge-1, edge-2) share {edge} and {llm}.
Policies: {pol} (edit them: every save is live).
Copy the commands below into another terminal. Ctrl-C here stops everything.

# 1. An unprotected route answers
{code} {edge}/open/hello   # expect 200

# 2. Turn a BYO ext_authz policy on for it (story 1): save a file, every Envoy enforces it
cat > {pol}/demo-protect-open.yaml <<'{heredoc_end}'
apiVersion: authplane.dev/v1alpha1
kind: AuthPolicy
metadata: {{name: demo-protect-open}}
spec:
  targetRef: {{kind: Route, name: home, rule: open}}
  extAuth: {{service: sample-ext-authz, timeout: 500ms}}
{heredoc_end}
sleep 1
curl -s {edge}/open/hello; echo   # expect body denied by ext_authz
{code} {edge}/open/hello   # expect 403
{code} -H 'x-ext-authz: allow' {edge}/open/hello   # expect 200

# 3. The same service at gateway and route level on the llm gateway: both must pass
{code} {llm}/openai/v1/chat   # expect 403
{code} -H 'x-ext-authz: allow' {llm}/openai/v1/chat   # expect 200

# 4. JWT at the edge (story 3): no token, then a token from the development identity provider
{code} {edge}/api/items   # expect 401
ALICE=$(curl -s '{idp}/token?sub=alice&groups=admins')   # or: {cli} demo token --sub alice --groups admins
BOB=$(curl -s '{idp}/token?sub=bob&groups=dev')
{code} -H "Authorization: Bearer $BOB" {edge}/api/items   # expect 200
curl -s -H "Authorization: Bearer $BOB" {edge}/api/items | grep x-user-id   # expect body "x-user-id": "bob"

# 5. A group rule: only admins reach /api/admin
{code} -H "Authorization: Bearer $BOB" {edge}/api/admin/users   # expect 403
{code} -H "Authorization: Bearer $ALICE" {edge}/api/admin/users   # expect 200

# 6. authplane's own decision service ({pol}/builtin/sample.yaml)
{code} {edge}/sample   # expect 403
{code} -H 'x-ext-authz: allow' {edge}/sample   # expect 200

# 6b. Edit its rules: the header value "allow" becomes "granted"; status shows a new version
sed -i.bak 's/x-ext-authz: .allow./x-ext-authz: [granted]/' {pol}/builtin/sample.yaml
rm {pol}/builtin/sample.yaml.bak
sleep 1
{code} -H 'x-ext-authz: allow' {edge}/sample   # expect 403
{code} -H 'x-ext-authz: granted' {edge}/sample   # expect 200

# 7. Remove the policy of step 2: the route is open again
rm {pol}/demo-protect-open.yaml
sleep 1
{code} {edge}/open/hello   # expect 200

# Which Envoy runs which version, and the metrics:
{cli} status --admin 127.0.0.1:{ports.admin}
curl -s localhost:{ports.admin}/metrics | grep '^authplane_'
"""


@dataclass
class Stack:
    """Everything the demo started, stopped in reverse order."""

    stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        while self.stops:
            try:
                self.stops.pop()()
            except Exception as e:  # keep stopping the rest
                print(f"  warning: while stopping: {e}", file=sys.stderr)


def _step(msg: str) -> None:
    print(f"  {msg} ...", end="", flush=True)


def _ok() -> None:
    print(" ok", flush=True)


def _wait_http(url: str, timeout: float, want: int) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == want:
                    return
                last = str(r.status)
        except urllib.error.HTTPError as e:
            last = str(e.code)
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer {want} within {timeout:.0f}s (last: {last})")


def _authplane(*args: str) -> list[str]:
    return [sys.executable, "-m", "authplane.cli", *args]


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_dev_servers(stack: Stack) -> None:
    from authplane.devtools.echo import EchoServer
    from authplane.devtools.idp_server import IdpServer, dev_provider
    from authplane.devtools.sample_authz import SampleAuthzGrpc

    servers: list[tuple[str, Callable[[], object]]] = [
        (f"echo upstream (:{ECHO_PORT})", lambda: EchoServer("127.0.0.1", ECHO_PORT)),
        (f"identity provider (:{IDP_PORT})", lambda: IdpServer(dev_provider(), "127.0.0.1", IDP_PORT)),
        (f"BYO ext_authz sample (:{SAMPLE_AUTHZ_PORT})", lambda: SampleAuthzGrpc("127.0.0.1", SAMPLE_AUTHZ_PORT)),
    ]
    for label, make in servers:
        _step(label)
        server = make().start()  # type: ignore[attr-defined]
        stack.stops.append(server.stop)
        _ok()


def _start_serve(stack: Stack, policy_dir: str, ports: Ports, work: str) -> subprocess.Popen[bytes]:
    """Spawned with the stop signals held, so it is registered before a signal can interrupt."""
    _step(f"control plane (xDS :{ports.xds}, decisions :{ports.authz_grpc}/:{ports.authz_http}, admin :{ports.admin})")
    log_path = os.path.join(work, "serve.log")
    with open(log_path, "wb") as log, _signals_held():
        serve = subprocess.Popen(
            _authplane("serve", policy_dir, "--xds", f"127.0.0.1:{ports.xds}", "--admin", f"127.0.0.1:{ports.admin}",
                       "--authz-grpc-listen", f"127.0.0.1:{ports.authz_grpc}",
                       "--authz-http-listen", f"127.0.0.1:{ports.authz_http}",
                       "--authz-grpc", f"127.0.0.1:{ports.authz_grpc}",
                       "--authz-http", f"127.0.0.1:{ports.authz_http}"),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent())
        stack.stops.append(lambda: _terminate(serve))
    try:
        _wait_http(f"http://127.0.0.1:{ports.admin}/healthz", 30, want=200)
    except RuntimeError:
        with open(log_path, errors="replace") as f:
            raise RuntimeError(f"authplane serve did not start:\n{f.read()[-2000:]}") from None
    _ok()
    return serve


def _start_envoys(stack: Stack, ports: Ports, work: str) -> None:
    for i, admin_port in enumerate(ports.envoy_admin, start=1):
        node = f"edge-{i}"
        _step(f"Envoy {node} (fleet edge, admin :{admin_port})")
        boot = subprocess.run(
            _authplane("bootstrap", "--node-id", node, "--fleet", "edge", "--xds", f"127.0.0.1:{ports.xds}",
                       "--admin-port", str(admin_port)), capture_output=True, text=True, check=True).stdout
        path = os.path.join(work, f"{node}.yaml")
        with open(path, "w") as f:
            f.write(boot)
        envoy = EnvoyProcess(path, log_path=os.path.join(work, f"{node}.log"), with_parent=True)
        stack.stops.append(envoy.stop)  # before start(): it blocks until Envoy's admin is up
        with _signals_held():
            envoy.start_process()
        envoy.wait_admin()
        envoy.wait_ready(60)
        _ok()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP (terminal closed): stop everything started so far, at start-up too."""


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold the stop signals while a child is spawned and registered; they arrive right after."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _interrupt(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def run(args: argparse.Namespace) -> int:
    ports = Ports(args.xds_port, args.admin_port, args.authz_grpc_port, args.authz_http_port,
                  tuple(args.envoy_admin_ports))
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    busy = busy_ports(ports.all())
    if busy:
        print("authplane demo: cannot start:\n  " + "\n  ".join(busy), file=sys.stderr)
        print("Stop what uses them, or move the control-plane ports with the flags named above.", file=sys.stderr)
        return 1
    directory = os.path.abspath(args.dir)
    if os.path.isdir(directory) and os.listdir(directory):
        print(f"Using the policies in {directory}", flush=True)
    else:
        try:
            write_examples(directory)
        except OSError as e:
            print(f"authplane demo: cannot write the example policies: {e}", file=sys.stderr)
            return 1
        print(f"Wrote the example policies to {directory}", flush=True)
    stack = Stack()
    work = tempfile.mkdtemp(prefix="authplane-demo-")
    stack.stops.append(lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        print("Starting the authplane demo stack on 127.0.0.1:", flush=True)
        _start_dev_servers(stack)
        serve = _start_serve(stack, directory, ports, work)
        _start_envoys(stack, ports, work)
        _step("waiting for the listeners")
        _wait_http(f"http://127.0.0.1:{EDGE_PORT}/healthz", 30, want=200)
        _ok()
        print(walkthrough(directory, ports), flush=True)
        while serve.poll() is None:
            time.sleep(0.2)
        print(f"authplane serve exited ({serve.returncode}); stopping", file=sys.stderr)
        return 1
    except _Stop:
        print("\nStopping the demo ...", flush=True)
        return 0
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"\nauthplane demo: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stack.stop()
        print("Stopped.", flush=True)


def token(args: argparse.Namespace) -> int:
    from authplane.devtools.idp_server import dev_provider

    claims: dict[str, object] = {}
    if args.groups:
        claims["groups"] = [g for g in args.groups.split(",") if g]
    if args.email:
        claims["email"] = args.email
    print(dev_provider().mint(sub=args.sub, audience=args.aud, ttl=args.ttl, **claims))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the local demo stack (control plane, two Envoys, echo, identity provider)")
    p.add_argument("--dir", "--policies", dest="dir", default="authplane-demo", metavar="DIR",
                   help="policy directory; the example set is written there if it is missing or empty "
                   "(default: %(default)s)")
    p.add_argument("--xds-port", type=int, default=18000, metavar="N", help="xDS port (default: %(default)s)")
    p.add_argument("--admin-port", type=int, default=9100, metavar="N",
                   help="admin port: /status, /metrics (default: %(default)s)")
    p.add_argument("--authz-grpc-port", type=int, default=9001, metavar="N",
                   help="decision service gRPC port (default: %(default)s)")
    p.add_argument("--authz-http-port", type=int, default=9002, metavar="N",
                   help="decision service HTTP port (default: %(default)s)")
    p.add_argument("--envoy-admin-ports", type=int, nargs=2, default=(9901, 9902), metavar=("EDGE1", "EDGE2"),
                   help="admin ports of the two Envoys (default: 9901 9902)")
    p.set_defaults(func=run)
    demo_sub = p.add_subparsers(dest="demo_command", parser_class=type(p))
    t = demo_sub.add_parser("token", help="print a token from the development identity provider")
    t.add_argument("--sub", default="alice")
    t.add_argument("--groups", default="", help="comma-separated, e.g. admins,dev")
    t.add_argument("--email", default="")
    t.add_argument("--aud", default="api")
    t.add_argument("--ttl", type=int, default=3600, help="seconds")
    t.set_defaults(func=token)


def init(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.dir)
    try:
        written = write_examples(directory)
    except FileExistsError as e:
        print(f"authplane init: {e}; nothing written", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"authplane init: cannot write {directory}: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {len(written)} files to {directory}; check them with: authplane validate {directory}")
    return 0


def add_init_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("init", help="write the starter policy set (the demo's examples) into a directory")
    p.add_argument("dir", nargs="?", default=".", help="where to write them (default: the current directory)")
    p.set_defaults(func=init)
