"""WAL records: which relation blocks the WAL between two positions names, read from the WAL
itself, for block-level incremental backups on servers without WAL summaries (PostgreSQL 15
and 16, or 17+ with ``summarize_wal = off``).

Responsibility. Pure: bytes of WAL segments in, change rows out, no I/O. :func:`scan` walks the
pages of consecutive segments (:class:`Segment`: its number and a readable binary file), checks
every page header, reassembles every record that spans pages, and yields, for each record that
starts in ``[since, until)``, the same rows PostgreSQL 17's WAL summarizer would record
(``walsummarizer.c``): ``(tablespace, database, relfilenode, fork, is_limit, block)``, the shape
:meth:`walship.backup.walsummary.BlockChanges.from_rows` takes.

* Every block reference of every record (``XLogRecordBlockHeader``: full-page images, data,
  ``WILL_INIT``), except the free space map fork, which is not fully WAL-logged.
* Relation forks created (``XLOG_SMGR_CREATE``) and forks dropped at commit or abort (the
  relations of an ``xl_xact_relfilelocators``): limit 0, the whole fork is new or gone.
* Truncation (``XLOG_SMGR_TRUNCATE``): limit = the new length, for the main and the
  visibility-map forks it cuts.
* Databases created (either strategy) or dropped (``RM_DBASE_ID``): relfilenode 0 with limit 0,
  every file of that tablespace and database.

It fails closed: anything it does not recognise raises :class:`WalReadError`, and the caller
then reads and compares every file instead. That covers a page magic of a format it was not
written for (PostgreSQL 15 to 18), a page address or timeline that does not match the position
(a recycled segment), a broken ``xl_prev`` chain, a record whose headers do not add up to its
length, a record left incomplete by a crash (``XLP_FIRST_IS_OVERWRITE_CONTRECORD``), the end of
the WAL before ``until``, and a switch to ``wal_level = minimal`` (``XLOG_PARAMETER_CHANGE``),
under which relations are written without WAL. Record CRCs are not computed (Python's CRC-32C
would cost more than the reading it saves); the page-address, chain and length checks catch a
segment that is not the WAL this range needs, and the segments come from PostgreSQL's own
``pg_wal`` or, verified by the codec, from the repository.

Memory: one page of the current segment and the record being reassembled (at most
``max_record`` bytes, 1 GiB in PostgreSQL, bounded lower here).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

# xlp_magic of each format this reader knows (XLOG_PAGE_MAGIC in xlog_internal.h). The record
# layout (XLogRecord, block headers, RelFileLocator) is the same in all four; the meaning of
# bimg_info's bits changed in 15 (compression methods), which is why 14 and older are not here.
PAGE_MAGICS = {0xD110: 15, 0xD113: 16, 0xD116: 17, 0xD118: 18}

XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x0008
SHORT_HEADER = 24  # MAXALIGN(sizeof(XLogPageHeaderData))
LONG_HEADER = 40  # MAXALIGN(sizeof(XLogLongPageHeaderData))
RECORD_HEADER = 24  # sizeof(XLogRecord)

RM_XLOG, RM_XACT, RM_SMGR, RM_DBASE = 0, 1, 2, 4
XLR_INFO_MASK = 0x0F
XLOG_SWITCH = 0x40
XLOG_PARAMETER_CHANGE = 0x60
XLOG_SMGR_CREATE, XLOG_SMGR_TRUNCATE = 0x10, 0x20
SMGR_TRUNCATE_HEAP, SMGR_TRUNCATE_VM = 0x0001, 0x0002
XLOG_DBASE_CREATE_FILE_COPY, XLOG_DBASE_CREATE_WAL_LOG, XLOG_DBASE_DROP = 0x00, 0x10, 0x20
XLOG_XACT_OPMASK, XLOG_XACT_HAS_INFO = 0x70, 0x80
XLOG_XACT_COMMIT, XLOG_XACT_ABORT = 0x00, 0x20
XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED = 0x30, 0x40
XACT_XINFO_HAS_DBINFO, XACT_XINFO_HAS_SUBXACTS, XACT_XINFO_HAS_RELFILELOCATORS = 1, 2, 4
WAL_LEVEL_MINIMAL = 0

XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT, XLR_BLOCK_ID_DATA_LONG = 255, 254
XLR_BLOCK_ID_ORIGIN, XLR_BLOCK_ID_TOPLEVEL_XID = 253, 252
BKPBLOCK_FORK_MASK, BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL = 0x0F, 0x10, 0x80
BKPIMAGE_HAS_HOLE, BKPIMAGE_COMPRESSED = 0x01, 0x04 | 0x08 | 0x10  # pglz, lz4, zstd (15+)

MAIN_FORK, FSM_FORK, VM_FORK, INIT_FORK = 0, 1, 2, 3
MAX_RECORD = 64 << 20  # a longer record is refused (PostgreSQL allows up to 1 GiB)

Row = tuple[int, int, int, int, bool, int]

_PAGE = struct.Struct("<HHIQI")  # magic, info, tli, pageaddr, rem_len
_LONG = struct.Struct("<QII")  # sysid, seg_size, xlog_blcksz (at offset 24)
_RECORD = struct.Struct("<IIQBBxxI")  # tot_len, xid, prev, info, rmid, crc
_U32 = struct.Struct("<I")
_BLOCK = struct.Struct("<BH")  # fork_flags, data_length (after the id byte)
_IMAGE = struct.Struct("<HHB")  # bimg_len, hole_offset, bimg_info
_LOCATOR_BLOCK = struct.Struct("<IIII")  # spcOid, dbOid, relNumber, blkno
_LOCATOR = struct.Struct("<III")


class WalReadError(ValueError):
    """The WAL could not be read as this reader understands it: do not use it."""


class TooMuchWal(WalReadError):
    """More WAL pages than ``max_bytes`` allowed would have to be read."""


@dataclass(frozen=True)
class Segment:
    """One WAL segment to read: its absolute number (position // segment size) and a binary
    file positioned at its first byte."""

    number: int
    file: BinaryIO


@dataclass
class ScanResult:
    """What :func:`scan` saw (filled in while its rows are consumed)."""

    records: int = 0  # records in [since, until)
    block_references: int = 0
    bytes_read: int = 0  # pages read (those after an XLOG_SWITCH are skipped, never read)
    end: int = 0  # where the next record begins (the position to resume at)
    last: int | None = None  # where the last record read began (its successor points to it)
    version: int = 0  # PostgreSQL major version from the page magic


def page_address(header: bytes) -> int | None:
    """The position a page's header says the page is at (``xlp_pageaddr``), or None when the
    header is not one of a known format."""
    magic, _info, _tli, address, _rem = _PAGE.unpack_from(header)
    return address if magic in PAGE_MAGICS else None


def scan(segments: Iterable[Segment], *, since: int, until: int, timeline: int,
         segment_size: int, page_size: int = 8192, system_identifier: int | None = None,
         result: ScanResult | None = None, resume: bool = False,
         complete_only: bool = False, block_size: int = 8192,
         max_bytes: int | None = None) -> Iterator[Row]:
    """The change rows of every record starting in ``[since, until)`` on ``timeline``.

    ``segments``: consecutive segments, the first holding ``since``; each page must carry
    ``timeline`` or an earlier one (the first segment of a timeline starts with its parent's
    pages). ``segment_size`` and ``page_size`` (XLOG_BLCKSZ) must equal what the segments'
    long headers say, and ``system_identifier`` (when given) theirs; ``block_size`` is the
    relations' (BLCKSZ, for the length of a truncated visibility map). Reading more than
    ``max_bytes`` of pages in all (``result.bytes_read``, over every scan sharing ``result``)
    raises :class:`TooMuchWal`. Raises
    :class:`WalReadError` (see the module's docstring) rather than yield a partial answer;
    rows already yielded must then be discarded.

    Reading starts at the first page of ``since``'s segment (records that end before
    ``since`` are read and left out), unless ``resume``: then ``since`` is a record's start,
    ``result.end`` of an earlier scan (``result`` that scan's, whose last record the first
    one read must point back to), and reading starts there. ``complete_only``: stop before
    the first record that does not END by ``until`` (for ``until`` = the server's flush
    position, beyond which the file holds nothing yet); ``result.end`` says where."""
    if since > until:
        raise WalReadError(f"the range {since:X}..{until:X} runs backwards")
    if result is None:
        result = ScanResult()
    if resume and result.last is not None and result.end != since:
        raise WalReadError(f"resuming at {_lsn(since)}, not where the scan stopped "
                           f"({_lsn(result.end)})")
    if not resume:
        result.last = None
    result.end = since
    if since == until:
        return
    first_page = since - since % page_size if resume else since - since % segment_size
    reader = _Pages(iter(segments), timeline, segment_size, page_size, system_identifier,
                    since // segment_size, result, first_page, max_bytes)
    yield from _records(reader, since, until, result, resume, complete_only, block_size)


class _Pages:
    """The pages of consecutive segments, every header checked; ``payload`` is the current
    page after its header."""

    def __init__(self, segments: Iterator[Segment], timeline: int, segment_size: int,
                 page_size: int, system_identifier: int | None, first: int,
                 result: ScanResult, first_page: int, max_bytes: int | None) -> None:
        if page_size <= 0 or page_size & (page_size - 1) or segment_size % page_size:
            raise WalReadError(f"bad page size {page_size} for segment size {segment_size}")
        self.segments = segments
        self.timeline = timeline
        self.segment_size = segment_size
        self.page_size = page_size
        self.system_identifier = system_identifier
        self.expected_segment = first
        self.result = result
        self.file: BinaryIO | None = None
        self.first_page = first_page  # the page to start at
        self.max_bytes = max_bytes
        self.page_lsn = -page_size  # the position of the current page
        self.page = b""
        self.header = 0
        self.info = 0
        self.rem_len = 0

    def next_page(self) -> None:
        """Move to the page after the current one (the first page of the next segment at a
        segment's end)."""
        lsn = self.page_lsn + self.page_size
        if self.file is None or lsn % self.segment_size == 0:
            self._next_segment()
            lsn = self.expected_segment * self.segment_size
            self.expected_segment += 1
            if self.first_page > lsn:  # resuming within the segment
                self.file.seek(self.first_page - lsn)  # type: ignore[union-attr]
                lsn = self.first_page
        if self.max_bytes is not None and self.result.bytes_read >= self.max_bytes:
            raise TooMuchWal(f"more than {self.max_bytes} bytes of WAL to read")
        page = self.file.read(self.page_size)  # type: ignore[union-attr]
        self.result.bytes_read += len(page)
        if len(page) != self.page_size:
            raise WalReadError(f"the WAL ends early, at {_lsn(lsn)}: a short segment file")
        magic, info, tli, address, rem_len = _PAGE.unpack_from(page)
        version = PAGE_MAGICS.get(magic)
        if version is None:
            if not any(page):
                raise WalReadError(f"the WAL ends at {_lsn(lsn)} (an empty page)")
            raise WalReadError(f"page {_lsn(lsn)} has magic {magic:#06x}, a WAL format this "
                               "reader does not know (PostgreSQL 15 to 18)")
        if self.result.version and version != self.result.version:
            raise WalReadError(f"page {_lsn(lsn)} is of PostgreSQL {version}, the WAL before "
                               f"it of {self.result.version}")
        self.result.version = version
        if address != lsn:
            raise WalReadError(f"page {_lsn(lsn)} says it is page {_lsn(address)} (a recycled "
                               "or foreign segment)")
        if tli > self.timeline or tli == 0:
            raise WalReadError(f"page {_lsn(lsn)} is of timeline {tli}, not {self.timeline}")
        if info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
            raise WalReadError(f"page {_lsn(lsn)} overwrites a record a crash left incomplete")
        header = SHORT_HEADER
        if lsn % self.segment_size == 0:
            if not info & XLP_LONG_HEADER:
                raise WalReadError(f"segment page {_lsn(lsn)} has no long header")
            sysid, seg_size, blcksz = _LONG.unpack_from(page, 24)
            if seg_size != self.segment_size or blcksz != self.page_size:
                raise WalReadError(f"segment {_lsn(lsn)} is of segment size {seg_size} and "
                                   f"page size {blcksz}, not {self.segment_size} and "
                                   f"{self.page_size}")
            if self.system_identifier is not None and sysid != self.system_identifier:
                raise WalReadError(f"segment {_lsn(lsn)} is of system {sysid}, not "
                                   f"{self.system_identifier}")
            header = LONG_HEADER
        self.page_lsn, self.page, self.header, self.info, self.rem_len = (
            lsn, page, header, info, rem_len)

    def _next_segment(self) -> None:
        try:
            segment = next(self.segments)
        except StopIteration:
            raise WalReadError(f"the WAL ends at {_lsn(self.expected_segment * self.segment_size)}"
                               ": no more segments") from None
        if segment.number != self.expected_segment:
            raise WalReadError(f"segment {segment.number:X} given where "
                               f"{self.expected_segment:X} was expected")
        self.file = segment.file

    def skip_to_segment_end(self) -> None:
        """After XLOG_SWITCH: the rest of this segment holds no record; the next page read is
        the next segment's first."""
        self.page_lsn = (self.page_lsn // self.segment_size + 1) * self.segment_size \
            - self.page_size


def _records(pages: _Pages, since: int, until: int, result: ScanResult, resume: bool,
             complete_only: bool, block_size: int) -> Iterator[Row]:
    size = pages.page_size
    pages.next_page()
    offset = pages.header
    previous = result.last
    if resume:
        offset = since % size
        if offset < pages.header:
            raise WalReadError(f"{_lsn(since)} is inside a page header, not a record's start")
    elif pages.info & XLP_FIRST_IS_CONTRECORD:  # a record's tail, begun in an earlier segment
        offset = _skip_continuation(pages)
    while True:
        offset = (offset + 7) & ~7
        if offset >= size:
            following = pages.page_lsn + size
            if complete_only and following >= until:  # the file may not reach further yet
                result.end = following + (LONG_HEADER if following % pages.segment_size == 0
                                          else SHORT_HEADER)
                return
            pages.next_page()
            if pages.info & XLP_FIRST_IS_CONTRECORD:
                raise WalReadError(f"page {_lsn(pages.page_lsn)} continues a record where a "
                                   "new one should begin")
            offset = pages.header
        start = pages.page_lsn + offset
        if start >= until:
            result.end = start
            return
        page = pages.page
        (total,) = _U32.unpack_from(page, offset)
        if total < RECORD_HEADER or total > MAX_RECORD:
            if total == 0:
                raise WalReadError(f"the WAL ends at {_lsn(start)}, before {_lsn(until)}")
            raise WalReadError(f"the record at {_lsn(start)} has length {total}")
        # (where it ends, counting page headers, only when it could be past ``until``: a
        # record crosses at most total // (page - long header) + 1 headers)
        if complete_only and start + total + (total // (size - LONG_HEADER) + 1) * LONG_HEADER \
                > until and _end(pages, offset, total) > until:
            result.end = start
            return
        if offset + total <= size:
            record = page[offset:offset + total]
            offset += total
        else:
            pieces = [page[offset:]]
            need = total - (size - offset)
            while need:
                pages.next_page()
                if not pages.info & XLP_FIRST_IS_CONTRECORD or pages.rem_len != need:
                    raise WalReadError(f"page {_lsn(pages.page_lsn)} does not continue the "
                                       f"record at {_lsn(start)} ({need} bytes left, the page "
                                       f"says {pages.rem_len})")
                take = min(need, size - pages.header)
                pieces.append(pages.page[pages.header:pages.header + take])
                need -= take
                offset = pages.header + take
            record = b"".join(pieces)
        _, _, prev, info, rmid, _ = _RECORD.unpack_from(record)
        if previous is not None and prev != previous:
            raise WalReadError(f"the record at {_lsn(start)} points back to {_lsn(prev)}, not "
                               f"{_lsn(previous)}")
        previous = result.last = start
        end = pages.page_lsn + offset
        if end > since:
            result.records += 1
            yield from _record_rows(record, info, rmid, start, result, block_size)
        if rmid == RM_XLOG and info & ~XLR_INFO_MASK == XLOG_SWITCH:
            pages.skip_to_segment_end()
            offset = size


def _end(pages: _Pages, offset: int, total: int) -> int:
    """Where a record of ``total`` bytes starting at ``offset`` of the current page ends,
    counting the page headers it crosses, without reading those pages."""
    size = pages.page_size
    if offset + total <= size:
        return pages.page_lsn + offset + total
    need = total - (size - offset)
    lsn = pages.page_lsn + size
    while True:
        header = LONG_HEADER if lsn % pages.segment_size == 0 else SHORT_HEADER
        take = min(need, size - header)
        need -= take
        if not need:
            return lsn + header + take
        lsn += size


def _skip_continuation(pages: _Pages) -> int:
    """Skip the continued tail of a record at the start of the first segment read; return the
    offset of the first record that begins in it."""
    need = pages.rem_len
    while True:
        take = min(need, pages.page_size - pages.header)
        need -= take
        if not need:
            return pages.header + take
        pages.next_page()
        if not pages.info & XLP_FIRST_IS_CONTRECORD or pages.rem_len != need:
            raise WalReadError(f"page {_lsn(pages.page_lsn)} does not continue the record "
                               "its segment started with")


def _record_rows(record: bytes, info: int, rmid: int, start: int, result: ScanResult,
                 block_size: int) -> list[Row]:
    """Decode one record's headers (DecodeXLogRecord's walk) and return its rows (a list,
    not a generator: one per record, the reader's most frequent step)."""
    total = len(record)
    position = RECORD_HEADER
    data_total = 0
    main_length = 0
    locator: tuple[int, int, int] | None = None
    blocks: list[Row] = []
    try:
        while total - position > data_total:
            block_id = record[position]
            position += 1
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_length = record[position]
                position += 1
                data_total += main_length
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                (main_length,) = _U32.unpack_from(record, position)
                position += 4
                data_total += main_length
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                position += 2
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                position += 4
                continue
            if block_id > XLR_MAX_BLOCK_ID:
                raise WalReadError(f"block id {block_id}")
            flags, length = _BLOCK.unpack_from(record, position)
            position += 3
            data_total += length
            if flags & BKPBLOCK_HAS_IMAGE:
                image_length, _hole, image_info = _IMAGE.unpack_from(record, position)
                position += 5
                if image_info & BKPIMAGE_HAS_HOLE and image_info & BKPIMAGE_COMPRESSED:
                    position += 2
                data_total += image_length
            if flags & BKPBLOCK_SAME_REL:
                if locator is None:
                    raise WalReadError("BKPBLOCK_SAME_REL without a previous relation")
                (block,) = _U32.unpack_from(record, position)
                position += 4
            else:
                space, database, relation, block = _LOCATOR_BLOCK.unpack_from(record, position)
                position += 16
                locator = (space, database, relation)
            fork = flags & BKPBLOCK_FORK_MASK
            if fork > INIT_FORK:
                raise WalReadError(f"fork number {fork}")
            if fork != FSM_FORK:
                blocks.append((*locator, fork, False, block))
    except (struct.error, IndexError):
        raise WalReadError(f"the record at {_lsn(start)} is cut short in its headers") from None
    if position + data_total != total:
        raise WalReadError(f"the record at {_lsn(start)} does not add up: {position} bytes of "
                           f"headers and {data_total} of data in {total}")
    result.block_references += len(blocks)
    if rmid in (RM_XLOG, RM_XACT, RM_SMGR, RM_DBASE):
        main = record[total - main_length:]
        try:
            blocks.extend(_special_rows(rmid, info & ~XLR_INFO_MASK, main, start, block_size))
        except (struct.error, IndexError):
            raise WalReadError(f"the record at {_lsn(start)} (resource manager {rmid}, info "
                               f"{info:#04x}) has short main data") from None
    return blocks


def _special_rows(rmid: int, info: int, main: bytes, start: int,
                  block_size: int) -> Iterator[Row]:
    """The rows of the records that change files without naming blocks (walsummarizer.c's
    SummarizeSmgrRecord, SummarizeDbaseRecord, SummarizeXactRecord), and the refusal of
    ``wal_level = minimal``."""
    if rmid == RM_XLOG:
        if info == XLOG_PARAMETER_CHANGE:
            (level,) = struct.unpack_from("<i", main, 20)  # xl_parameter_change.wal_level
            if level == WAL_LEVEL_MINIMAL:
                raise WalReadError(f"wal_level was set to minimal at {_lsn(start)}: relations "
                                   "may have been written without WAL")
    elif rmid == RM_SMGR:
        if info == XLOG_SMGR_CREATE:
            space, database, relation, fork = struct.unpack_from("<IIIi", main)
            if fork != FSM_FORK:
                yield (space, database, relation, fork, True, 0)
        elif info == XLOG_SMGR_TRUNCATE:
            block, space, database, relation, flags = struct.unpack_from("<IIIIi", main)
            if flags & SMGR_TRUNCATE_HEAP:
                yield (space, database, relation, MAIN_FORK, True, block)
            if flags & SMGR_TRUNCATE_VM:
                yield (space, database, relation, VM_FORK, True,
                       visibility_map_length(block, block_size))
    elif rmid == RM_DBASE:
        if info in (XLOG_DBASE_CREATE_FILE_COPY, XLOG_DBASE_CREATE_WAL_LOG):
            database, space = struct.unpack_from("<II", main)
            yield (space, database, 0, MAIN_FORK, True, 0)
        elif info == XLOG_DBASE_DROP:
            database, count = struct.unpack_from("<Ii", main)
            for space in struct.unpack_from(f"<{count}I", main, 8):
                yield (space, database, 0, MAIN_FORK, True, 0)
    elif rmid == RM_XACT:
        operation = info & XLOG_XACT_OPMASK
        if operation in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT,
                         XLOG_XACT_ABORT_PREPARED) and info & XLOG_XACT_HAS_INFO:
            (xinfo,) = _U32.unpack_from(main, 8)  # after xact_time
            at = 12
            if xinfo & XACT_XINFO_HAS_DBINFO:
                at += 8
            if xinfo & XACT_XINFO_HAS_SUBXACTS:
                (count,) = struct.unpack_from("<i", main, at)
                at += 4 + 4 * count
            if xinfo & XACT_XINFO_HAS_RELFILELOCATORS:
                (count,) = struct.unpack_from("<i", main, at)
                at += 4
                for number in range(count):
                    space, database, relation = _LOCATOR.unpack_from(main, at + 12 * number)
                    for fork in (MAIN_FORK, VM_FORK, INIT_FORK):
                        yield (space, database, relation, fork, True, 0)


def visibility_map_length(heap_blocks: int, block_size: int = 8192) -> int:
    """The blocks of a visibility map that covers ``heap_blocks`` heap blocks: two bits per
    heap block in each map page after its 24-byte header (visibilitymap.c's
    visibilitymap_prepare_truncate; PostgreSQL 18's summarizer sets this as the limit)."""
    per_page = (block_size - 24) * 4
    return heap_blocks // per_page + (1 if heap_blocks % per_page else 0)


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
