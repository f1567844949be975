"""backup-push, backup-list and backup-fetch on a fake server: a data directory built by hand
and a fake backup session, on the memory and file:// backends. Fast; no PostgreSQL needed."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.fixtures.archives import temporary_archive

from walship import wal
from walship.archive import Archive
from walship.backup import catalog, layout
from walship.backup.fetch import MARKER, fetch_backup
from walship.backup.push import push_backup
from walship.backup.restore import make_target, restore
from walship.backup.source import ServerInfo, StopResult
from walship.codec import Codec
from walship.errors import IntegrityError, NotFound, UsageError
from walship.storage import open_storage

SEG = 16 << 20


class FakeSource:
    """A backup session over a hand-made data directory."""

    def __init__(self, data: Path, tablespace: Path | None = None,
                 stop_hook=None) -> None:
        self.data = data
        self.tablespace = tablespace
        self.calls: list[str] = []
        self.stop_hook = stop_hook

    def describe(self) -> ServerInfo:
        return ServerInfo(150004, str(self.data), "7301234567890123456", SEG, False, "on",
                          {16400: "fast"})

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def start(self, label: str, fast: bool) -> wal.Lsn:
        self.calls.append(f"start {label}")
        return wal.Lsn.parse("0/2000028")

    def stop(self, wait_for_archive: bool) -> StopResult:
        self.calls.append(f"stop {wait_for_archive}")
        if self.stop_hook:
            self.stop_hook()
        label = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
                 "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n"
                 "BACKUP FROM: primary\nSTART TIME: 2026-11-25 02:00:00 UTC\n"
                 "LABEL: x\nSTART TIMELINE: 1\n")
        spcmap = f"16400 {self.tablespace}\n" if self.tablespace else ""
        return StopResult(wal.Lsn.parse("0/3000000"), label, spcmap, self.now())

    def close(self) -> None:
        self.calls.append("close")


def make_cluster(root: Path) -> tuple[Path, Path]:
    data = root / "data"
    ts = root / "ts"
    for d in ("base/1", "base/5", "base/pgsql_tmp", "global", "pg_wal/archive_status",
              "pg_tblspc", "pg_stat_tmp", "pg_replslot/slot", "pg_xact", "log"):
        (data / d).mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    files = {
        "PG_VERSION": b"15\n",
        "postgresql.auto.conf": b"# Do not edit\nrestore_command = 'old'\n",
        "postmaster.pid": b"1234\n",
        "global/pg_control": (7301234567890123456).to_bytes(8, sys.byteorder)
        + os.urandom(8184),
        "global/pg_internal.init": b"cache",
        "base/1/PG_VERSION": b"15\n",
        "base/1/1259": os.urandom(300_000),
        "base/5/16384": os.urandom(2_000_000),
        "base/5/16384_fsm": os.urandom(24576),
        "base/5/16390": b"u" * 8192,  # unlogged: only its init fork is kept
        "base/5/16390_init": b"",
        "base/5/t3_16500": b"temp",
        "base/pgsql_tmp/pgsql_tmp99.0": b"spill",
        "pg_wal/000000010000000000000002": bytes(1 << 20),
        "pg_wal/archive_status/000000010000000000000002.done": b"",
        "pg_stat_tmp/global.stat": b"s",
        "pg_replslot/slot/state": b"s",
        "pg_xact/0000": os.urandom(8192),
        "log/postgresql.log": b"log line\n" * 100,
    }
    for rel, content in files.items():
        (data / rel).write_bytes(content)
    os.symlink("postgresql.auto.conf", data / "conf-link")
    (ts / "PG_15_202209061" / "5").mkdir(parents=True)
    (ts / "PG_14_202107181").mkdir()
    (ts / "PG_15_202209061" / "5" / "17000").write_bytes(os.urandom(500_000))
    (ts / "PG_14_202107181" / "other").write_bytes(b"not ours")
    os.symlink(ts, data / "pg_tblspc" / "16400")
    return data, ts


@pytest.fixture(params=["memory", "file", "file-encrypted"])
def archive(request, tmp_path):
    with temporary_archive(request.param, tmp_path) as made:
        yield made


def push_wal_names(archive: Archive, names: list[str]) -> None:
    for name in names:
        archive.storage.put(f"wal/{name}", [b"x"], metadata=lambda: {})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_list_fetch_round_trip(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = FakeSource(data, ts)
    lines: list[str] = []
    result = push_backup(archive, source, parallel=2, part_size=1 << 20, log=lines.append)
    m = result.manifest
    assert source.calls[0].startswith(f"start walship backup {m.name}")
    assert source.calls[1:] == ["stop False", "close"]  # walship waits for the WAL itself
    assert len(m.parts) >= 3 and result.bytes_in == sum(p.size for p in m.parts)
    paths = {f.path for f in m.files}
    assert {"PG_VERSION", "base/5/16384", "base/5/16390_init", "global/pg_control",
            "backup_label", "tablespace_map", "pg_tblspc/16400/PG_15_202209061/5/17000",
            "log/postgresql.log"} <= paths
    for left_out in ("postmaster.pid", "global/pg_internal.init", "base/5/16390",
                     "base/5/t3_16500", "base/pgsql_tmp/pgsql_tmp99.0",
                     "pg_wal/000000010000000000000002", "pg_stat_tmp/global.stat",
                     "pg_replslot/slot/state"):
        assert left_out not in paths
    assert not any("PG_14" in p for p in paths)
    dirs = {d.path for d in m.directories}
    assert {"pg_wal", "pg_wal/archive_status", "pg_stat_tmp", "pg_replslot"} <= dirs
    assert "pg_replslot/slot" not in dirs and "base/pgsql_tmp" not in dirs
    assert [(t.oid, t.location, t.name) for t in m.tablespaces] == [(16400, str(ts), "fast")]
    assert m.start_wal == "000000010000000000000002" and m.stop_wal == "000000010000000000000002"
    assert m.stop_lsn == wal.Lsn.parse("0/3000000")
    last = m.parts[-1].number
    assert {f.path for f in m.files if f.part == last} == {"global/pg_control", "backup_label",
                                                             "tablespace_map"}
    # WAL not archived: the backup is complete but not usable, and push said so.
    assert any("missing 000000010000000000000002" in line for line in lines)
    [entry] = catalog.list_backups(archive)
    row = catalog.summary(entry, catalog.WalIndex(archive))
    assert row["complete"] and not row["usable"] and row["wal_missing"] == [m.start_wal]
    push_wal_names(archive, ["000000010000000000000002"])
    assert catalog.summary(entry, catalog.WalIndex(archive))["usable"]

    target = tmp_path / "restored" / "data"
    new_ts = tmp_path / "new-ts"
    fetched = fetch_backup(archive, "LATEST", target, tablespace_map={16400: str(new_ts)},
                           parallel=3)
    assert fetched.bytes_out == m.size
    for rel in ("PG_VERSION", "base/5/16384", "base/1/1259", "global/pg_control", "pg_xact/0000",
                "log/postgresql.log"):
        assert sha(target / rel) == sha(data / rel), rel
    assert (target / "base/5/16390_init").exists() and not (target / "base/5/16390").exists()
    assert not (target / "postmaster.pid").exists() and not (target / MARKER).exists()
    assert os.readlink(target / "pg_tblspc" / "16400") == str(new_ts)
    assert sha(new_ts / "PG_15_202209061/5/17000") == sha(ts / "PG_15_202209061/5/17000")
    assert not (new_ts / "PG_14_202107181").exists()
    assert (target / "tablespace_map").read_text() == f"16400 {new_ts}\n"
    assert (target / "backup_label").read_text().startswith("START WAL LOCATION: 0/2000028")
    assert os.readlink(target / "conf-link") == "postgresql.auto.conf"
    assert (target / "pg_wal" / "archive_status").is_dir()
    assert os.listdir(target / "pg_wal") == ["archive_status"]
    assert os.stat(target).st_mode & 0o777 == 0o700
    assert os.stat(target / "base/5/16384").st_mode & 0o777 == 0o600
    assert int(os.stat(target / "base/5/16384").st_mtime) == \
        int(os.stat(data / "base/5/16384").st_mtime)


def test_name_collision_gets_a_suffix(archive, tmp_path):
    data, _ = make_cluster(tmp_path)
    fixed = datetime(2026, 11, 25, 2, 0, 0, tzinfo=timezone.utc)
    source = FakeSource(data, tmp_path / "ts")
    source.now = lambda: fixed  # type: ignore[method-assign]
    first = push_backup(archive, source).manifest.name
    second = push_backup(archive, source).manifest.name
    assert (first, second) == ("20261125T020000Z", "20261125T020000Z-2")
    assert catalog.resolve(archive, "LATEST").name == second


def test_a_backup_without_manifest_is_never_used(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    good = push_backup(archive, FakeSource(data, ts)).manifest.name
    # A killed push leaves parts and no manifest.
    archive.storage.put(layout.part_key("29991231T000000Z", 1), [b"junk"], metadata=lambda: {})
    entries = catalog.list_backups(archive)
    assert [(e.name, e.complete) for e in entries] == [(good, True),
                                                       ("29991231T000000Z", False)]
    assert catalog.resolve(archive, "LATEST").name == good
    with pytest.raises(NotFound, match="incomplete"):
        catalog.resolve(archive, "29991231T000000Z")
    with pytest.raises(NotFound, match="does not exist"):
        catalog.resolve(archive, "20000101T000000Z")


def test_failed_push_removes_its_parts_and_aborts(archive, tmp_path):
    data, ts = make_cluster(tmp_path)

    def boom():
        raise RuntimeError("stop failed")

    source = FakeSource(data, ts, stop_hook=boom)
    with pytest.raises(RuntimeError):
        push_backup(archive, source, part_size=1 << 20)
    assert source.calls[-1] == "close"
    assert list(archive.storage.list("backups/")) == []


def test_push_refuses_another_clusters_data_directory(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    (data / "global" / "pg_control").write_bytes(os.urandom(8192))
    source = FakeSource(data, ts)
    with pytest.raises(UsageError, match="not the connected server's"):
        push_backup(archive, source)
    assert source.calls == []


def test_push_refuses_when_archiving_is_off(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = FakeSource(data, ts)
    info = source.describe()
    source.describe = lambda: ServerInfo(info.version, info.data_directory,  # type: ignore
                                         info.system_identifier, SEG, False, "off")
    with pytest.raises(UsageError, match="archive_mode is off"):
        push_backup(archive, source)
    assert source.calls == []


@pytest.mark.parametrize("other", ["key", "segment size"])
def test_push_refuses_a_repository_written_another_way(tmp_path, other):
    """One repository, one key, one segment size: a backup-push with another key, or from a
    cluster with another wal_segment_size, is refused before the backup starts."""
    from walship.codec.keys import EncryptionKey
    from walship.errors import RepositoryMismatch

    (tmp_path / "repo").mkdir()
    url = f"file://{tmp_path / 'repo'}"
    first = Archive(open_storage(url), Codec(key=EncryptionKey.generate()))
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(bytes(1 << 20 if other == "segment size" else SEG))
    first.push_wal(segment)
    data, ts = make_cluster(tmp_path)
    source = FakeSource(data, ts)
    archive = first if other == "segment size" else Archive(
        open_storage(url), Codec(key=EncryptionKey.generate()))
    with pytest.raises(RepositoryMismatch, match="another key" if other == "key" else
                       "holds segments of 1048576 bytes") as caught:
        push_backup(archive, source)
    assert caught.value.status == 3
    assert source.calls == []
    assert [i.key for i in archive.storage.list("backups/")] == []


def test_a_repository_without_marker_takes_its_segment_size_from_a_manifest(tmp_path):
    """Backups but no WAL, no marker (written before walship had one): the manifest's
    wal_segment_size decides, and the marker is written from it."""
    from walship.errors import RepositoryMismatch

    with temporary_archive("file-encrypted", tmp_path) as archive:
        data, ts = make_cluster(tmp_path)
        push_backup(archive, FakeSource(data, ts))
        archive.storage.delete("walship.json")
        (tmp_path / "pg_wal").mkdir()
        small = tmp_path / "pg_wal" / "000000010000000000000001"
        small.write_bytes(bytes(1 << 20))
        fresh = Archive(archive.storage, archive.codec)
        with pytest.raises(RepositoryMismatch, match="segments of 16777216 bytes"):
            fresh.push_wal(small)
        with archive.storage.get("walship.json") as download:
            assert b'"wal_segment_size": 16777216' in download.read()
        assert [i.key for i in archive.storage.list("wal/")] == []


@pytest.mark.parametrize("damage", ["flip", "swap"])
def test_damaged_part_fails_and_leaves_nothing_startable(tmp_path, damage):
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    m = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest
    victim = tmp_path / "repo" / m.parts[0].key
    if damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 3] ^= 0x40
        victim.write_bytes(bytes(raw))
    else:  # a part swapped for another part of the same backup
        victim.write_bytes((tmp_path / "repo" / m.parts[1].key).read_bytes())
    target = tmp_path / "restored"
    target.mkdir()
    new_ts = tmp_path / "new-ts"
    with pytest.raises(IntegrityError):
        fetch_backup(archive, m.name, target, tablespace_map={16400: str(new_ts)})
    assert target.is_dir() and os.listdir(target) == []
    assert not new_ts.exists()


def test_a_part_replaced_by_a_consistent_object_is_refused(tmp_path):
    """A part swapped for another well-formed object, with a digest of its own that matches it:
    the digest the manifest records for the part does not, so nothing is restored (backup-fetch
    relies on that check instead of hashing every file again)."""
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    m = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest
    part = max(m.parts, key=lambda p: p.size)
    assert part.digest and part.digest.startswith("sha256:")
    with archive.storage.get(part.key) as download:
        plain = bytearray(b"".join(archive.codec.decode(part.key, download,
                                                        download.info.metadata)))
    plain[len(plain) // 2] ^= 0x20  # inside a file's data: a valid tar stream still
    archive.storage.delete(part.key)
    forged = archive.codec.stored_form(part.key, [bytes(plain)])
    archive.storage.put(part.key, forged, metadata=forged.metadata)
    target = tmp_path / "restored"
    with pytest.raises(IntegrityError, match="does not match its digest"):
        fetch_backup(archive, m.name, target, tablespace_map={16400: str(tmp_path / "t2")})
    assert not target.exists()


def test_a_manifest_without_part_digests_is_fetched_with_every_file_hashed(tmp_path):
    """Backups written before manifests recorded part digests: every file is checked against
    its SHA-256, and a damaged file is caught that way."""
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    m = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest
    old = replace(m, parts=tuple(replace(p, digest=None) for p in m.parts))
    archive.storage.delete(layout.manifest_key(m.name))
    catalog.store_manifest(archive, old)
    assert all(p.digest is None for p in catalog.load_manifest(archive, m.name).parts)
    target = tmp_path / "restored"
    fetch_backup(archive, m.name, target, tablespace_map={16400: str(tmp_path / "t2")})
    assert sha(target / "base/5/16384") == sha(data / "base/5/16384")
    # a file damaged inside a part whose own digest was made to match
    part = max(m.parts, key=lambda p: p.size)
    with archive.storage.get(part.key) as download:
        plain = bytearray(b"".join(archive.codec.decode(part.key, download,
                                                        download.info.metadata)))
    plain[len(plain) // 2] ^= 0x20
    archive.storage.delete(part.key)
    forged = archive.codec.stored_form(part.key, [bytes(plain)])
    archive.storage.put(part.key, forged, metadata=forged.metadata)
    with pytest.raises(IntegrityError, match="SHA-256"):
        fetch_backup(archive, m.name, tmp_path / "again",
                     tablespace_map={16400: str(tmp_path / "t3")})


def test_fetch_refuses_non_empty_directories(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    push_backup(archive, FakeSource(data, ts))
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep").write_text("x")
    remap = {16400: str(tmp_path / "ts2")}
    with pytest.raises(UsageError, match="not empty"):
        fetch_backup(archive, "LATEST", target, tablespace_map=remap)
    assert (target / "keep").exists()
    with pytest.raises(UsageError, match="tablespace 16400 location .* not empty"):
        fetch_backup(archive, "LATEST", tmp_path / "t2")  # the original location is in use
    assert not (tmp_path / "t2").exists()
    with pytest.raises(UsageError, match="no tablespace 1"):
        fetch_backup(archive, "LATEST", tmp_path / "t3", tablespace_map={1: "/x"})
    with pytest.raises(UsageError, match="not a PostgreSQL data directory"):
        fetch_backup(archive, "LATEST", target, tablespace_map=remap, force=True)
    assert (target / "keep").exists()  # --force never empties an arbitrary directory
    (target / "PG_VERSION").write_text("15\n")  # an old cluster: --force replaces it
    (target / "global").mkdir()
    fetch_backup(archive, "LATEST", target, tablespace_map=remap, force=True)
    assert not (target / "keep").exists() and (target / "PG_VERSION").exists()
    (target / "postmaster.pid").write_text("1\n")
    with pytest.raises(UsageError, match="postmaster.pid"):
        fetch_backup(archive, "LATEST", target, force=True,
                     tablespace_map={16400: str(tmp_path / "ts3")})


def test_restore_writes_recovery_settings_and_checks_wal(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    push_backup(archive, FakeSource(data, ts))
    remap = {16400: str(tmp_path / "ts2")}
    target = tmp_path / "r"
    with pytest.raises(Exception, match="lacks WAL"):
        restore(archive, target, make_target(), tablespace_map=remap)
    assert not target.exists()
    push_wal_names(archive, ["000000010000000000000002"])
    result = restore(archive, target, make_target(name="before"), action="promote",
                     tablespace_map=remap, command=["/opt/w/bin/walship"],
                     archive_mode_off=True)
    assert result.signal == "recovery.signal" and (target / "recovery.signal").exists()
    conf = (target / "postgresql.auto.conf").read_text()
    assert "'old'" not in conf
    assert "restore_command = '/opt/w/bin/walship wal-fetch %f %p'" in conf
    assert "recovery_target_name = 'before'" in conf
    assert "recovery_target_action = 'promote'" in conf
    assert "recovery_target_timeline = 'latest'" in conf
    assert "archive_mode = 'off'" in conf
    with pytest.raises(NotFound, match="precedes"):
        restore(archive, tmp_path / "r2", make_target(time="2000-01-01T00:00:00Z"),
                tablespace_map=remap)
    standby = restore(archive, tmp_path / "r3", make_target(), standby=True,
                      tablespace_map={16400: str(tmp_path / "ts3")})
    assert (tmp_path / "r3" / "standby.signal").exists()
    assert not (tmp_path / "r3" / "recovery.signal").exists()
    assert standby.signal == "standby.signal"


def test_parallel_fetch_stops_everything_on_failure(tmp_path, monkeypatch):
    """With many parts in flight, one damaged part cancels the rest quickly."""
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    data, ts = make_cluster(tmp_path)
    for i in range(30):
        (data / "base/5" / f"{20000 + i}").write_bytes(os.urandom(200_000))
    push_wal_names(archive, ["000000010000000000000002"])
    m = push_backup(archive, FakeSource(data, ts), part_size=256 << 10, parallel=4).manifest
    assert len(m.parts) > 20
    victim = tmp_path / "repo" / m.parts[5].key
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 1
    victim.write_bytes(bytes(raw))
    target = tmp_path / "out"
    with pytest.raises(IntegrityError):
        fetch_backup(archive, m.name, target, tablespace_map={16400: str(tmp_path / "x")},
                     parallel=4)
    assert not target.exists()
    assert threading.active_count() < 5


def test_push_waits_for_the_wal_in_the_repository_then_commits(archive, tmp_path):
    """On a primary the manifest is written once the WAL the backup needs has reached the
    repository (polled there, not PostgreSQL's once-a-second wait for its archiver)."""
    import time

    data, ts = make_cluster(tmp_path)
    needed = ["000000010000000000000002"]  # stop LSN 0/3000000 ends segment 2
    seen: list[bool] = []

    def archiver_later() -> None:
        def run() -> None:
            time.sleep(0.4)
            seen.append(bool(catalog.list_backups(archive)[-1].complete))
            push_wal_names(archive, needed)
        threading.Thread(target=run, daemon=True).start()

    started = time.monotonic()
    result = push_backup(archive, FakeSource(data, ts, stop_hook=archiver_later),
                         wal_timeout=30)
    assert 0.4 <= time.monotonic() - started < 10
    assert seen == [False]  # no manifest while the WAL was still on its way
    assert result.wal_missing == () and result.manifest.needed_wal() == needed


def test_push_on_a_primary_never_lists_the_archived_wal(archive, tmp_path, monkeypatch):
    """What WAL is missing is known from the wait for it, segment by segment: the whole
    timeline's WAL (a month of it: tens of thousands of objects) is not listed at the end."""
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    listed: list[str] = []
    real = archive.storage.list

    def listing(prefix: str = "", **kwargs):
        if kwargs.get("limit") is None:  # (a probe for one object is cheap)
            listed.append(prefix)
        return real(prefix, **kwargs)

    monkeypatch.setattr(archive.storage, "list", listing)
    result = push_backup(archive, FakeSource(data, ts), wal_timeout=5)
    assert result.wal_missing == ()
    assert not [p for p in listed if p.startswith("wal/")], listed


def test_push_stores_the_ready_segment_itself_instead_of_waiting(archive, tmp_path):
    """The segment pg_backup_stop switched from, marked .ready and not archived yet, is
    stored by backup-push itself (the archiver's later wal-push of it finds identical content):
    no wait for the archiver. A .ready that is a link is not followed."""
    import time

    data, ts = make_cluster(tmp_path)
    name = "000000010000000000000002"
    status = data / "pg_wal" / "archive_status"
    (status / f"{name}.done").unlink()
    (status / f"{name}.ready").touch()
    segment = os.urandom(1 << 16) * (SEG >> 16)
    (data / "pg_wal" / name).write_bytes(segment)
    started = time.monotonic()
    result = push_backup(archive, FakeSource(data, ts), wal_timeout=20)
    assert time.monotonic() - started < 10
    assert result.wal_missing == ()
    out = tmp_path / "fetched"
    archive.fetch_wal(name, out)
    assert out.read_bytes() == segment
    assert archive.push_wal(data / "pg_wal" / name).outcome  # the archiver's call: fine

    data2, ts2 = make_cluster(tmp_path / "two")
    status2 = data2 / "pg_wal" / "archive_status"
    (status2 / f"{name}.done").unlink()
    (status2 / f"{name}.ready").symlink_to(status / f"{name}.ready")
    (data2 / "pg_wal" / name).write_bytes(segment)
    archive.storage.delete(f"wal/{name}")
    result = push_backup(archive, FakeSource(data2, ts2), wal_timeout=1)
    assert result.wal_missing == (name,)  # left to the archiver (none here)


def test_a_prescan_that_cannot_ask_the_flush_position_leaves_the_wal_to_after_the_start(
        archive, tmp_path):
    """wal_prescan: the WAL is read before pg_backup_start only up to the server's flush
    position; when that query fails, the scanner is returned unread (the whole range is read
    after the start) and the backup goes on."""
    from walship.backup.push import wal_prescan
    from walship.errors import WalshipError

    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    parent = push_backup(archive, FakeSource(data, ts)).manifest
    reads: list[object] = []

    class Scanner:
        def read(self, position, complete_only=False):
            reads.append((position, complete_only))

    class Source(FakeSource):
        def wal_scanner(self, **kwargs):
            return Scanner()

        def flush_lsn(self):
            raise WalshipError("PostgreSQL refused a backup query", "permission denied")

    info = replace(FakeSource(data).describe(), timeline=1)
    lines: list[str] = []
    scanner = wal_prescan(Source(data), info, parent, str(data), archive, lines.append)
    assert isinstance(scanner, Scanner) and reads == []
    assert len(lines) == 1 and "after the backup's start" in lines[0], lines

    class Flushing(Source):
        def flush_lsn(self):
            return wal.Lsn.parse("0/5000000")

    wal_prescan(Flushing(data), info, parent, str(data), archive, lines.append)
    assert reads == [(wal.Lsn.parse("0/5000000"), True)]
    later = replace(info, version=170002)  # WAL summaries first: no pre-scan
    assert wal_prescan(Flushing(data), later, parent, str(data), archive, None) is None

    class Summarizing(Flushing):
        summarizing = True

        def summarizes_wal(self):
            return self.summarizing

    assert wal_prescan(Summarizing(data), later, parent, str(data), archive, None) is None
    Summarizing.summarizing = False  # 17+ with summarize_wal off: read before the start
    reads.clear()
    assert isinstance(wal_prescan(Summarizing(data), later, parent, str(data), archive, None),
                      Scanner)
    assert reads == [(wal.Lsn.parse("0/5000000"), True)]
    assert wal_prescan(Flushing(data), info, None, str(data), archive, None) is None


def test_a_plain_tar_header_is_byte_for_byte_what_tarfile_writes():
    """Headers are built directly when tarfile would write a plain ustar one (ASCII name of
    at most 100 bytes, size and time within 11 octal digits); tarfile writes the others."""
    import random
    import tarfile

    from walship.backup.parts import PartWriter, _plain_header

    def by_tarfile(path: str, size: int, mode: int, mtime: int) -> bytes:
        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime, info.type = size, mode, mtime, tarfile.REGTYPE
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    rng = random.Random(5)
    direct = 0
    for _ in range(5000):
        path = "".join(rng.choice("abcxyz0189/_.-") for _ in range(
            rng.choice([1, 18, 99, 100, 101, 150])))
        if rng.random() < 0.05:
            path = path[:-1] + rng.choice(["é", "\udcff"])
        size = rng.choice([0, 1, 512, 8192, rng.randrange(1 << 40), 8 ** 11 - 1, 8 ** 11])
        mode = rng.randrange(0o10000)
        mtime = rng.choice([0, 1796609837, 8 ** 11 - 1, 8 ** 11, rng.randrange(1 << 34)])
        header = PartWriter(1, [])._header(path, size, mode, mtime + 0.5)
        assert header == by_tarfile(path, size, mode, mtime), (path, size, mode, mtime)
        direct += _plain_header(path, size, mode, mtime) is not None
    assert 1000 < direct < 5000  # both ways were taken


def test_a_parts_small_chunks_cross_to_the_consumer_joined_and_unchanged():
    """The reader hands the part's stream to the consumer (codec, storage) in batches of at
    least BATCH_SIZE bytes: an incr's stream is mostly small chunks (a block member's header,
    its blocks, its padding), and a hand-off per chunk, with a compressor call each, cost more
    than the chunks. The bytes are the same, in the same order; a large chunk passes alone,
    not copied; a failure of the reader reaches the consumer; a consumer that stops early
    stops the reader, which closes its source."""
    import random

    from walship.backup.parts import BATCH_SIZE, pipelined

    rng = random.Random(11)
    for _ in range(20):
        sizes = [0, 1, 512, 7000, 60_000, 300_000, 2 << 20]
        chunks = [bytes([n % 251]) * rng.choice(sizes) for n in range(rng.randrange(0, 200))]
        out = list(pipelined(iter(chunks)))
        assert b"".join(out) == b"".join(chunks)
        assert all(len(c) >= BATCH_SIZE for c in out[:-1]), [len(c) for c in out]
        assert all(len(c) < BATCH_SIZE + max(map(len, chunks)) for c in out)
        # (a large chunk right after a hand-off is handed off as it is)
        alone = [c for c, before in zip(chunks, [b"x" * BATCH_SIZE, *chunks])
                 if len(c) >= BATCH_SIZE and len(before) >= BATCH_SIZE]
        assert {id(c) for c in alone} <= {id(c) for c in out}
    small = [b"a" * 100] * 10_000  # 1 MB of 100-byte chunks: 4 hand-offs, not 10,000
    assert len(list(pipelined(iter(small)))) == -(-len(small) * 100 // BATCH_SIZE)

    def failing():
        yield b"x" * 10
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(pipelined(failing()))
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield b"y" * (BATCH_SIZE // 3)
        finally:
            closed.set()

    stream = pipelined(endless())
    next(stream)
    stream.close()
    assert closed.wait(5)
