"""Random and truncated YAML never produces a traceback: only PolicyError (or a valid result)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authplane.compiler.snapshot import compile_policies
from authplane.errors import PolicyError
from authplane.policy.loader import load_texts

HERE = os.path.join(os.path.dirname(__file__), "testdata")
SAMPLES = [Path(p).read_text() for p in sorted(glob.glob(f"{HERE}/*.in.yaml"))]


def _load(text: str) -> None:
    try:
        policies = load_texts({os.path.join(HERE, "fuzz.yaml"): text}, root=HERE)
    except PolicyError as e:
        assert e.problems
        for p in e.problems:
            assert p.line >= 1 and p.col >= 1 and p.message
        return
    compile_policies(policies)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_truncated_and_mutated_samples(sample, data):
    cut = data.draw(st.integers(0, len(sample)))
    text = sample[:cut]
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.text(max_size=8)) + text[at:]
    _load(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text):
    _load(text)


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=10),
                    st.sampled_from(["edge", "echo", "builtin", "30s", "/api", "10.0.0.0/8"]))
_keys = st.sampled_from(["apiVersion", "kind", "metadata", "name", "spec", "fleet", "listeners",
                         "port", "rules", "backend", "gateway", "targetRef", "jwt", "providers",
                         "jwks", "file", "uri", "authorization", "extAuth", "service", "when",
                         "claims", "action", "match", "pathPrefix"])
_tree = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(_keys, inner, max_size=4)),
                     max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["Gateway", "Backend", "Route", "AuthPolicy"]), _tree)
def test_random_documents(kind, spec):
    import yaml

    text = yaml.safe_dump({"apiVersion": "authplane.dev/v1alpha1", "kind": kind,
                           "metadata": {"name": "x"}, "spec": spec})
    _load(text)
