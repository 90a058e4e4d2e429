"""Loopback ports for the tests' servers, and waiting for something listening on them."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A loopback port the OS just handed out and nothing listens on (for a server to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (for a service that must be unreachable)."""
    return free_port()


def wait_for(check: Callable[[], T], what: str, timeout: float = 15, every: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            got = check()
        except (OSError, http.client.HTTPException, KeyError) as e:
            last = e  # not there yet: keep polling (an exception is no answer, however truthy)
        else:
            if got:
                return got
            last = got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
