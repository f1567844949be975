"""``backup-verify``: is a stored backup restorable? Every byte is checked, nothing is written.

Every part is downloaded and decoded through the codec (its digest and, when encrypted, its
authentication checked) and unpacked by the same machinery as ``backup-fetch``
(:mod:`walship.backup.unpack`), into a sink that only hashes: every file's SHA-256 and size must
match the manifest, every file the manifest lists must be present, nothing else may be. Then the
WAL range the backup needs to become consistent (its start to its stop segment) must be in the
archive. The block maps (what the next differential or incremental backup compares against)
are read and checked too. Block-delta files are checked piece by piece: the base and each
backup's changed blocks must have the SHA-256 and size the manifest records for that piece
(the object digests already cover every byte); the rebuilt file's own SHA-256 is checked by a
restore, which rebuilds it. Damage raises :class:`~walship.errors.IntegrityError`; missing WAL
is reported in the result (the caller decides how to fail).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from walship.archive import Archive
from walship.backup import catalog
from walship.backup.blocks import check_maps
from walship.backup.manifest import Manifest
from walship.backup.progress import Progress
from walship.backup.unpack import HashSink, read_parts
from walship.errors import IntegrityError


@dataclass(frozen=True)
class BackupVerification:
    """A backup whose every file checked out; ``wal_missing`` lists the segments it needs that
    the archive lacks (empty: restorable)."""

    manifest: Manifest
    stored_bytes: int
    file_bytes: int
    seconds: float
    wal_missing: tuple[str, ...]

    @property
    def restorable(self) -> bool:
        return not self.wal_missing


def verify_backup(archive: Archive, name: str, *, parallel: int = 3,
                  progress: Progress | None = None) -> BackupVerification:
    """Verify backup ``name`` (or ``LATEST``); raise IntegrityError on any damage."""
    started = time.monotonic()
    manifest = catalog.resolve(archive, name)
    catalog.check_chain(archive, manifest)
    sink = HashSink(manifest, progress)
    if progress is not None:
        progress.start(manifest.size)
    try:
        stored = read_parts(archive, manifest, sink, parallel)
    finally:
        if progress is not None:
            progress.finish()
    missing = sink.missing()
    if missing:
        raise IntegrityError(f"backup {manifest.name} lacks {len(missing)} files its manifest "
                             "lists", f"e.g. {sorted(missing)[0]}",
                             "the repository was tampered with")
    stored += check_maps(archive, manifest)
    wal_missing = catalog.WalIndex(archive).missing(manifest)
    return BackupVerification(manifest, stored, sink.done, time.monotonic() - started,
                              tuple(wal_missing))
