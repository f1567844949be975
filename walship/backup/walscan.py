"""Which blocks changed since the parent backup, read from the WAL itself: the change source of
block-level incremental and differential backups where the server keeps no WAL summaries
(PostgreSQL 15 and 16, or 17+ with ``summarize_wal = off``), so that the unchanged blocks of
the large relation files need not be read and compared.

Responsibility. The server and repository side around :mod:`walship.walrecords` (the pure
record reader): it checks that the WAL can answer, finds each segment of the range (in the
server's ``pg_wal`` first, else in the repository, streamed through the codec, which verifies
each segment by the time it is read to its end), runs the reader over them and returns the
same :class:`walship.backup.walsummary.BlockChanges` the WAL summaries give, so that push, the
block maps and every safety rule of :mod:`walship.backup.walsummary` (its module docstring)
apply unchanged. All or nothing: a complete answer, or :class:`NoChangeSource` with the reason
(then every large file is read and compared, and the backup is as correct, only slower).

The range is the one WAL summaries use, ``[parent's start LSN, this backup's start LSN)``; see
:func:`walship.backup.push.wal_summary_source` for why. What the reader records per record is
what PostgreSQL 17's WAL summarizer records (:mod:`walship.walrecords`), so the answer is the
one ``pg_wal_summary_contents`` would give for the same range; the tests compare the two on a
PostgreSQL 18 server.

No answer (read and compare instead) when:

* the parent backup is of another system, or on another timeline than the server now (a
  promotion since the parent: the WAL of the old timeline's last segment is not reliably at
  hand; the first backup after a failover compares, the next ones read WAL again);
* the WAL to read (pages actually read: the rest of a segment after an ``XLOG_SWITCH``, e.g.
  from ``archive_timeout``, is skipped) is more than the bytes of the large relation files
  (``budget``): reading and parsing it would cost more than comparing the files;
* a segment is in neither place, is not the segment its name says (a recycled file in
  ``pg_wal``: its page addresses differ), or anything in it is not understood, including
  ``wal_level = minimal`` for a while (:class:`walship.walrecords.WalReadError`);
* more than ``max_blocks`` distinct blocks changed (memory: 4 bytes each).

Memory: one page and record at a time (and a chunk of a segment streamed from the repository),
and the changed blocks, kept as 4-byte numbers per relation fork, sorted and deduplicated
whenever a fork's list doubles. Nothing is written to disk.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from walship import wal, walrecords
from walship.backup.walsummary import BlockChanges, NoChangeSource, server_layout
from walship.errors import WalshipError

MAX_BLOCKS = 64 << 20  # distinct changed blocks kept (256 MB; 512 GB of 8 kB blocks)

Fetch = Callable[[str], Iterable[bytes]]  # segment name -> its archived content, in chunks,
# verified by the time the last chunk has been read (NotFound, IntegrityError...)
Log = Callable[[str], None]


@dataclass
class ScanStats:
    """Where the segments came from and what the reader saw, for the log line."""

    local: int = 0  # segments read from pg_wal
    fetched: int = 0  # segments read from the repository
    records: int = 0
    block_references: int = 0
    bytes_read: int = 0  # WAL pages read (not the unused rest of switched segments)
    seconds: float = 0.0


def changed_blocks(connection, *, until_lsn: wal.Lsn, scanner: WalScanner | None = None,
                   log: Log | None = None, **arguments) -> BlockChanges | None:
    """The blocks changed up to ``until_lsn`` (:meth:`WalScanner.changes`), read by
    ``scanner`` (one that has read part of the range already) or by a new
    ``WalScanner(connection, **arguments)``; None when the WAL cannot tell. One ``log`` line
    either way: what was read, or why not."""
    if scanner is None:
        scanner = WalScanner(connection, **arguments)
    found = scanner.changes(until_lsn)
    stats = scanner.stats
    if isinstance(found, NoChangeSource):
        if log is not None:
            log(f"walship: WAL not read for changes: {found.reason}; reading and comparing "
                "every file")
        return None
    if log is not None:
        log(f"walship: WAL read for changes: {found.block_count} blocks of {found.fork_count} "
            f"relation forks changed from the parent's start {found.since_lsn} to {until_lsn} "
            f"({stats.bytes_read / 1e6:.1f} MB of WAL read, {stats.records} records, {stats.local} segments from pg_wal and "
            f"{stats.fetched} from the repository, {stats.seconds:.2f} s); only those are "
            "read and compared in the large relation files")
    return found


class WalScanner:
    """Reads the WAL on ``timeline`` from ``since_lsn`` (the parent backup's start) in one or
    more steps (:meth:`read`), keeping the changed blocks, then gives them
    (:meth:`changes`). A first step before ``pg_backup_start`` can read what is in pg_wal
    before that checkpoint recycles it; the last step reads up to the backup's start.

    ``connection``: an open psycopg 3 connection to the server (its block and segment sizes
    and catalog version are read at once). ``pg_wal``: the server's WAL directory;
    ``fetch(name)`` gives the archived segment ``name`` in chunks, verified once read to the
    end (None: pg_wal only). ``parent_timeline`` and ``system_identifier``: the parent
    backup's. ``budget``: the most WAL bytes worth reading (None: no limit)."""

    def __init__(self, connection, *, pg_wal: str, fetch: Fetch | None, timeline: int,
                 since_lsn: wal.Lsn, wal_segment_size: int,
                 parent_timeline: int | None = None, system_identifier: str | None = None,
                 budget: int | None = None, max_blocks: int = MAX_BLOCKS) -> None:
        self.pg_wal, self.fetch, self.timeline = pg_wal, fetch, timeline
        self.since_lsn, self.wal_segment_size = since_lsn, wal_segment_size
        self.budget, self.max_blocks = budget, max_blocks
        self.stats = ScanStats()
        self.failed: NoChangeSource | None = None
        self.position = since_lsn.value  # where the next step starts
        self.started = False  # whether a step has read records (the next one resumes)
        self.result = walrecords.ScanResult()
        self.forks = _Forks(max_blocks)
        self.layout: tuple[str, int, int, str] | None = None
        if parent_timeline is not None and parent_timeline != timeline:
            self.failed = NoChangeSource(f"the timeline changed since the parent backup "
                                         f"({parent_timeline} -> {timeline})")
            return
        try:
            import psycopg
        except ImportError:
            self.failed = NoChangeSource("psycopg is not installed")
            return
        try:
            with connection.transaction(), connection.cursor() as cur:
                self.layout = server_layout(cur, connection.info.server_version)
        except ValueError as error:
            self.failed = NoChangeSource(f"the server's answer was not understood: {error}")
            return
        except psycopg.Error as error:
            self.failed = NoChangeSource(f"reading the server's layout failed: "
                                         f"{' '.join(str(error).split())}")
            return
        if system_identifier is not None and str(system_identifier) != self.layout[0]:
            self.failed = NoChangeSource(f"the parent backup is of another system "
                                         f"({system_identifier}, the server is "
                                         f"{self.layout[0]})")

    def read(self, until_lsn: wal.Lsn, *, complete_only: bool = False) -> None:
        """Read the records from where the last step stopped to ``until_lsn``
        (``complete_only``: only those that end by it, for the server's flush position). A
        failure is kept, and makes :meth:`changes` say why."""
        if self.failed is not None:
            return
        if until_lsn.value < self.position:
            if complete_only:
                return
            self.failed = NoChangeSource(f"the range {self.since_lsn}..{until_lsn} runs "
                                         "backwards")
            return
        started = time.monotonic()
        add = self.forks.add
        try:
            segments = _segments(self.position // self.wal_segment_size,
                                 until_lsn.value // self.wal_segment_size, self.timeline,
                                 self.wal_segment_size, self.pg_wal, self.fetch, self.stats)
            try:
                for row in walrecords.scan(
                        segments, since=self.position, until=until_lsn.value,
                        timeline=self.timeline, segment_size=self.wal_segment_size,
                        system_identifier=int(self.layout[0]),  # type: ignore[index]
                        result=self.result, resume=self.started,
                        complete_only=complete_only,
                        block_size=self.layout[1],  # type: ignore[index]
                        max_bytes=self.budget):
                    add(row)
            finally:
                segments.close()
            self.position = self.result.end
            self.started = True
        except walrecords.TooMuchWal:
            self.failed = NoChangeSource(
                f"more WAL since the parent backup than the {self.budget / 1e6:.0f} MB of "  # type: ignore[operator]
                "large relation files: comparing them costs less")
        except walrecords.WalReadError as error:
            self.failed = NoChangeSource(f"the WAL could not be read: {error}")
        except _TooMany:
            self.failed = NoChangeSource(f"more than {self.max_blocks} blocks changed")
        except (WalshipError, OSError) as error:
            self.failed = NoChangeSource(f"a WAL segment could not be read: {error}")
        except Exception as error:  # noqa: BLE001 - a defect here must not fail the backup:
            # comparing every block is always correct
            self.failed = NoChangeSource(f"unexpected {type(error).__name__} reading the WAL: "
                                         f"{error}")
        finally:
            self.stats.seconds += time.monotonic() - started
        self.stats.records = self.result.records
        self.stats.block_references = self.result.block_references
        self.stats.bytes_read = self.result.bytes_read

    def changes(self, until_lsn: wal.Lsn) -> BlockChanges | NoChangeSource:
        """The blocks changed in ``[since_lsn, until_lsn)``, after reading what is left."""
        self.read(until_lsn)
        if self.failed is not None:
            return self.failed
        _system, block_size, segment_size, version_directory = self.layout  # type: ignore[misc]
        try:
            return BlockChanges.from_rows(self.forks.rows(), timeline=self.timeline,
                                          since_lsn=self.since_lsn, until_lsn=until_lsn,
                                          block_size=block_size, segment_size=segment_size,
                                          version_directory=version_directory)
        except ValueError as error:
            return NoChangeSource(f"a block number in the WAL is out of range: {error}")


class _TooMany(Exception):
    pass


class _Forks:
    """The rows of a scan, kept small: per relation fork its limits (the lowest) and its
    blocks as 4-byte numbers, sorted and deduplicated whenever the list doubles."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.blocks: dict[tuple[int, int, int, int], array] = {}  # type: ignore[type-arg]
        self.compacted: dict[tuple[int, int, int, int], int] = {}
        self.limits: dict[tuple[int, int, int, int], int] = {}
        self.total = 0

    def add(self, row: walrecords.Row) -> None:
        space, database, relation, fork, is_limit, block = row
        key = (space, database, relation, fork)
        if is_limit:
            old = self.limits.get(key)
            if old is None or block < old:
                self.limits[key] = block
            return
        blocks = self.blocks.get(key)
        if blocks is None:
            blocks = self.blocks[key] = array("I")
            self.compacted[key] = 0
        blocks.append(block)
        if len(blocks) > 2 * self.compacted[key] + 4096:
            self.total -= self.compacted[key]
            blocks = self.blocks[key] = array("I", sorted(set(blocks)))
            self.compacted[key] = len(blocks)
            self.total += len(blocks)
            if self.total > self.max_blocks:
                raise _TooMany

    def rows(self) -> Iterator[tuple[int, int, int, int, bool, int]]:
        """Per fork in order: its limit, then its blocks in order (what from_rows keeps
        flat)."""
        for key in sorted(set(self.blocks) | set(self.limits)):
            if key in self.limits:
                yield (*key, True, self.limits[key])
            for block in sorted(set(self.blocks.get(key, ()))):
                yield (*key, False, block)


def _segments(first: int, last: int, timeline: int, segment_size: int, pg_wal: str,
              fetch: Fetch | None, stats: ScanStats) -> Iterator[walrecords.Segment]:
    """Segments ``first`` to ``last`` of ``timeline``: each from pg_wal when the file there
    is that segment (its first page says so), else streamed from the repository. A streamed
    segment is read to its end once the reader leaves it, or stops in it (the codec verifies
    it there: until then its rows are not trusted, and a failure fails the whole scan)."""
    for number in range(first, last + 1):
        name = wal.segment_name(timeline, number, segment_size)
        handle = _open_local(os.path.join(pg_wal, name), number * segment_size)
        if handle is not None:
            stats.local += 1
            try:
                yield walrecords.Segment(number, handle)
            finally:
                handle.close()
            continue
        if fetch is None:
            raise walrecords.WalReadError(f"segment {name} is not in {pg_wal}")
        stream = ChunkReader(fetch(name))
        stats.fetched += 1
        try:
            try:
                yield walrecords.Segment(number, stream)  # type: ignore[arg-type]
            except GeneratorExit:  # the scan stopped inside this segment: verify what it read
                stream.drain()
                raise
            stream.drain()
        finally:
            stream.close()


class ChunkReader:
    """A forward-only binary file over an iterable of chunks: ``read(n)``, ``seek(offset)``
    forward from the start, and :meth:`drain` (read the rest, which lets the producer verify
    the whole)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""  # the current chunk, read from ``_at`` on
        self._at = 0
        self._offset = 0  # bytes returned or skipped so far

    def read(self, size: int) -> bytes:
        # (a page at a time out of 1 MiB chunks: slicing the rest off at each read would copy
        # the chunk over and over, most of this reader's time once)
        end = self._at + size
        if end <= len(self._buffer):
            out = self._buffer[self._at:end]
            self._at = end
        else:
            parts = [self._buffer[self._at:]]
            have = len(parts[0])
            while have < size:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                parts.append(chunk)
                have += len(chunk)
            self._buffer = parts[-1]
            self._at = len(self._buffer) - (have - size) if have > size else len(self._buffer)
            parts[-1] = self._buffer[:self._at]
            out = b"".join(parts)
        self._offset += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._offset:
            raise OSError("a streamed segment is read forward only")
        while self._offset < offset:
            if not self.read(min(1 << 20, offset - self._offset)):
                break
        return self._offset

    def drain(self) -> None:
        for _ in self._chunks:
            pass
        self._buffer, self._at = b"", 0

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _open_local(path: str, address: int):  # -> a binary file or None
    """``path`` opened for reading if it is a regular file whose first page is the page at
    ``address`` (a segment PostgreSQL recycled under a later name starts with older pages)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    handle = os.fdopen(descriptor, "rb")
    try:
        if not _is_regular(descriptor):
            handle.close()
            return None
        head = handle.read(walrecords.SHORT_HEADER)
        if len(head) < walrecords.SHORT_HEADER or walrecords.page_address(head) != address:
            handle.close()
            return None
        handle.seek(0)
        return handle
    except OSError:
        handle.close()
        return None


def _is_regular(descriptor: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(descriptor).st_mode)
