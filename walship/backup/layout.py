"""Where a base backup lives in a repository: its name and the keys of its objects.

A backup is the set of objects under ``backups/<NAME>/``:

* ``backups/<NAME>/part.NNNNN``: data parts, numbered from 00001, each a POSIX tar stream;
* ``backups/<NAME>/blockmap.NNNNN``: the per-block digests of the large relation files of part
  NNNNN (see :mod:`walship.backup.blocks`), read by the next backup to find changed blocks;
* ``backups/<NAME>/manifest``: the JSON manifest, written LAST. It is the commit point: a backup
  without a manifest is incomplete and is never listed as usable nor restored.

``NAME`` is the UTC start time ``YYYYMMDDTHHMMSSZ``, with ``-2``, ``-3``... appended when that
name is already taken, so names sort by start time. Every object goes through the repository's
codec like a WAL file does (compression, optional encryption, name-bound digest).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

BACKUP_PREFIX = "backups/"
MANIFEST = "manifest"
PART_PREFIX = "part."
BLOCK_MAP_PREFIX = "blockmap."
NAME_PATTERN = re.compile(r"^(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<suffix>[1-9]\d{0,5}))?$")
_PART = re.compile(r"^part\.(\d{5,})$")


def base_name(start: datetime) -> str:
    """The name a backup started at ``start`` gets when nothing else has it."""
    return start.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def with_suffix(name: str, attempt: int) -> str:
    """The ``attempt``-th name to try (1 = the plain name, 2 = ``NAME-2``...)."""
    return name if attempt <= 1 else f"{name}-{attempt}"


def is_backup_name(name: str) -> bool:
    return name.isascii() and bool(NAME_PATTERN.fullmatch(name))  # ($ would take a "\n")


def sort_key(name: str) -> tuple[str, int]:
    """Orders names by start time, then suffix (``-10`` after ``-9``)."""
    match = NAME_PATTERN.match(name)
    if not match:
        return (name, 0)
    return (match["stamp"], int(match["suffix"] or 1))


def backup_prefix(name: str) -> str:
    """The prefix every object of backup ``name`` starts with (trailing slash included)."""
    return f"{BACKUP_PREFIX}{name}/"


def manifest_key(name: str) -> str:
    return backup_prefix(name) + MANIFEST


def part_key(name: str, number: int) -> str:
    return f"{backup_prefix(name)}{PART_PREFIX}{number:05d}"


def block_map_key(name: str, number: int) -> str:
    return f"{backup_prefix(name)}{BLOCK_MAP_PREFIX}{number:05d}"


def split_key(key: str) -> tuple[str, str] | None:
    """``(backup name, object)`` for a key under ``backups/``, else None."""
    if not key.startswith(BACKUP_PREFIX):
        return None
    rest = key[len(BACKUP_PREFIX):]
    name, sep, obj = rest.partition("/")
    if not sep or not is_backup_name(name) or "/" in obj:
        return None
    return name, obj


def part_number(obj: str) -> int | None:
    """The number of a part object name (``part.00003`` -> 3), else None."""
    match = _PART.match(obj)
    return int(match[1]) if match else None
