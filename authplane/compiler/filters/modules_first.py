"""The policy ``filters`` placed ``beforeAuthentication``: first in the chain, before every check
(``dynamic_module.py`` has the machinery and the later places)."""

from __future__ import annotations

from authplane.compiler.filters.dynamic_module import PREFIX, Modules


class BeforeAuthentication(Modules):
    prefix = f"{PREFIX}.first"
    places = ("beforeAuthentication",)


FILTER = BeforeAuthentication()
