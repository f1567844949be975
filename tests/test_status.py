"""``walship status``: archive facts from the repository, pg_stat_archiver only when a server is
given (else "unknown"), JSON, and the Prometheus textfile written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from tests.test_prune import NOW, fake_backup, put, set_age
from walship.archive import Archive
from walship.backup import catalog, layout
from walship.codec import Codec
from walship.entry import main
from walship.status import ArchiverStats, Status, gather, prometheus_text, write_textfile
from walship.storage import open_storage


@pytest.fixture
def repo(file_repo_env):
    root = file_repo_env
    return Archive(open_storage(f"file://{root}"), Codec())


def test_status_of_an_empty_repository(repo, capsys):
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "last archived  none" in out and "newest backup  none" in out
    assert "archiver       unknown: no server given" in out


def test_last_archived_is_the_newest_name_and_its_age_the_newest_store(repo):
    """Push-ahead stores segment N+1 a moment before PostgreSQL's call for N completes: the
    last archived file is N+1 (as pg_stat_archiver says), its age the newest store's; a
    timeline history file, archived first on a switch, is not "the last archived WAL"."""
    put(repo, "wal/000000010000000000000016", NOW - timedelta(seconds=50))
    put(repo, "wal/000000010000000000000015", NOW - timedelta(seconds=40))
    put(repo, "wal/00000002.history", NOW - timedelta(seconds=30))
    status = gather(repo, environ={}, now=NOW)
    assert status.last_archived == "000000010000000000000016"
    assert 29 < status.last_archived_age < 31  # type: ignore[operator]


def test_status_reports_ages_sizes_and_counts(repo, tmp_path, capsys):
    fake_backup(repo, 10, NOW - timedelta(days=2))
    fake_backup(repo, 20, NOW - timedelta(days=1))
    fake_backup(repo, 30, NOW - timedelta(hours=3), complete=False)
    put(repo, "wal/000000010000000000000014", NOW - timedelta(minutes=30))
    put(repo, "wal/000000010000000000000015", NOW - timedelta(minutes=2))
    put(repo, "wal/000000010000000000000013", NOW - timedelta(minutes=40))
    status = gather(repo, environ={}, now=NOW)
    assert status.last_archived == "000000010000000000000015"
    assert 100 < status.last_archived_age < 200  # type: ignore[operator]
    assert status.newest_backup is not None and status.backups_complete == 2
    assert status.backups_incomplete == 1 and status.wal_files == 3 and status.wal_bytes == 300
    assert 86000 - 1200 < status.newest_backup_age < 86400  # type: ignore[operator]
    prom = tmp_path / "metrics" / "walship.prom"
    prom.parent.mkdir()
    assert main(["status", "--json", "--prometheus", str(prom)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["last_archived"] == "000000010000000000000015"
    assert doc["backups"] == {"complete": 2, "incomplete": 1, "bytes": status.backup_bytes}
    assert doc["archiver"]["known"] is False
    text = prom.read_text()
    assert 'walship_archive_bytes{kind="wal"} 300\n' in text
    assert 'walship_backups{state="incomplete"} 1\n' in text
    assert "walship_archiver_stats_known 0\n" in text
    assert "walship_archiver_failed_count" not in text  # unknown is left out, not 0
    assert "# TYPE walship_last_archived_age_seconds gauge" in text
    assert os.listdir(prom.parent) == ["walship.prom"]  # no temporary file left
    assert oct(os.stat(prom).st_mode & 0o777) == "0o644"


def test_an_unreachable_server_is_unknown_not_an_error(repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGHOST", str(tmp_path / "no-socket-here"))
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
    assert main(["status"]) == 0
    assert "archiver       unknown: cannot query the server" in capsys.readouterr().out


def test_prometheus_text_with_archiver_failures(tmp_path):
    now = datetime.now(timezone.utc)
    failed_at = now - timedelta(minutes=1)
    status = Status(now, "file:///r", 5, 500, "000000010000000000000005", now, 1, 0, 900,
                    "20261125T020000Z", now - timedelta(hours=2),
                    ArchiverStats(True, "", 40, "000000010000000000000005", now, 3,
                                  "000000010000000000000006", failed_at))
    text = prometheus_text(status)
    assert "walship_archiver_failed_count 3\n" in text
    assert f"walship_archiver_last_failed_timestamp_seconds {failed_at.timestamp():.3f}" \
        .rstrip("0").rstrip(".") in text
    assert "walship_newest_backup_age_seconds 7200\n" in text
    target = tmp_path / "x.prom"
    write_textfile(target, "old\n")
    write_textfile(target, text)
    assert target.read_text() == text and os.listdir(tmp_path) == ["x.prom"]


@pytest.mark.parametrize("dbname", [
    "postgresql://walship:p%zzS3CRET@127.0.0.1:1/postgres",  # libpq quotes the bad token
    "host=127.0.0.1 port=1 password=S3CRET sslmode=bogus",
])
def test_a_password_in_dbname_is_never_shown(dbname):
    """libpq quotes parts of a malformed connection string in its errors; status and
    backup-push mask the password it carries before printing them."""
    from walship.backup.source import PostgresSource
    from walship.errors import StorageError
    from walship.status import read_archiver

    stats = read_archiver(dbname, timeout=2)
    assert not stats.known and "S3CRET" not in stats.reason
    assert "cannot query the server" in stats.reason
    with pytest.raises(StorageError) as caught:
        PostgresSource(dbname)
    assert "S3CRET" not in caught.value.one_line()


def fake_incr(archive: Archive, parent: str, start_seg: int, start: datetime,
              backup_type: str = "incr") -> str:
    """An incremental backup on ``parent`` (by name: its manifest need not exist), made from a
    :func:`fake_backup` whose manifest is rewritten to name the parent."""
    name = fake_backup(archive, start_seg, start)
    manifest = catalog.load_manifest(archive, name)
    archive.storage.delete(layout.manifest_key(name))
    catalog.store_manifest(archive, replace(manifest, backup_type=backup_type, parent=parent))
    set_age(archive, layout.manifest_key(name), manifest.stop_time)
    return name


def test_a_newer_backup_with_a_broken_chain_is_not_the_newest_backup(repo, tmp_path, capsys):
    """The newest complete backup is an incr whose parent has no manifest: it cannot be
    restored, so the backup age is the newest usable one's, and status says why."""
    full = fake_backup(repo, 10, NOW - timedelta(days=2))
    diff = fake_incr(repo, full, 20, NOW - timedelta(days=1), "diff")
    gone = fake_backup(repo, 25, NOW - timedelta(hours=10), complete=False)
    incr = fake_incr(repo, gone, 30, NOW - timedelta(hours=3))
    status = gather(repo, environ={}, now=NOW)
    assert status.newest_backup == diff and status.backups_complete == 3
    assert 86000 - 1200 < status.newest_backup_age < 86400  # type: ignore[operator]
    assert [(b.name, b.backup_type) for b in status.broken_backups] == [(incr, "incr")]
    assert gone in status.broken_backups[0].problem
    prom = tmp_path / "walship.prom"
    assert main(["status", "--prometheus", str(prom)]) == 0
    out = capsys.readouterr().out
    assert f"newest backup  {diff} (stopped" in out
    assert (f"WARNING: backup {incr} (incr) is newer but cannot be restored: its chain is "
            f"broken (its parent {gone} is missing or incomplete (no manifest))") in out
    assert "walship_newest_backup_chain_broken 1\n" in prom.read_text()
    assert main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["newest_backup"] == diff
    assert [(b["name"], b["type"]) for b in doc["broken_backups"]] == [(incr, "incr")]
    assert "missing or incomplete" in doc["broken_backups"][0]["problem"]


def test_no_usable_backup_when_every_chain_is_broken(repo):
    incr = fake_incr(repo, "20200101T000000Z", 30, NOW - timedelta(hours=3))
    status = gather(repo, environ={}, now=NOW)
    assert status.newest_backup is None and status.newest_backup_age is None
    assert [b.name for b in status.broken_backups] == [incr]
    text = prometheus_text(status)
    assert "walship_newest_backup_chain_broken 1\n" in text
    assert "walship_newest_backup_age_seconds" not in text


def test_chain_broken_gauge_is_0_with_a_usable_newest_backup_and_absent_without_backups(repo):
    assert "walship_newest_backup_chain_broken" not in prometheus_text(
        gather(repo, environ={}, now=NOW))
    full = fake_backup(repo, 10, NOW - timedelta(days=1))
    fake_incr(repo, full, 20, NOW - timedelta(hours=1))
    status = gather(repo, environ={}, now=NOW)
    assert status.broken_backups == () and status.newest_backup is not None
    assert "walship_newest_backup_chain_broken 0\n" in prometheus_text(status)
