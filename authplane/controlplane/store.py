"""The policy store: the last good revision of the policy directory, shared by every component.

A reload loads and compiles the whole directory off the event loop; any problem rejects the whole
change and the last good revision keeps serving. Hooks (for instance the decision service)
see a revision before Envoys are sent its snapshots, and can reject it by raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from authplane.compiler.ir import CompileOptions
from authplane.compiler.snapshot import Compiled, Snapshot, compile_changed
from authplane.controlplane.metrics import Metrics
from authplane.errors import CompileError, PolicyError, Problem
from authplane.policy.documents import PolicySet
from authplane.policy.files import DEFAULT_MAX_FILE_SIZE, SETTLE_SECONDS
from authplane.policy.gcpause import paused_gc
from authplane.policy.loader import Loader, load_dir

log = logging.getLogger("authplane.reload")
T = TypeVar("T")
MAX_LOGGED_WARNINGS = 20
"""New warnings logged per reload; a large repository can have thousands."""
MAX_RELOAD_HISTORY = 50
"""Reloads kept for ``/status`` (``reload_history``) and the status page, oldest forgotten first."""


@dataclass(frozen=True)
class Revision:
    """One successful load of the policy directory."""

    snapshots: dict[str, Snapshot]
    policies: PolicySet | None = None
    files: tuple[str, ...] = ()
    """Files read besides the policy files (JWKS, API keys): watched too."""
    loaded_at: float = field(default_factory=time.time)
    compile_seconds: float = 0.0
    compiled: Compiled | None = field(default=None, repr=False, compare=False)
    """What each fleet was compiled from: the next reload recompiles only fleets whose inputs changed."""

    def versions(self) -> dict[str, str]:
        return {fleet: snap.version for fleet, snap in self.snapshots.items()}

    @property
    def rules_version(self) -> str:
        """One version for the builtin rules of every fleet (what decision logs and caches name)."""
        fleets = ",".join(f"{f}={v}" for f, v in sorted(self.versions().items()))
        return hashlib.sha256(fleets.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ReloadError:
    """Why the last change was rejected: policy problems with positions, or one message."""

    problems: tuple[Problem, ...]
    message: str = ""
    at: float = field(default_factory=time.time)

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems] or [self.message]


@dataclass(frozen=True)
class ReloadRecord:
    """One load of the directory as the status page lists it."""

    at: float
    outcome: str
    """``changed``, ``unchanged`` or ``rejected`` (the versions served did not change)."""
    versions: dict[str, str]
    """The versions served after it, per fleet."""
    seconds: float | None
    """From the start of the load to the push (None: not measured, the start-up load of
    ``serve --allow-empty``)."""
    git: str | None
    """The commit of what is served after it."""
    error: str = ""
    """The first problem of a rejected change (all of them are in ``last_reload_error``)."""
    problems: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
                "outcome": self.outcome, "versions": dict(self.versions),
                "seconds": None if self.seconds is None else round(self.seconds, 4),
                "git": self.git, "error": self.error, "problems": self.problems}


def git_version(directory: str) -> str | None:
    """The commit SHA of the work tree holding ``directory``, ``-dirty`` if the directory differs
    from it (untracked files included); None without git or outside a work tree."""
    where, spec = (directory, ".") if os.path.isdir(directory) else (os.path.dirname(directory) or ".",
                                                                      os.path.basename(directory))
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never write .git/index (we may be watching it)

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=5, env=env,
                              stdin=subprocess.DEVNULL)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--", spec)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


@paused_gc()  # load and compile as one pause: a collection between them walks all just loaded
def build(directory: str, options: CompileOptions, previous: Revision | None = None,
          max_file_size: int = DEFAULT_MAX_FILE_SIZE, loader: Loader | None = None) -> Revision:
    """Load and compile; raises PolicyError or CompileError. Files are read once settled, and an
    empty policy file keeps its documents of ``previous`` (see ``load_dir``); warnings not
    already given for ``previous`` are logged. With ``loader`` the reload is incremental: only
    changed files are parsed again, and fleets whose inputs are those of ``previous`` keep its
    snapshots (byte-identical to a full rebuild: tests/controlplane/test_incremental.py)."""
    start = time.perf_counter()
    before = previous.policies if previous is not None else None
    policies = load_dir(directory, max_file_size, SETTLE_SECONDS, before.texts if before else None, loader)
    given = set(before.warnings) if before is not None else set()
    new = [w for w in policies.warnings if w not in given]
    for warning in new[:MAX_LOGGED_WARNINGS]:
        log.warning("%s", warning)
    if len(new) > MAX_LOGGED_WARNINGS:
        log.warning("... and %d more warnings (authplane validate lists them all)", len(new) - MAX_LOGGED_WARNINGS)
    compiled = compile_changed(policies, options, previous.compiled if previous is not None and loader else None)
    if loader is not None:
        log.debug("reload: %d of %d files parsed, fleets compiled: %s", loader.reparsed, len(policies.texts),
                  ", ".join(compiled.compiled) or "none")
    return Revision(compiled.snapshots, policies, tuple(sorted(policies.files)),
                    compile_seconds=time.perf_counter() - start, compiled=compiled)


RevisionHook = Callable[[Revision], object]


class ReloadAbandoned(Exception):
    """The server is stopping: the reload in progress is dropped."""


def in_daemon_thread(fn: Callable[..., T], *args: Any) -> tuple[asyncio.Future[T], threading.Thread]:
    """``asyncio.to_thread`` in a daemon thread: the default executor's threads are joined when
    the loop and the interpreter shut down, so a stuck build would keep the process alive."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # abandoned meanwhile
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as e:  # handed to the awaiting coroutine
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(target=run, name="authplane-reload", daemon=True)
    thread.start()
    return future, thread


class PolicyStore:
    def __init__(self, directory: str, options: CompileOptions, metrics: Metrics, publish: RevisionHook) -> None:
        self.directory = directory
        self.options = options
        self.metrics = metrics
        self.current = Revision({})
        self.git: str | None = None
        self.last_error: ReloadError | None = None
        self.reloads = 0
        self.history: deque[ReloadRecord] = deque(maxlen=MAX_RELOAD_HISTORY)
        self._publish = publish
        self._hooks: list[RevisionHook] = []
        self._lock: asyncio.Lock | None = None
        self._building: asyncio.Future[Revision] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._git_checked = 0.0
        self.max_file_size = DEFAULT_MAX_FILE_SIZE
        self.loader: Loader | None = Loader()
        """Incremental reloads (None: every reload loads and compiles everything)."""

    def add_hook(self, hook: RevisionHook) -> None:
        """``hook(revision)`` runs, in the order added, before Envoys get the revision's
        snapshots; if it raises, the revision is rejected like an invalid policy change."""
        self._hooks.append(hook)

    def _build(self) -> Revision:
        return build(self.directory, self.options, self.current, self.max_file_size, self.loader)

    def load(self) -> None:
        """The start-up load: raises PolicyError/CompileError, there is no last good revision."""
        started = time.perf_counter()
        self._apply(self._build(), started)
        self._git_known(git_version(self.directory))
        self._stamp_git()
        if self.git:
            log.info("policy directory %s is at git %s", self.directory, self.git)

    def start_empty(self, error: PolicyError | CompileError) -> None:
        """Serve nothing until the directory becomes valid (``serve --allow-empty``)."""
        self._failed(error)

    async def reload(self) -> bool:
        """Reload the directory; True if the new revision is now served (changed or not)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._stopping:
                return False
            started = time.perf_counter()
            try:
                self._building, self._thread = in_daemon_thread(self._build)
                self._apply(await self._building, started)
            except ReloadAbandoned:
                log.info("reload abandoned: stopping")
                return False
            except (PolicyError, CompileError) as e:
                self._failed(e, started)
                return False
            except Exception as e:  # a bug in a hook or the compiler: keep serving, say so
                log.exception("reload failed")
                self._failed(e, started)
                return False
            finally:
                self._building = None
            await self.refresh_git(force=True)  # after the push: not on the save → Envoy path
            self._stamp_git()
            return True

    def abandon(self) -> None:
        """Stopping: an in-flight reload returns False now (its build thread, a daemon, is not
        waited for: SIGTERM stops ``serve`` even mid-reload), and no reload starts any more."""
        self._stopping = True
        if self._building is not None and not self._building.done():
            self._building.set_exception(ReloadAbandoned())

    def abandoned_build(self) -> bool:
        """An abandoned reload still runs: exit without the interpreter's teardown, which would
        share the GIL with it (and free its half-built revision) for seconds."""
        return self._stopping and self._thread is not None and self._thread.is_alive()

    async def refresh_git(self, force: bool = False) -> str | None:
        """The SHA also changes on a commit, which touches no policy file: refreshed on reloads
        and, at most once a second, when status is asked for."""
        if force or time.monotonic() - self._git_checked > 1.0:
            self._git_known(await asyncio.to_thread(git_version, self.directory))
        return self.git

    def _git_known(self, git: str | None) -> None:
        self._git_checked = time.monotonic()
        self.git = git
        self.metrics.fleets(self.current.versions(), git)

    def _stamp_git(self) -> None:
        """The last reload's record gets the SHA looked up after its push."""
        if self.history and self.history[-1].outcome != "rejected":
            self.history[-1] = replace(self.history[-1], git=self.git)

    def history_status(self) -> list[dict[str, Any]]:
        """Recent reloads, most recent first (``/status`` ``reload_history``)."""
        return [r.as_dict() for r in reversed(self.history)]

    def _apply(self, rev: Revision, started: float | None = None) -> None:
        for hook in self._hooks:
            hook(rev)
        before = self.current.versions()
        self._publish(rev)
        self.current, self.last_error = rev, None
        self.reloads += 1
        after = rev.versions()
        seconds = rev.compile_seconds if started is None else time.perf_counter() - started
        self.history.append(ReloadRecord(time.time(), "changed" if after != before or self.reloads == 1
                                         else "unchanged", after, seconds, self.git))
        self.metrics.compile_seconds.observe(rev.compile_seconds)
        self.metrics.reload_applied(after != before)
        self.metrics.fleets(after, self.git)
        if after == before and self.reloads > 1:
            log.debug("policies reloaded: no change")
            return
        fleets = ", ".join(f"{f} {v}" + (" (new)" if f not in before else "" if before[f] == v else
                                         f" (was {before[f]})") for f, v in after.items()) or "none"
        gone = ", ".join(f for f in before if f not in after)
        log.info("policies loaded in %.0f ms: fleets %s%s", rev.compile_seconds * 1000, fleets,
                 f"; fleets removed: {gone}" if gone else "")

    def _failed(self, error: Exception, started: float | None = None) -> None:
        if isinstance(error, PolicyError):
            failure = ReloadError(tuple(error.problems))
        elif isinstance(error, CompileError):
            failure = ReloadError((), f"cannot compile: {error}")
        else:
            failure = ReloadError((), f"internal error: {error!r}")
        self.last_error = failure
        lines = failure.lines()
        self.history.append(ReloadRecord(failure.at, "rejected", self.current.versions(),
                                         None if started is None else time.perf_counter() - started, self.git,
                                         lines[0] if lines else "", len(failure.problems)))
        self.metrics.reload_failed(list(failure.problems))
        serving = ", ".join(f"{f} {v}" for f, v in self.current.versions().items()) or "nothing"
        log.error("policy change rejected, still serving %s:\n  %s", serving, "\n  ".join(failure.lines()))
