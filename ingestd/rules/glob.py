"""Glob patterns for rule selectors: ``*``, ``?``, ``[a-c]``, ``[!a-c]``, ``{a,b}``, ``\\x``, ``!``.

A leading ``!`` negates the whole pattern (``site: "!lab-*"``). A missing tag is matched as
the empty string, so ``*`` and ``!lab-*`` match a reading without the tag and ``gh-*`` does
not. Patterns are checked when rules load: an unterminated ``[`` or ``{``, a stray ``}``,
nested ``{``, an empty ``[]`` or a trailing ``\\`` is an error, not a literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Glob", "GlobError"]


class GlobError(ValueError):
    """A pattern that is not a valid glob; the message says what is wrong and where."""


@dataclass(frozen=True, slots=True)
class Glob:
    """A compiled glob; ``literal`` is the plain string when it has no wildcard."""

    pattern: str
    negated: bool = field(init=False)
    literal: str | None = field(init=False)
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        body = self.pattern
        negated = body.startswith("!")
        if negated:
            body = body[1:]
        regex, literal = _translate(body)
        object.__setattr__(self, "negated", negated)
        object.__setattr__(self, "literal", None if negated else literal)
        object.__setattr__(self, "_regex", None if literal is not None else re.compile(regex))
        if literal is not None and negated:
            object.__setattr__(self, "_regex", re.compile(re.escape(literal)))

    @property
    def matches_everything(self) -> bool:
        return self.pattern == "*"

    def match(self, value: str) -> bool:
        if self._regex is None:
            return value == self.literal
        return (self._regex.fullmatch(value) is not None) != self.negated


def _translate(pattern: str) -> tuple[str, str | None]:
    """The regex for ``pattern``, and the plain string when it has no wildcard."""
    if not pattern:
        raise GlobError("empty pattern (use * to match anything)")
    out: list[str] = []
    plain: list[str] = []
    wild = False
    in_braces = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 == n:
                raise GlobError("trailing backslash")
            out.append(re.escape(pattern[i + 1]))
            plain.append(pattern[i + 1])
            i += 2
            continue
        if c == "*":
            out.append(".*")
            wild = True
        elif c == "?":
            out.append(".")
            wild = True
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "^") else i + 1)
            if pattern[i + 1 : i + 2] == "]" or pattern[i + 1 : i + 3] in ("!]", "^]"):
                raise GlobError(f"empty character class at position {i + 1}")
            if end < 0:
                raise GlobError(f"unterminated '[' at position {i + 1}")
            body = pattern[i + 1 : end]
            if body[0] in "!^":
                body = "^" + body[1:].replace("\\", "\\\\")
            else:
                body = body.replace("\\", "\\\\")
            try:
                re.compile(f"[{body}]")
            except re.error as exc:
                raise GlobError(f"bad character class at position {i + 1}: {exc}") from None
            out.append(f"[{body}]")
            wild = True
            i = end
        elif c == "{":
            if in_braces:
                raise GlobError(f"nested '{{' at position {i + 1}")
            if pattern.find("}", i) < 0:
                raise GlobError(f"unterminated '{{' at position {i + 1}")
            in_braces = True
            out.append("(?:")
            wild = True
        elif c == "}":
            if not in_braces:
                raise GlobError(f"'}}' without '{{' at position {i + 1}")
            in_braces = False
            out.append(")")
        elif c == "," and in_braces:
            out.append("|")
        elif c == "]":
            raise GlobError(f"']' without '[' at position {i + 1}")
        else:
            out.append(re.escape(c))
            plain.append(c)
        i += 1
    if in_braces:
        raise GlobError("unterminated '{'")
    return "".join(out), None if wild else "".join(plain)
