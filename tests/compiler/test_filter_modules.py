"""The filter-module conformance check: every module under ``compiler/filters/`` has the one shape
(``base.Filter``) and registers exactly one filter, in ``ORDER``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from authplane.compiler import filters
from authplane.compiler.filters import ORDER
from authplane.compiler.filters.base import Filter

MODULES = sorted(f"{filters.__name__}.{m.name}" for m in pkgutil.iter_modules(filters.__path__) if m.name != "base")
HOOKS = {name for name, value in vars(Filter).items() if inspect.isfunction(value) and not name.startswith("_")}


def _own_filters(module_name: str) -> list[Filter]:
    module = importlib.import_module(module_name)
    return [v for v in vars(module).values() if isinstance(v, Filter) and type(v).__module__ == module_name]


def test_every_module_registers_exactly_one_filter_in_order():
    assert len(MODULES) >= 8
    for module_name in MODULES:
        own = _own_filters(module_name)
        assert len(own) == 1, f"{module_name}: defines {len(own)} Filter instances, expected one (FILTER)"
        assert sum(f is own[0] for f in ORDER) == 1, f"{module_name}: its filter is not in ORDER exactly once"
    assert sorted(type(f).__module__ for f in ORDER) == MODULES, "ORDER holds a filter from outside filters/"


def test_every_filter_is_a_subclass_of_the_base_with_only_its_hooks():
    for f in ORDER:
        cls = type(f)
        assert cls is not Filter and issubclass(cls, Filter), cls
        assert cls.prefix.startswith("envoy.filters.http."), cls
        public = {n for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("_")}
        assert public <= HOOKS, f"{cls.__name__}: methods {sorted(public - HOOKS)} are no hook of Filter"
    assert len({f.prefix for f in ORDER}) == len(ORDER)


def test_router_is_last():
    assert type(ORDER[-1]).__module__ == f"{filters.__name__}.router"
