"""Reading files safely: the policy files of a directory, and any file a policy names.

Nothing read here can block or grow without bound (FIFOs, devices, ``/dev/zero``, files being
written); the limits are ``DEFAULT_MAX_FILE_SIZE`` and ``SETTLE_SECONDS``.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path as FsPath

from authplane.errors import PolicyError, Problem

_TEMP_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".bak", ".orig")


DEFAULT_MAX_FILE_SIZE = 4 * 1024 * 1024
"""Largest file read (policy, JWKS, key, secret files); ``--max-file-size`` changes it."""
SETTLE_SECONDS = 0.03
"""``serve`` reads a policy file once its size and times have not changed for this long (waiting
at most ten times as long), so a file being written is not applied half-written."""


def policy_files(root: str) -> list[str]:
    """``*.yaml``/``*.yml`` under root, recursively, without hidden and editor temporary files.
    Raises PolicyError naming every directory that cannot be listed: a part of the policies must
    never go missing silently."""
    found: list[str] = []
    unlisted: list[Problem] = []

    def failed(e: OSError) -> None:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # removed while we looked: simply gone
            unlisted.append(Problem(str(e.filename or root), 1, 1, "", f"cannot read directory: {e.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith((".", "#", "~")) or name.endswith(_TEMP_SUFFIXES):
                continue
            if name.endswith((".yaml", ".yml")):
                found.append(os.path.join(dirpath, name))
    if unlisted:
        raise PolicyError(unlisted)
    return found


def read_file(path: str, limit: int = DEFAULT_MAX_FILE_SIZE, settle: float = 0.0) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; else OSError with a ``strerror``.

    Nothing read can block or grow without bound: a FIFO or device is refused before it is opened
    (and after, by fstat: the open is non-blocking), and at most ``limit + 1`` bytes are read
    (``/dev/zero``). Symlinks to regular files are followed. With ``settle``, the read waits until
    the file has not changed for ``settle`` seconds (at most ``10 * settle``)."""
    _regular(os.stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _regular(_settled(fd, settle) if settle else os.fstat(fd), limit)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # grew since fstat
            raise OSError(errno.EFBIG, _too_big(limit))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_big(limit: int) -> str:
    size = f"{limit // 1048576} MiB" if limit % 1048576 == 0 else f"{limit} bytes"
    return f"larger than {size} (see --max-file-size)"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _regular(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special")
        raise OSError(errno.EINVAL, f"not a regular file ({kind})")
    if st.st_size > limit:
        raise OSError(errno.EFBIG, _too_big(limit))


def _settled(fd: int, settle: float) -> os.stat_result:
    """fstat once the file has been unchanged for ``settle`` seconds, or ``10 * settle`` passed."""
    deadline = time.monotonic() + 10 * settle
    st = os.fstat(fd)
    age = time.time() - st.st_mtime_ns / 1e9
    while age < settle and time.monotonic() < deadline:
        time.sleep(max(0.001, min(settle - max(age, 0.0), deadline - time.monotonic())))
        again = os.fstat(fd)
        if (again.st_size, again.st_mtime_ns, again.st_ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return again  # unchanged for a whole window (also when the mtime lies in the future)
        st, age = again, time.time() - again.st_mtime_ns / 1e9
    return st


def is_policy_file(path: str) -> bool:
    name = os.path.basename(path)
    return (name.endswith((".yaml", ".yml")) and not name.startswith((".", "#", "~"))
            and not any(p.startswith(".") for p in FsPath(path).parts[:-1] if p not in (".", "..")))
