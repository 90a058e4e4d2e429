"""What makes loading a large repository cheap keeps its behaviour: positions recorded only when
asked for (and then exact), no YAML node kept after a parse, collection paused and restored."""

from __future__ import annotations

import gc
import glob

from authplane.policy import yamlpos
from authplane.policy.gcpause import paused_gc
from authplane.policy.parse import parse_file
from tests.support import TESTDATA

TEXT = """\
kind: Route
metadata: {name: r1}
spec:
  port: 8080
  enabled: true
  rules:
    - match: {pathPrefix: /a}
      limit: 1.5
---
kind: Backend
metadata:
  name: b
"""


def test_positions_are_recorded_when_first_asked_for() -> None:
    docs = yamlpos.load_documents(TEXT)
    assert [d._positions for d in docs] == [None, None]
    assert docs[0].pos(("spec", "rules", 0, "match", "pathPrefix")) == (7, 27)
    assert docs[0].pos(("spec", "port"), key=True) == (4, 3)
    assert docs[1].pos(("metadata", "name")) == (12, 9)
    assert docs[1].pos(("metadata", "nothing", "here")) == (12, 3)  # the deepest node that exists


def test_lazy_positions_are_those_recorded_while_parsing() -> None:
    for path in sorted(glob.glob(f"{TESTDATA}/*.in.yaml")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        recorded = yamlpos._load(text, record=True)
        lazy = yamlpos.load_documents(text)
        assert [d.data for d in lazy] == [d.data for d in recorded], path
        assert [(d.positions, d.key_positions) for d in lazy] == [(d.positions, d.key_positions)
                                                                  for d in recorded], path


def test_problems_found_without_positions_are_worded_with_them() -> None:
    parsed = parse_file("p.yaml", "kind: Route\nmetadata: {name: a}\nspec:\n  gateway: g\n  gateway: h\n")
    assert [str(p) for p in parsed.problems] == ["p.yaml:5:3: spec.gateway: duplicate key 'gateway'"]
    parsed = parse_file("p.yaml", "a: &x [1, *x]\n")
    assert len(parsed.problems) == 1 and "recursive alias" in parsed.problems[0].message
    assert (parsed.problems[0].line, parsed.problems[0].col) == (1, 11)


def test_no_yaml_node_is_kept_after_a_parse() -> None:
    yamlpos.load_documents(TEXT)
    assert not yamlpos._CONSTRUCTOR.constructed_objects
    assert not yamlpos._CONSTRUCTOR.recursive_objects


def test_paused_collection_is_restored_after_the_outermost_pause() -> None:
    assert gc.isenabled()
    with paused_gc():
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # off before: stays off
    finally:
        gc.enable()
