"""Backup parts: POSIX tar streams of whole files, produced and consumed in bounded memory.

A part is a pax-format tar stream of regular files (stdlib :mod:`tarfile` builds every header).
:class:`PartWriter` *generates* the stream chunk by chunk as the files are read, so it plugs
straight into ``codec.encode`` and ``storage.put`` with no thread and no buffer larger than one
read (1 MiB). Each file is stored with exactly the size its header announces, the size the file
had when it was opened: a file that grows while read is cut there, one that shrinks is padded
with zeros (an online backup; WAL replay repairs both). The SHA-256 and size of the bytes
actually stored are recorded for the manifest.

:class:`ChunkReader` turns an iterator of bytes (a decoding download) into the ``read(n)``
object that ``tarfile.open(mode="r|")`` needs.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from walship.backup.manifest import FileEntry
from walship.errors import UsageError

BLOCK = tarfile.BLOCKSIZE
READ_SIZE = 1 << 20
DEFAULT_PART_SIZE = 64 << 20
_ZEROS = bytes(READ_SIZE)


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
                 cancel: threading.Event | None = None) -> None:
        self.number = number
        self.files = files
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
            else:
                yield from self._disk_file(source)
        yield self._emit(bytes(2 * BLOCK))  # end-of-archive marker

    def _header(self, path: str, size: int, mode: int, mtime: float) -> bytes:
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

    def _disk_file(self, source: SourceFile) -> Iterator[bytes]:
        try:
            fd = os.open(source.disk, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            self.skipped.append(source.path)
            return
        except OSError as error:
            raise UsageError(f"cannot read {source.disk}", os.strerror(error.errno or 0),
                             "run backup-push as the cluster's OS user (postgres)") from None
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


class ChunkReader:
    """A ``read(n)`` file object over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._offset = 0
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            out = [self._buffer[self._offset:]]
            out.extend(self._chunks)
            self._buffer, self._offset = b"", 0
            data = b"".join(out)
            self.total += len(data)
            return data
        while len(self._buffer) - self._offset < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            if self._offset:
                self._buffer = self._buffer[self._offset:]
                self._offset = 0
            self._buffer = self._buffer + chunk if self._buffer else chunk
        data = self._buffer[self._offset:self._offset + n]
        self._offset += len(data)
        if self._offset >= len(self._buffer):
            self._buffer, self._offset = b"", 0
        self.total += len(data)
        return data

    def drain(self) -> int:
        """Consume the rest (so a verifying generator runs to its end); return its length."""
        left = len(self._buffer) - self._offset
        self._buffer, self._offset = b"", 0
        for chunk in self._chunks:
            left += len(chunk)
        self.total += left
        return left


_DONE = object()


def pipelined(chunks: Iterator[bytes], depth: int = 8, name: str = "walship-stage"
              ) -> Iterator[bytes]:
    """Run the generator ``chunks`` in a thread of its own, ``depth`` chunks ahead.

    Two stages of a part's pipeline (reading and hashing the files; digesting, compressing
    and storing the stream) then use two cores: hashlib and zstd release the GIL. Memory stays
    bounded by ``depth`` chunks. An exception in the producer is raised to the consumer; a
    consumer that stops early (failure, cancellation) stops the producer, which closes
    ``chunks``.
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
            for chunk in chunks:
                if not offer(chunk):
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
