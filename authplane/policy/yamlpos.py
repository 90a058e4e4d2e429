"""YAML documents as plain data plus the source position of every node.

PyYAML's composer keeps marks on nodes; we build Python values ourselves so that each value's
path (``("spec", "rules", 0, "match")``) maps to the line and column where it was written.
Positions are needed only to report a problem, so a document records them when first asked:
the file's text is composed again then (once for all its documents). Recording every position
up front took a third of the parse of a large repository and most of the memory it kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


class YamlProblem(Exception):
    def __init__(self, line: int, col: int, message: str, path: Path = ()):
        self.line, self.col, self.message, self.path = line, col, message, path
        super().__init__(message)


Positions = dict[Path, tuple[int, int]]


class _Text:
    """The text of one file, composed again the first time one of its documents is asked for a
    position: then the positions of every document of the file are recorded."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.found: list[tuple[Positions, Positions]] | None = None

    def positions(self, index: int) -> tuple[Positions, Positions]:
        if self.found is None:
            self.found = [(d.positions, d.key_positions) for d in _load(self.text, record=True)]
        return self.found[index]


@dataclass
class Document:
    data: Any
    line: int
    col: int
    _positions: Positions | None = field(default=None, repr=False)
    _key_positions: Positions | None = field(default=None, repr=False)
    _text: _Text | None = field(default=None, repr=False, compare=False)
    _index: int = field(default=0, repr=False, compare=False)

    @property
    def positions(self) -> Positions:
        """Path → (line, column) of the node written there."""
        return self._recorded()[0]

    @property
    def key_positions(self) -> Positions:
        """Path → (line, column) of the mapping key naming it."""
        return self._recorded()[1]

    def _recorded(self) -> tuple[Positions, Positions]:
        if self._positions is None or self._key_positions is None:
            found = self._text.positions(self._index) if self._text is not None else ({}, {})
            self._positions, self._key_positions = found
        return self._positions, self._key_positions

    def pos(self, path: Path, key: bool = False) -> tuple[int, int]:
        """Position of the deepest node on ``path`` that exists (the key itself if ``key``)."""
        path = tuple(path)
        if key and path in self.key_positions:
            return self.key_positions[path]
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return self.positions.get((), (self.line, self.col))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


MAX_DEPTH = 100
"""Deepest nesting accepted (policies need about ten levels; Python's recursion limit is 1,000)."""
ALIAS_BUDGET = 10_000
"""Nodes that aliases (``*name``) may repeat in one file: a few repeated rule lists fit, a
"billion laughs" (nested aliases, 272 bytes growing to gigabytes) stops here."""


class _AliasError(Exception):
    """An alias over budget or recursive; located later from the events (nodes do not know where
    their aliases are written)."""

    def __init__(self, path: Path, message: str):
        self.path, self.message = path, message


class _Builder:
    """Plain values from the nodes of one document, expanding aliases within ``ALIAS_BUDGET``.

    The composer hands back an alias as the very node object it names, so a node met twice is an
    alias; ``outer`` is the path of the alias, written in the text, being expanded."""

    def __init__(self, doc: Document | None, budget: list[int]) -> None:
        self.doc = doc  # None: positions are not recorded
        self.budget = budget  # shared by the documents of a file
        self.built: set[int] = set()
        self.active: set[int] = set()
        self.outer: Path | None = None

    def build(self, node: yaml.Node, path: Path) -> Any:
        if len(path) > MAX_DEPTH:
            raise YamlProblem(*_mark(node), f"nested more than {MAX_DEPTH} levels deep")
        key = id(node)
        if key in self.active:
            raise _AliasError(self.outer or path, "recursive alias: it names a node that contains it")
        if key not in self.built:
            self.built.add(key)
            return self._node(node, path)
        if self.outer is not None:
            return self._node(node, path)
        self.outer = path
        try:
            return self._node(node, path)
        finally:
            self.outer = None

    def _node(self, node: yaml.Node, path: Path) -> Any:
        if self.outer is not None:
            self.budget[0] -= 1
            if self.budget[0] < 0:
                raise _AliasError(self.outer, f"aliases expand to more than {ALIAS_BUDGET} nodes in this "
                                              "file; repeat fewer or smaller parts")
        if self.doc is not None:
            self.doc.positions[path] = _mark(node)
        if isinstance(node, yaml.ScalarNode):
            return node.value if node.tag == _STR else _scalar(node, path)
        key = id(node)
        self.active.add(key)
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.active.discard(key)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlProblem(*_mark(key_node), "mapping keys must be plain strings", path)
            key = key_node.value
            if key == "<<":
                raise YamlProblem(*_mark(key_node), "merge keys (<<) are not supported", path)
            if key in out:
                raise YamlProblem(*_mark(key_node), f"duplicate key {_short(key)}", (*path, key))
            if self.doc is not None:
                self.doc.key_positions[(*path, key)] = _mark(key_node)
            out[key] = self.build(value_node, (*path, key))
        return out


_STR = "tag:yaml.org,2002:str"
"""A plain string's tag: its value is the node's text (as ``SafeConstructor`` gives it)."""


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _scalar(node: yaml.ScalarNode, path: Path) -> Any:
    if node.tag == _STR:
        return node.value
    try:
        return yaml.SafeLoader.construct_object(_CONSTRUCTOR, node, deep=True)
    except ValueError as e:  # Python's int digit limit, 2026-13-01 ...
        kind = node.tag.rpartition(":")[2]
        if kind == "int":
            reason = f"integer too long ({len(node.value)} characters)"
        else:
            reason = f"invalid {kind} {_short(node.value)} ({e})"
        raise YamlProblem(*_mark(node), f"{reason}; quote it to make it a string", path) from None
    finally:
        # the shared constructor remembers every node it built (a document's worth, normally):
        # forgotten at once, or every scalar node ever parsed would stay in memory
        _CONSTRUCTOR.constructed_objects.pop(node, None)
        _CONSTRUCTOR.recursive_objects.pop(node, None)


def _alias_mark(text: str, document: int, path: Path) -> tuple[int, int, str]:
    """(line, col, name) of the alias written at ``path`` of the ``document``-th document."""
    frames: list[list[Any]] = []  # [key or index, "key"/"value" (what a mapping expects) or None]
    doc = -1
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.DocumentStartEvent):
            doc, frames = doc + 1, []
        elif doc != document:
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            frames.pop()
            _advance(frames)
        elif isinstance(event, yaml.NodeEvent):
            if frames and frames[-1][1] == "key":
                frames[-1][0] = event.value if isinstance(event, yaml.ScalarEvent) else None
            elif isinstance(event, yaml.AliasEvent) and tuple(f[0] for f in frames) == path:
                return event.start_mark.line + 1, event.start_mark.column + 1, str(event.anchor)
            if isinstance(event, yaml.CollectionStartEvent):
                frames.append([0, None] if isinstance(event, yaml.SequenceStartEvent) else [None, "key"])
            else:
                _advance(frames)
    return 1, 1, "?"


def _advance(frames: list[list[Any]]) -> None:
    """After a node: a sequence moves to its next item, a mapping from key to value and back."""
    if frames:
        top = frames[-1]
        if top[1] is None:
            top[0] += 1
        else:
            top[1] = "value" if top[1] == "key" else "key"


class _Constructor(yaml.SafeLoader):
    def __init__(self) -> None:
        super().__init__("")


_CONSTRUCTOR = _Constructor()
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # ~10x faster


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """The safe loader, resolving each (kind, text) once per file: the composer asks for the tag
    of every node (a key like ``name`` is met hundreds of times), and a tag depends only on
    these as long as no path resolvers are registered (none are)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._tags: dict[tuple[Any, Any, Any], str] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        key = (kind, value, implicit)
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = super().resolve(kind, value, implicit)
        return tag

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass  # only path resolvers use it

    def ascend_resolver(self) -> None:
        pass


assert not _Loader.yaml_path_resolvers


def load_documents(text: str) -> list[Document]:
    """Parse every document of a YAML stream; empty documents are skipped. Positions are recorded
    when a document is first asked for one (``Document.pos``)."""
    return _load(text, record=False)


def _load(text: str, record: bool) -> list[Document]:
    docs: list[Document] = []
    loader: yaml.SafeLoader | None = None  # the C loader when PyYAML has libyaml
    budget = [ALIAS_BUDGET]
    lazy = None if record else _Text(text)
    try:
        loader = _Loader(text)
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            line, col = _mark(node)
            if record:
                doc = Document(None, line, col, {}, {})
            else:
                doc = Document(None, line, col, _text=lazy, _index=len(docs))
            try:
                doc.data = _Builder(doc if record else None, budget).build(node, ())
            except yaml.constructor.ConstructorError as e:
                mark = e.problem_mark or node.start_mark
                raise YamlProblem(mark.line + 1, mark.column + 1, str(e.problem)) from None
            except _AliasError as e:
                line, col, name = _alias_mark(text, len(docs), e.path)
                raise YamlProblem(line, col, f"alias *{name}: {e.message}", e.path) from None
            docs.append(doc)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = e.problem or e.context or "invalid YAML"
        raise YamlProblem(line, col, f"invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as e:  # bad characters: only an offset is known
        before = text[: e.position]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise YamlProblem(line, col, f"invalid YAML: character {e.character!r} not allowed") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs
