"""Load a policy directory: read → parse → validate → resolve, every problem collected.

Each stage has one module: ``files.py`` reads, ``parse.py`` turns YAML into typed documents with
positions, ``validate.py`` checks documents against each other, ``resolve.py`` reads the files
the policies name (and runs OIDC discovery) once; ``lint.py`` adds warnings (static checks). The
result, a ``PolicySet``, is all the compiler and the decision service read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from authplane.errors import PolicyError, Problem
from authplane.policy.documents import PolicySet
from authplane.policy.files import DEFAULT_MAX_FILE_SIZE, policy_files, read_file
from authplane.policy.gcpause import paused_gc
from authplane.policy.lint import lint
from authplane.policy.parse import Parsed, hide_secret_files, merge, parse, parse_file
from authplane.policy.resolve import resolve
from authplane.policy.validate import validate


class Loader:
    """Parses a directory again and again: a file whose content hash did not change since the
    last ``parse`` keeps the documents parsed then (the parse of a file depends on its path and
    text alone), so a reload of a large repository re-parses only the files that changed."""

    def __init__(self) -> None:
        self._parsed: dict[str, tuple[bytes, Parsed]] = {}
        self.reparsed = 0
        """Files parsed by the last ``parse`` (the others were kept)."""

    def parse(self, texts: dict[str, str]) -> Parsed:
        kept: dict[str, tuple[bytes, Parsed]] = {}
        self.reparsed = 0
        for path in sorted(texts):
            digest = hashlib.sha256(texts[path].encode()).digest()
            hit = self._parsed.get(path)
            if hit is None or hit[0] != digest:
                hit = (digest, parse_file(path, texts[path]))
                self.reparsed += 1
            kept[path] = hit
        self._parsed = kept  # deleted and renamed files are forgotten
        return merge([one for _, one in kept.values()])


@paused_gc()
def load_texts(texts: dict[str, str], root: str = ".", max_file_size: int = DEFAULT_MAX_FILE_SIZE,
               parser: Callable[[dict[str, str]], Parsed] = parse) -> PolicySet:
    """Load policies from ``{path: yaml text}``; raises PolicyError with every problem.
    ``parser``: ``Loader.parse`` keeps the documents of unchanged files."""
    parsed = parser(texts)
    problems = parsed.problems
    policies = PolicySet(root=root, broken=parsed.broken, texts=dict(texts), max_file_size=max_file_size)
    for item in parsed.documents:
        table = policies.table(item.resource.kind)
        if item.name in table:
            first = table[item.name].source
            problems.append(item.source.problem(
                ("metadata", "name"), f"duplicate {item.resource.kind} {item.name!r} "
                f"(first defined at {first})"))
            continue
        table[item.name] = item
    for table_name in ("gateways", "backends", "routes", "auth_policies", "tests"):
        table = getattr(policies, table_name)
        setattr(policies, table_name, dict(sorted(table.items())))
    problems += validate(policies)
    problems += resolve(policies)
    if problems:
        raise PolicyError(hide_secret_files(problems, texts, parsed.secret_files))
    policies.warnings += lint(policies)
    return policies


@paused_gc()
def load_dir(root: str, max_file_size: int = DEFAULT_MAX_FILE_SIZE, settle: float = 0.0,
             previous: dict[str, str] | None = None, loader: Loader | None = None) -> PolicySet:
    """Load and validate every policy file under ``root``.

    ``previous`` (policy file → text of the revision being served) lets a reload keep the
    documents of a file found empty, as a file being rewritten is for a moment: an empty file
    must not drop a policy, so it keeps its previous documents, with a warning, until it has
    content again or is deleted. ``settle``: see ``read_file``. ``loader``: parse with it (a reload
    re-parses only changed files); every file is still read, and every other stage runs in full."""
    if not os.path.exists(root):
        raise PolicyError([Problem(root, 1, 1, "", "no such directory")])
    paths = [root] if os.path.isfile(root) else policy_files(root)
    if not paths:
        raise PolicyError([Problem(root, 1, 1, "", "no policy files (*.yaml, *.yml) found")])
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    kept: list[Problem] = []
    for path in paths:
        try:
            data = read_file(path, max_file_size, settle)
            texts[path] = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(path, 1, 1, "", f"not a UTF-8 text file ({e.reason} at byte "
                                                    f"{e.start})"))
        except FileNotFoundError:
            continue  # deleted since it was listed (or a dangling symlink): simply gone
        except OSError as e:
            problems.append(Problem(path, 1, 1, "", f"cannot read: {e.strerror}"))
        else:
            if not data and (previous or {}).get(path):
                texts[path] = (previous or {})[path]
                kept.append(Problem(path, 1, 1, "", "the file is empty (being written?): its previous "
                                                    "documents stay in force until it has content or is deleted"))
    try:
        policies = load_texts(texts, root=root, max_file_size=max_file_size,
                              parser=loader.parse if loader is not None else parse)
    except PolicyError as e:
        raise PolicyError(problems + e.problems) from None
    if problems:
        raise PolicyError(problems)
    policies.warnings[:0] = kept
    return policies
