"""Snapshots as YAML/JSON for people (``authplane render``) and static bootstraps for Envoy."""

from __future__ import annotations

import json
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from authplane.compiler.pb import pack
from authplane.compiler.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from authplane.compiler.snapshot import Snapshot

SECTION = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes"}


def to_dict(msg: Message) -> dict[str, Any]:
    # via JSON text: MessageToDict nests OrderedDicts for Any fields, which yaml.safe_dump refuses
    return json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))


def snapshot_dict(snap: Snapshot) -> dict[str, Any]:
    return {
        "fleet": snap.fleet,
        "version": snap.version,
        "resources": {SECTION[t]: [to_dict(m) for m in snap.resources[t].values()] for t in SECTION},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(data: Any, fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    # Keys sorted: protobuf map iteration order is not stable across processes.
    return yaml.dump(data, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=100)


def static_bootstrap(snap: Snapshot, node_id: str = "authplane-validate") -> bootstrap_pb2.Bootstrap:
    """What the fleet would be served, as a static bootstrap: routes inlined, endpoints in clusters.

    ``envoy --mode validate`` checks this without a control plane.
    """
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = node_id
    boot.node.cluster = snap.fleet
    routes = snap.resources[ROUTE]
    for msg in snap.resources[LISTENER].values():
        lst = listener_pb2.Listener()
        lst.CopyFrom(msg)
        for chain in lst.filter_chains:
            for f in chain.filters:
                manager = hcm.HttpConnectionManager()
                f.typed_config.Unpack(manager)
                if manager.HasField("rds"):
                    manager.route_config.CopyFrom(routes[manager.rds.route_config_name])
                    manager.ClearField("rds")
                f.typed_config.CopyFrom(pack(manager))
        boot.static_resources.listeners.append(lst)
    for name, msg in snap.resources[CLUSTER].items():
        c = cluster_pb2.Cluster()
        c.CopyFrom(msg)
        if c.type == cluster_pb2.Cluster.EDS:
            c.type = cluster_pb2.Cluster.STATIC
            c.ClearField("eds_cluster_config")
            c.load_assignment.CopyFrom(snap.resources[ENDPOINT][name])
        boot.static_resources.clusters.append(c)
    return boot
