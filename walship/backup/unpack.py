"""Reading a backup's parts back: download, decode, untar, and check every file against the
manifest, handing each file's bytes to a *sink*.

Shared by ``backup-fetch`` (its sink writes the files into a data directory) and
``backup-verify`` (:class:`HashSink` only hashes them). Whatever the sink, the same checks run:
every part is decoded through the codec, its stored bytes checked against the object digest the
manifest records for it (or, for manifests without one, the part's own); it must be a tar stream
of exactly the size the manifest records; every member must be a regular file the manifest lists
in that part, with its size, seen once. A part checked against the manifest's digest has every
byte checked against the manifest, so ``backup-fetch`` need not hash each file again
(:attr:`PartSink.rehash`); ``backup-verify`` and parts without it check each file's SHA-256.
Nothing a fetch writes counts until its part's check has passed: a failure removes it all.
Parts are read ``parallel`` at a time; the first failure cancels the others.

A differential or incremental backup also reads the parts of older backups its manifest
references (checked against the digests its manifest copied): of those, only the members the
manifest assigns to that part are handed to the sink, the others are read (the part's digest
covers them) and dropped.

Block-delta files (:mod:`walship.backup.blocks`): each piece's own bytes (the base member, or
a piece's block members in order) must have the size and SHA-256 its manifest entry records.
A sink that rebuilds files (``phased``) gets the parts backup by backup, oldest first (the
parts of one backup in parallel), each backup's pieces checked before the next backup starts,
so a delta is never applied before its base or an older delta of the same file.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

from walship.archive import Archive
from walship.backup import layout
from walship.backup.blocks import block_digests, decode_blocks, split_member
from walship.backup.manifest import PIECE_BLOCKS, PIECE_FILE, FileEntry, Manifest, PartEntry
from walship.backup.parts import Cancelled, TarReader, pipelined
from walship.backup.progress import NullProgress, Progress
from walship.codec import OBJECT_DIGEST_METADATA
from walship.errors import IntegrityError, NotFound, StorageError


class PartSink:
    """Receives the files of a backup's parts (shared by the part workers); subclasses
    implement :meth:`member`, which must read ``data`` to its end and, when :meth:`must_hash`
    says so, hash it and call :meth:`verify`."""

    rehash = True  # check each file's SHA-256 even in a part the manifest's digest covers
    phased = False  # block pieces applied in order: parts read backup by backup

    def __init__(self, manifest: Manifest, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.manifest = manifest
        self.expected = {f.path: f for f in manifest.files}
        self.pieces_at: dict[tuple[str, int], dict[str, int]] = {}
        for entry in manifest.files:
            for index, piece in enumerate(entry.pieces):
                self.pieces_at.setdefault(piece.holder, {})[entry.path] = index
        self.piece_hashes: dict[tuple[str, int], list] = {}  # type: ignore[type-arg]
        self.applied: dict[str, int] = {}  # pieces of each file checked, phase after phase
        self._created: set[str] = set()  # block-delta files whose base is in blocks, begun
        self.seen: set[str] = set()
        self.done = 0  # file bytes handled
        self._lock = threading.Lock()
        self._progress = progress or NullProgress()
        self.cancel = cancel or threading.Event()

    def claim(self, part: PartEntry, member: tarfile.TarInfo) -> FileEntry | None:
        """The manifest's entry for ``member`` of ``part``, or IntegrityError; None for a
        member of another backup's part that this backup takes from elsewhere (skip it)."""
        entry = self.expected.get(member.name)
        problem = ""
        if part.backup and member.isreg() and (entry is None or entry.holder != (
                part.backup, part.number)):
            return None
        if entry is not None and entry.pieces:  # the base of a block-delta file: its own size
            base = entry.pieces[0]
            if base.kind != PIECE_FILE:
                problem = f"{member.name} is stored in blocks, not whole"
            entry = replace(entry, size=base.size, sha256=base.sha256)
        if problem:
            pass
        elif entry is None:
            problem = f"it holds {member.name!r}, which the manifest does not list"
        elif entry.holder != (part.backup, part.number):
            problem = f"{member.name} belongs to part {entry.part}"
        elif not member.isreg():
            problem = f"{member.name} is not a regular file"
        elif member.size != entry.size:
            problem = f"{member.name} has {member.size} bytes, the manifest says {entry.size}"
        with self._lock:
            if not problem and member.name in self.seen:
                problem = f"{member.name} appears twice"
            if problem:
                where = f" {part.backup}" if part.backup else ""
                raise IntegrityError(f"part {part.number} of backup{where} does not match "
                                     "its manifest", problem,
                                     "the repository was tampered with")
            self.seen.add(member.name)
        assert entry is not None
        return entry

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._progress.advance(n)

    def must_hash(self, part: PartEntry) -> bool:
        """Whether the files of ``part`` need their own SHA-256 checked."""
        return self.rehash or not part.digest

    @staticmethod
    def verify(entry: FileEntry, sha256: str, size: int) -> None:
        if size != entry.size or sha256 != entry.sha256:
            raise IntegrityError(f"file {entry.path} of the backup is damaged",
                                 f"its SHA-256 or size ({size}) does not match the manifest",
                                 "the stored part is corrupt or was tampered with")

    def member_blocks(self, part: PartEntry, member: tarfile.TarInfo,
                      data: Iterator[memoryview]) -> None:
        """A block member (``<path>//<first block>``) of a block-delta file's piece."""
        path, first = split_member(member.name) or ("", 0)
        entry = self.expected.get(path)
        index = self.pieces_at.get((part.backup, part.number), {}).get(path)
        if entry is None or index is None or entry.pieces[index].kind != PIECE_BLOCKS:
            if part.backup and (entry is None or index is None):
                return  # another backup's chain: read (the part's digest covers it), dropped
            where = f" {part.backup}" if part.backup else ""
            raise IntegrityError(f"part {part.number} of backup{where} does not match its "
                                 "manifest", f"it holds blocks of {path!r}, which the manifest "
                                 "does not place there", "the repository was tampered with")
        content = bytearray()
        for chunk in data:
            if self.cancel.is_set():
                raise Cancelled(path)
            content += chunk
        blocks = decode_blocks(bytes(content), self.manifest.block_size, first)
        with self._lock:
            found = self.piece_hashes.setdefault((path, index), [hashlib.sha256(), 0])
            if index == 0:
                self.seen.add(path)
        found[0].update(content)  # (a piece's members come in order, from one part)
        found[1] += len(content)
        self.apply_blocks(entry, index, blocks)
        self.advance(len(content))

    def apply_blocks(self, entry: FileEntry, index: int,
                     blocks: list[tuple[int, memoryview]]) -> None:
        """Use the blocks of piece ``index`` of ``entry`` (here: nothing, they are checked)."""

    def first_blocks(self, entry: FileEntry, index: int) -> bool:
        """Whether these are the first blocks written of ``entry`` (a base stored in blocks:
        the file is then created); IntegrityError if an older piece is not applied yet."""
        with self._lock:
            if index == 0:
                if entry.path in self._created:
                    return False
                self._created.add(entry.path)
                return True
            if self.applied.get(entry.path, 0) != index:
                raise IntegrityError(f"blocks of {entry.path} came before its base or an "
                                     "older delta", f"piece {index}, "
                                     f"{self.applied.get(entry.path, 0)} applied",
                                     "the repository was tampered with")
            return False

    def rebuilt_files(self) -> list[FileEntry]:
        """The block-delta files, once every phase has run; IntegrityError if one lacks a
        piece."""
        rebuilt = [f for f in self.manifest.files if f.pieces]
        for entry in rebuilt:
            if self.applied.get(entry.path, 0) != len(entry.pieces):
                raise IntegrityError(f"{entry.path} lacks some of its pieces",
                                     hint="the repository was tampered with")
        return rebuilt

    def end_phase(self, backup: str | None) -> None:
        """Every piece held by ``backup`` (None: every piece) has been read: check each one's
        bytes against the manifest, and count it applied."""
        for entry in self.manifest.files:
            for index, piece in enumerate(entry.pieces):
                if backup is not None and piece.backup != backup:
                    continue
                where = f"backup {piece.backup}" if piece.backup else "this backup"
                if piece.kind == PIECE_BLOCKS:
                    found = self.piece_hashes.get((entry.path, index))
                    if found is None or (found[0].hexdigest(), found[1]) != (piece.sha256,
                                                                            piece.size):
                        raise IntegrityError(f"the blocks of {entry.path} stored in part "
                                             f"{piece.part} of {where} are damaged or missing",
                                             "their SHA-256 or size does not match the manifest",
                                             "the repository was tampered with")
                elif entry.path not in self.seen:
                    raise IntegrityError(f"the base of {entry.path} is missing from part "
                                         f"{piece.part} of {where}",
                                         hint="the repository was tampered with")
                if self.phased:
                    if self.applied.get(entry.path, 0) != index:
                        raise IntegrityError(f"the pieces of {entry.path} came out of order",
                                             f"piece {index} before piece "
                                             f"{self.applied.get(entry.path, 0)}")
                    self.applied[entry.path] = index + 1

    def missing(self) -> set[str]:
        """Files the manifest lists that no part held (call once every part is read)."""
        return set(self.expected) - self.seen

    def member(self, part: PartEntry, member: tarfile.TarInfo, data: Iterator[memoryview]
               ) -> None:
        """Handle the regular file ``member``, whose content ``data`` yields in pieces."""
        raise NotImplementedError


class HashSink(PartSink):
    """Checks every file's SHA-256 and size, and writes nothing."""

    def member(self, part: PartEntry, member: tarfile.TarInfo, data: Iterator[memoryview]
               ) -> None:
        entry = self.claim(part, member)
        if entry is None:
            return
        digest = hashlib.sha256()
        size = 0
        for chunk in data:
            if self.cancel.is_set():
                raise Cancelled(entry.path)
            digest.update(chunk)
            size += len(chunk)
            self.advance(len(chunk))
        self.verify(entry, digest.hexdigest(), size)


def write_blocks(path: Path, blocks: list[tuple[int, memoryview]], block_size: int, *,
                 create: bool, mode: int) -> None:
    """Write ``blocks`` (block number, data) into the file ``path`` at their offsets; with
    ``create``, the file must not exist yet."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except OSError as error:
        raise StorageError(f"cannot write {path}", os.strerror(error.errno or 0)) from None
    try:
        for number, data in blocks:
            os.pwrite(fd, data, number * block_size)
    finally:
        os.close(fd)


def check_rebuilt(path: Path, entry: FileEntry, block_size: int,
                  cancel: threading.Event) -> None:
    """Cut (or extend) the rebuilt file ``path`` to the manifest's size, read it back and
    check its size and SHA-256 (or, for a file whose manifest knows it by its block digests
    only, the SHA-256 of those: see :class:`~walship.backup.manifest.FileEntry`);
    IntegrityError if they differ. Reads 1 MiB at a time."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise StorageError(f"cannot open {path}", os.strerror(error.errno or 0)) from None
    digest = hashlib.sha256()
    size = 0
    with open(fd, "r+b", buffering=0) as handle:
        os.ftruncate(fd, entry.size)
        while True:
            if cancel.is_set():
                raise Cancelled(entry.path)
            chunk = handle.read(1 << 20)  # (a multiple of any block size)
            if not chunk:
                break
            if entry.sha256:
                digest.update(chunk)
            else:
                digest.update(block_digests(chunk, block_size))
            size += len(chunk)
    if size != entry.size or digest.hexdigest() != (entry.sha256 or entry.blocks_sha256):
        raise IntegrityError(f"file {entry.path} rebuilt from its pieces is damaged",
                             f"its SHA-256 or size ({size}) does not match the manifest",
                             "the repository was tampered with")


def _cancellable(chunks: Iterator[bytes], cancel: threading.Event) -> Iterator[bytes]:
    for chunk in chunks:
        if cancel.is_set():
            raise Cancelled("fetch cancelled")
        yield chunk


def read_part(archive: Archive, part: PartEntry, sink: PartSink) -> int:
    """Download, decode, unpack and check one part into ``sink``; return its stored size."""
    try:
        download = archive.storage.get(part.key)
    except NotFound:
        raise IntegrityError(f"part {part.number} ({part.key}) is missing from the repository",
                             "the manifest lists it", "the repository was tampered with or "
                             "partly deleted") from None
    with download:
        # The manifest's digest of the part, when it has one, is what the stored bytes must
        # match: every byte of the part is then checked against the (verified) manifest.
        metadata = ({OBJECT_DIGEST_METADATA: part.digest} if part.digest
                    else download.info.metadata)
        chunks = archive.codec.decode(part.key, download, metadata)
        # Decoding (and the part's digest) runs ahead in a thread of its own.
        reader = TarReader(pipelined(_cancellable(chunks, sink.cancel),
                                     name=f"walship-decode-{part.number}"))
        try:
            for member, data in reader.members():
                if not member.isreg():
                    sink.claim(part, member)  # raises: not a regular file
                if "//" in member.name:
                    sink.member_blocks(part, member, data)
                else:
                    sink.member(part, member, data)
            reader.drain()  # runs the decoder to its end: the part's digest is checked there
        except tarfile.TarError as error:
            raise IntegrityError(f"part {part.number} ({part.key}) is not a valid tar stream",
                                 str(error), "the stored part is corrupt") from None
        if reader.total != part.size:
            raise IntegrityError(f"part {part.key} has {reader.total} bytes",
                                 f"the manifest says {part.size}")
        return download.info.size


def read_parts(archive: Archive, manifest: Manifest, sink: PartSink, parallel: int) -> int:
    """Read every part of ``manifest`` into ``sink``; return the stored bytes read. A
    ``phased`` sink of a backup with block deltas gets them backup by backup, oldest first."""
    if sink.phased and any(f.pieces for f in manifest.files):
        groups: dict[str, list[PartEntry]] = {}
        for part in manifest.all_parts:
            groups.setdefault(part.backup, []).append(part)
        order = sorted((b for b in groups if b), key=layout.sort_key) + [""]
        total = 0
        for backup in order:
            total += _read_phase(archive, groups.get(backup, []), sink, parallel)
            sink.end_phase(backup)
        return total
    total = _read_phase(archive, list(manifest.all_parts), sink, parallel)
    sink.end_phase(None)
    return total


def _read_phase(archive: Archive, parts: list[PartEntry], sink: PartSink, parallel: int
                ) -> int:
    """Read ``parts`` into ``sink``, ``parallel`` at a time; the first failure stops them."""
    with ThreadPoolExecutor(max_workers=max(1, parallel),
                            thread_name_prefix="walship-fetch") as pool:
        futures: list[Future[int]] = []
        try:
            # The biggest parts first: the slowest one starts early.
            for part in sorted(parts, key=lambda p: -p.size):
                futures.append(pool.submit(read_part, archive, part, sink))
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            if not all(f.done() and f.exception() is None for f in futures):
                sink.cancel.set()
                for future in futures:
                    future.cancel()
        wait(futures)
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors:
        real = [e for e in errors if not isinstance(e, Cancelled)]
        raise (real or errors)[0]  # type: ignore[misc]
    return sum(f.result() for f in futures)
