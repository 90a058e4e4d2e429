"""Snapshots as YAML/JSON for people (``authplane render``) and static bootstraps for Envoy."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from pydantic import BaseModel
from udpa.annotations import sensitive_pb2

from authplane.compiler.protos import pack
from authplane.compiler.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from authplane.compiler.snapshot import Snapshot

SECTION = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes",
           SECRET: "secrets"}


def to_dict(msg: Message, show_secrets: bool = True) -> dict[str, Any]:
    """``msg`` as JSON-like data; with ``show_secrets`` False, every field Envoy's protos mark
    sensitive (API keys, htpasswd users, secrets) reads ``[redacted: N bytes]``."""
    # via JSON text: MessageToDict nests OrderedDicts for Any fields, which yaml.safe_dump refuses
    data = json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))
    if not show_secrets:
        _redact(msg, data)
    return data


def snapshot_dict(snap: Snapshot, show_secrets: bool = False) -> dict[str, Any]:
    return {
        "fleet": snap.fleet,
        "version": snap.version,
        "resources": {SECTION[t]: [to_dict(m, show_secrets) for m in snap.resources[t].values()]
                      for t in SECTION if t != SECRET or snap.resources[t]},
    }


def ir_dict(fleets: dict[str, Any]) -> dict[str, Any]:
    """The IR (``translate.build``'s result) as plain data for YAML, walked generically: dataclass
    fields (without those declared ``repr=False``: they hold secrets), policy models as their YAML
    (defaults left out), tuples as lists, dict keys as strings."""
    return {str(name): _plain(fleet) for name, fleet in fleets.items()}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list | tuple) else sorted(items, key=repr)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, bytes | bytearray):
        # only secrets are bytes in the IR; one outside a repr=False field must not be printed
        raise TypeError("ir_dict: bytes outside a repr=False field")
    return value


_NOT_SECRET = frozenset({"envoy.extensions.filters.http.ext_authz.v3.CheckSettings.context_extensions"})
"""Fields Envoy marks sensitive that authplane fills with nothing secret (policy names)."""


def _redact(msg: Message, data: Any) -> None:
    if not isinstance(data, dict):  # well-known types (wrappers, durations) render as scalars
        return
    if isinstance(msg, any_pb2.Any):
        inner = _message_class(msg.TypeName())()
        inner.ParseFromString(msg.value)
        _redact(inner, data)
        return
    for fd, value in msg.ListFields():
        if fd.name not in data:
            continue
        if fd.GetOptions().Extensions[sensitive_pb2.sensitive] and fd.full_name not in _NOT_SECRET:
            data[fd.name] = _placeholder(value)
        elif fd.message_type is None:
            continue
        elif fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is not None:
                for k, v in value.items():
                    _redact(v, data[fd.name][str(k)])
        elif fd.is_repeated:
            for v, d in zip(value, data[fd.name], strict=True):
                _redact(v, d)
        else:
            _redact(value, data[fd.name])


def _placeholder(value: Any) -> str:
    if isinstance(value, base_pb2.DataSource):
        which = value.WhichOneof("specifier")
        content = getattr(value, which) if which else b""
        size = len(content.encode() if isinstance(content, str) else content)
    elif isinstance(value, Message):
        size = value.ByteSize()
    elif isinstance(value, str | bytes):
        size = len(value.encode() if isinstance(value, str) else value)
    else:
        return f"[redacted: {len(value)} items]"
    return f"[redacted: {size} bytes]"


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
    if snap.resources[SECRET]:
        boot.static_resources.secrets.extend(snap.resources[SECRET].values())
        _static_secrets(boot.static_resources, tuple(n.encode() for n in snap.resources[SECRET]))
    return boot


def _static_secrets(msg: Message, names: tuple[bytes, ...]) -> bool:
    """Point every SDS reference to ``names`` at ``static_resources.secrets`` (a static bootstrap
    has no ADS) by dropping its ``sds_config``; True if ``msg`` changed."""
    if isinstance(msg, secret_pb2.SdsSecretConfig):
        changed = msg.HasField("sds_config") and msg.name.encode() in names
        if changed:
            msg.ClearField("sds_config")
        return changed
    if isinstance(msg, any_pb2.Any):
        if not any(n in msg.value for n in names):
            return False
        inner = _message_class(msg.TypeName())()
        inner.ParseFromString(msg.value)
        changed = _static_secrets(inner, names)
        if changed:
            msg.CopyFrom(pack(inner))
        return changed
    changed = False
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            values = value.values() if fd.message_type.fields_by_name["value"].message_type else []
        else:
            values = value if fd.is_repeated else [value]
        for v in values:
            changed = _static_secrets(v, names) or changed
    return changed


def _message_class(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))
