"""The errors ingestd raises, and whether trying again can help.

    IngestdError          every error of ours; ``retriable`` says what to do next
     └── ConfigError      a setting or a file it names is wrong: fix it, then start again

Library errors are translated at the boundary with ``raise ... from``; messages say what
happened and what an operator can do about it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "IngestdError"]


class IngestdError(Exception):
    """Base of every ingestd error."""

    retriable = False


class ConfigError(IngestdError):
    """The configuration (a setting, a file it names) is invalid; the message says where."""
