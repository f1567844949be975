"""walship.backup.walscan without a server: where segments come from (pg_wal when the file is
that segment, else the repository), and the bounded store of changed blocks. Against real
servers: test_walscan_e2e.py."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from tests.test_walrecords import SEG, SYSID, Wal, block, record
from walship import wal, walrecords
from walship.backup import walscan
from walship.errors import IntegrityError


def page(address: int) -> bytes:
    return struct.pack("<HHIQI", 0xD110, 2, 1, address, 0).ljust(walrecords.SHORT_HEADER, b"\0")


def test_a_file_of_pg_wal_is_used_only_if_it_is_that_segment(tmp_path: Path):
    (tmp_path / "good").write_bytes(page(5 * SEG) + b"x" * 100)
    (tmp_path / "old").write_bytes(page(2 * SEG))  # recycled: its first page is older
    (tmp_path / "short").write_bytes(b"\x10\xd1")
    (tmp_path / "link").symlink_to(tmp_path / "good")
    os.mkfifo(tmp_path / "fifo")
    handle = walscan._open_local(str(tmp_path / "good"), 5 * SEG)
    assert handle is not None and handle.read(2) == b"\x10\xd1"  # from its first byte
    handle.close()
    for name in ("old", "short", "link", "fifo", "missing"):
        assert walscan._open_local(str(tmp_path / name), 5 * SEG) is None, name


def _three_segments() -> tuple[Wal, list[walrecords.Segment], list[str]]:
    built = Wal(first_segment=3, segments=3)
    for n in range(700):  # ~2.2 MB: three 1 MB segments
        built.add(record(blocks=(block(0, 100, n, image=(3000, 0, 0)),)))
    segments = built.segments()
    return built, segments, [wal.segment_name(1, s.number, SEG) for s in segments]


def test_segments_from_pg_wal_else_streamed_from_the_repository(tmp_path: Path):
    built, segments, names = _three_segments()
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    (pg_wal / names[0]).write_bytes(segments[0].file.getvalue())
    (pg_wal / names[1]).write_bytes(page(9 * SEG).ljust(SEG, b"\0"))  # recycled under its name
    archived = {names[1]: segments[1].file.getvalue(), names[2]: segments[2].file.getvalue()}
    asked: list[str] = []
    drained: list[str] = []

    def fetch(name: str):
        asked.append(name)
        data = archived[name]
        for start in range(0, len(data), 100_000):  # odd-sized chunks
            yield data[start:start + 100_000]
        drained.append(name)  # read to its end: the codec's checks would have run

    stats = walscan.ScanStats()
    provider = walscan._segments(3, 5, 1, SEG, str(pg_wal), fetch, stats)
    rows = list(walrecords.scan(provider, since=built.base, until=built.pos, timeline=1,
                                segment_size=SEG, system_identifier=SYSID))
    provider.close()
    assert [r[5] for r in rows] == list(range(700))
    assert asked == names[1:] and (stats.local, stats.fetched) == (1, 2)
    assert drained == names[1:]  # the last one too, though the scan stopped inside it
    assert list(tmp_path.iterdir()) == [pg_wal]  # nothing written

    with pytest.raises(walrecords.WalReadError, match="is not in"):
        list(walrecords.scan(walscan._segments(3, 5, 1, SEG, str(pg_wal), None,
                                               walscan.ScanStats()),
                             since=built.base, until=built.pos, timeline=1, segment_size=SEG))


def test_a_streamed_segment_that_fails_its_check_fails_the_scan(tmp_path: Path):
    """The codec's last check (digest, authentication) comes at the end of the stream: a scan
    that stopped inside the segment still waits for it, and fails with it."""
    built, segments, names = _three_segments()

    def fetch(name: str):
        yield segments[names.index(name)].file.getvalue()
        raise IntegrityError(f"{name} is damaged")

    provider = walscan._segments(3, 5, 1, SEG, str(tmp_path), fetch, walscan.ScanStats())
    rows = walrecords.scan(provider, since=built.base, until=built.base + 1000, timeline=1,
                           segment_size=SEG, system_identifier=SYSID)
    with pytest.raises(IntegrityError, match="damaged"):
        list(rows)
        provider.close()


def test_chunk_reader():
    reader = walscan.ChunkReader([b"abc", b"", b"defgh", b"ij"])
    assert reader.read(2) == b"ab"
    assert reader.seek(4) == 4 and reader.read(3) == b"efg"
    with pytest.raises(OSError):
        reader.seek(1)
    assert reader.read(10) == b"hij" and reader.read(1) == b""


def test_chunk_reader_reads_what_the_chunks_hold_in_any_cut():
    rng = random.Random(7)
    for _ in range(200):
        data = rng.randbytes(rng.randrange(0, 3000))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randrange(5))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        reader = walscan.ChunkReader(chunks)
        out, at = [], 0
        while True:
            if rng.random() < 0.2:
                at = reader.seek(at + rng.randrange(300))
                out.append(None)
            piece = reader.read(rng.choice([1, 7, 64, 512, 1000]))
            if not piece:
                break
            out.append((at, piece))
            at += len(piece)
        for entry in out:
            if entry is not None:
                assert data[entry[0]:entry[0] + len(entry[1])] == entry[1]
        assert at == len(data)


def test_the_changed_blocks_are_kept_small_and_bounded():
    forks = walscan._Forks(max_blocks=50_000)
    for n in range(30_000):
        forks.add((1663, 5, 100, 0, False, n % 1000))  # many references to few blocks
        forks.add((1663, 5, 101, 0, False, n))
    forks.add((1663, 5, 100, 0, True, 700))
    forks.add((1663, 5, 100, 0, True, 400))
    rows = list(forks.rows())
    assert rows[0] == (1663, 5, 100, 0, True, 400)  # the lowest limit first
    assert [r[5] for r in rows[1:1001]] == list(range(1000))  # deduplicated, in order
    assert len(rows) == 1 + 1000 + 30_000
    assert len(forks.blocks[(1663, 5, 100, 0)]) < 10_000  # compacted as it grew
    small = walscan._Forks(max_blocks=5_000)
    with pytest.raises(walscan._TooMany):
        for n in range(100_000):
            small.add((1663, 5, 102, 0, False, n))


def test_a_defect_in_the_reader_never_fails_the_backup(monkeypatch, tmp_path: Path):
    """Anything unexpected while reading makes the scanner say why and the backup compare
    every block instead."""
    scanner = walscan.WalScanner.__new__(walscan.WalScanner)  # built by hand: no server
    scanner.pg_wal, scanner.fetch, scanner.timeline = str(tmp_path), None, 1
    scanner.since_lsn, scanner.wal_segment_size = wal.Lsn(3 * SEG), SEG
    scanner.budget, scanner.max_blocks = None, walscan.MAX_BLOCKS
    scanner.stats, scanner.failed = walscan.ScanStats(), None
    scanner.position, scanner.started = 3 * SEG, False
    scanner.result, scanner.forks = walrecords.ScanResult(), walscan._Forks(walscan.MAX_BLOCKS)
    scanner.layout = ("7001", 8192, 131072, "PG_15_202209061")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a defect")
        yield  # pragma: no cover

    monkeypatch.setattr(walrecords, "scan", broken)
    scanner.read(wal.Lsn(4 * SEG))
    found = scanner.changes(wal.Lsn(4 * SEG))
    assert isinstance(found, walscan.NoChangeSource)
    assert "unexpected ZeroDivisionError" in found.reason
