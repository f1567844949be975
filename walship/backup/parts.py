"""Backup parts: POSIX tar streams of whole files, produced and consumed in bounded memory.

A part is a pax-format tar stream of regular files (stdlib :mod:`tarfile` builds every header).
:class:`PartWriter` *generates* the stream chunk by chunk as the files are read, so it plugs
straight into ``codec.encode`` and ``storage.put`` with no thread and no buffer larger than one
read (1 MiB). Each file is stored with exactly the size its header announces, the size the file
had when it was opened: a file that grows while read is cut there, one that shrinks is padded
with zeros (an online backup; WAL replay repairs both). The SHA-256 and size of the bytes
actually stored are recorded for the manifest.

:class:`TarReader` reads such a stream back from an iterator of chunks (a decoding download),
handing out file data as slices of the chunks rather than copies.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from walship.backup import blocks as block_delta
from walship.backup.manifest import PIECE_BLOCKS, PIECE_FILE, FileEntry, Piece
from walship.errors import UsageError

BLOCK = tarfile.BLOCKSIZE
READ_SIZE = 1 << 20
DEFAULT_PART_SIZE = 64 << 20
_ZEROS = bytes(READ_SIZE)


@dataclass(frozen=True)
class ParentFile:
    """What the parent backup holds of a large relation file: its block map and the pieces
    that rebuild it (holders named absolutely: never "" for "this backup")."""

    map: block_delta.FileMap
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class BlockContext:
    """How a part stores the large relation files (see :mod:`walship.backup.blocks`):
    ``eligible``, the paths recorded in a block map; ``parents``, the parent's version of
    those it has (absent: stored whole); ``changed``, an optional change source."""

    block_size: int
    eligible: frozenset[str]
    parents: dict[str, ParentFile]
    changed: block_delta.ChangeSource | None = None


class Cancelled(Exception):
    """Another part failed: this one stops early (its object is never made visible)."""


@dataclass(frozen=True)
class SourceFile:
    """A file to store: read from ``disk``, or taken from ``content`` when that is given."""

    path: str
    disk: str
    size: int
    content: bytes | None = None


def tar_size(size: int) -> int:
    """Bytes a file of ``size`` bytes takes in a tar stream, its header excluded."""
    return -(-size // BLOCK) * BLOCK


def plan_parts(files: Sequence[SourceFile], target: int) -> list[list[SourceFile]]:
    """Group ``files``, in order, into parts of about ``target`` plaintext bytes.

    A part is closed before the file that would take it past ``target``; a file larger than
    ``target`` gets a part of its own.
    """
    parts: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    filled = 0
    for source in files:
        size = BLOCK + tar_size(source.size)
        if current and filled + size > target:
            parts.append(current)
            current, filled = [], 0
        current.append(source)
        filled += size
    if current:
        parts.append(current)
    return parts


class PartWriter:
    """Generates the tar stream of one part and records what it stored.

    ``entries`` (the stored files) and ``size`` (bytes generated) are complete once the
    iteration of :meth:`stream` has finished. A file that vanished before it could be opened is
    skipped (a relation dropped during the backup; WAL replay removes it anyway).
    """

    def __init__(self, number: int, files: Sequence[SourceFile], *,
                 progress: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None,
                 blocks: BlockContext | None = None) -> None:
        self.number = number
        self.files = files
        self.blocks = blocks
        self.maps: list[block_delta.FileMap] = []  # block maps of the large relation files
        self.entries: list[FileEntry] = []
        self.skipped: list[str] = []
        self.size = 0
        self._progress = progress
        self._cancel = cancel

    def _emit(self, chunk: bytes) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled(f"part {self.number} cancelled")
        self.size += len(chunk)
        if self._progress is not None:
            self._progress(len(chunk))
        return chunk

    def stream(self) -> Iterator[bytes]:
        for source in self.files:
            if source.content is not None:
                yield from self._memory_file(source)
            elif self.blocks is not None and source.path in self.blocks.eligible:
                yield from self._block_file(source, self.blocks.parents.get(source.path))
            else:
                yield from self._disk_file(source)
        yield self._emit(bytes(2 * BLOCK))  # end-of-archive marker

    def _header(self, path: str, size: int, mode: int, mtime: float) -> bytes:
        fast = _plain_header(path, size, mode & 0o7777, int(mtime))
        if fast is not None:
            return fast
        info = tarfile.TarInfo(path)
        info.size = size
        info.mode = mode & 0o7777
        info.mtime = int(mtime)  # an integer keeps pax extended headers away
        info.type = tarfile.REGTYPE
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def _memory_file(self, source: SourceFile) -> Iterator[bytes]:
        import time

        data = source.content or b""
        mtime = time.time()
        yield self._emit(self._header(source.path, len(data), 0o600, mtime))
        if data:
            yield self._emit(data)
        yield self._emit(bytes(tar_size(len(data)) - len(data)))
        self.entries.append(FileEntry(source.path, len(data), 0o600, mtime,
                                      hashlib.sha256(data).hexdigest(), self.number))

    def _block_file(self, source: SourceFile, parent: ParentFile | None) -> Iterator[bytes]:
        """A large relation file: whole (no parent version) or its changed blocks, with its
        block map (see :mod:`walship.backup.blocks`), in one read of the file; with a change
        source covering it, only the blocks that may have changed are read."""
        assert self.blocks is not None
        block_size = self.blocks.block_size
        fd = self._open(source)
        if fd is None:
            return
        with open(fd, "rb", buffering=0) as handle:
            st = os.fstat(fd)
            size = st.st_size
            digests = bytearray()
            whole = hashlib.sha256()
            if parent is None:
                yield self._emit(self._header(source.path, size, st.st_mode, st.st_mtime))
            hint = (self.blocks.changed(source.path)
                    if parent is not None and self.blocks.changed is not None else None)
            piece = hashlib.sha256()
            piece_size = 0
            every_read_whole = True
            # (read ahead, the block digests computed by a small pool of threads: with the
            # file's SHA-256 computed here meanwhile, hashing uses more than one core)
            reads = _read_ahead(handle, size, block_size) if hint is None else None
            plan = (_SparsePlan(fd, size, block_size, hint, parent.map.blocks)
                    if hint is not None and parent is not None else None)
            for offset in range(0, size, block_delta.CHUNK):
                want = min(block_delta.CHUNK, size - offset)
                first = offset // block_size
                count = -(-want // block_size)
                if reads is not None:
                    chunk, found = next(reads)
                    whole.update(chunk)
                if parent is None:
                    digests += found
                    yield self._emit(chunk)
                    continue
                known = parent.map.blocks
                if plan is not None:  # only the blocks that may have changed are read
                    wanted = plan.wanted(first, count)
                    if 2 * len(wanted) <= count:
                        every_read_whole = False
                        content = self._sparse_blocks(fd, parent, wanted, first, count, size,
                                                      digests)
                        if content:
                            piece.update(content)
                            piece_size += len(content)
                            yield from self._block_member(source.path, first, content, st)
                        continue
                    chunk = os.pread(fd, want, offset)  # mostly: compared whole, as below
                    chunk += _ZEROS[:want - len(chunk)]
                    found = block_delta.block_digests(chunk, block_size)
                view = memoryview(chunk)
                digests += found
                old = parent.map.digests[first * DIGEST:(first + count) * DIGEST]
                if found == old:
                    changed: list[int] = []
                else:
                    changed = [first + i for i in range(count)
                               if first + i >= known
                               or found[i * DIGEST:(i + 1) * DIGEST] != old[i * DIGEST:
                                                                             (i + 1) * DIGEST]]
                if 2 * len(changed) > count:  # mostly changed: the whole read
                    changed = list(range(first, first + count))
                else:
                    every_read_whole = False
                if changed:
                    content = block_delta.encode_blocks(changed, first, view, block_size)
                    piece.update(content)
                    piece_size += len(content)
                    yield from self._block_member(source.path, first, content, st)
            if parent is None:
                padding = tar_size(size) - size
                if padding:
                    yield self._emit(bytes(padding))
        mode = st.st_mode & 0o7777
        # With a change source, the blocks not read are the parent's: the file's SHA-256 is
        # unknown. A file rebuilt from pieces is known by the SHA-256 of its block digests
        # alone, in any case: what a restore checks is then what backup-verify can check
        # from the pieces' blocks, without rebuilding the file.
        sha256 = whole.hexdigest() if hint is None else ""
        blocks_sha256 = hashlib.sha256(digests).hexdigest()
        self.maps.append(block_delta.FileMap(source.path, size, bytes(digests)))
        if parent is None:
            self.entries.append(FileEntry(source.path, size, mode, st.st_mtime, sha256,
                                          self.number))
            return
        own = Piece("", self.number, PIECE_BLOCKS, piece_size, piece.hexdigest())
        if piece_size and every_read_whole:
            pieces: tuple[Piece, ...] = (own,)  # a new base
        elif piece_size:
            pieces = parent.pieces + (own,)
        else:
            pieces = parent.pieces
        base = pieces[0]
        if len(pieces) == 1 and base.kind == PIECE_FILE and (base.size, base.sha256) == (
                size, sha256):  # unchanged, held whole by an older backup: a plain reference
            pieces = ()
        self.entries.append(FileEntry(source.path, size, mode, st.st_mtime,
                                      "" if pieces else sha256, base.part, base.backup, pieces,
                                      blocks_sha256 if pieces else ""))

    def _sparse_blocks(self, fd: int, parent: ParentFile, wanted: list[int], first: int,
                       count: int, size: int, digests: bytearray) -> bytes:
        """The blocks ``wanted`` (sorted, within ``first`` .. ``first + count - 1``: a change
        source named them) of one read, read alone and compared; the others' digests copied
        from the parent's map, run by run (a block not wanted is one the parent knew: see
        :class:`_SparsePlan`). Returns the block member's content, or b"" when none changed.
        Only the wanted blocks cost a step: an incr of a large file is mostly this loop."""
        assert self.blocks is not None
        block_size = self.blocks.block_size
        known = parent.map.blocks
        old = parent.map.digests
        sha256 = hashlib.sha256
        pread = os.pread
        numbers: list[int] = []
        datas: list[bytes] = []
        copied = first  # the blocks before this have their digest in ``digests``
        for block in wanted:
            if block > copied:
                digests += old[copied * DIGEST:block * DIGEST]
            start = block * block_size
            length = min(block_size, size - start)
            data = pread(fd, length, start)
            if len(data) < length:  # the file shrank since: zeros, as a whole read pads
                data += _ZEROS[:length - len(data)]
            value = sha256(data).digest()[:DIGEST]
            digests += value
            if block >= known or value != old[block * DIGEST:(block + 1) * DIGEST]:
                numbers.append(block)
                datas.append(data)
            copied = block + 1
        if first + count > copied:
            digests += old[copied * DIGEST:(first + count) * DIGEST]
        if not numbers:
            return b""
        return block_delta.encode_blocks(numbers, numbers[0], datas, block_size,
                                         contiguous=False)

    def _block_member(self, path: str, first: int, content: bytes, st: os.stat_result
                      ) -> Iterator[bytes]:
        yield self._emit(self._header(block_delta.member_name(path, first), len(content),
                                      st.st_mode, st.st_mtime))
        yield self._emit(content)
        padding = tar_size(len(content)) - len(content)
        if padding:
            yield self._emit(bytes(padding))

    def _open(self, source: SourceFile) -> int | None:
        """A descriptor of the source file (never through a symbolic link), or None when it
        disappeared since the scan (recorded in ``skipped``: PostgreSQL removed it)."""
        try:
            return os.open(source.disk, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            self.skipped.append(source.path)
            return None
        except OSError as error:
            raise UsageError(f"cannot read {source.disk}", os.strerror(error.errno or 0),
                             "run backup-push as the cluster's OS user (postgres)") from None

    def _disk_file(self, source: SourceFile) -> Iterator[bytes]:
        fd = self._open(source)
        if fd is None:
            return
        with open(fd, "rb", buffering=0) as handle:
            st = os.fstat(fd)
            size = st.st_size
            yield self._emit(self._header(source.path, size, st.st_mode, st.st_mtime))
            digest = hashlib.sha256()
            left = size
            while left:
                chunk = handle.read(min(READ_SIZE, left))
                if not chunk:  # the file shrank while read: pad to the announced size
                    chunk = _ZEROS[:min(READ_SIZE, left)]
                digest.update(chunk)
                left -= len(chunk)
                yield self._emit(chunk)
            padding = tar_size(size) - size
            if padding:
                yield self._emit(bytes(padding))
        self.entries.append(FileEntry(source.path, size, st.st_mode & 0o7777, st.st_mtime,
                                      digest.hexdigest(), self.number))


_OCTAL_11 = 8 ** 11  # sizes and times that fit the header's 12-byte fields


def _plain_header(path: str, size: int, mode: int, mtime: int) -> bytes | None:
    """The tar header ``tarfile`` writes (PAX format) for a regular file whose name is ASCII
    and at most 100 bytes, and whose size and time fit their fields (then it writes a plain
    ustar header, no extended one), built directly: 2 us a header where ``tarfile`` takes 16,
    and an incr writes a header per changed 1 MiB of a large file. None otherwise."""
    if (len(path) > tarfile.LENGTH_NAME or not path.isascii() or "\0" in path
            or not 0 <= size < _OCTAL_11 or not 0 <= mtime < _OCTAL_11 or not path):
        return None
    head = b"".join((path.encode("ascii").ljust(100, b"\0"), b"%07o\0" % mode,
                     b"0000000\0" * 2, b"%011o\0" % size, b"%011o\0" % mtime, b" " * 8,
                     b"0", _AFTER_TYPE))
    checksum = sum(head)
    return head[:148] + b"%06o\0 " % checksum + head[156:]


_AFTER_TYPE = bytes(100) + b"ustar\x0000" + bytes(512 - 265)


DIGEST = block_delta.DIGEST_SIZE
PREFETCH = 8 << 20  # bytes of blocks to read asked of the kernel ahead of their use
_pool_lock = threading.Lock()
_digest_pool: ThreadPoolExecutor | None = None


def _digests() -> ThreadPoolExecutor:
    """The threads computing block digests, shared by every part (made on first use)."""
    global _digest_pool
    with _pool_lock:
        if _digest_pool is None:
            _digest_pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                              thread_name_prefix="walship-digest")
        return _digest_pool


def _read_ahead(handle: object, size: int, block_size: int, depth: int = 4
                ) -> Iterator[tuple[bytes, bytes]]:
    """``(read, its block digests)`` for each 1 MiB read of ``handle`` (``size`` bytes), in
    order; up to ``depth`` reads ahead, their digests computed meanwhile by the pool."""
    from collections import deque

    pool = _digests()
    pending: deque[tuple[bytes, Future[bytes]]] = deque()
    try:
        for offset in range(0, size, block_delta.CHUNK):
            chunk = _read_full(handle, min(block_delta.CHUNK, size - offset))
            pending.append((chunk, pool.submit(block_delta.block_digests, chunk, block_size)))
            if len(pending) > depth:
                chunk, future = pending.popleft()
                yield chunk, future.result()
        while pending:
            chunk, future = pending.popleft()
            yield chunk, future.result()
    finally:
        for _, future in pending:
            future.cancel()


class _SparsePlan:
    """Which blocks of a file a change source has the backup read (see
    :class:`~walship.backup.blocks.ChangedBlocks`: those it names, those from its ``limit`` on,
    those past the parent's ``known`` blocks), 1 MiB read after read, in order; and the kernel
    told to fetch them ahead (``posix_fadvise(WILLNEED)``, up to :data:`PREFETCH` bytes of
    them), with its own read-ahead off for the file. A read of a few blocks of a file not in
    the page cache is one synchronous disk read each otherwise: measured on the 1.1 GB
    benchmark cluster, most of an incr's time, and 200 MB read from disk for 55 MB of
    blocks."""

    def __init__(self, fd: int, size: int, block_size: int, hint: block_delta.ChangedBlocks,
                 known: int) -> None:
        import bisect

        self._bisect = bisect.bisect_left
        self.fd = fd
        self.block_size = block_size
        total = -(-size // block_size)
        every_from = min(total, known, total if hint.limit is None else hint.limit)
        self.blocks = sorted(b for b in hint.blocks if b < every_from)
        self.blocks.extend(range(every_from, total))
        self.total = total
        self.advised = 0  # blocks below this were advised (or read whole)
        from collections import deque

        self._pending: deque[tuple[int, int]] = deque()  # (end block of a read, blocks asked)
        self._outstanding = 0  # blocks asked for and not read yet
        self._advise = getattr(os, "posix_fadvise", None)
        if self._advise is not None:
            try:
                self._advise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                self._advise = None

    def wanted(self, first: int, count: int) -> list[int]:
        """The blocks to read among ``first`` .. ``first + count - 1``."""
        if self._advise is not None:
            self._ahead(first)
        start = self._bisect(self.blocks, first)
        return self.blocks[start:self._bisect(self.blocks, first + count, start)]

    def _ahead(self, first: int) -> None:
        per_read = block_delta.CHUNK // self.block_size
        while self._pending and self._pending[0][0] <= first:  # (read by now)
            self._outstanding -= self._pending.popleft()[1]
        budget = PREFETCH // self.block_size - self._outstanding
        end = max(self.advised, first)  # (both where a read starts)
        index = self._bisect(self.blocks, end)
        while end < self.total and index < len(self.blocks) and budget > 0:
            read_end = min(self.total, end + per_read)  # (end: where a read starts)
            stop = self._bisect(self.blocks, read_end, index)
            wanted = self.blocks[index:stop]
            if 2 * len(wanted) > read_end - end:  # read whole (see PartWriter._block_file)
                self._fetch(end, read_end - end)
                taken = read_end - end
            else:
                run_start = previous = -2
                for block in wanted:
                    if block != previous + 1:
                        if run_start >= 0:
                            self._fetch(run_start, previous + 1 - run_start)
                        run_start = block
                    previous = block
                if run_start >= 0:
                    self._fetch(run_start, previous + 1 - run_start)
                taken = len(wanted)
            if taken:
                self._pending.append((read_end, taken))
                self._outstanding += taken
                budget -= taken
            index, end = stop, read_end
        self.advised = max(self.advised, end)

    def _fetch(self, block: int, count: int) -> None:
        advise = self._advise
        if advise is None:
            return
        try:
            advise(self.fd, block * self.block_size, count * self.block_size,
                   os.POSIX_FADV_WILLNEED)
        except OSError:
            self._advise = None  # (advice only: the reads still read)


def _read_full(handle: object, want: int) -> bytes:
    """``want`` bytes read from ``handle``: a file that shrank while read is padded with
    zeros, as a whole stored file is."""
    parts = []
    got = 0
    while got < want:
        chunk = handle.read(want - got)  # type: ignore[attr-defined]
        if not chunk:
            parts.append(_ZEROS[:want - got])
            break
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class TarReader:
    """Reads a part's tar stream from an iterator of byte chunks (a decoding download), handing
    out each member's data as slices of those chunks, without copying them.

    It reads what :class:`PartWriter` writes: ustar headers, pax extended headers (``path``,
    ``size``) before a member that needs one, and the end-of-archive marker; anything else
    raises :class:`tarfile.ReadError`. ``total`` counts the bytes read.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._view = memoryview(b"")
        self._left = 0  # bytes of the current member's data not yet handed out
        self.total = 0

    def _next_chunk(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._view = memoryview(chunk)
                return True
        return False

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` bytes (copied: headers only), or ReadError at the end of the stream."""
        parts = []
        while n:
            if not self._view and not self._next_chunk():
                raise tarfile.ReadError("the tar stream ends early")
            piece = self._view[:n]
            self._view = self._view[len(piece):]
            parts.append(piece.tobytes())
            n -= len(piece)
            self.total += len(piece)
        return b"".join(parts)

    def _data(self) -> Iterator[memoryview]:
        while self._left:
            if not self._view and not self._next_chunk():
                raise tarfile.ReadError("the tar stream ends inside a file")
            piece = self._view[:self._left]
            self._view = self._view[len(piece):]
            self._left -= len(piece)
            self.total += len(piece)
            yield piece

    def members(self) -> Iterator[tuple[tarfile.TarInfo, Iterator[memoryview]]]:
        """Each member's header and an iterator over its data (to be consumed before the next
        member is asked for; what is left of it is skipped)."""
        while True:
            block = self._take(BLOCK)
            if block == _ZERO_BLOCK:
                if self._take(BLOCK) != _ZERO_BLOCK:
                    raise tarfile.ReadError("a lone zero block inside the tar stream")
                return
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            if info.type == tarfile.XHDTYPE:
                overrides = _pax_records(self._take(tar_size(info.size))[:info.size])
                info = tarfile.TarInfo.frombuf(self._take(BLOCK), "utf-8", "surrogateescape")
                if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                    raise tarfile.ReadError("two extended headers in a row")
                if "path" in overrides:
                    info.name = overrides["path"]
                if "size" in overrides:
                    if not overrides["size"].isdigit():
                        raise tarfile.ReadError("an invalid size in an extended header")
                    info.size = int(overrides["size"])
            elif info.type not in tarfile.REGULAR_TYPES + (tarfile.DIRTYPE, tarfile.SYMTYPE,
                                                           tarfile.LNKTYPE):
                raise tarfile.ReadError(f"an unexpected tar header of type {info.type!r}")
            self._left = info.size if info.isreg() else 0
            yield info, self._data()
            for _ in self._data():  # whatever the consumer left
                pass
            padding = tar_size(info.size) - info.size if info.isreg() else 0
            if padding:
                self._take(padding)

    def drain(self) -> int:
        """Consume the rest of the chunks (so a verifying generator runs to its end); return
        how many bytes that was."""
        left = len(self._view)
        self._view = memoryview(b"")
        for chunk in self._chunks:
            left += len(chunk)
        self.total += left
        return left


_ZERO_BLOCK = bytes(BLOCK)


def _pax_records(data: bytes) -> dict[str, str]:
    """The records ``"<length> <key>=<value>\\n"`` of a pax extended header."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        length = data[position:space]
        if space < 0 or not length.isdigit() or int(length) < space - position + 3 \
                or position + int(length) > len(data):
            raise tarfile.ReadError("a malformed extended header")
        record = data[space + 1:position + int(length)]
        if not record.endswith(b"\n") or b"=" not in record:
            raise tarfile.ReadError("a malformed extended header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                         "surrogateescape")
        position += int(length)
    return records


_DONE = object()


BATCH_SIZE = 256 << 10  # bytes of small chunks joined into one handed to the consumer


def pipelined(chunks: Iterator[bytes], depth: int = 8, name: str = "walship-stage"
              ) -> Iterator[bytes]:
    """Run the generator ``chunks`` in a thread of its own, ``depth`` chunks ahead.

    Two stages of a part's pipeline (reading and hashing the files; digesting, compressing
    and storing the stream) then use two cores: hashlib and zstd release the GIL. Small chunks
    are joined and handed over :data:`BATCH_SIZE` bytes at a time (an incr's stream is mostly
    small chunks: a block member's header, its blocks, its padding; a hand-off and a
    compressor call per chunk cost more than the chunks); a larger chunk is handed over as it
    is. Memory stays bounded by ``depth`` batches. An exception in the producer is raised to
    the consumer; a consumer that stops early (failure, cancellation) stops the producer,
    which closes ``chunks``.
    """
    import queue

    handoff: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            batch: list[bytes] = []
            held = 0
            for chunk in chunks:
                batch.append(chunk)
                held += len(chunk)
                if held >= BATCH_SIZE:
                    if not offer(batch[0] if len(batch) == 1 else b"".join(batch)):
                        return
                    batch, held = [], 0
            if batch and not offer(batch[0] if len(batch) == 1 else b"".join(batch)):
                return
            offer(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed over to the consumer
            offer(error)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
