"""Versioned snapshots: the Envoy resources of a fleet plus content-hash versions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from google.protobuf.message import Message

from authplane.compiler import translate
from authplane.compiler.ir import CompileOptions, Origin
from authplane.compiler.resources import TYPE_ORDER, fleet_resources
from authplane.policy.documents import PolicySet


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """What one fleet is served. ``version`` changes iff any resource's bytes change."""

    fleet: str
    version: str
    resources: dict[str, dict[str, Message]]
    """type URL → resource name → message, in the order Envoy needs."""
    resource_versions: dict[str, dict[str, str]]
    origins: dict[tuple[str, str], list[Origin]] = field(default_factory=dict)

    @classmethod
    def empty(cls, fleet: str) -> Snapshot:
        return cls(fleet, _digest(b""), {t: {} for t in TYPE_ORDER}, {t: {} for t in TYPE_ORDER})


def compile_policies(policies: PolicySet, opts: CompileOptions | None = None) -> dict[str, Snapshot]:
    """Policies → one snapshot per fleet. Pure: the same policies give the same bytes."""
    out: dict[str, Snapshot] = {}
    for name, fleet in translate.build(policies, opts).items():
        res = fleet_resources(fleet)
        versions: dict[str, dict[str, str]] = {}
        whole = hashlib.sha256()
        for type_url in TYPE_ORDER:
            versions[type_url] = {}
            for rname, msg in res.by_type[type_url].items():
                data = msg.SerializeToString(deterministic=True)
                versions[type_url][rname] = _digest(data)
                whole.update(f"{type_url}\0{rname}\0{len(data)}\0".encode())
                whole.update(data)
        out[name] = Snapshot(name, whole.hexdigest()[:16], res.by_type, versions, res.origins)
    return out
