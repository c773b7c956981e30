"""The errors ingestd raises, and whether trying again can help.

    IngestdError          every error of ours; ``retriable`` says what to do next
     └── ConfigError      a setting or a file it names is wrong: fix it, then start again

Library errors are translated at the boundary with ``raise ... from``; messages say what
happened and what an operator can do about it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ConfigError", "IngestdError", "key_path"]

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


class IngestdError(Exception):
    """Base of every ingestd error."""

    retriable = False


class ConfigError(IngestdError):
    """The configuration (a setting, a file it names) is invalid; the message says where."""


def key_path(loc: Iterable[str | int]) -> str:
    """``rules.0.select`` for the place of a problem in a YAML document. A key that is not a
    plain word (a typo with a space, a newline, an empty key) is quoted, so a message stays
    on one line and says exactly which key it means."""
    parts = [
        str(p) if isinstance(p, int) or _PLAIN_KEY.fullmatch(str(p)) else repr(str(p)) for p in loc
    ]
    return ".".join(parts) or "(top level)"
