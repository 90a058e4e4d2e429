"""Policy trees on disk for the tests: ``write_policies`` and the documents they are made of."""

from __future__ import annotations

import os
import textwrap

HEAD = "apiVersion: authplane.dev/v1alpha1\n"


def write_policies(directory: str, files: dict[str, str]) -> str:
    """Write ``{relative path: yaml}``; documents get the apiVersion line prepended."""
    for rel, text in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = textwrap.dedent(text).strip("\n") + "\n"
        if rel.endswith((".yaml", ".yml")):
            text = "\n---\n".join(HEAD + doc.strip("\n") + "\n" for doc in text.split("\n---\n"))
        with open(path, "w") as f:
            f.write(text)
    return directory


def gateway(name: str, port: int, fleet: str | None = None) -> str:
    """A Gateway document with one listener ``http`` on 127.0.0.1 (for ``write_policies``)."""
    return (f"kind: Gateway\nmetadata: {{name: {name}}}\n"
            f"spec: {{fleet: {fleet or name}, listeners: [{{name: http, port: {port}, address: 127.0.0.1}}]}}")


def backend(name: str, port: int, http2: bool = False, host: str = "127.0.0.1") -> str:
    protocol = ", protocol: http2" if http2 else ""
    return f'kind: Backend\nmetadata: {{name: {name}}}\nspec: {{endpoints: ["{host}:{port}"]{protocol}}}'


def documents(*docs: str) -> str:
    return "\n---\n".join(textwrap.dedent(d).strip("\n") for d in docs)


def app_gateway(backend_port: int) -> str:
    """Gateway ``edge`` (fleet edge), Backend ``app`` on ``backend_port``, Route ``app`` for every path."""
    return textwrap.dedent(f"""\
        kind: Gateway
        metadata: {{name: edge}}
        spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
        ---
        kind: Backend
        metadata: {{name: app}}
        spec: {{endpoints: ["127.0.0.1:{backend_port}"]}}
        ---
        kind: Route
        metadata: {{name: app}}
        spec: {{gateway: edge, rules: [{{name: main, match: {{pathPrefix: /}}, backend: app}}]}}
        """)


def app_policy(ext: str, jwt: str = "", name: str = "app", route: str = "app") -> str:
    """An AuthPolicy on Route ``route``; ``ext`` and ``jwt`` are the YAML of its extAuth and jwt."""
    doc = f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Route, name: {route}}}\n"
    for key, body in (("jwt", jwt), ("extAuth", ext)):
        if body:
            doc += f"  {key}:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"
    return doc


DEV_JWT = """
    required: false
    providers:
      - name: dev
        issuer: https://idp.authplane.test
        audiences: [api]
        jwks: {file: jwks.json}
        from: [{cookie: session}, {header: authorization, prefix: "Bearer "}]
"""
"""The ``jwt`` section for tokens of the tests' ``idp`` fixture (JWKS in ``jwks_file``)."""
