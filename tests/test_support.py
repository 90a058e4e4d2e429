"""The shared test helpers themselves (a wrong helper makes every test that uses it unreliable)."""

from __future__ import annotations

import pytest

from tests.support.ports import wait_for


def test_wait_for_keeps_polling_while_the_check_raises():
    calls = []

    def check() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not listening yet")
        return "up"

    assert wait_for(check, "the server", timeout=5, every=0.001) == "up"
    assert len(calls) == 3


def test_wait_for_times_out_naming_the_last_error():
    def check() -> None:
        raise ConnectionRefusedError("still down")

    with pytest.raises(AssertionError, match=r"the server .*still down"):
        wait_for(check, "the server", timeout=0.05, every=0.001)
