"""The resolve stage: read every file the policies name (JWKS, htpasswd and key files, OIDC
secrets) and run OIDC discovery, once, into ``PolicySet.resolved``, checking what was read.

After this stage nothing reads a file or the network for these policies: the compiler and the
decision service work from ``PolicySet.resolved``. Every file read also lands in
``PolicySet.files`` (path → text), which is part of the served version and watched by ``serve``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from authplane.errors import Problem
from authplane.policy import modules
from authplane.policy.certificates import CertificateError, ca_bundle, key_pair
from authplane.policy.credentials import (
    Entry,
    KeyFileError,
    parse_api_keys,
    parse_htpasswd,
    parse_key_file,
)
from authplane.policy.documents import KeyPair, Located, PolicySet, Resolved, TlsMaterial
from authplane.policy.files import read_file
from authplane.policy.model import AuthPolicy, Backend, Gateway
from authplane.policy.oidc import OidcError, ResolvedOidc, derive_hmac_secret, id_token_claims, read_secret
from authplane.policy.oidc import endpoints as oidc_endpoints

_JWK_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "oct": ("k",), "OKP": ("crv", "x")}


def usable_keys(jwks: Any) -> str | None:
    """None when ``jwks`` holds at least one usable key, else what is wrong."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        return 'expected a JWKS: a JSON object with a "keys" list'
    for key in jwks["keys"]:
        if isinstance(key, dict) and all(key.get(m) for m in _JWK_MEMBERS.get(key.get("kty"), ("?",))):
            return None
    return "no usable key (each key needs kty RSA/EC/oct/OKP and its members, e.g. n and e for RSA)"


def resolve(p: PolicySet) -> list[Problem]:
    """Fill ``p.resolved`` for every AuthPolicy; the problems found in what was read."""
    out: list[Problem] = []
    jwks_files: dict[str, tuple[str, str | None]] = {}
    unavailable = functools.cache(modules.native_unavailable)  # a file lookup and read: once
    for pol in p.auth_policies.values():
        spec = pol.resource.spec
        p.resolved[pol.name] = Resolved(
            jwks=_jwks(p, pol, out, jwks_files) if spec.jwt else {},
            users=tuple(_read_entries(p, pol, "basicAuth", spec.basic_auth.file, parse_htpasswd, out))
            if spec.basic_auth else (),
            keys=_api_key(p, pol, out) if spec.api_key else (),
            ext_keys=_ext_keys(p, pol, out) if spec.ext_auth and spec.ext_auth.api_keys else None,
            oidc=_oidc(p, pol, out) if spec.oidc else None,
            **_engine(p, pol, unavailable),
        )
    for gw in p.gateways.values():
        _listener_tls(p, gw, out)
    for backend in p.backends.values():
        _backend_tls(p, backend, out)
    return out


def _engine(p: PolicySet, pol: Located[AuthPolicy], unavailable: Callable[[], str | None]) -> dict[str, Any]:
    """``extAuth.engine: auto``: native or the decision service, decided here (the module is
    looked for on disk) so that the compiler only reads ``Resolved``; a note says which."""
    ext = pol.resource.spec.ext_auth
    if ext is None or ext.engine != "auto" or ext.service != "builtin":
        return {}
    why = modules.auto_engine(ext, pol.resource.spec.mode == "shadow", unavailable)
    where = ("spec", "extAuth", "engine")
    if not why:
        p.notes.append(pol.source.problem(where, "engine: auto: decided in Envoy by the native module"))
        return {"native_rules": True}
    p.notes.append(pol.source.problem(where, f"engine: auto: decided by the decision service: {why}"))
    return {"engine_reason": why}


def _read(p: PolicySet, pol: Located[Any], rel: str, where: tuple[Any, ...], what: str,
          out: list[Problem]) -> tuple[str, str] | None:
    """(path, text) of a file the policy names, recorded in ``p.files``; None (with a problem)
    when it cannot be read."""
    path = pol.source.relative(rel)
    try:
        text = read_file(path, p.max_file_size).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not a UTF-8 text file"
        out.append(pol.source.problem(where, f"cannot read {what}{rel!r}: {reason}"))
        return None
    return path, text


def _jwks(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem],
          files: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """``files``: JWKS file path → (text, problem) of the files read so far: a JWKS file shared
    by many policies is read and parsed once (and its text kept once)."""
    jwt = pol.resource.spec.jwt
    assert jwt is not None
    found: dict[str, str] = {}
    for i, prov in enumerate(jwt.providers):
        where = ("spec", "jwt", "providers", i, "jwks")
        if prov.jwks.file is not None:
            path = pol.source.relative(prov.jwks.file)
            cached = files.get(path)
            if cached is None:
                read = _read(p, pol, prov.jwks.file, (*where, "file"), "JWKS file ", out)
                if read is None:
                    continue  # not cached: each policy naming it reports why
                try:
                    cached = (read[1], usable_keys(json.loads(read[1])))
                except ValueError as e:
                    cached = (read[1], f"not JSON ({e})")
                files[path] = cached
            text, problem = cached
            if problem:
                out.append(pol.source.problem((*where, "file"), f"JWKS file {prov.jwks.file!r}: {problem}"))
            else:
                p.files[path] = text
                found[prov.name] = text
        elif prov.jwks.inline is not None:
            problem = usable_keys(prov.jwks.inline)
            if problem:
                out.append(pol.source.problem((*where, "inline"), problem))
    return found


def _read_entries(p: PolicySet, pol: Located[AuthPolicy], section: str, rel: str,
                  parse: Callable[[str, str], tuple[list[Entry], list[Problem]]],
                  out: list[Problem]) -> list[Entry]:
    """Read and check an htpasswd or key file; its content becomes part of the version."""
    read = _read(p, pol, rel, ("spec", section, "file"), "", out)
    if read is None:
        return []
    path, text = read
    entries, problems = parse(path, text)
    out.extend(problems)
    p.files[path] = text
    return entries


def _api_key(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem]) -> tuple[Entry, ...]:
    spec = pol.resource.spec.api_key
    assert spec is not None
    entries = _read_entries(p, pol, "apiKey", spec.file, parse_key_file, out)
    known = {e.name for e in entries}
    for i, client in enumerate(spec.clients):
        if entries and client not in known:
            out.append(pol.source.problem(("spec", "apiKey", "clients", i),
                                          f"no client {client!r} in the key file {spec.file!r}"))
    return tuple(entries)


def _ext_keys(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem]) -> str | None:
    """The ``extAuth.apiKeys`` file's text, checked, and its clients against the rules' ``apiKeys``
    conditions."""
    ext = pol.resource.spec.ext_auth
    assert ext is not None and ext.api_keys is not None
    where = ("spec", "extAuth", "apiKeys", "file")
    read = _read(p, pol, ext.api_keys.file, where, "API key file ", out)
    if read is None:
        return None
    path, text = read
    try:
        clients = set(parse_api_keys(text))
    except KeyFileError as e:
        out.append(pol.source.problem(where, f"API key file {ext.api_keys.file!r}: {e}"))
        return None
    p.files[path] = text
    for i, rule in enumerate(ext.rules or []):
        where = ("spec", "extAuth", "rules", i, "when")
        for when in rule.when.nested():  # the rule's own conditions, then each `not` inside
            unknown = sorted(set(when.api_keys) - {"*"} - clients)
            if unknown:
                out.append(pol.source.problem((*where, "apiKeys"), f"no client {unknown[0]!r} in the API "
                                                                   f"key file {ext.api_keys.file!r}"))
            where = (*where, "not")
    return text


def _oidc(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem]) -> ResolvedOidc | None:
    """Endpoints (discovery) and secrets; the secret files are watched like policy files."""
    spec = pol.resource.spec.oidc
    assert spec is not None
    where = ("spec", "oidc")
    secrets: dict[str, bytes] = {}
    refs = [("clientSecret", spec.client_secret), ("hmacSecret", spec.hmac_secret),
            *((f"sessionKeys.{i}", ref) for i, ref in enumerate(spec.session_keys)),
            ("session.password", spec.session.password)]
    for name, ref in refs:
        if ref is None:
            continue
        try:
            secrets[name], path = read_secret(ref, pol.source.relative, p.max_file_size)
        except OidcError as e:
            out.append(pol.source.problem((*where, name), str(e)))
            continue
        if path:
            p.files[path] = secrets[name].decode(errors="replace")
        if name not in ("clientSecret", "session.password") and len(secrets[name]) < 32:
            out.append(pol.source.problem((*where, *name.split(".")), "needs at least 32 bytes"))
    try:
        found, warning = oidc_endpoints(spec)
    except OidcError as e:
        out.append(pol.source.problem((*where, "issuer"), str(e)))
        return None
    if warning:
        p.warnings.append(pol.source.problem((*where, "issuer"), warning))
    claims = id_token_claims(spec, pol.resource.spec.authorization)
    if found.claims_parameter is False and claims:
        p.warnings.append(pol.source.problem((*where, "issuer"), (
            "the provider's discovery document does not list claims_parameter_supported: it may ignore "
            f"the request for {', '.join(claims)} in the ID token, and Envoy reads no other claims "
            "(set idTokenClaims: [] if it rejects the parameter)")))
    if "clientSecret" not in secrets:
        return None
    client = secrets["clientSecret"]
    keys = tuple(secrets[f"sessionKeys.{i}"] for i in range(len(spec.session_keys)) if f"sessionKeys.{i}" in secrets)
    return ResolvedOidc(found, client, secrets.get("hmacSecret") or derive_hmac_secret(client, spec), keys,
                        secrets.get("session.password"))


def _pem(p: PolicySet, item: Located[Any], rel: str, where: tuple[Any, ...], what: str,
         out: list[Problem]) -> str | None:
    """A PEM file's text, recorded in ``p.files`` (watched: a rotation is a reload)."""
    read = _read(p, item, rel, where, what, out)
    if read is None:
        return None
    p.files[read[0]] = read[1]
    return read[1]


def _pair(p: PolicySet, item: Located[Any], cert_file: str, key_file: str, where: tuple[Any, ...],
          out: list[Problem]) -> KeyPair | None:
    """A checked certificate and key; any problem is reported at ``certFile`` (``where``)."""
    cert = _pem(p, item, cert_file, where, "certFile ", out)
    key = _pem(p, item, key_file, where, "keyFile ", out)
    if cert is None or key is None:
        return None
    try:
        return key_pair(cert, key, cert_file, key_file)
    except CertificateError as e:
        out.append(item.source.problem(where, str(e)))
        return None


def _ca(p: PolicySet, item: Located[Any], rel: str, where: tuple[Any, ...], out: list[Problem]) -> str | None:
    text = _pem(p, item, rel, where, "caFile ", out)
    try:
        return ca_bundle(text, rel) if text is not None else None
    except CertificateError as e:
        out.append(item.source.problem(where, str(e)))
        return None


def _listener_tls(p: PolicySet, gw: Located[Gateway], out: list[Problem]) -> None:
    """Every ``https`` listener's certificates (no DNS name served by two of them) and client CA."""
    for i, lst in enumerate(gw.resource.spec.listeners):
        if lst.tls is None:
            continue
        where = ("spec", "listeners", i, "tls")
        pairs: list[KeyPair] = []
        named: dict[str, int] = {}
        for j, files in enumerate(lst.tls.certificates):
            at = (*where, "certificates", j, "certFile")
            pair = _pair(p, gw, files.cert_file, files.key_file, at, out)
            if pair is None:
                continue
            for name in pair.dns_names:
                if name in named:
                    out.append(gw.source.problem(at, f"{name!r} is also a name of certificate {named[name]}: "
                                                     "SNI could not choose between them"))
                named.setdefault(name, j)
            if j > 0 and not pair.dns_names:
                p.warnings.append(gw.source.problem(at, "the certificate has no DNS name: no client's SNI "
                                                        "selects it (only the first certificate is the default)"))
            pairs.append(pair)
        validation = lst.tls.client_validation
        ca = _ca(p, gw, validation.ca_file, (*where, "clientValidation", "caFile"), out) if validation else None
        p.listener_tls[f"{gw.name}/{lst.name}"] = TlsMaterial(tuple(pairs), ca)


def _backend_tls(p: PolicySet, backend: Located[Backend], out: list[Problem]) -> None:
    tls = backend.resource.spec.tls
    if isinstance(tls, bool):
        return
    where = ("spec", "tls")
    ca = _ca(p, backend, tls.ca_file, (*where, "caFile"), out) if tls.ca_file else None
    pair = None
    if tls.cert_file and tls.key_file:
        pair = _pair(p, backend, tls.cert_file, tls.key_file, (*where, "certFile"), out)
    p.backend_tls[backend.name] = TlsMaterial((pair,) if pair else (), ca)
