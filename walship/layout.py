"""Where things live in a repository: the object keys of WAL files, backups and the marker.

Keys are deterministic, so fetching a WAL file is one GET with no listing:

* ``walship.json``: the repository marker, written (create-only) by the first push: whether
  the repository is encrypted, with which key id, and its WAL segment size. A push that does
  not match it is refused before it stores anything (see :mod:`walship.repository`).
* ``wal/<file name>``: every file PostgreSQL archives (segments, ``.partial``, ``.history``,
  ``.backup``). Segment names start with their timeline, so ``wal/<TTTTTTTT>`` lists a timeline.
"""

from __future__ import annotations

MARKER_KEY = "walship.json"
LAYOUT_VERSION = 1
WAL_PREFIX = "wal/"


def wal_key(file_name: str) -> str:
    """The key of an archived WAL, history, partial or backup-label file."""
    return WAL_PREFIX + file_name


def wal_name(key: str) -> str:
    """The file name stored under a WAL key."""
    if not key.startswith(WAL_PREFIX):
        raise ValueError(f"not a WAL key: {key!r}")
    return key[len(WAL_PREFIX):]
