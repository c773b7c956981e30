"""Read a YAML file and remember where every key and value is, so errors can say ``file:line:col``.

A generalisation of ``ingestd.config._read_yaml``/``_construct`` (which keeps lines only):
this one keeps line *and* column of each key and of each value, reports duplicate keys
(PyYAML silently keeps the last one) and never raises for a problem inside the document;
it collects problems so a caller can report all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Loc", "Mark", "MarkedDocument", "read_marked_yaml"]

Loc = tuple[str | int, ...]
"""A path into a document: mapping keys and sequence indexes."""


@dataclass(frozen=True, slots=True)
class Mark:
    """A position in a file, both counted from 1."""

    line: int
    column: int

    @classmethod
    def of(cls, mark: yaml.Mark | None) -> Mark:
        return cls(mark.line + 1, mark.column + 1) if mark is not None else cls(1, 1)


@dataclass
class MarkedDocument:
    """A parsed YAML document and where each of its parts was written."""

    path: Path
    data: Any = None
    keys: dict[Loc, Mark] = field(default_factory=dict)
    """Where the key of a mapping entry is (for "unknown key" errors)."""
    values: dict[Loc, Mark] = field(default_factory=dict)
    """Where a value starts (for "wrong type" errors); ``()`` is the document itself."""
    problems: list[tuple[Mark, str]] = field(default_factory=list)
    """Syntax errors and duplicate keys: (where, reason)."""

    def mark(self, loc: Sequence[str | int], *, key: bool = False) -> Mark:
        """Where ``loc`` is, or its nearest enclosing part that exists in the document."""
        parts = tuple(loc)
        if key and parts in self.keys:
            return self.keys[parts]
        for depth in range(len(parts), -1, -1):
            found = self.values.get(parts[:depth])
            if found is not None:
                return found
        return Mark(1, 1)

    def where(self, loc: Sequence[str | int], *, key: bool = False) -> str:
        """``file:line:column`` of ``loc`` (see :meth:`mark`)."""
        mark = self.mark(loc, key=key)
        return f"{self.path}:{mark.line}:{mark.column}"


def read_marked_yaml(path: Path, text: str | None = None) -> MarkedDocument:
    """Parse one YAML document; problems are collected in ``problems``, never raised.

    An unreadable file or a syntax error leaves ``data`` as ``None``.
    """
    document = MarkedDocument(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            document.problems.append((Mark(1, 1), f"cannot read the file: {reason}"))
            return document
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # raises ReaderError for a non-printable character
        node = loader.get_single_node()
        if node is not None:
            budget = _Budget(max(_MAX_NODES, 10 * len(text)))
            document.data = _construct(loader, node, (), document, budget)
            document.values[()] = Mark.of(node.start_mark)
    except yaml.MarkedYAMLError as exc:
        document.data = None
        document.problems.append(
            (Mark.of(exc.problem_mark), f"not valid YAML: {exc.problem or exc}")
        )
    except yaml.reader.ReaderError as exc:
        document.data = None
        before = text[: exc.position]
        mark = Mark(before.count("\n") + 1, exc.position - before.rfind("\n"))
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "?")
        document.problems.append(
            (mark, f"not valid YAML: unacceptable character #x{code:04x}: {exc.reason}")
        )
    except yaml.YAMLError as exc:
        document.data = None
        document.problems.append((Mark(1, 1), f"not valid YAML: {exc}"))
    except RecursionError:  # PyYAML composes and we construct recursively
        document.data = None
        document.problems.append((Mark(1, 1), "not valid YAML: nested too deeply"))
    finally:
        if loader is not None:
            loader.dispose()
    return document


_MAX_NODES = 100_000
"""Values a document may expand to, at least (10 per byte of text is always allowed): an
alias repeats what its anchor names, so a few hundred bytes of nested aliases ("billion
laughs") would otherwise expand to billions of values."""


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    def spend(self, node: yaml.Node) -> None:
        self.left -= 1
        if self.left < 0:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the document expands to more than {self.limit} values "
                "(aliases repeat what their anchor names)",
                node.start_mark,
            )


def _scalar(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """A scalar's value; a list or mapping here (a complex key) is refused. Every problem is
    a ``MarkedYAMLError``: PyYAML lets ValueError out of ``!!int x``, ``!!float x`` and
    dates that do not exist (``2024-02-30``)."""
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(
            None, None, "a key must be a plain value, not a list or a mapping", node.start_mark
        )
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, OverflowError) as exc:
        kind = node.tag.rpartition(":")[2]
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read {node.value[:40]!r} as {kind}: {exc}", node.start_mark
        ) from None


def _construct(
    loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, document: MarkedDocument, budget: _Budget
) -> Any:
    budget.spend(node)
    document.values[loc] = Mark.of(node.start_mark)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(_scalar(loader, key_node))
            key_mark = Mark.of(key_node.start_mark)
            if key in result:
                first = document.keys[(*loc, key)]
                path = ".".join(str(p) for p in (*loc, key))
                document.problems.append(
                    (key_mark, f"{path}: duplicate key (first at line {first.line})")
                )
                continue
            document.keys[(*loc, key)] = key_mark
            result[key] = _construct(loader, value_node, (*loc, key), document, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(loader, item, (*loc, index), document, budget)
            for index, item in enumerate(node.value)
        ]
    return _scalar(loader, node)
