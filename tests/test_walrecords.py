"""walship.walrecords: the WAL record reader, on WAL built byte by byte here (page headers,
records spanning pages and segments, every kind of block header) and on its refusals. The same
reader against a real server's WAL and PostgreSQL 18's own summaries: tests/backup/
test_walscan_e2e.py."""

from __future__ import annotations

import io
import struct

import pytest

from walship import walrecords as wr
from walship.walrecords import ScanResult, Segment, WalReadError, scan

SEG = 1 << 20  # the smallest wal_segment_size
PAGE = 8192
SYSID = 7001
SPC, DB = 1663, 5


def block(block_id: int, relation: int, number: int, *, fork: int = 0, data: int = 0,
          image: tuple[int, int, int] | None = None, same_rel: bool = False,
          hole_length: int | None = None) -> tuple[bytes, int]:
    """One XLogRecordBlockHeader (and what follows it) and the bytes of data it announces.
    ``image``: (bimg_len, hole_offset, bimg_info)."""
    flags = fork | (0x20 if data else 0) | (0x10 if image else 0) | (0x80 if same_rel else 0)
    out = struct.pack("<BBH", block_id, flags, data)
    payload = data
    if image:
        out += struct.pack("<HHB", *image)
        if image[2] & wr.BKPIMAGE_HAS_HOLE and image[2] & wr.BKPIMAGE_COMPRESSED:
            out += struct.pack("<H", hole_length or 0)
        payload += image[0]
    if not same_rel:
        out += struct.pack("<III", SPC, DB, relation)
    out += struct.pack("<I", number)
    return out, payload


def record(rmid: int = 10, info: int = 0, blocks: tuple[tuple[bytes, int], ...] = (),
           main: bytes = b"", origin: bool = False, toplevel: bool = False,
           long_main: bool = False) -> bytes:
    """A record without its header (added by :class:`Wal`, which knows xl_prev)."""
    headers = b"".join(h for h, _ in blocks)
    if origin:
        headers += struct.pack("<BH", wr.XLR_BLOCK_ID_ORIGIN, 1)
    if toplevel:
        headers += struct.pack("<BI", wr.XLR_BLOCK_ID_TOPLEVEL_XID, 99)
    if main:
        headers += (struct.pack("<BI", 254, len(main)) if long_main or len(main) > 255
                    else struct.pack("<BB", 255, len(main)))
    data = b"".join(b"\xab" * n for _, n in blocks) + main
    return bytes([rmid, info]) + headers + data  # rmid/info are moved into the header


class Wal:
    """WAL written the way PostgreSQL lays it out: records MAXALIGNed, split across pages with
    XLP_FIRST_IS_CONTRECORD and xlp_rem_len, a long header on each segment's first page."""

    def __init__(self, first_segment: int = 3, segments: int = 3, magic: int = 0xD110,
                 tli: int = 1) -> None:
        self.base = first_segment * SEG
        self.first = first_segment
        self.buf = bytearray(segments * SEG)
        self.magic, self.tli = magic, tli
        self.headers: dict[int, tuple[int, int]] = {}  # page lsn -> (info flags, rem_len)
        self.pos = self.base + wr.LONG_HEADER
        self.prev = 0
        self.starts: list[int] = []

    def header_size(self, page: int) -> int:
        return wr.LONG_HEADER if page % SEG == 0 else wr.SHORT_HEADER

    def add(self, body: bytes) -> int:
        rmid, info, rest = body[0], body[1], body[2:]
        total = wr.RECORD_HEADER + len(rest)
        data = struct.pack("<IIQBBxxI", total, 0, self.prev, info, rmid, 0) + rest
        return self.raw(data)

    def raw(self, data: bytes) -> int:
        pos = (self.pos + 7) & ~7
        if pos % PAGE == 0:
            pos += self.header_size(pos)
        start = pos
        while data:
            page = pos // PAGE * PAGE
            chunk = data[:page + PAGE - pos]
            self.buf[pos - self.base:pos - self.base + len(chunk)] = chunk
            data = data[len(chunk):]
            pos += len(chunk)
            if data:
                following = page + PAGE
                self.headers[following] = (wr.XLP_FIRST_IS_CONTRECORD, len(data))
                pos = following + self.header_size(following)
        self.pos = pos
        self.prev = start
        self.starts.append(start)
        return start

    def switch(self) -> int:
        start = self.add(bytes([wr.RM_XLOG, wr.XLOG_SWITCH]))
        self.pos = (self.pos // SEG + 1) * SEG
        return start

    def segments(self, pages_written_to: int | None = None) -> list[Segment]:
        """The segments, each page given a header up to ``pages_written_to`` (default: the
        page after the last record; later pages stay zero, as in a file not written yet)."""
        end = pages_written_to or (self.pos // PAGE + 1) * PAGE
        buf = bytearray(self.buf)
        for page in range(self.base, min(end, self.base + len(buf)), PAGE):
            info, rem = self.headers.get(page, (0, 0))
            if page % SEG == 0:
                info |= wr.XLP_LONG_HEADER
            struct.pack_into("<HHIQI", buf, page - self.base, self.magic, info, self.tli, page,
                             rem)
            if page % SEG == 0:
                struct.pack_into("<QII", buf, page - self.base + 24, SYSID, SEG, PAGE)
        return [Segment(self.first + n, io.BytesIO(bytes(buf[n * SEG:(n + 1) * SEG])))
                for n in range(len(buf) // SEG)]


def rows_of(wal: Wal, since: int | None = None, until: int | None = None, **kw) -> list:
    return list(scan(wal.segments(), since=wal.base if since is None else since,
                     until=wal.pos if until is None else until, timeline=1, segment_size=SEG,
                     system_identifier=SYSID, **kw))


# -- what is read --------------------------------------------------------------------------------
def test_block_references_of_every_shape():
    wal = Wal()
    wal.add(record(blocks=(block(0, 100, 7, data=30),)))
    wal.add(record(blocks=(block(0, 101, 1, image=(8192, 0, 0)),
                           block(1, 101, 2, image=(500, 100, wr.BKPIMAGE_HAS_HOLE | 0x04),
                                 same_rel=True, hole_length=7000),
                           block(2, 102, 3, fork=wr.VM_FORK, data=4)),
                   main=b"m" * 10, origin=True, toplevel=True))
    wal.add(record(blocks=(block(0, 103, 9, fork=wr.FSM_FORK, data=2),
                           block(5, 104, 0, fork=wr.INIT_FORK)), main=b"x" * 300))
    rows = rows_of(wal)
    assert rows == [(SPC, DB, 100, 0, False, 7), (SPC, DB, 101, 0, False, 1),
                    (SPC, DB, 101, 0, False, 2), (SPC, DB, 102, 2, False, 3),
                    (SPC, DB, 104, 3, False, 0)]  # the free space map is left out


def test_records_across_pages_and_segments():
    wal = Wal(segments=4)
    big = record(blocks=(block(0, 200, 1, image=(8192, 0, 0)), block(1, 200, 2, data=8000)),
                 main=b"z" * 5000)
    for n in range(150):  # ~21 kB each: many page and two segment boundaries crossed
        wal.add(big if n % 3 else record(blocks=(block(0, 201, n),)))
    assert wal.pos > wal.base + 2 * SEG  # into the third segment
    result = ScanResult()
    rows = rows_of(wal, result=result)
    assert result.records == 150
    assert [r for r in rows if r[2] == 201] == [(SPC, DB, 201, 0, False, n)
                                                for n in range(0, 150, 3)]
    assert len(rows) == 50 + 2 * 100


def test_only_records_from_since_and_before_until():
    wal = Wal()
    starts = [wal.add(record(blocks=(block(0, 300, n),))) for n in range(10)]
    rows = rows_of(wal, since=starts[3], until=starts[7])
    assert [r[5] for r in rows] == [3, 4, 5, 6]
    # a range starting inside a record keeps that record (more is safe)
    assert [r[5] for r in rows_of(wal, since=starts[3] + 8, until=starts[5])] == [3, 4]


def test_a_segment_starting_with_the_tail_of_a_record():
    wal = Wal(first_segment=3, segments=2)
    filler = record(blocks=(block(0, 400, 0, image=(1000, 0, 0)),))
    while wal.pos < wal.base + SEG - 3000:
        wal.add(filler)
    spanning = wal.add(record(blocks=(block(0, 401, 1, image=(8000, 0, 0)),)))
    after = wal.add(record(blocks=(block(0, 402, 2),)))
    assert spanning < wal.base + SEG < after
    segments = wal.segments()[1:]  # start reading at the second segment
    rows = list(scan(segments, since=wal.base + SEG, until=wal.pos, timeline=1,
                     segment_size=SEG, system_identifier=SYSID))
    assert rows == [(SPC, DB, 402, 0, False, 2)]


def test_xlog_switch_skips_the_rest_of_the_segment():
    wal = Wal()
    wal.add(record(blocks=(block(0, 500, 1),)))
    wal.switch()
    wal.add(record(blocks=(block(0, 500, 2),)))
    assert [r[5] for r in rows_of(wal)] == [1, 2]


def test_files_changed_without_block_references():
    wal = Wal()
    wal.add(record(wr.RM_SMGR, wr.XLOG_SMGR_CREATE, main=struct.pack("<IIIi", SPC, DB, 600, 0)))
    wal.add(record(wr.RM_SMGR, wr.XLOG_SMGR_CREATE, main=struct.pack("<IIIi", SPC, DB, 600, 1)))
    wal.add(record(wr.RM_SMGR, wr.XLOG_SMGR_TRUNCATE,
                   main=struct.pack("<IIIIi", 42, SPC, DB, 601, 0x7)))
    wal.add(record(wr.RM_SMGR, wr.XLOG_SMGR_TRUNCATE,
                   main=struct.pack("<IIIIi", 43, SPC, DB, 602, 0x4)))  # FSM only: nothing
    wal.add(record(wr.RM_DBASE, wr.XLOG_DBASE_CREATE_FILE_COPY,
                   main=struct.pack("<IIII", 16400, 1663, 1, 1663)))
    wal.add(record(wr.RM_DBASE, wr.XLOG_DBASE_CREATE_WAL_LOG,
                   main=struct.pack("<II", 16401, 16500)))
    wal.add(record(wr.RM_DBASE, wr.XLOG_DBASE_DROP,
                   main=struct.pack("<Ii2I", 16402, 2, 1663, 16500)))
    commit = struct.pack("<qI", 0, wr.XACT_XINFO_HAS_DBINFO | wr.XACT_XINFO_HAS_SUBXACTS
                         | wr.XACT_XINFO_HAS_RELFILELOCATORS)
    commit += struct.pack("<II", DB, SPC) + struct.pack("<i2I", 2, 11, 12)
    commit += struct.pack("<i", 2) + struct.pack("<6I", SPC, DB, 603, SPC, DB, 604)
    wal.add(record(wr.RM_XACT, wr.XLOG_XACT_COMMIT | wr.XLOG_XACT_HAS_INFO, main=commit))
    abort = struct.pack("<qI", 0, wr.XACT_XINFO_HAS_RELFILELOCATORS)
    abort += struct.pack("<i3I", 1, SPC, DB, 605)
    wal.add(record(wr.RM_XACT, wr.XLOG_XACT_ABORT | wr.XLOG_XACT_HAS_INFO, main=abort))
    wal.add(record(wr.RM_XACT, wr.XLOG_XACT_COMMIT, main=struct.pack("<q", 0)))  # plain commit
    limits = rows_of(wal)
    assert all(is_limit for *_, is_limit, _ in limits)
    assert set(limits) == {
        (SPC, DB, 600, 0, True, 0),  # created (its FSM left out)
        (SPC, DB, 601, 0, True, 42), (SPC, DB, 601, 2, True, 1),  # heap and VM truncated
        (1663, 16400, 0, 0, True, 0), (16500, 16401, 0, 0, True, 0),  # databases created
        (1663, 16402, 0, 0, True, 0), (16500, 16402, 0, 0, True, 0),  # ... and dropped
        *((SPC, DB, rel, fork, True, 0) for rel in (603, 604, 605) for fork in (0, 2, 3)),
    }


def test_the_length_of_a_truncated_visibility_map():
    per_page = (8192 - 24) * 4  # heap blocks one map page covers
    assert [wr.visibility_map_length(n) for n in (0, 1, per_page, per_page + 1)] == [0, 1, 1, 2]
    assert wr.visibility_map_length(100, block_size=32768) == 1


def test_resume_and_complete_only():
    """A first step up to a flush position that cuts a record reads only the complete ones
    and stops where the cut one begins; the next step resumes there."""
    wal = Wal()
    for n in range(40):
        wal.add(record(blocks=(block(0, 700, n, image=(3000, 0, 0)),)))
    cut = wal.starts[25] + 100  # inside record 25
    result = ScanResult()
    first = list(scan(wal.segments(), since=wal.base, until=cut, timeline=1, segment_size=SEG,
                      system_identifier=SYSID, result=result, complete_only=True))
    assert [r[5] for r in first] == list(range(25)) and result.end == wal.starts[25]
    rest = list(scan(wal.segments(), since=result.end, until=wal.pos, timeline=1,
                     segment_size=SEG, system_identifier=SYSID, result=result, resume=True))
    assert [r[5] for r in rest] == list(range(25, 40))
    # the file not written beyond the flush position: pages after it are zero
    wal2 = Wal()
    for n in range(10):
        wal2.add(record(blocks=(block(0, 701, n, image=(6000, 0, 0)),)))
    flush = wal2.starts[9] + 50
    segments = wal2.segments(pages_written_to=(flush // PAGE + 1) * PAGE)
    result = ScanResult()
    got = list(scan(segments, since=wal2.base, until=flush, timeline=1, segment_size=SEG,
                    system_identifier=SYSID, result=result, complete_only=True))
    assert [r[5] for r in got] == list(range(9)) and result.end == wal2.starts[9]


def test_complete_only_stops_exactly_before_the_first_record_ending_past_the_limit():
    """Whatever the limit (a flush position), the records read are exactly those that end by
    it, across page and segment boundaries, images of every size. (The reader works a
    record's end out, page headers counted, only when a cheap bound says it could be past the
    limit: the bound must never skip a record that is.)"""
    import random

    rng = random.Random(11)
    wal = Wal(segments=2)
    ends: list[int] = []
    while wal.pos < wal.base + SEG + SEG // 4:
        size = rng.choice([0, 8, 500, 3000, 8000, 8150, 16300, 30000, 65000])
        wal.add(record(blocks=(block(0, 900, len(ends), image=(size, 0, 0) if size else None),),
                       main=b"m" * rng.choice([0, 3])))
        ends.append(wal.pos)
    limits = {wal.base + 100}
    for end in ends[:-1]:
        limits |= {end - 1, end, end + 1, end + 8}
    limits |= {rng.randrange(wal.base, ends[-2]) for _ in range(300)}
    segments = wal.segments()
    for until in sorted(limits):
        for segment in segments:
            segment.file.seek(0)
        result = ScanResult()
        got = [r[5] for r in scan(segments, since=wal.base, until=until, timeline=1,
                                  segment_size=SEG, system_identifier=SYSID, result=result,
                                  complete_only=True)]
        whole = sum(1 for end in ends if end <= until)
        assert got == list(range(whole)), (until, got[-3:], whole)
        assert result.end == wal.starts[whole], (until, result.end)


def test_resume_checks_the_chain():
    wal = Wal()
    for n in range(5):
        wal.add(record(blocks=(block(0, 800, n),)))
    result = ScanResult()
    list(scan(wal.segments(), since=wal.base, until=wal.starts[3], timeline=1,
              segment_size=SEG, system_identifier=SYSID, result=result))
    result.last = wal.starts[1]  # as if another scan had read up to here
    with pytest.raises(WalReadError, match="points back"):
        list(scan(wal.segments(), since=result.end, until=wal.pos, timeline=1,
                  segment_size=SEG, system_identifier=SYSID, result=result, resume=True))


# -- what is refused ----------------------------------------------------------------------------
def _damaged(wal: Wal, offset: int, data: bytes) -> list[Segment]:
    segments = wal.segments()
    raw = bytearray(segments[0].file.getvalue())  # type: ignore[attr-defined]
    raw[offset:offset + len(data)] = data
    segments[0] = Segment(segments[0].number, io.BytesIO(bytes(raw)))
    return segments


def _scan_all(segments: list[Segment], wal: Wal, **kw) -> list:
    return list(scan(segments, since=wal.base, until=wal.pos, timeline=1, segment_size=SEG,
                     system_identifier=SYSID, **kw))


def _small_wal(count: int = 50) -> Wal:
    wal = Wal()
    for n in range(count):
        wal.add(record(blocks=(block(0, 900, n, image=(2000, 0, 0)),)))
    return wal


@pytest.mark.parametrize("offset, data, message", [
    (PAGE, struct.pack("<H", 0xD106), "does not know"),  # PostgreSQL 14's magic
    (PAGE + 8, struct.pack("<Q", 5 * SEG), "says it is page"),  # a recycled segment
    (PAGE + 4, struct.pack("<I", 2), "timeline 2"),
    (PAGE + 2, struct.pack("<H", wr.XLP_FIRST_IS_OVERWRITE_CONTRECORD), "incomplete"),
    (32, struct.pack("<I", 4 << 20), "segment size"),
    (24, struct.pack("<Q", 1), "system"),
])
def test_pages_that_are_not_this_wal(offset, data, message):
    wal = _small_wal()
    with pytest.raises(WalReadError, match=message):
        _scan_all(_damaged(wal, offset, data), wal)


def test_records_that_do_not_add_up():
    wal = _small_wal()
    third = wal.starts[3] - wal.base
    with pytest.raises(WalReadError, match="points back"):
        _scan_all(_damaged(wal, third + 8, struct.pack("<Q", 12345)), wal)
    with pytest.raises(WalReadError, match="does not add up"):
        _scan_all(_damaged(wal, third + wr.RECORD_HEADER + 2, struct.pack("<H", 10)), wal)
    with pytest.raises(WalReadError, match="block id"):
        _scan_all(_damaged(wal, third + wr.RECORD_HEADER, b"\x40"), wal)
    with pytest.raises(WalReadError, match="length"):
        _scan_all(_damaged(wal, third, struct.pack("<I", 5)), wal)
    # a continuation page whose rem_len disagrees
    spanning = next(s for s in wal.starts if s // PAGE != (s + 2100) // PAGE)
    page = (spanning // PAGE + 1) * PAGE - wal.base
    with pytest.raises(WalReadError, match="does not continue"):
        _scan_all(_damaged(wal, page + 16, struct.pack("<I", 1)), wal)


def test_the_end_of_the_wal_before_until_and_missing_segments():
    wal = _small_wal()
    with pytest.raises(WalReadError, match="ends at"):
        list(scan(wal.segments(), since=wal.base, until=wal.pos + 4 * PAGE, timeline=1,
                  segment_size=SEG, system_identifier=SYSID))
    longer = _small_wal(600)  # 1.2 MB: into the second segment
    with pytest.raises(WalReadError, match="no more segments"):
        list(scan(longer.segments()[:1], since=longer.base, until=longer.pos, timeline=1,
                  segment_size=SEG, system_identifier=SYSID))
    with pytest.raises(WalReadError, match="was expected"):
        list(scan(wal.segments()[1:], since=wal.base, until=wal.pos, timeline=1,
                  segment_size=SEG, system_identifier=SYSID))


def test_wal_level_minimal_is_refused():
    wal = Wal()
    wal.add(record(blocks=(block(0, 950, 1),)))
    change = struct.pack("<6i2?", 100, 8, 10, 0, 64, 0, False, False)
    wal.add(record(wr.RM_XLOG, wr.XLOG_PARAMETER_CHANGE, main=change))
    with pytest.raises(WalReadError, match="minimal"):
        rows_of(wal)
    fine = Wal()
    fine.add(record(wr.RM_XLOG, wr.XLOG_PARAMETER_CHANGE,
                    main=struct.pack("<6i2?", 100, 8, 10, 0, 64, 1, False, False)))
    assert rows_of(fine) == []


def test_every_known_format_and_no_other():
    for magic in (0xD110, 0xD113, 0xD116, 0xD118):
        wal = Wal(magic=magic)
        wal.add(record(blocks=(block(0, 990, 4),)))
        result = ScanResult()
        assert rows_of(wal, result=result) == [(SPC, DB, 990, 0, False, 4)]
        assert result.version == wr.PAGE_MAGICS[magic]
    assert wr.page_address(struct.pack("<HHIQI", 0xD110, 0, 1, 77, 0)) == 77
    assert wr.page_address(struct.pack("<HHIQI", 0xD10D, 0, 1, 77, 0)) is None


def test_an_empty_range_reads_nothing():
    assert list(scan([], since=5 * SEG, until=5 * SEG, timeline=1, segment_size=SEG)) == []
    with pytest.raises(WalReadError, match="backwards"):
        list(scan([], since=5 * SEG, until=4 * SEG, timeline=1, segment_size=SEG))


def test_max_bytes_counts_the_pages_read_not_the_switched_away_rest():
    """archive_timeout switches segments often: the rest of a switched segment is never
    read, and does not count against ``max_bytes``."""
    wal = Wal(segments=3)
    for n in range(3):
        if n:
            wal.switch()  # each segment: one page used
        wal.add(record(blocks=(block(0, 980, n),)))
    result = ScanResult()
    assert [r[5] for r in rows_of(wal, result=result, max_bytes=5 * PAGE)] == [0, 1, 2]
    assert result.bytes_read <= 4 * PAGE, result.bytes_read  # 3 segments' first pages (+1)
    busy = _small_wal(200)  # ~50 pages of records
    with pytest.raises(wr.TooMuchWal):
        rows_of(busy, max_bytes=10 * PAGE)
