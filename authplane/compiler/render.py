"""Snapshots as YAML/JSON for people (``authplane render``) and static bootstraps for Envoy."""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import math
from json.encoder import encode_basestring_ascii
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
from google.protobuf import any_pb2, descriptor, descriptor_pool, json_format, message_factory
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message
from pydantic import BaseModel
from udpa.annotations import sensitive_pb2

from authplane.compiler.protos import pack
from authplane.compiler.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from authplane.compiler.snapshot import Snapshot
from authplane.policy.gcpause import paused_gc

SECTION = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes",
           SECRET: "secrets"}


def to_dict(msg: Message, show_secrets: bool = True) -> dict[str, Any]:
    """``msg`` as JSON-like data; with ``show_secrets`` False, every field Envoy's protos mark
    sensitive (API keys, htpasswd users, secrets) reads ``[redacted: N bytes]``."""
    data = _message_dict(msg)
    if not show_secrets:
        _redact(msg, data)
    return data


def _reference_dict(msg: Message) -> Any:
    return _plain_json(json_format.MessageToDict(msg, preserving_proto_field_name=True))


class _Unusual(Exception):
    """Something ``_message_dict`` leaves to ``json_format`` (extensions, enum value options,
    unknown enum numbers and Any types)."""


_MSG, _ENUM, _STR, _BYTES, _BOOL, _INT64, _FLOAT, _DOUBLE, _PLAIN = range(9)
_CPP = descriptor.FieldDescriptor
_KINDS = {_CPP.CPPTYPE_ENUM: _ENUM, _CPP.CPPTYPE_BOOL: _BOOL, _CPP.CPPTYPE_INT64: _INT64,
          _CPP.CPPTYPE_UINT64: _INT64, _CPP.CPPTYPE_FLOAT: _FLOAT, _CPP.CPPTYPE_DOUBLE: _DOUBLE}
_PLANS: dict[Any, tuple[str, int, int, Any]] = {}
"""Field descriptor → (name, kind, map value kind or -1 when not a map, map value field)."""
_WHOLE: dict[Any, bool] = {}
"""Message descriptor → whether ``json_format`` converts it (wrappers, well-known types)."""


def _kind(fd: Any) -> int:
    if fd.cpp_type == _CPP.CPPTYPE_MESSAGE:
        return _MSG
    if fd.cpp_type == _CPP.CPPTYPE_STRING:
        return _BYTES if fd.type == _CPP.TYPE_BYTES else _STR
    return _KINDS.get(fd.cpp_type, _PLAIN)


def _plan(fd: Any) -> tuple[str, int, int, Any]:
    if fd.is_extension:
        raise _Unusual
    if fd.type == _CPP.TYPE_MESSAGE and fd.message_type.has_options and fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        return fd.name, _MSG, _kind(value_fd), value_fd
    return fd.name, _kind(fd), -1, None


def _message_dict(msg: Message) -> Any:
    """``json_format.MessageToDict(msg, preserving_proto_field_name=True)`` with plain dicts,
    about 3x faster: what to do with each field is worked out once per field descriptor, not
    for every value. Anything unusual is left to ``json_format`` itself."""
    try:
        return _message(msg)
    except _Unusual:
        return _reference_dict(msg)


def _message(msg: Message) -> Any:
    desc = msg.DESCRIPTOR
    whole = _WHOLE.get(desc)
    if whole is None:
        whole = _WHOLE[desc] = (desc.file.name == "google/protobuf/wrappers.proto"
                                or desc.full_name in json_format._WKTJSONMETHODS)
    if not whole:
        return _fields(msg, {})
    if desc.full_name != "google.protobuf.Any":
        return _reference_dict(msg)
    assert isinstance(msg, any_pb2.Any)
    if not msg.ListFields():
        return {}
    try:
        inner = _message_class(msg.type_url.split("/")[-1])()
    except KeyError:
        raise _Unusual from None
    inner.ParseFromString(msg.value)
    out: dict[str, Any] = {"@type": msg.type_url}
    value = _message(inner)
    if _WHOLE[inner.DESCRIPTOR]:
        out["value"] = value
        return out
    out.update(value)
    return out


def _fields(msg: Message, out: dict[str, Any]) -> dict[str, Any]:
    for fd, value in msg.ListFields():
        plan = _PLANS.get(fd)
        if plan is None:
            plan = _PLANS[fd] = _plan(fd)
        name, kind, map_kind, value_fd = plan
        if map_kind >= 0:
            out[name] = {("true" if key else "false") if isinstance(key, bool) else str(key):
                         _value(value_fd, map_kind, value[key]) for key in value}
        elif fd.is_repeated:
            out[name] = [_value(fd, kind, v) for v in value]
        else:
            out[name] = _value(fd, kind, value)
    return out


def _value(fd: Any, kind: int, value: Any) -> Any:
    """``json_format``'s ``_FieldToJsonObject``."""
    if kind == _MSG:
        return _message(value)
    if kind == _STR:
        return str(value)
    if kind == _INT64:
        return str(value)
    if kind == _BOOL:
        return bool(value)
    if kind == _ENUM:
        if fd.enum_type.full_name == "google.protobuf.NullValue":
            return None
        found = fd.enum_type.values_by_number.get(value, None)
        if found is None or found.has_options:
            raise _Unusual
        return found.name
    if kind == _BYTES:
        return base64.b64encode(value).decode("utf-8")
    if kind in (_FLOAT, _DOUBLE):
        if math.isinf(value):
            return "-Infinity" if value < 0.0 else "Infinity"
        if math.isnan(value):
            return "NaN"
        if kind == _FLOAT:
            return type_checkers.ToShortestFloat(value)
    return value


def _plain_json(value: Any) -> Any:
    """MessageToDict's result with plain dicts: it nests OrderedDicts for Any fields, which
    yaml.safe_dump refuses."""
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


@paused_gc()
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
        kind = _FIELD_KINDS.get(fd)
        if kind is None:
            kind = _FIELD_KINDS[fd] = _field_kind(fd)
        if kind == _SENSITIVE:
            data[fd.name] = _placeholder(value)
        elif kind == _SKIP:
            continue
        elif kind == _MAP:
            for k, v in value.items():
                _redact(v, data[fd.name][str(k)])
        elif fd.is_repeated:
            for v, d in zip(value, data[fd.name], strict=True):
                _redact(v, d)
        else:
            _redact(value, data[fd.name])


_SENSITIVE, _SKIP, _MAP, _MESSAGE = range(4)
"""Replaced; nothing inside to redact (scalars, maps of scalars); a map of messages; messages."""
_FIELD_KINDS: dict[Any, int] = {}
"""Field descriptor → what ``_redact`` does with it (reading a field's options is slow)."""


def _field_kind(fd: Any) -> int:
    if fd.GetOptions().Extensions[sensitive_pb2.sensitive] and fd.full_name not in _NOT_SECRET:
        return _SENSITIVE
    if fd.message_type is None:
        return _SKIP
    if fd.message_type.GetOptions().map_entry:
        return _MAP if fd.message_type.fields_by_name["value"].message_type is not None else _SKIP
    return _MESSAGE


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


@paused_gc()
def dump(data: Any, fmt: str = "yaml") -> str:
    if fmt == "json":
        try:
            return _json_text(data) + "\n"
        except _NotJson:
            return json.dumps(data, indent=2, sort_keys=True) + "\n"
    # Keys sorted: protobuf map iteration order is not stable across processes.
    return yaml.dump(data, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=100)


class _NotJson(Exception):
    """A value ``_json_text`` leaves to ``json.dumps`` (which converts or refuses it)."""


_INFINITY = float("inf")


def _json_text(data: Any) -> str:
    """``json.dumps(data, indent=2, sort_keys=True)``, the same text about 7x faster: with an
    indent, ``json`` encodes in Python through one generator per nesting level, so each piece
    of text passes up through every level; here each piece is appended once (strings are encoded
    by ``json``'s C function). Raises ``_NotJson`` for anything but str keys and JSON values."""
    out: list[str] = []
    add = out.append

    def value(v: Any, indent: str) -> None:
        if type(v) is str:
            add(encode_basestring_ascii(v))
        elif isinstance(v, dict | list):
            keyed = isinstance(v, dict)
            if not v:
                add("{}" if keyed else "[]")
                return
            inner = indent + "  "
            opening = ("{\n" if keyed else "[\n") + inner
            for item in sorted(v) if keyed else v:
                add(opening)
                opening = ",\n" + inner
                if keyed:
                    if type(item) is not str:
                        raise _NotJson
                    add(encode_basestring_ascii(item) + ": ")
                    item = v[item]
                value(item, inner)
            add("\n" + indent + ("}" if keyed else "]"))
        elif isinstance(v, str):
            add(encode_basestring_ascii(v))
        elif v is None:
            add("null")
        elif v is True:
            add("true")
        elif v is False:
            add("false")
        elif isinstance(v, int):
            add(int.__repr__(v))
        elif isinstance(v, float):
            add("NaN" if v != v else "Infinity" if v == _INFINITY else "-Infinity" if v == -_INFINITY
                else float.__repr__(v))
        else:
            raise _NotJson

    value(data, "")
    return "".join(out)


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
        default = [lst.default_filter_chain] if lst.HasField("default_filter_chain") else []  # https
        for chain in [*lst.filter_chains, *default]:
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
