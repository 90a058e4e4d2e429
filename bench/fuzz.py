"""Many more fuzz cases than the suite runs: mutated policy directories, CheckRequest bytes (gRPC)
and raw HTTP requests (Envoy HTTP mode, forward auth) to the decision service, ADS streams to the
control plane; the generators and checks of tests/policy/test_fuzz.py and tests/authz/test_fuzz_wire.py.

Each batch runs in its own child process (memory capped with RLIMIT_AS) with a per-case timer;
the parent counts outcomes, hangs and each batch's peak RSS. Target (issue 9): zero unexpected
exceptions, zero hangs, RSS bounded (the same peak in the last batches as in the first).

    python bench/fuzz.py [--cases 20000] [--batch 1000] [--timeout 10] [--only policy|check|http|ads]
                         [--first-seed 0]

"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARES = {"policy": 0.65, "check": 0.15, "http": 0.1, "ads": 0.1}
MEMORY_CAP = 2 << 30  # a case that allocates without bound fails with MemoryError, not the machine


class ErrorLog(logging.Handler):
    """Counts records at ERROR and above (a server logging a traceback for bad input)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage()[:200])


def _policy_runner() -> tuple[Callable[[int], str], Callable[[], None]]:
    from tests.policy.test_fuzz import policy_case, run_policy_case

    return (lambda seed: "valid" if run_policy_case(policy_case(seed)) else "rejected"), lambda: None


def _decision_service() -> Any:
    from tests.authz.test_authz_service import SAMPLE
    from tests.support.policies import write_policies
    from tests.support.processes import ServiceThread

    d = write_policies(tempfile.mkdtemp(prefix="fuzz-"), {"p.yaml": SAMPLE, "keys.txt": "acme: key-1\nglobex: key-2\n"})
    return ServiceThread(d)


def _check_runner() -> tuple[Callable[[int], str], Callable[[], None]]:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2 as pb

    from authplane.authz.grpc_api import SERVICE, GrpcFrontend
    from tests.authz.test_fuzz_wire import check_answer, check_case

    svc = _decision_service()
    frontend = GrpcFrontend(svc.svc.decider)
    channel = grpc.insecure_channel(f"127.0.0.1:{svc.svc.grpc_port}")
    call = channel.unary_unary(f"/{SERVICE}/Check")

    def run(seed: int) -> str:
        raw = check_case(seed)
        answer = call(raw, timeout=30)
        check_answer(raw, answer)
        check_answer(raw, frontend.answer(raw))
        return "allowed" if pb.CheckResponse.FromString(answer).status.code == 0 else "denied"

    def close() -> None:
        channel.close()
        svc.close()

    return run, close


def _http_runner() -> tuple[Callable[[int], str], Callable[[], None]]:
    from tests.authz.test_fuzz_wire import check_http_answer, http_case, http_exchange

    svc = _decision_service()

    def run(seed: int) -> str:
        data = http_case(seed)
        status = check_http_answer(data, http_exchange(svc.svc.http_port, data, timeout=30))
        return "closed" if not status else f"{status // 100}xx"

    return run, svc.close


def _ads_runner() -> tuple[Callable[[int], str], Callable[[], None]]:
    import grpc

    from authplane.controlplane.app import ControlPlane, ServeConfig
    from tests.authz.test_fuzz_wire import BACKEND, GATEWAY, ROUTES, ads_case, assert_serves_snapshot, run_ads_case
    from tests.support.policies import documents, write_policies
    from tests.support.processes import InProcess

    d = write_policies(tempfile.mkdtemp(prefix="fuzz-"), {"all.yaml": documents(GATEWAY, BACKEND, ROUTES)})
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0", watch=False))
    cp.load()
    plane = InProcess(cp)
    channel = grpc.insecure_channel(plane.xds)

    def run(seed: int) -> str:
        answered = run_ads_case(channel, ads_case(seed), timeout=30)
        if seed % 50 == 49:
            assert_serves_snapshot(plane.xds)
        return "answered" if answered else "silent"

    def close() -> None:
        channel.close()
        plane.close()

    return run, close


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _frames(e: BaseException) -> str:
    """The innermost frames of authplane (else of anything) where ``e`` was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f"{os.sep}authplane{os.sep}" in f.filename] or frames
    return "\n".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} in {f.name}" for f in ours[-3:])


def worker(kind: str, first: int, count: int, timeout: float, progress: str) -> dict[str, Any]:
    from tests.policy.test_fuzz import time_limit

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.WARNING)
    runners = {"policy": _policy_runner, "check": _check_runner, "http": _http_runner,
               "ads": _ads_runner}
    run, close = runners[kind]()

    outcomes: collections.Counter[str] = collections.Counter()
    failures: dict[str, list[Any]] = {}  # "Type: first line" → [count, first seed, traceback tail]
    jump = (0, -1)  # the largest rise of the peak RSS during one case (KiB) and its seed
    start_rss = _rss_kib()
    with open(progress, "w") as prog:
        for seed in range(first, first + count):
            prog.write(f"{seed}\n")
            prog.flush()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            logged = len(errors.records)
            try:
                with time_limit(timeout):
                    outcomes[run(seed)] += 1
            except Exception as e:  # every unexpected outcome is counted, with its seed
                line = re.sub(r"\d+", "N", (str(e).splitlines() or [""])[0][:160])
                entry = failures.setdefault(f"{type(e).__name__}: {line}", [0, seed, _frames(e)])
                entry[0] += 1
            for message in errors.records[logged:]:
                failures.setdefault(f"logged error: {message}", [0, seed, ""])[0] += 1
            rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            if rise > jump[0]:
                jump = (rise, seed)
    end_rss = _rss_kib()
    close()
    return {"outcomes": outcomes, "failures": failures, "growth_kib": end_rss - start_rss,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "jump": jump}


def run_batch(kind: str, first: int, count: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", prefix="fuzz-progress-") as progress:
        cmd = [sys.executable, __file__, "--worker", kind, str(first), str(count), progress.name,
               "--timeout", str(args.timeout)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=count * args.timeout + 60)
        except subprocess.TimeoutExpired:  # stuck where the timer cannot interrupt (C code)
            seeds = progress.read().split()
            return {"hang": int(seeds[-1]) if seeds else first}
        if proc.returncode != 0 or not proc.stdout.strip():
            seeds = progress.read().split()
            return {"crash": (proc.returncode, int(seeds[-1]) if seeds else first, proc.stderr[-1500:])}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20_000, help="cases in all (default 20000)")
    parser.add_argument("--batch", type=int, default=1000, help="cases per child process")
    parser.add_argument("--timeout", type=float, default=10, help="seconds per case before it counts as a hang")
    parser.add_argument("--only", choices=sorted(SHARES), help="one generator only")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "FIRST", "COUNT", "PROGRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, first, count, progress = args.worker
        print(json.dumps(worker(kind, int(first), int(count), args.timeout, progress)))
        return 0

    shares = {args.only: 1.0} if args.only else SHARES
    started = time.monotonic()
    outcomes: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in shares}
    failures: dict[str, list[Any]] = {}
    hangs: list[tuple[str, int]] = []
    crashes: list[Any] = []
    rss: dict[str, list[int]] = {k: [] for k in shares}
    growth: dict[str, list[int]] = {k: [] for k in shares}
    jumps: dict[str, tuple[int, int]] = {k: (0, -1) for k in shares}
    for kind, share in shares.items():
        total = round(args.cases * share)
        for first in range(args.first_seed, args.first_seed + total, args.batch):
            count = min(args.batch, args.first_seed + total - first)
            res = run_batch(kind, first, count, args)
            if "hang" in res:
                hangs.append((kind, res["hang"]))
                continue
            if "crash" in res:
                crashes.append((kind, *res["crash"]))
                continue
            outcomes[kind].update(res["outcomes"])
            for key, (n, seed, tb) in res["failures"].items():
                entry = failures.setdefault(f"{kind}: {key}", [0, seed, tb])
                entry[0] += n
            rss[kind].append(res["max_rss_kib"])
            growth[kind].append(res["growth_kib"])
            jumps[kind] = max(jumps[kind], tuple(res["jump"]))  # type: ignore[assignment]
            print(f"  {kind} seeds {first}..{first + count - 1}: {dict(res['outcomes'])}, "
                  f"{sum(v[0] for v in res['failures'].values())} failures, "
                  f"peak RSS {res['max_rss_kib'] / 1024:.0f} MiB", flush=True)

    ran = sum(sum(c.values()) for c in outcomes.values()) + sum(v[0] for v in failures.values())
    print(f"cases run: {ran} ({', '.join(f'{k} {sum(c.values())}' for k, c in outcomes.items())}, "
          f"plus {sum(v[0] for v in failures.values())} failed)")
    for kind, counts in outcomes.items():
        done = sum(counts.values()) or 1
        print(f"{kind}: " + ", ".join(f"{name} {n} ({n / done:.0%})" for name, n in sorted(counts.items())))
    timed_out = sum(n for key, (n, _, _) in failures.items() if key.split(": ")[1] == "Hang")
    print(f"unexpected exceptions: {sum(v[0] for v in failures.values()) - timed_out}")
    by_type: collections.Counter[str] = collections.Counter()
    for key, (n, _, _) in failures.items():
        by_type[": ".join(key.split(": ")[:2])] += n
    for key, n in by_type.most_common():
        print(f"  {key}: {n}")
    for key, (n, seed, tb) in sorted(failures.items(), key=lambda kv: -kv[1][0]):
        indented = "\n      " + tb.strip().replace("\n", "\n      ") if tb else ""
        print(f"  {n} x {key}\n    first seed {seed}{indented}")
    print(f"hangs: {timed_out + len(hangs)} ({timed_out} cases over --timeout, listed above; {len(hangs)} "
          "batches stuck where the timer cannot interrupt)" + "".join(f"\n  {k} seed {s}" for k, s in hangs))
    print(f"crashed batches: {len(crashes)}" + "".join(f"\n  {c}" for c in crashes))
    for kind, peaks in rss.items():
        if peaks:
            print(f"max RSS {kind}: {max(peaks) / 1024:.0f} MiB (first batch {peaks[0] / 1024:.0f}, last "
                  f"{peaks[-1] / 1024:.0f}); RSS growth over a batch at most {max(growth[kind]) / 1024:.1f} MiB; "
                  f"largest rise of the peak in one case {jumps[kind][0] / 1024:.1f} MiB (seed {jumps[kind][1]})")
    print(f"elapsed: {time.monotonic() - started:.0f} s")
    return 1 if failures or hangs or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
