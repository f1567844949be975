"""``backup-verify``: is a stored backup restorable? Every byte is checked, nothing is written.

Every part is downloaded and decoded through the codec (its digest and, when encrypted, its
authentication checked) and unpacked by the same machinery as ``backup-fetch``
(:mod:`walship.backup.unpack`), into a sink that only hashes: every file's SHA-256 and size must
match the manifest, every file the manifest lists must be present, nothing else may be. Then the
WAL range the backup needs to become consistent (its start to its stop segment) must be in the
archive. Block-delta files (:mod:`walship.backup.blocks`) are rebuilt as a restore rebuilds
them, the parts read backup by backup along the chain, each piece checked against the SHA-256
and size the manifest records for it, and each rebuilt file's size and digest checked against
the manifest. A file the manifest knows by the SHA-256 of its block digests (every block-delta
file walship writes now) is rebuilt as its block digests only: 16 bytes a block in a scratch
directory (``scratch``, by default the system's temporary directory), 1/512 of the file with 8
KiB blocks, plus its blocks shorter than a block; the digest is then the one a restore
computes from the file it wrote. Older manifests' block-delta files, known by their whole
SHA-256, are rebuilt whole in the scratch directory (it then needs room for them). The block
maps of the backup and of every backup of its chain (what the next differential or incremental
backup compares against) are read and checked too. Damage raises
:class:`~walship.errors.IntegrityError`; missing WAL is reported in the result (the caller
decides how to fail).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from walship.archive import Archive
from walship.backup import catalog
from walship.backup.blocks import DIGEST_SIZE, block_digests, check_chain_maps, digest
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


class _BlockDigests:
    """What a rebuilt block-delta file would hold, without the file: the digest of each block
    (16 bytes a block, in a scratch file: 1/512 of the file's size with 8 KiB blocks), the
    bytes of its blocks shorter than a block, and its length. :meth:`write` is a ``pwrite``
    of ``data`` at ``block * block_size`` (a block, or the file's last, shorter one, or a run
    of blocks from the base), as a restore writes it; :meth:`final_digest` the SHA-256 of the
    block digests of the file cut or extended to ``size``, as a restore's check computes it
    (see :func:`walship.backup.unpack.check_rebuilt`)."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.block_size = block_size
        self.length = 0
        self.partial: dict[int, bytes] = {}  # block -> its bytes, when shorter than a block
        self.unknown: set[int] = set()  # partial blocks whose bytes past their own are unknown
        self._carry = b""  # the base's bytes past its last whole block, streamed so far
        self._next = 0  # the base's next block

    def base(self, chunk: memoryview | bytes) -> None:
        """The next bytes of a base stored whole (from its first byte on)."""
        data = self._carry + bytes(chunk) if self._carry else chunk
        whole = len(data) - len(data) % self.block_size
        if whole:
            os.pwrite(self.fd, block_digests(data[:whole], self.block_size),
                      self._next * DIGEST_SIZE)
            self._next += whole // self.block_size
            self.length = self._next * self.block_size
        self._carry = bytes(data[whole:])

    def end_base(self) -> None:
        if self._carry:
            self.write(self._next, self._carry)
            self._carry = b""

    def write(self, block: int, data: memoryview | bytes) -> None:
        size = self.block_size
        if len(data) == size:
            os.pwrite(self.fd, digest(data), block * DIGEST_SIZE)
            self.partial.pop(block, None)
            self.unknown.discard(block)
        else:
            start = block * size
            if start >= self.length:
                old = b""
            else:
                old = self.partial.get(block)  # None: a whole block, known by its digest only
            if old is None or block in self.unknown:  # (only its first bytes are known)
                self.unknown.add(block)
                old = self.partial.get(block, b"")
            self.partial[block] = bytes(data) + old[len(data):]
        self.length = max(self.length, block * size + len(data))

    def final_digest(self, size: int) -> str | None:
        """The SHA-256 of the block digests of the file cut or extended to ``size`` bytes;
        None when that depends on bytes not known here (a short write over a whole block, or
        a cut within one: never made by PostgreSQL, which extends and truncates relation
        files by whole blocks)."""
        bs = self.block_size
        result = hashlib.sha256()
        zeros = bytes(bs)
        hole = bytes(DIGEST_SIZE)  # (a digest never written reads as zeros)
        per_read = (1 << 20) // DIGEST_SIZE
        count = -(-size // bs)
        for first in range(0, count, per_read):
            stored = os.pread(self.fd, min(per_read, count - first) * DIGEST_SIZE,
                              first * DIGEST_SIZE)
            for i in range(first, min(count, first + per_read)):
                want = min(bs, size - i * bs)
                at = (i - first) * DIGEST_SIZE
                value = stored[at:at + DIGEST_SIZE]
                if i * bs >= self.length:
                    value = digest(zeros[:want])
                elif i in self.partial:
                    have = self.partial[i]
                    if i in self.unknown and want > len(have):
                        return None
                    value = digest((have + zeros)[:want])
                elif len(value) < DIGEST_SIZE or value == hole:
                    value = digest(zeros[:want])  # a hole left by a later, farther write
                elif want < bs:
                    return None
                result.update(value)
        return result.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


class RebuildSink(HashSink):
    """Checks every file like :class:`HashSink`, and rebuilds the block-delta files to check
    them whole: in ``scratch`` (named by their number in the manifest), or, for a file the
    manifest knows by its block digests alone (``blocks_sha256``, no ``sha256``: what a
    restore checks then) and not listed in ``whole``, as their block digests only
    (:class:`_BlockDigests`)."""

    phased = True

    def __init__(self, manifest: Manifest, scratch: Path, progress: Progress | None = None,
                 whole: frozenset[str] = frozenset()) -> None:
        super().__init__(manifest, progress)
        self.scratch = scratch
        self.number = {f.path: str(n) for n, f in enumerate(manifest.files) if f.pieces}
        self.digests: dict[str, _BlockDigests] = {}
        self.by_digest = frozenset(f.path for f in manifest.files if f.pieces and not f.sha256
                                   and f.blocks_sha256 and f.path not in whole)

    def _digests(self, path: str) -> _BlockDigests:
        with self._lock:
            found = self.digests.get(path)
            if found is None:
                found = self.digests[path] = _BlockDigests(
                    self.scratch / f"{self.number[path]}.digests", self.manifest.block_size)
            return found

    def member(self, part: PartEntry, member: tarfile.TarInfo, data: Iterator[memoryview]
               ) -> None:
        if member.name not in self.number:
            return super().member(part, member, data)
        entry = self.claim(part, member)  # (the base's own size and SHA-256)
        if entry is None:
            return
        with contextlib.ExitStack() as done:
            if entry.path in self.by_digest:
                state = self._digests(entry.path)
                use: Callable[[memoryview], object] = state.base
                done.callback(state.end_base)
            else:
                fd = os.open(self.scratch / self.number[entry.path],
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                use = done.enter_context(open(fd, "wb", buffering=0)).write
            digest_ = hashlib.sha256()
            size = 0
            for chunk in data:
                if self.cancel.is_set():
                    raise Cancelled(entry.path)
                digest_.update(chunk)
                use(chunk)
                size += len(chunk)
                self.advance(len(chunk))
        self.verify(entry, digest_.hexdigest(), size)

    def apply_blocks(self, entry, index, blocks) -> None:  # type: ignore[no-untyped-def]
        create = self.first_blocks(entry, index)
        if entry.path in self.by_digest:
            state = self._digests(entry.path)
            for number, data in blocks:
                state.write(number, data)
            return
        write_blocks(self.scratch / self.number[entry.path], blocks, self.manifest.block_size,
                     create=create, mode=0o600)

    def finish(self) -> list[str]:
        """Check every rebuilt file whole, removing each once checked; return the files known
        by their block digests whose final digest depends on bytes these do not keep (see
        :meth:`_BlockDigests.final_digest`): to be rebuilt whole."""
        undecided = []
        for entry in self.rebuilt_files():
            if entry.path in self.by_digest:
                state = self.digests.pop(entry.path)
                try:
                    found = state.final_digest(entry.size)
                finally:
                    state.close()
                    (self.scratch / f"{self.number[entry.path]}.digests").unlink()
                if found is None:
                    undecided.append(entry.path)
                elif found != entry.blocks_sha256:
                    raise IntegrityError(f"file {entry.path} rebuilt from its pieces is "
                                         "damaged", "the SHA-256 of its block digests does "
                                         "not match the manifest",
                                         "the repository was tampered with")
                continue
            path = self.scratch / self.number[entry.path]
            check_rebuilt(path, entry, self.manifest.block_size, self.cancel)
            path.unlink()
        return undecided

    def close(self) -> None:
        for state in self.digests.values():
            state.close()
        self.digests.clear()


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
    whole: frozenset[str] = frozenset()
    with tempfile.TemporaryDirectory(prefix="walship-verify-", dir=scratch) as place:
        while True:
            sink = (RebuildSink(manifest, Path(place), progress, whole) if rebuilds
                    else HashSink(manifest, progress))
            if progress is not None:
                progress.start(manifest.size)
            try:
                try:
                    stored += read_parts(archive, manifest, sink, parallel)
                finally:
                    if progress is not None:
                        progress.finish()
                missing = sink.missing()
                if missing:
                    raise IntegrityError(f"backup {manifest.name} lacks {len(missing)} files "
                                         "its manifest lists", f"e.g. {min(missing)}",
                                         "the repository was tampered with")
                undecided = sink.finish() if isinstance(sink, RebuildSink) else []
            finally:
                if isinstance(sink, RebuildSink):
                    sink.close()
            if not undecided or whole:
                break
            whole = frozenset(undecided)
            # (never seen: files whose digests alone cannot decide; read again, rebuilt whole)
    wal_missing = catalog.WalIndex(archive).missing(manifest)
    return BackupVerification(manifest, stored, sink.done, time.monotonic() - started,
                              tuple(wal_missing))
