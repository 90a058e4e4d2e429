"""setuptools hook: compile authplane's Envoy dynamic module (native/authplane_rules, Rust std
only) into the package (``authplane/_native/libauthplane_rules.so``) when rustc is present.
Without it the install still succeeds: authplane works, and ``extAuth.engine: native`` is refused
by ``validate`` with the reason. ``AUTHPLANE_NO_NATIVE=1`` skips the step."""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithNative(build_py):
    def run(self) -> None:
        super().run()
        if os.environ.get("AUTHPLANE_NO_NATIVE"):
            return
        editable = getattr(self, "editable_mode", False)
        dest = os.path.join(HERE if editable else self.build_lib, "authplane", "_native")
        try:
            spec = importlib.util.spec_from_file_location("authplane_native_build",
                                                          os.path.join(HERE, "native", "build.py"))
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            print(f"authplane: built {module.build_rules(dest)}")
        except Exception as e:  # never fail the install for the optional native path
            print(f"authplane: the native rules module was not built ({e}); "
                  "extAuth.engine: native is unavailable", file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithNative})
