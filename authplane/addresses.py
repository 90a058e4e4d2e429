"""``HOST:PORT`` parsing, written once for the CLI, the policy model, the compiler and the servers."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) → (host, port); ValueError with a one-line message."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
