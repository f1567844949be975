"""The WAL model: names for every segment size, kinds of archive files, LSNs, history files."""

from __future__ import annotations

import pytest

from walship import wal


@pytest.mark.parametrize("size_mb,per_log", [(1, 4096), (16, 256), (64, 64), (1024, 4)])
def test_segment_names_for_every_size(size_mb, per_log):
    size = size_mb << 20
    assert wal.segments_per_log(size) == per_log
    assert wal.segment_name(1, per_log - 1, size) == f"0000000100000000{per_log - 1:08X}"
    assert wal.segment_name(1, per_log, size) == "000000010000000100000000"
    assert wal.next_segments(f"0000000100000000{per_log - 1:08X}", 2, size) == [
        "000000010000000100000000", "000000010000000100000001"]
    parsed = wal.parse_name("000000030000000200000001")
    assert parsed.segment_number(size) == 2 * per_log + 1


def test_lsn_maps_to_segment():
    lsn = wal.Lsn.parse("16/B374D848")
    assert str(lsn) == "16/B374D848"
    assert wal.segment_name(1, lsn.segment_number(16 << 20), 16 << 20) == \
        "0000000100000016000000B3"


@pytest.mark.parametrize("name,kind,tli", [
    ("000000010000000000000001", wal.FileKind.SEGMENT, 1),
    ("0000000A0000000100000002.partial", wal.FileKind.PARTIAL, 10),
    ("00000002.history", wal.FileKind.HISTORY, 2),
    ("000000010000000000000002.00000028.backup", wal.FileKind.BACKUP, 1),
])
def test_parse_archive_names(name, kind, tli):
    parsed = wal.parse_name(name)
    assert parsed.kind is kind and parsed.timeline == tli


@pytest.mark.parametrize("name", ["", "RECOVERYXLOG", "00000001000000000000001", "../etc/passwd",
                                  "000000010000000000000001/x", "00000000.history",
                                  "000000010000000000000001.gz", "0000000100000000000010000",
                                  # matched in full: a trailing newline is not part of a name
                                  "000000010000000000000001\n", "00000002.history\n",
                                  "000000010000000000000001.partial\n",
                                  "000000010000000000000001.00000028.backup\n"])
def test_rejects_other_names(name):
    with pytest.raises(ValueError):
        wal.parse_name(name)


@pytest.mark.parametrize("size", [0, 1 << 19, (16 << 20) + 1, 3 << 20, 2 << 30])
def test_segment_size_must_be_a_power_of_two_in_range(size):
    with pytest.raises(ValueError):
        wal.check_segment_size(size)


def test_history_file():
    text = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000098\tat restore point\n"
    entries = wal.parse_history(text)
    assert [e.parent for e in entries] == [1, 2]
    assert entries[1].switchpoint == wal.Lsn.parse("0/5000098")
    assert wal.timeline_of(wal.Lsn.parse("0/2000000"), 3, entries) == 1
    assert wal.timeline_of(wal.Lsn.parse("0/4000000"), 3, entries) == 2
    assert wal.timeline_of(wal.Lsn.parse("0/6000000"), 3, entries) == 3
    with pytest.raises(ValueError):
        wal.parse_history("2\t0/1\n1\t0/2\n")
