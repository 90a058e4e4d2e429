"""``render``'s fast paths give what the library functions they replace give: ``_message_dict``
is ``json_format.MessageToDict`` (plain dicts), ``dump(..., "json")`` is ``json.dumps`` with an
indent of 2 and sorted keys, on every resource of every golden case."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2, wrappers_pb2

from authplane.compiler import render
from authplane.compiler.protos import pack
from authplane.compiler.snapshot import compile_policies
from authplane.policy.loader import load_dir
from tests.compiler.test_golden import CASES, HERE


def reference(msg: object) -> object:
    return json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES)
def test_golden_resources_convert_as_json_format_does(case: str) -> None:
    snapshots = compile_policies(load_dir(f"{HERE}/{case}.in.yaml"))
    for snap in snapshots.values():
        msgs = [m for by_name in snap.resources.values() for m in by_name.values()]
        for msg in [*msgs, render.static_bootstrap(snap)]:
            assert render.to_dict(msg) == reference(msg), msg.DESCRIPTOR.full_name
        data = render.snapshot_dict(snap)
        assert render.dump(data, "json") == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_well_known_types_and_any() -> None:
    struct = struct_pb2.Struct()
    struct.update({"a": [1, "x", None, True], "b": {"c": 1.5}})
    for msg in (duration_pb2.Duration(seconds=3, nanos=500), wrappers_pb2.UInt32Value(value=7), struct,
                pack(struct), pack(wrappers_pb2.StringValue(value="v")), pack(pack(duration_pb2.Duration(seconds=1))),
                struct_pb2.Value(list_value=struct_pb2.ListValue())):
        assert render.to_dict(msg) == reference(msg)
        assert type(render.to_dict(msg)) is type(reference(msg))


JSON_VALUES = [{}, [], {"a": []}, [{}], [[[]]], {"z": {"y": {}}, "a": 0}, "x", 3, None, True,
               {"b": 1.5, "a": [1, 2.0, None, True, False, "é\x7f\n\u2028😀\\\"", -0.0, 1e16, 1e-7, 10**30]},
               [math.nan, math.inf, -math.inf]]


@pytest.mark.parametrize("value", JSON_VALUES, ids=range(len(JSON_VALUES)))
def test_json_text_is_json_dumps(value: object) -> None:
    assert render.dump(value, "json") == json.dumps(value, indent=2, sort_keys=True) + "\n"


def test_json_falls_back_for_what_json_converts() -> None:
    for value in ({1: "a", 2: "b"}, {"t": (1, 2)}, {"b": {2: 1.0, 1: 2}}):
        assert render.dump(value, "json") == json.dumps(value, indent=2, sort_keys=True) + "\n"
    with pytest.raises(TypeError):  # keys that cannot be sorted: as json.dumps
        render.dump({"k": None, 3: 4.0}, "json")
