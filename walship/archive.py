"""The archive core: push a WAL file into a repository, fetch one back to a path.

Every command that moves WAL goes through here; the CLI only parses arguments and maps errors.

Push promises: the call returns only when the object is durably stored (the backend's ``put``
contract); pushing identical content again succeeds; different content under an existing name
raises :class:`~walship.errors.ContentConflict` and leaves the stored object untouched.
Nothing is stored into a repository written with another key (or none) or holding segments of
another size (:class:`~walship.errors.RepositoryMismatch`, see :mod:`walship.repository`), nor a
``.history`` file that does not parse as one (:class:`~walship.errors.IntegrityError`).

Fetch promises: the destination appears (by rename) only with complete, verified content;
:class:`~walship.errors.NotFound` is raised only when the repository holds WAL and
authoritatively lacks this file. An empty or absent repository is
:class:`~walship.errors.RepositoryMissing`, because "not found" would let PostgreSQL end
recovery early.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from walship import layout, wal
from walship.codec import Codec
from walship.errors import (AlreadyExists, ContentConflict, DiskFull, IntegrityError,
                            KeyMismatch, NotFound, RepositoryMissing, StorageError, UsageError)
from walship.storage.base import Storage

if TYPE_CHECKING:
    from walship.config import Settings

READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Transfer:
    """What one push or fetch did, for the log line."""

    action: str
    name: str
    outcome: str
    bytes_in: int
    bytes_out: int
    seconds: float


def archive_name(name: str) -> wal.ArchiveFile:
    """Parse a file name handed over by PostgreSQL, or raise a one-line usage error."""
    try:
        return wal.parse_name(name)
    except ValueError as error:
        raise UsageError(f"{name!r} is not a WAL file name", str(error),
                         "archive_command passes %p and restore_command %f %p") from None


def check_destination(destination: str | os.PathLike[str]) -> None:
    """Refuse an empty destination or one that is a directory, before anything is fetched
    (restore_command passes %p, the path of the file to write)."""
    if not os.fspath(destination):
        raise UsageError("no wal-fetch destination given", "the destination is empty",
                         "restore_command = 'walship wal-fetch %f %p'")
    if os.path.isdir(destination) and not os.path.islink(destination):
        raise UsageError(f"wal-fetch destination {destination} is a directory",
                         "the destination is the path of the file to write, %p",
                         "restore_command = 'walship wal-fetch %f %p'")


class ByteCounter:
    """Counts the bytes of an iterable as it is consumed."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.total += len(chunk)
            yield chunk


class Archive:
    """WAL operations on one repository with one codec."""

    def __init__(self, storage: Storage, codec: Codec) -> None:
        from walship.repository import RepositoryGuard

        self.storage = storage
        self.codec = codec
        self.guard = RepositoryGuard(storage, codec)

    def check_repository(self, segment_size: int | None = None, *,
                         wal_dir: str | os.PathLike[str] | None = None, name: str = "") -> None:
        """Refuse (:class:`~walship.errors.RepositoryMismatch`) to store anything into a
        repository written with another key (or none), or holding segments of another size
        than ``segment_size``; write the repository's marker where it has none (see
        :mod:`walship.repository`)."""
        self.guard.check(segment_size, wal_dir=None if wal_dir is None else str(wal_dir),
                         name=name)

    # -- push ----------------------------------------------------------------------------------
    def push_wal(self, path: str | os.PathLike[str]) -> Transfer:
        """Store the WAL file at ``path`` under its file name."""
        started = time.monotonic()
        path = Path(path)
        info = archive_name(path.name)
        key = layout.wal_key(path.name)
        handle = _open_wal(path)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if info.kind is wal.FileKind.SEGMENT:
                try:
                    wal.check_segment_size(size)
                except ValueError:
                    raise IntegrityError(f"WAL segment {path} has {size} bytes",
                                         "a segment is a power of two from 1 MiB to 1 GiB",
                                         "the file is incomplete or not a WAL segment") from None
            if info.kind is wal.FileKind.HISTORY:
                _check_history(handle, path, info.timeline)
            self.check_repository(size if info.kind is wal.FileKind.SEGMENT else None,
                                  wal_dir=path.parent, name=path.name)
            source = ByteCounter(self._read(handle))
            stored = self.codec.stored_form(key, source, size_hint=size)
            try:
                self.storage.put(key, stored, metadata=stored.metadata)
            except AlreadyExists as error:
                # (with mirrors: judged in every repository that holds the name)
                for holder in getattr(error, "holders", [self.storage]):
                    judged = self._judge_duplicate(path, key, started, holder)
                return judged
        if source.total != size:
            # PostgreSQL never changes a file it is archiving; a change means something is wrong.
            raise IntegrityError(f"WAL file {path} changed size while being archived",
                                 f"{size} bytes before, {source.total} read",
                                 "check that nothing but PostgreSQL writes to pg_wal")
        return Transfer("wal-push", path.name, "stored", source.total, stored.size,
                        time.monotonic() - started)

    @staticmethod
    def _read(handle: object) -> Iterator[bytes]:
        while chunk := handle.read(READ_SIZE):  # type: ignore[attr-defined]
            yield chunk

    def _judge_duplicate(self, path: Path, key: str, started: float,
                         storage: Storage) -> Transfer:
        """The name is taken: succeed if the stored content is identical, else refuse loudly.

        The stored object is downloaded, verified and compared with the file byte for byte
        (a rare path: a push repeated after a crash, or several servers pushing the same WAL).
        """
        size = 0
        same = True
        try:
            with storage.get(key) as download, _open_wal(path) as local:
                # (read to the end even after a difference: a damaged copy is told as such)
                for chunk in self.codec.decode(key, download, download.info.metadata):
                    if same:
                        mine = local.read(len(chunk))
                        size += len(mine)
                        same = mine == chunk
                same = same and not local.read(1)
        except KeyMismatch as error:
            raise ContentConflict(f"WAL file {path.name} is already archived and cannot be "
                                  "compared", f"{error.what}; the stored copy is left untouched",
                                  "check that every server uses the same key and repository"
                                  ) from None
        except IntegrityError as error:
            raise ContentConflict(f"WAL file {path.name} is already archived and its stored "
                                  "copy is damaged", f"{error.why}; it is left untouched and "
                                  "this file was not archived", "run walship wal-verify --deep "
                                  "and remove the damaged object") from None
        if same:
            return Transfer("wal-push", path.name, "already stored, identical", size, 0,
                            time.monotonic() - started)
        raise ContentConflict(f"WAL file {path.name} is already archived with DIFFERENT "
                              "content", "the stored copy is left untouched and this file was "
                              "not archived", "is another cluster archiving into this "
                              "repository? Give each cluster its own repository")

    # -- fetch ---------------------------------------------------------------------------------
    def fetch_wal(self, name: str, destination: str | os.PathLike[str], *,
                  prove_absence: bool = True) -> Transfer:
        """Write the archived file ``name`` to ``destination``, complete and verified.

        A missing ``name`` raises :class:`NotFound` only once the repository is seen to hold
        WAL at all (else :class:`RepositoryMissing`: an empty or wrong repository proves
        nothing); ``prove_absence=False`` skips that request, for a caller to whom "not found"
        only means "not archived yet" (the prefetch worker reaching ahead of the archive).
        """
        try:
            return self._fetch_wal_from(self.storage, name, destination, prove_absence)
        except IntegrityError:
            if not hasattr(self.storage, "members"):
                raise
            from walship.storage.mirrored import read_elsewhere

            return read_elsewhere(self.storage, lambda storage: self._fetch_wal_from(
                storage, name, destination, prove_absence))

    def wal_chunks(self, name: str) -> Iterator[bytes]:
        """The decoded content of the archived WAL file ``name``, chunk by chunk, for a reader
        that does not need it on disk. The codec checks it as it is read, the object's digest
        or authentication at its end: nothing read from it is trustworthy until the iterator
        is exhausted without error. NotFound if it is not archived."""
        key = layout.wal_key(name)
        with self.storage.get(key) as download:
            yield from self.codec.decode(key, download, download.info.metadata)

    def _fetch_wal_from(self, storage: Storage, name: str,
                        destination: str | os.PathLike[str], prove_absence: bool) -> Transfer:
        started = time.monotonic()
        info = archive_name(name)
        check_destination(destination)
        key = layout.wal_key(name)
        destination = Path(destination)
        owner = _destination_owner(destination)
        try:
            download = storage.get(key)
        except NotFound:
            if prove_absence and not self._holds_wal(storage):
                raise RepositoryMissing(f"the repository {storage.url} holds no WAL at "
                                        "all", f"so the absence of {name} proves nothing",
                                        "check the repository URL, prefix and mount") from None
            raise
        temp = destination.with_name(f".{destination.name}.walship-{secrets.token_hex(4)}")
        written = 0
        try:
            with download, _create(temp, owner) as out:
                metadata = download.info.metadata
                for chunk in self.codec.decode(key, download, metadata):
                    out.write(chunk)
                    written += len(chunk)
            if info.kind is wal.FileKind.SEGMENT:
                try:
                    wal.check_segment_size(written)
                except ValueError:
                    raise IntegrityError(f"archived segment {name} has {written} bytes",
                                         "a segment is a power of two from 1 MiB to 1 GiB",
                                         "the archived object is damaged") from None
            # No fsync: PostgreSQL reads the file at once and, after a crash, fetches it again.
            os.replace(temp, destination)
        except OSError as error:
            _unlink_quietly(temp)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(str(destination.parent), name) from None
            raise
        except BaseException:
            _unlink_quietly(temp)
            raise
        sweep_leftovers(destination.parent)
        return Transfer("wal-fetch", name, "delivered", download.info.size, written,
                        time.monotonic() - started)

    def _holds_wal(self, storage: Storage) -> bool:
        """Whether the repository holds any WAL, which makes a missing file authoritative
        (one small request: a listing of at most one object)."""
        for _ in storage.list(layout.WAL_PREFIX, limit=1):
            return True
        return False


MAX_HISTORY_BYTES = 1 << 20  # a timeline history file has one short line per timeline


def _check_history(handle: object, path: Path, timeline: int) -> None:
    """Refuse a ``.history`` file that is not one (read from ``handle``, then rewound): a
    damaged history file in the archive would mislead every later recovery and timeline
    switch. IntegrityError, like a segment of impossible size: the input file is corrupt."""
    data = handle.read(MAX_HISTORY_BYTES + 1)  # type: ignore[attr-defined]
    handle.seek(0)  # type: ignore[attr-defined]
    try:
        if len(data) > MAX_HISTORY_BYTES:
            raise ValueError(f"more than {MAX_HISTORY_BYTES} bytes")
        # (latin-1 decodes any byte: a restore point's name in the reason may be in any
        # encoding; the structure is what is checked)
        entries = wal.parse_history(data.decode("latin-1"))
        if not entries:
            raise ValueError("it names no parent timeline")
        if entries[-1].parent >= timeline:
            raise ValueError(f"it names timeline {entries[-1].parent} as a parent of "
                             f"timeline {timeline}")
    except ValueError as error:
        raise IntegrityError(f"timeline history file {path} is not one", str(error),
                             "the file is damaged or not PostgreSQL's: it was not archived"
                             ) from None


def open_archive(settings: Settings, deadline: float | None = None) -> Archive:
    """The archive that ``settings`` describe: their repository, key and compression level;
    ``deadline`` (a :func:`time.monotonic` instant) bounds every storage request."""
    from walship.storage import open_storage

    key = None
    if settings.encryption_key_file:
        from walship.codec.keys import load_key_file

        key = load_key_file(settings.encryption_key_file)
    storage = open_storage(settings.require_repo(), settings.storage_options(deadline))
    if settings.mirrors or settings.read_only_primary:  # (a read member, never written)
        from walship.storage.mirrored import open_mirrored

        storage = open_mirrored(storage, settings, deadline)
    return Archive(storage, Codec(level=settings.compression_level, key=key))


def disk_full(directory: str, name: str) -> DiskFull:
    """The error of a file that could not be written for lack of space."""
    return DiskFull(f"cannot write {name} into {directory}", "no space left on its filesystem",
                    "free space there; walship's prefetch cache leaves cache_min_free_mb free "
                    "and holds at most cache_max_mb")


def _open_wal(path: Path):  # -> a binary file object, unbuffered
    """Open a WAL file to read, refusing at once anything but a regular file (opened without
    blocking, so that a FIFO never hangs the call)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UsageError(f"cannot read WAL file {path}", os.strerror(error.errno or 0),
                         "archive_command must pass %p, relative to the data directory"
                         ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) \
            else "not a regular file"
        raise UsageError(f"WAL file {path} is not a regular file", f"it is {kind}",
                         "archive_command must pass %p, a file in pg_wal")
    return os.fdopen(fd, "rb", buffering=0)


def _destination_owner(destination: Path) -> tuple[int, int] | None:
    """Refuse a destination whose directory does not exist (walship creates no directory on the
    way to it). Returns the (uid, gid) the delivered file must get: the directory's owner's
    when root writes into another user's directory (the postgres user's pg_wal), so that the
    file is that user's like any other there; None otherwise."""
    try:
        st = os.stat(destination.parent)
        why = "" if stat.S_ISDIR(st.st_mode) else "it is not a directory"
    except OSError as error:
        why = os.strerror(error.errno or 0)
    if why:
        raise UsageError(f"cannot write {destination}: no directory {destination.parent}", why,
                         "restore_command passes %p, a file in pg_wal; walship creates no "
                         "directories")
    if os.geteuid() == 0 and st.st_uid != 0:
        return st.st_uid, st.st_gid
    return None


def _create(path: Path, owner: tuple[int, int] | None):  # noqa: ANN202 - a binary file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        if owner is not None:
            os.fchown(fd, *owner)
    except OSError as error:
        raise StorageError(f"cannot write {path}", os.strerror(error.errno or 0),
                           "restore_command must be able to write into pg_wal") from None
    return os.fdopen(fd, "wb")


LEFTOVER_SECONDS = 3600.0  # a temporary file this old belongs to no call in progress


def sweep_leftovers(directory: Path) -> None:
    """Delete the temporary files (``.NAME.walship-XXXXXXXX``) that fetches killed before
    their rename left in ``directory``, once older than any call lives: a call in progress
    keeps writing its own, so it is never swept from under it."""
    now = time.time()
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                stem, mark, token = entry.name.rpartition(".walship-")
                if not (stem.startswith(".") and mark and len(token) == 8):
                    continue  # (temp names: see fetch_wal)
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime > LEFTOVER_SECONDS:
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
