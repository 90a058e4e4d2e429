"""YAML documents as plain data plus the source position of every node.

PyYAML's composer keeps marks on nodes; we build Python values ourselves so that each value's
path (``("spec", "rules", 0, "match")``) maps to the line and column where it was written.
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


@dataclass
class Document:
    data: Any
    line: int
    col: int
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[Path, tuple[int, int]] = field(default_factory=dict)

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


def _build(node: yaml.Node, path: Path, doc: Document) -> Any:
    doc.positions[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlProblem(*_mark(key_node), "mapping keys must be plain strings", path)
            key = key_node.value
            if key == "<<":
                raise YamlProblem(*_mark(key_node), "merge keys (<<) are not supported", path)
            if key in out:
                raise YamlProblem(*_mark(key_node), f"duplicate key {key!r}", (*path, key))
            doc.key_positions[(*path, key)] = _mark(key_node)
            out[key] = _build(value_node, (*path, key), doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), doc) for i, item in enumerate(node.value)]
    return yaml.SafeLoader.construct_object(_CONSTRUCTOR, node, deep=True)


class _Constructor(yaml.SafeLoader):
    def __init__(self) -> None:
        super().__init__("")


_CONSTRUCTOR = _Constructor()
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # ~10x faster


def load_documents(text: str) -> list[Document]:
    """Parse every document of a YAML stream; empty documents are skipped."""
    docs: list[Document] = []
    loader: yaml.SafeLoader | None = None  # the C loader when PyYAML has libyaml
    try:
        loader = _Loader(text)
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = Document(data=None, line=_mark(node)[0], col=_mark(node)[1])
            try:
                doc.data = _build(node, (), doc)
            except yaml.constructor.ConstructorError as e:
                mark = e.problem_mark or node.start_mark
                raise YamlProblem(mark.line + 1, mark.column + 1, str(e.problem)) from None
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
