"""The policy ``filters`` placed ``afterAuthentication``, then those placed ``beforeAuthorization``:
after every credential check, before the authorization rules (``dynamic_module.py`` has the
machinery)."""

from __future__ import annotations

from authplane.compiler.filters.dynamic_module import PREFIX, Modules


class BetweenChecks(Modules):
    prefix = f"{PREFIX}.between"
    places = ("afterAuthentication", "beforeAuthorization")


FILTER = BetweenChecks()
