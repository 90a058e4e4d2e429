from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from authplane.devtools.echo import EchoServer
from authplane.devtools.idp import DevIdentityProvider
from authplane.devtools.sample_authz import SampleAuthzGrpc, SampleAuthzHttp


@pytest.fixture(scope="session")
def idp() -> DevIdentityProvider:
    return DevIdentityProvider(issuer="https://idp.authplane.test")


@pytest.fixture
def jwks_file(tmp_path, idp) -> str:
    path = tmp_path / "policies" / "jwks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(idp.jwks()))
    return str(path)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer().start()
    yield server
    server.stop()


@pytest.fixture
def sample_authz() -> Iterator[SampleAuthzGrpc]:
    server = SampleAuthzGrpc().start()
    yield server
    server.stop()


@pytest.fixture
def sample_authz_http() -> Iterator[SampleAuthzHttp]:
    server = SampleAuthzHttp().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def native_module(tmp_path_factory) -> str:
    """The directory of ``libauthplane_rules.so`` built for this session (``native/build.py``)."""
    from tests.support.native import build_module

    build = build_module()
    try:
        return str(build.build_rules(tmp_path_factory.mktemp("native-module")).parent)
    except build.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def processes() -> Iterator[tuple[list, list]]:
    """(Envoys, serve processes) a test starts, stopped at the end whatever happens."""
    import signal

    envoys: list = []
    serves: list = []
    yield envoys, serves
    for envoy in envoys:
        envoy.stop()
    for serve in serves:
        serve.stop(signal.SIGKILL)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the golden outputs in tests/testdata from the current compiler "
                          "and delete stale ones")
