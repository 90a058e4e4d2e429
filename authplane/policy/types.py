"""Constrained scalar types shared by the policy model (durations, ports, CIDRs, regexes ...), and
the value matches of conditions (``StringMatch``, ``PathMatch``)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar

import re2
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_NAME = r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"
_HOST = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)$")
_RE2_UNSUPPORTED = re.compile(r"\(\?(=|!|<=|<!)|\\[1-9]")


def parse_duration(value: object) -> float:
    """``"200ms"``, ``"30s"``, ``"5m"``, ``"1h"`` → seconds. Bare numbers are refused on purpose."""
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: write it with a unit, e.g. 200ms, 30s, 5m")
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"invalid duration {value!r}: use a number and a unit (ms, s, m, h), e.g. 30s")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > 315_576_000_000:
        raise ValueError(f"invalid duration {value!r}: too long")
    return round(seconds, 3)


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {value!r}: expected e.g. 10.0.0.0/8 or 2001:db8::/32") from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None


def re2_options() -> Any:
    """RE2's default options (those Envoy uses), without RE2 logging parse errors to stderr."""
    options = re2.Options()
    options.log_errors = False
    return options


def _regex(value: str) -> str:
    """RE2 (Envoy's engine) decides; a refusal is explained by Python's ``re`` when it has words
    for it (lookaround, an unbalanced parenthesis ...), else by RE2."""
    try:
        re2.compile(value, re2_options())
        return value
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
    if _RE2_UNSUPPORTED.search(value):
        raise ValueError(f"invalid regex {value!r}: lookaround and backreferences are not supported by RE2")
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regex {value!r}: {e}") from None
    raise ValueError(f"invalid regex {value!r}: {reason}")


def _header(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"invalid header name {value!r}: use letters, digits and - (RFC 9110 token)")
    return value.lower()


def _hostname(value: str) -> str:
    if not _HOST.match(value) or len(value) > 253:
        raise ValueError(f"invalid hostname {value!r}: expected e.g. api.example.com, *.example.com or *")
    return value.lower()


def _endpoint(value: str) -> str:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid endpoint {value!r}: expected host:port with a port from 1 to 65535")
    if not _HOST.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"invalid endpoint {value!r}: bad host {host!r}") from None
    return value


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"invalid path {value!r}: must start with /")
    if "*" in value[:-1] or (value.endswith("*") and not value.endswith("/*")):
        raise ValueError(f"invalid path {value!r}: * is only allowed as a final /* (prefix match)")
    return value


def _schema(pattern: str, description: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": pattern, "description": description})


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    _schema(_DURATION.pattern, "A duration with a unit: 200ms, 30s, 5m, 1h."),
]
Port = Annotated[int, Field(ge=1, le=65535)]
Status = Annotated[int, Field(ge=200, le=599)]
Name = Annotated[str, Field(pattern=_NAME, max_length=63)]
CIDR = Annotated[str, AfterValidator(_cidr), WithJsonSchema({"type": "string", "description": "An IPv4 or IPv6 CIDR."})]
IPAddress = Annotated[str, AfterValidator(_ip), WithJsonSchema({"type": "string", "description": "An IP address."})]
Regex = Annotated[str, AfterValidator(_regex),
                  WithJsonSchema({"type": "string", "format": "regex", "description": "An RE2 regular expression."})]
HeaderName = Annotated[str, AfterValidator(_header), _schema(_TOKEN.pattern, "An HTTP header name.")]
Hostname = Annotated[str, AfterValidator(_hostname), _schema(_HOST.pattern, "A hostname, *.suffix or *.")]
Endpoint = Annotated[str, AfterValidator(_endpoint), WithJsonSchema({"type": "string", "description": "host:port"})]
PathPattern = Annotated[str, AfterValidator(_path), WithJsonSchema(
    {"type": "string", "pattern": "^/", "description": "An exact path, or a prefix ending in /*."})]
Method = Annotated[str, Field(pattern=r"^(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS|CONNECT|TRACE)$")]


# --- value matches (conditions) -----------------------------------------------------------------


class _Match(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="after")
    def _one_kind(self) -> Any:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(type(self).model_fields)}")
        return self

    @field_validator("prefix", "regex", check_fields=False)
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value == "":
            raise ValueError("must not be empty")
        return value

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A plain value dumps as the string it was written as (render, IR goldens)."""
        plain = getattr(self, self._plain)
        return plain if plain is not None else handler(self)

    _plain: ClassVar[str] = ""


class StringMatch(_Match):
    """A header or claim value: a plain string is an exact value; or a mapping with one of
    ``prefix``, ``regex``, ``present``."""

    exact: str | None = None
    """The whole value (what a plain string means)."""
    prefix: str | None = None
    """The value starts with this."""
    regex: Regex | None = None
    """RE2 regular expression matched against the whole value."""
    present: bool | None = None
    """``true``: present, whatever its value (a claim: any JSON value, ``null`` included). For
    absent, put ``{present: true}`` under ``not``."""

    @field_validator("present")
    @classmethod
    def _only_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("only present: true exists; for an absent value put {present: true} under not")
        return value

    _plain: ClassVar[str] = "exact"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"exact": data}
        if not isinstance(data, dict | StringMatch):
            raise ValueError("expected a string or a mapping with one of prefix, regex, present")
        return data


class PathMatch(_Match):
    """A path: a plain string is an exact path (``/x`` matches ``/x`` and ``/x/``) or a prefix
    written ``/x/*`` (``/x``, ``/x/`` and everything below); or a mapping with ``regex``."""

    path: PathPattern | None = None
    """The exact path or ``/prefix/*`` (what a plain string means)."""
    regex: Regex | None = None
    """RE2 regular expression matched against the whole normalised path (without the query)."""

    _plain: ClassVar[str] = "path"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"path": _path(data)}  # a bad path is reported at the string itself
        if not isinstance(data, dict | PathMatch):
            raise ValueError("expected a path or a mapping with regex")
        return data


Scope = Annotated[str, Field(pattern=r"^[!#-\[\]-~]+$")]
"""An OAuth scope token (RFC 6749 section 3.3)."""


def scope_regex(scope: str) -> str:
    """RE2 regex matching a whole space-delimited ``scope`` claim that holds ``scope`` (Envoy's
    string regexes match the whole value; ``(?s)``: a newline is just another character)."""
    return f"(?s)(.* )?{re.escape(scope)}( .*)?"
