"""Reload the store when a policy file, or a file the policies read (JWKS, API keys), changes.

Watches directories rather than files, so editors that write a temporary file and rename it over
the original are seen; their temporary, backup and hidden files are ignored. Events are grouped
for ``STEP_MS`` of quiet (at most ``DEBOUNCE_MS``), so a save is applied within ~30 ms.

Symlink swaps are followed too: Kubernetes ConfigMap and Secret volumes publish an update by
renaming the ``..data`` symlink inside the directory (seen as an event), and git-sync by pointing
the directory's own symlink at a new worktree (no event where we watch: checked every second).
"""

from __future__ import annotations

import asyncio
import logging
import os

from watchfiles import Change, DefaultFilter, awatch

from authplane.controlplane.store import PolicyStore

log = logging.getLogger("authplane.reload")

STEP_MS = 10
DEBOUNCE_MS = 100
RETRY_SECONDS = 1.0
TEMPORARY = (("~", ".swp", ".swx", ".tmp", ".bak", ".orig", ".part"), (".", "#", "~"))
"""Suffixes and prefixes of editor temporary, backup and lock files (as the loader skips them)."""


class PolicyWatcher:
    """A component of ``serve`` (see ``app.Component``)."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.root = os.path.abspath(store.directory)
        self._ignored = DefaultFilter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def extras(self) -> set[str]:
        return {os.path.abspath(p) for p in self.store.current.files}

    def paths(self) -> list[str]:
        """The directories to watch: the policy directory and those of extra files outside it."""
        root_dir = self.root if os.path.isdir(self.root) else os.path.dirname(self.root)
        dirs = {root_dir}
        for path in self.extras():
            if not path.startswith(root_dir + os.sep):
                dirs.add(os.path.dirname(path))
        return sorted(d for d in dirs if os.path.isdir(d))

    def relevant(self, change: Change, path: str) -> bool:
        if path in self.extras():
            return True
        if not self._ignored(change, path):
            return False
        if not os.path.isdir(self.root):
            return path == self.root
        rel = os.path.relpath(path, self.root)
        first = rel.split(os.sep)[0]
        if first.startswith("..") and first != "..":
            return True  # ..data, ..2026_11_23...: a ConfigMap/Secret volume's atomic update
        name = os.path.basename(path)
        if name.endswith(TEMPORARY[0]) or name.startswith(TEMPORARY[1]):
            return False
        return first != ".." and not any(part.startswith(".") for part in rel.split(os.sep))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="policy-watcher")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        real = os.path.realpath(self.root)  # the target last loaded: a swap right after a reload is seen
        catch_up = False  # re-watching: a save made before the new watches existed sent no event
        while not self._stop.is_set():
            paths = self.paths()
            try:
                if not paths:
                    raise FileNotFoundError(self.root)
                log.debug("watching %s", ", ".join(paths))
                async for changes in awatch(*paths, watch_filter=self.relevant, debounce=DEBOUNCE_MS,
                                            step=STEP_MS, stop_event=self._stop, rust_timeout=1000,
                                            yield_on_timeout=True):
                    target = os.path.realpath(self.root)
                    swapped = target != real
                    if not changes and not swapped and not catch_up:
                        continue  # a quiet second
                    if swapped:
                        log.info("%s now points at %s", self.root, target)
                        real = target
                    catch_up = False
                    await self.store.reload()
                    if swapped or self.paths() != paths:
                        catch_up = True
                        break  # watch the new target, or the directories of newly read files
            except Exception as e:  # the directory vanished, too many watches ...: retry, keep serving
                log.warning("cannot watch %s (%s); retrying", self.root, e)
                try:
                    await asyncio.wait_for(self._stop.wait(), RETRY_SECONDS)
                except TimeoutError:
                    real = os.path.realpath(self.root)
                    await self.store.reload()
