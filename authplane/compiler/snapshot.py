"""Versioned snapshots: the Envoy resources of a fleet plus content-hash versions."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from authplane.compiler import translate
from authplane.compiler.ir import CompileOptions, Origin
from authplane.compiler.resources import TYPE_ORDER, RouteMemo, fleet_resources
from authplane.policy.documents import PolicySet
from authplane.policy.gcpause import paused_gc


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


@dataclass(frozen=True)
class Compiled:
    """One compile's snapshots with what each fleet was built from, for the next reload to reuse."""

    snapshots: dict[str, Snapshot]
    inputs: dict[str, tuple[Any, ...]] = field(repr=False)
    """Fleet → ``translate.fleet_inputs``."""
    opts: CompileOptions | None = None
    compiled: tuple[str, ...] = ()
    """The fleets compiled this time (the others were the previous snapshots)."""
    memos: dict[str, RouteMemo] = field(default_factory=dict, repr=False, compare=False)
    """Fleet → its route entries, for the next compile of the fleet to reuse those of unchanged routes."""


@paused_gc()
def compile_changed(policies: PolicySet, opts: CompileOptions | None = None,
                    previous: Compiled | None = None) -> Compiled:
    """``compile_policies``, reusing ``previous``'s snapshot of every fleet whose inputs are
    unchanged (the same bytes as compiling it again, as the equivalence test checks)."""
    inputs = translate.fleet_inputs(policies)
    reuse: dict[str, Snapshot] = {}
    if previous is not None and previous.opts == opts:
        reuse = {fleet: previous.snapshots[fleet] for fleet, key in inputs.items()
                 if fleet in previous.snapshots and previous.inputs.get(fleet) == key}
    last = previous.memos if previous is not None and previous.opts == opts else {}
    memos = {fleet: last[fleet] for fleet in reuse if fleet in last}
    fresh = compile_policies(policies, opts, only=set(inputs) - set(reuse), memos=memos,
                             last=last) if len(reuse) < len(inputs) else {}
    return Compiled({fleet: reuse[fleet] if fleet in reuse else fresh[fleet] for fleet in inputs}, inputs, opts,
                    tuple(fresh), memos)


@paused_gc()
def compile_policies(policies: PolicySet, opts: CompileOptions | None = None,
                     only: Collection[str] | None = None, memos: dict[str, RouteMemo] | None = None,
                     last: dict[str, RouteMemo] | None = None) -> dict[str, Snapshot]:
    """Policies → one snapshot per fleet (or per fleet in ``only``). Pure: the same policies give
    the same bytes. With ``memos``, each fleet's route entries are recorded there (and reused from
    ``last``, the previous compile's: ``resources.RouteMemo``), the same bytes either way."""
    out: dict[str, Snapshot] = {}
    for name, fleet in translate.build(policies, opts, only).items():
        memo = None
        if memos is not None:
            memos[name] = memo = RouteMemo()
        res = fleet_resources(fleet, memo, (last or {}).get(name))
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
