"""Push-ahead: a wal-push call also uploads, in parallel, further segments that PostgreSQL has
marked ``.ready``, and records each durable upload so that PostgreSQL's later calls for them
return at once (see :mod:`walship.fastpath`).

PostgreSQL's ``archive_status`` files are only read, never renamed: PostgreSQL still calls
archive_command for every file and marks it done itself. A record is written only after the
object is durably stored, and is trusted only while the file still matches it. One call at a
time pushes ahead (``push.lock``); a concurrent call just pushes its own file.
"""

from __future__ import annotations

import fcntl
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from walship import spool, wal
from walship.archive import Transfer

if TYPE_CHECKING:
    from walship.archive import Archive
    from walship.config import Settings


def _ready(status_dir: Path, own: str, limit: int, records: Path, fingerprint: str) -> list[str]:
    """The ``limit`` next files PostgreSQL will ask to archive (history files first, then by
    name, as its archiver does), skipping ``own`` and files already recorded."""
    try:
        entries = os.listdir(status_dir)
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        if not entry.endswith(".ready"):
            continue
        name = entry[:-len(".ready")]
        try:
            wal.parse_name(name)
        except ValueError:
            continue
        if name != own and not (records / name).exists():
            names.append(name)
    names.sort(key=lambda n: (not n.endswith(".history"), n))
    return names[:limit]


def _push_one(archive: Archive, path: Path, fingerprint: str) -> bool:
    before = spool.file_fingerprint(str(path))
    archive.push_wal(path)
    if spool.file_fingerprint(str(path)) != before:
        return False
    spool.record_pushed(str(path.parent), path.name, before, fingerprint)
    return True


def push(archive: Archive, settings: Settings, path: str | os.PathLike[str]) -> Transfer:
    """Push ``path``; alongside, push up to ``settings.push_ahead`` other ready files."""
    path = Path(path)
    if settings.push_ahead == 0:
        return archive.push_wal(path)
    wal_dir = path.parent
    root = Path(spool.spool_dir(str(wal_dir)))
    records = root / "pushed"
    try:
        records.mkdir(parents=True, exist_ok=True)
        lock = os.open(root / "push.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return archive.push_wal(path)  # no spool (read-only pg_wal?): plain push
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return archive.push_wal(path)
        fingerprint = spool.settings_fingerprint()
        for stale in os.listdir(records):  # records of files PostgreSQL no longer has
            if not (wal_dir / stale).exists():
                (records / stale).unlink(missing_ok=True)
        ahead = _ready(wal_dir / "archive_status", path.name, settings.push_ahead, records,
                       fingerprint)
        with ThreadPoolExecutor(max(1, settings.parallel)) as pool:
            own = pool.submit(archive.push_wal, path)
            others = [(name, pool.submit(_push_one, archive, wal_dir / name, fingerprint))
                      for name in ahead]
            try:
                result = own.result()
            finally:
                done = 0
                for name, future in others:
                    try:
                        done += bool(future.result())
                    except Exception as error:  # noqa: BLE001 - PostgreSQL will ask again
                        if settings.debug:
                            print(f"walship: push-ahead {name}: {error}", file=sys.stderr)
    finally:
        os.close(lock)
    if done:
        result = Transfer(result.action, result.name, f"{result.outcome} (+{done} ahead)",
                          result.bytes_in, result.bytes_out, result.seconds)
    return result
