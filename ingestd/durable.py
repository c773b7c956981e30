"""Renames that survive a power cut: a promise made after a rename needs the directory synced.

``os.replace`` changes the directory, not the file: until the directory itself is fsynced,
a power cut may bring back the old entry (or none), even though the new file's data was
fsynced. Wherever a message is acknowledged, or anything else promised, after a rename
(the alert state's files), the rename goes through :func:`replace`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "replace"]


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (files created, renamed, removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target`` and make the rename durable. ``source``'s data
    must have been fsynced already: the rename may reach the disk before the data would."""
    os.replace(source, target)
    fsync_dir(target.parent)
