"""Responses serialised once per snapshot and shared by every stream (cache.PackedSnapshot):
the bytes a stream writes parse as the response it used to build for itself."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from authplane.compiler.resources import CLUSTER, LISTENER, ROUTE
from authplane.compiler.snapshot import compile_policies
from authplane.controlplane import cache
from authplane.controlplane.cache import CONTROL_PLANE, PackedSnapshot, with_nonce
from authplane.policy.loader import load_texts
from tests.support.policies import HEAD, app_gateway


def _packed() -> PackedSnapshot:
    text = "---\n".join(HEAD + doc for doc in app_gateway(9000).split("---\n"))
    return PackedSnapshot.of(compile_policies(load_texts({"p.yaml": text}))["edge"])


def test_delta_bytes_parse_as_the_response_built_per_stream():
    packed = _packed()
    send = tuple(packed.resources[CLUSTER])
    body = packed.delta_body(CLUSTER, send, ("gone",))
    got = discovery_pb2.DeltaDiscoveryResponse.FromString(with_nonce(body, "17"))
    want = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=packed.version, type_url=CLUSTER, nonce="17", control_plane=CONTROL_PLANE,
        resources=[packed.resources[CLUSTER][n] for n in send], removed_resources=["gone"])
    assert got == want
    assert got.resources and got.nonce == "17"


def test_sotw_bytes_parse_as_the_response_built_per_stream():
    packed = _packed()
    names = tuple(packed.resources[LISTENER])
    got = discovery_pb2.DiscoveryResponse.FromString(with_nonce(packed.sotw_body(LISTENER, names), "3"))
    want = discovery_pb2.DiscoveryResponse(
        version_info=packed.version, type_url=LISTENER, nonce="3", control_plane=CONTROL_PLANE,
        resources=[packed.resources[LISTENER][n].resource for n in names])
    assert got == want


def test_streams_with_the_same_subscription_share_one_serialisation():
    packed = _packed()
    names = tuple(packed.resources[ROUTE])
    first = packed.delta_body(ROUTE, names, ())
    assert packed.delta_body(ROUTE, names, ()) is first
    assert packed.delta_body(ROUTE, (), names) is not first  # another response, its own bytes
    assert with_nonce(first, "1") != with_nonce(first, "2")


def test_beyond_the_bound_responses_are_serialised_per_stream_and_still_right(monkeypatch):
    monkeypatch.setattr(cache, "MAX_BODIES", 1)
    packed = _packed()
    packed.delta_body(ROUTE, (), ())  # fills the cache
    names = tuple(packed.resources[ROUTE])
    a, b = packed.delta_body(ROUTE, names, ()), packed.delta_body(ROUTE, names, ())
    assert a == b and a is not b
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(with_nonce(a, "9"))
    assert [r.name for r in parsed.resources] == list(names) and parsed.nonce == "9"


def test_a_snapshot_knows_which_types_its_predecessor_had_alike():
    def snap(prefix: str):  # type: ignore[no-untyped-def]
        text = app_gateway(9000).replace("pathPrefix: /}", f"pathPrefix: {prefix}}}")
        return compile_policies(load_texts({"p.yaml": "---\n".join(HEAD + d for d in text.split("---\n"))}))["edge"]

    first = PackedSnapshot.of(snap("/"))
    second = PackedSnapshot.of(snap("/v2"), first)  # only the route changed
    assert second.version != first.version
    assert second.unchanged(CLUSTER, first) and second.unchanged(LISTENER, first)
    assert not second.unchanged(ROUTE, first)
    assert not second.unchanged(CLUSTER, None)
    third = PackedSnapshot.of(snap("/v3"), second)
    assert not third.unchanged(CLUSTER, first)  # it vouches for its predecessor only
