"""``backup-verify``: is a stored backup restorable? Every byte is checked, nothing is written.

Every part is downloaded and decoded through the codec (its digest and, when encrypted, its
authentication checked) and unpacked by the same machinery as ``backup-fetch``
(:mod:`walship.backup.unpack`), into a sink that only hashes: every file's SHA-256 and size must
match the manifest, every file the manifest lists must be present, nothing else may be. Then the
WAL range the backup needs to become consistent (its start to its stop segment) must be in the
archive. Block-delta files (:mod:`walship.backup.blocks`) are rebuilt as a restore rebuilds
them, the parts read backup by backup along the chain, each piece checked against the SHA-256
and size the manifest records for it, into a scratch directory (``scratch``, by default the
system's temporary directory; it needs room for those files, only while the verification runs),
and each rebuilt file's size and SHA-256 checked against the manifest. The block maps of the
backup and of every backup of its chain (what the next differential or incremental backup
compares against) are read and checked too. Damage raises
:class:`~walship.errors.IntegrityError`; missing WAL is reported in the result (the caller
decides how to fail).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from walship.archive import Archive
from walship.backup import catalog
from walship.backup.blocks import check_chain_maps
from walship.backup.manifest import Manifest, PartEntry
from walship.backup.parts import Cancelled
from walship.backup.progress import Progress
from walship.backup.unpack import HashSink, check_rebuilt, read_parts, write_blocks
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


class RebuildSink(HashSink):
    """Checks every file like :class:`HashSink`, and rebuilds the block-delta files in
    ``scratch`` (named by their number in the manifest) to check them whole."""

    phased = True

    def __init__(self, manifest: Manifest, scratch: Path, progress: Progress | None = None
                 ) -> None:
        super().__init__(manifest, progress)
        self.scratch = scratch
        self.number = {f.path: str(n) for n, f in enumerate(manifest.files) if f.pieces}

    def member(self, part: PartEntry, member: tarfile.TarInfo, data: Iterator[memoryview]
               ) -> None:
        if member.name not in self.number:
            return super().member(part, member, data)
        entry = self.claim(part, member)  # (the base's own size and SHA-256)
        if entry is None:
            return
        import hashlib

        digest = hashlib.sha256()
        size = 0
        path = self.scratch / self.number[entry.path]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb", buffering=0) as out:
            for chunk in data:
                if self.cancel.is_set():
                    raise Cancelled(entry.path)
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                self.advance(len(chunk))
        self.verify(entry, digest.hexdigest(), size)

    def apply_blocks(self, entry, index, blocks) -> None:  # type: ignore[no-untyped-def]
        create = self.first_blocks(entry, index)
        write_blocks(self.scratch / self.number[entry.path], blocks, self.manifest.block_size,
                     create=create, mode=0o600)

    def finish(self) -> None:
        """Check every rebuilt file whole, removing each once checked."""
        for entry in self.rebuilt_files():
            path = self.scratch / self.number[entry.path]
            check_rebuilt(path, entry, self.manifest.block_size, self.cancel)
            path.unlink()


def verify_backup(archive: Archive, name: str, *, parallel: int = 3,
                  progress: Progress | None = None,
                  scratch: str | os.PathLike[str] | None = None) -> BackupVerification:
    """Verify backup ``name`` (or ``LATEST``); raise IntegrityError on any damage.
    ``scratch``: where block-delta files are rebuilt (see the module docstring)."""
    started = time.monotonic()
    manifest = catalog.resolve(archive, name)
    catalog.check_chain(archive, manifest)
    stored = check_chain_maps(archive, manifest)
    rebuilds = any(f.pieces for f in manifest.files)
    with tempfile.TemporaryDirectory(prefix="walship-verify-", dir=scratch) as place:
        sink = (RebuildSink(manifest, Path(place), progress) if rebuilds
                else HashSink(manifest, progress))
        if progress is not None:
            progress.start(manifest.size)
        try:
            stored += read_parts(archive, manifest, sink, parallel)
        finally:
            if progress is not None:
                progress.finish()
        missing = sink.missing()
        if missing:
            raise IntegrityError(f"backup {manifest.name} lacks {len(missing)} files its "
                                 "manifest lists", f"e.g. {sorted(missing)[0]}",
                                 "the repository was tampered with")
        if isinstance(sink, RebuildSink):
            sink.finish()
    wal_missing = catalog.WalIndex(archive).missing(manifest)
    return BackupVerification(manifest, stored, sink.done, time.monotonic() - started,
                              tuple(wal_missing))
