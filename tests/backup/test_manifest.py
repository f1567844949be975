"""The backup manifest, keys, exclusion rules, part planning and tar parts: pure unit tests."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from walship import wal
from walship.backup import layout
from walship.backup.manifest import (DirectoryEntry, FileEntry, LinkEntry, Manifest,
                                     ManifestError, PartEntry, Tablespace, format_tablespace_map,
                                     parse_backup_label, parse_tablespace_map)
from walship.backup.parts import PartWriter, SourceFile, TarReader, plan_parts
from walship.backup.restore import (RecoveryTarget, choose_backup, make_target,
                                    recovery_settings, rewrite_auto_conf)
from walship.backup.scan import excluded, scan, unlogged
from walship.errors import NotFound, UsageError

T0 = datetime(2026, 11, 25, 2, 0, 0, 123456, tzinfo=timezone.utc)
SHA = "ab" * 32


def manifest(**changes) -> Manifest:
    base = Manifest(
        name="20261125T020000Z", label="walship backup 20261125T020000Z", pg_version=150004,
        system_identifier="7301234567890123456", timeline=1,
        start_lsn=wal.Lsn.parse("0/2000028"), stop_lsn=wal.Lsn.parse("0/4000100"),
        start_wal="000000010000000000000002", stop_wal="000000010000000000000004",
        wal_segment_size=16 << 20, start_time=T0, stop_time=T0 + timedelta(seconds=12.5),
        from_standby=False, data_directory="/var/lib/postgresql/15/main",
        owner_user="postgres", owner_group="postgres",
        tablespaces=(Tablespace(16384, "/srv/ts 1", "fast"),),
        directories=(DirectoryEntry("base", 0o700), DirectoryEntry("global", 0o700)),
        links=(LinkEntry("pg_log", "/var/log/pg"),),
        files=(FileEntry("PG_VERSION", 3, 0o600, 1764036000.5, SHA, 1),
               FileEntry("backup_label", 200, 0o600, 1764036000.0, SHA, 2),
               FileEntry("global/pg_control", 8192, 0o600, 1764036000.0, SHA, 2)),
        parts=(PartEntry(1, "backups/20261125T020000Z/part.00001", 2048, 100, 1,
                         "sha256:" + "ab" * 32),
               PartEntry(2, "backups/20261125T020000Z/part.00002", 10240, 400, 2)),
        walship_version="0.1.0")
    return replace(base, **changes)


def test_manifest_json_round_trip():
    m = manifest()
    again = Manifest.from_json(m.to_json())
    assert again == m
    doc = m.to_dict()
    assert doc["totals"] == {"files": 3, "size": 8395, "stored_size": 500, "parts": 2}
    assert doc["duration"] == 12.5 and doc["start_time"] == "2026-11-25T02:00:00.123456Z"
    assert again.needed_wal() == ["000000010000000000000002", "000000010000000000000003",
                                  "000000010000000000000004"]


def test_manifest_keeps_unknown_fields_of_the_same_version():
    doc = manifest().to_dict()
    doc["future_field"] = {"x": 1}
    import json

    assert Manifest.from_json(json.dumps(doc).encode()).to_dict()["future_field"] == {"x": 1}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=4), "newer"),
    (lambda d: d.update(format="other"), "not a walship"),
    (lambda d: d.pop("files"), "malformed"),
    (lambda d: d["files"].append(dict(d["files"][0])), "twice"),
    (lambda d: d["files"][0].update(path="../etc/passwd"), "unsafe"),
    (lambda d: d["files"][0].update(path="/etc/passwd"), "unsafe"),
    (lambda d: d["files"][0].update(part=9), "not listed"),
    (lambda d: d.update(stop_lsn="0/1000000"), "precedes"),
    (lambda d: d.update(stop_wal="000000020000000000000004"), "timeline"),
    (lambda d: d.update(files=d["files"][1:]), "PG_VERSION"),
    (lambda d: d["tablespaces"][0].update(location="relative"), "absolute"),
])
def test_manifest_rejects_malformed_documents(mutate, message):
    import json

    doc = manifest().to_dict()
    mutate(doc)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(json.dumps(doc).encode())


def test_manifest_rejects_non_json():
    with pytest.raises(ManifestError):
        Manifest.from_json(b"\x28\xb5\x2f\xfd garbage")


def test_needed_wal_with_small_segments_crosses_the_log_boundary():
    size = 1 << 20
    m = manifest(wal_segment_size=size, start_lsn=wal.Lsn.parse("0/FFE00028"),
                 stop_lsn=wal.Lsn.parse("1/00100010"),
                 start_wal=wal.segment_name(1, 0xFFE, size),
                 stop_wal=wal.segment_name(1, 0x1001, size))
    names = m.needed_wal()
    assert names == ["000000010000000000000FFE", "000000010000000000000FFF",
                     "000000010000000100000000", "000000010000000100000001"]


def test_backup_names_and_keys():
    assert layout.base_name(datetime(2026, 11, 25, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))) \
        == "20261125T020405Z"
    assert layout.with_suffix("20261125T020405Z", 1) == "20261125T020405Z"
    assert layout.with_suffix("20261125T020405Z", 3) == "20261125T020405Z-3"
    assert layout.is_backup_name("20261125T020405Z-12")
    assert not layout.is_backup_name("20261125T020405Z-0")
    assert not layout.is_backup_name("latest")
    names = ["20261125T020405Z-10", "20261125T020406Z", "20261125T020405Z-2",
             "20261125T020405Z"]
    assert sorted(names, key=layout.sort_key) == [
        "20261125T020405Z", "20261125T020405Z-2", "20261125T020405Z-10", "20261125T020406Z"]
    assert layout.part_key("20261125T020405Z", 7) == "backups/20261125T020405Z/part.00007"
    assert layout.manifest_key("20261125T020405Z") == "backups/20261125T020405Z/manifest"
    assert layout.split_key("backups/20261125T020405Z/part.00007") == (
        "20261125T020405Z", "part.00007")
    assert layout.split_key("backups/junk/part.00007") is None
    assert layout.split_key("wal/000000010000000000000001") is None
    assert layout.part_number("part.00007") == 7 and layout.part_number("manifest") is None


def test_backup_label_and_tablespace_map_parsing():
    label = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
             "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n"
             "START TIME: 2026-11-25 02:00:00 UTC\nLABEL: walship backup x\n"
             "START TIMELINE: 1\n")
    fields = parse_backup_label(label)
    assert fields["START TIMELINE"] == "1" and fields["BACKUP FROM"] == "primary"
    spaces = {16384: "/srv/ts 1", 16385: "/odd\\path\nwith newline\r"}
    text = format_tablespace_map(spaces)
    assert text.count("\n") == 3  # two line ends and one escaped newline
    assert parse_tablespace_map(text) == spaces
    assert parse_tablespace_map("16384 /a\r\n\n16385 /b") == {16384: "/a", 16385: "/b"}
    with pytest.raises(ValueError):
        parse_tablespace_map("abc /x\n")


@pytest.mark.parametrize("parent,name,is_dir,out", [
    ("", "postmaster.pid", False, True),
    ("", "postmaster.opts", False, True),
    ("", "backup_label", False, True),
    ("", "backup_label.old", False, True),
    ("", "tablespace_map", False, True),
    ("", "current_logfiles", False, True),
    ("", "postgresql.auto.conf", False, False),
    ("", "PG_VERSION", False, False),
    ("base/1", "PG_VERSION", False, False),
    ("global", "pg_control", False, True),
    ("global", "pg_internal.init", False, True),
    ("base/5", "pg_internal.init.1234", False, True),
    ("base", "pgsql_tmp", True, True),
    ("base/pgsql_tmp", "pgsql_tmp1234.0", False, True),
    ("base/5", "t3_16384", False, True),
    ("base/5", "t3_16384_fsm", False, True),
    ("base/5", "t3_16384.1", False, True),
    ("base/5", "16384", False, False),
    ("pg_tblspc/16390/PG_15_202209061/5", "t12_99", False, True),
    ("log", "t3_16384", False, False),  # only in database directories
    ("", "pg_wal", True, False),
])
def test_exclusion_rules(parent, name, is_dir, out):
    assert excluded(parent, name, is_dir) is out


def test_unlogged_relations_keep_only_their_init_fork():
    names = ["16384", "16384_fsm", "16384_vm", "16384.1", "16384_init", "16390", "16390_fsm",
             "PG_VERSION", "pg_filenode.map"]
    assert unlogged(names) == {"16384", "16384_fsm", "16384_vm", "16384.1"}
    assert unlogged(["16390", "16390_vm"]) == set()


@pytest.mark.parametrize("major", [15, 17, 18])
def test_scan_leaves_pg_wal_contents_out_and_keeps_its_directories(tmp_path, major):
    """Nothing of pg_wal is stored: segments, archive_status files, walship's spool, and the
    WAL summaries that PostgreSQL 17+ writes with summarize_wal; the directories that
    pg_basebackup keeps are (pg_wal/summaries from 17 on)."""
    data = tmp_path / "data"
    files = {"PG_VERSION": f"{major}\n", "global/pg_control": "c", "base/1/1259": "r",
             "pg_wal/000000010000000000000001": "w",
             "pg_wal/archive_status/000000010000000000000001.done": "",
             "pg_wal/summaries/0000000100000000010000280000000001000100.summary": "s",
             "pg_wal/summaries/temp.summary": "s",
             "pg_wal/walship/prefetch/000000010000000000000002": "p"}
    for rel, text in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    found = scan(data, major)
    assert sorted(f.path for f in found.files) == ["PG_VERSION", "base/1/1259"]
    wal_dirs = sorted(d.path for d in found.directories if d.path.startswith("pg_wal"))
    expected = ["pg_wal", "pg_wal/archive_status"]
    assert wal_dirs == expected + (["pg_wal/summaries"] if major >= 17 else [])


def test_plan_parts_fills_to_the_target_and_isolates_big_files():
    files = [SourceFile(f"f{i}", "", size) for i, size in
             enumerate([100, 200, 3000, 100, 10_000, 50, 50])]
    plan = plan_parts(files, 4096)
    assert [[f.path for f in part] for part in plan] == [
        ["f0", "f1"], ["f2"], ["f3"], ["f4"], ["f5", "f6"]]
    assert plan_parts([], 4096) == []


def test_part_stream_is_a_tar_and_records_what_it_stored(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "big").write_bytes(bytes(range(256)) * 5000)
    growing = tmp_path / "grows"
    growing.write_bytes(b"x" * 1000)
    files = [SourceFile("a", str(tmp_path / "a"), 5),
             SourceFile("deep/" + "long" * 40, str(tmp_path / "big"), 1_280_000),
             SourceFile("gone", str(tmp_path / "missing"), 10),
             SourceFile("grows", str(growing), 1000),
             SourceFile("memory", "", 3, b"abc")]
    writer = PartWriter(4, files)
    data = b"".join(writer.stream())
    assert writer.size == len(data) and len(data) % 512 == 0
    assert writer.skipped == ["gone"]
    by_path = {e.path: e for e in writer.entries}
    assert set(by_path) == {"a", "deep/" + "long" * 40, "grows", "memory"}
    assert by_path["a"].sha256 == hashlib.sha256(b"hello").hexdigest()
    assert all(e.part == 4 for e in writer.entries)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        seen = {m.name: tar.extractfile(m).read() for m in tar}
    assert seen["a"] == b"hello" and seen["memory"] == b"abc"
    assert seen["deep/" + "long" * 40] == (tmp_path / "big").read_bytes()


def test_a_file_that_changes_size_is_stored_with_its_announced_size(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 3_000_000)
    writer = PartWriter(1, [SourceFile("f", str(path), 3_000_000)])
    stream = writer.stream()
    header = next(stream)
    first = next(stream)  # 1 MiB read; now the file shrinks
    with open(path, "r+b") as handle:
        handle.truncate(1_500_000)
    rest = b"".join(stream)
    body = (first + rest)[:3_000_000]
    assert body[:1_500_000] == b"a" * 1_500_000 and body[1_500_000:] == bytes(1_500_000)
    entry = writer.entries[0]
    assert entry.size == 3_000_000
    assert entry.sha256 == hashlib.sha256(body).hexdigest()
    assert header[:1] == b"f"

    path.write_bytes(b"b" * 1000)
    writer = PartWriter(1, [SourceFile("f", str(path), 1000)])
    stream = writer.stream()
    next(stream)
    with open(path, "ab") as handle:  # grows after open: cut at the announced size
        handle.write(b"c" * 5000)
    b"".join(stream)
    assert writer.entries[0].size == 1000
    assert writer.entries[0].sha256 == hashlib.sha256(b"b" * 1000).hexdigest()


def _read_back(data: bytes, cuts: list[int]) -> tuple[dict[str, bytes], TarReader]:
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    reader = TarReader(iter(pieces))
    seen = {}
    for member, content in reader.members():
        assert member.isreg()
        seen[member.name] = b"".join(content)
    return seen, reader


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
def test_tar_reader_reads_what_the_part_writer_writes(tmp_path, split):
    (tmp_path / "big").write_bytes(os.urandom(700_001))
    (tmp_path / "empty").write_bytes(b"")
    files = [SourceFile("deep/" + "long" * 40, str(tmp_path / "big"), 700_001),
             SourceFile("empty", str(tmp_path / "empty"), 0),
             SourceFile("n\u00e9", "", 3, b"abc")]
    data = b"".join(PartWriter(1, files).stream())
    rng = random.Random(7)
    cuts = {"whole": [], "bytes": list(range(1, 3000)) + list(range(700_000, 703_000)),
            "random": sorted(rng.sample(range(1, len(data)), 200))}[split]
    seen, reader = _read_back(data, cuts)
    assert seen == {"deep/" + "long" * 40: (tmp_path / "big").read_bytes(), "empty": b"",
                    "n\u00e9": b"abc"}
    assert reader.drain() == 0 and reader.total == len(data)


def test_tar_reader_refuses_damaged_streams(tmp_path):
    files = [SourceFile("a", "", 5000, os.urandom(5000)), SourceFile("b", "", 9, b"123456789")]
    data = b"".join(PartWriter(1, files).stream())
    for cut in (100, 512, 3000, len(data) - 512, len(data) - 1):
        with pytest.raises(tarfile.ReadError):
            _read_back(data[:cut], [])
    header = bytearray(data)
    header[10] ^= 0xFF  # the header checksum no longer matches
    with pytest.raises(tarfile.TarError):
        _read_back(bytes(header), [])
    with pytest.raises(tarfile.TarError):
        _read_back(data[:5632] + bytes(512) + data[6144:], [])  # a lone zero block inside


def test_recovery_target_parsing_and_settings():
    assert make_target() == RecoveryTarget()
    target = make_target(time="2026-11-25 14:30:00+01")
    assert target.settings() == {"recovery_target_time": "2026-11-25 13:30:00.000000+00"}
    assert make_target(lsn="16/B374D848").settings() == {"recovery_target_lsn": "16/B374D848"}
    assert make_target(xid="1234").settings() == {"recovery_target_xid": "1234"}
    assert make_target(name="before").settings() == {"recovery_target_name": "before"}
    assert make_target(immediate=True).settings() == {"recovery_target": "immediate"}
    for bad in ({"time": "2026-11-25 14:30:00"}, {"time": "yesterday"}, {"lsn": "zz"},
                {"xid": "x1"}, {"xid": "5", "name": "n"}):
        with pytest.raises(UsageError):
            make_target(**bad)


def test_choose_backup_by_target():
    a = manifest(name="20261125T020000Z")
    b = manifest(name="20261126T020000Z", start_time=T0 + timedelta(days=1),
                 stop_time=T0 + timedelta(days=1, seconds=10),
                 start_lsn=wal.Lsn.parse("0/9000028"), stop_lsn=wal.Lsn.parse("0/A000100"),
                 start_wal="000000010000000000000009", stop_wal="00000001000000000000000A")
    assert choose_backup([a, b], RecoveryTarget()) is b
    between = make_target(time=(T0 + timedelta(hours=5)).isoformat())
    assert choose_backup([a, b], between) is a
    assert choose_backup([a, b], make_target(time=(T0 + timedelta(days=2)).isoformat())) is b
    with pytest.raises(NotFound):
        choose_backup([a, b], make_target(time=(T0 - timedelta(hours=1)).isoformat()))
    assert choose_backup([a, b], make_target(lsn="0/A000100")) is b
    assert choose_backup([a, b], make_target(lsn="0/A0000FF")) is a
    assert choose_backup([a, b], make_target(xid="5")) is b
    with pytest.raises(NotFound):
        choose_backup([], RecoveryTarget())


def test_recovery_settings_and_auto_conf_rewrite():
    settings = recovery_settings(make_target(name="it's"), "promote",
                                 ["/opt/walship venv/bin/walship"])
    assert settings["restore_command"] == \
        "'''/opt/walship venv/bin/walship'' wal-fetch %f %p'"
    assert settings["recovery_target_name"] == "'it''s'"
    assert settings["recovery_target_timeline"] == "'latest'"
    assert settings["recovery_target_action"] == "'promote'"
    assert "recovery_target_action" not in recovery_settings(RecoveryTarget(), "pause",
                                                             ["/w"])
    text = ("# Do not edit this file manually!\nshared_buffers = '1GB'\n"
            "restore_command = 'old'\n  Recovery_Target_Time='x'\nprimary_conninfo = 'h'\n")
    out = rewrite_auto_conf(text, {"restore_command": "'new'"}, "walship restore")
    assert "old" not in out and "Recovery_Target_Time" not in out
    assert "shared_buffers = '1GB'" in out and "primary_conninfo" in out
    assert out.endswith("# walship restore\nrestore_command = 'new'\n")
