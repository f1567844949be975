"""PostgreSQL-level proof of wal-fetch's exit-status contract: when an archived segment is
corrupt, or the repository cannot be reached, recovery stops with FATAL. It never takes the
failure for "end of the archive", so it never ends early and promotes with data missing."""

from __future__ import annotations

import re
import socket
import time

import pytest

pytestmark = [pytest.mark.e2e]

RESTORE_FAILED = re.compile(r'FATAL:  could not restore file "([0-9A-F.a-z]+)" from archive: '
                            r"child process exited with exit code (\d+)")


def assert_aborted_without_promoting(cluster, wanted_file: str | None = None) -> None:
    """The server is down after a FATAL restore failure, and it never left recovery."""
    cluster.wait_stopped(90)
    log = cluster.log_text()
    failures = RESTORE_FAILED.findall(log)
    assert failures, f"no FATAL restore failure in the log\n{cluster.log_tail()}"
    name, status = failures[0]
    assert int(status) >= 126, cluster.log_tail()
    if wanted_file is not None:
        assert name == wanted_file, cluster.log_tail()
    for promoted in ("redo done", "selected new timeline ID", "archive recovery complete",
                     "database system is ready to accept connections"):
        assert promoted not in log, f"{promoted!r} in the log\n{cluster.log_tail()}"
    history = sorted(p.name for p in (cluster.data / "pg_wal").glob("*.history"))
    assert history == [], history
    control = cluster.controldata()
    assert control["Latest checkpoint's TimeLineID"] == "1", control


def flip_byte(data: bytes, fraction: float = 1 / 3) -> bytes:
    """One byte inverted, in the first half: the object's data, not a file trailer."""
    damaged = bytearray(data)
    damaged[int(len(damaged) * fraction)] ^= 0x5A
    return bytes(damaged)


def corrupt(repository, wal_file: str):
    """Damage the stored object of ``wal_file`` behind walship's back; return a callable that
    puts the original back."""
    key = f"wal/{wal_file}"
    if hasattr(repository, "object_path"):  # file://: the object is a file
        path = repository.object_path(wal_file)
        original = path.read_bytes()
        with open(path, "r+b") as handle:  # in place: same inode, owner and mode
            handle.write(flip_byte(original))
        return lambda: path.write_bytes(original)
    original = repository.read_raw(key)  # Azure: rewrite the blob, metadata kept
    repository.replace_raw(key, flip_byte(original))
    return lambda: repository.replace_raw(key, original)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where, encrypted, victim", [
    ("file", False, "backup-start"), ("file", True, "later"), ("azure", False, "later")],
    ids=["file-plain-backup-start-segment", "file-encrypted-later-segment",
         "azure-plain-later-segment"])
def test_corrupt_segment_aborts_recovery(pg, request, where, encrypted, victim):
    """backup-start: the very first segment recovery needs (the server never comes up);
    later: a segment after the backup's end (the server is up read-only, consistent, when it
    meets the damage: it must still abort, not promote)."""
    repository = request.getfixturevalue(f"{where}_repository")
    env = dict(repository.env)
    if encrypted:
        env["WALSHIP_ENCRYPTION_KEY_FILE"] = str(pg.key_file())
    primary = pg.initdb("primary", env=env)
    primary.start()
    primary.pgbench_init(2)
    backup = pg.basebackup(primary)
    start_segment = (backup / "backup_label").read_text().split("(file ", 1)[1][:24]
    # Recovery reads the record after the backup's end (in the next segment) before it declares
    # itself consistent: the victim "later" is one segment further.
    primary.pgbench(transactions=20)
    primary.switch_wal()
    primary.pgbench(transactions=20)
    later_segment = primary.current_walfile()
    assert int(later_segment, 16) >= int(start_segment, 16) + 2, (start_segment, later_segment)
    primary.pgbench(seconds=3)
    state_b = primary.table_checksums()
    last = primary.switch_wal()
    primary.wait_archived(last)
    primary.stop()
    wanted = start_segment if victim == "backup-start" else later_segment
    assert wanted <= last

    repair = corrupt(repository, wanted)

    restored = pg.restore(backup, "restored", env=env)
    result = restored.start(check=False)  # "later": it comes up read-only before it fails
    assert_aborted_without_promoting(restored, wanted)
    log = restored.log_text()
    assert f"walship: wal-fetch {wanted}: ERROR" in log, restored.log_tail()  # says why
    if victim == "later":
        assert "consistent recovery state reached" in log, restored.log_tail()
    else:
        assert result.returncode != 0 and "consistent recovery state" not in log, log

    # The aborted recovery left the cluster as it was: with the object repaired, the same data
    # directory recovers to the end of the archive.
    repair()
    restored.start(check=False)
    restored.wait_promoted()
    assert restored.table_checksums() == state_b, restored.log_tail()


def closed_port() -> int:
    with socket.socket() as sock:  # nobody listens on it once closed
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["file-missing", "azure-closed-port"])
def test_unreachable_repository_aborts_recovery(pg, file_repository, where):
    primary = pg.initdb("primary", env=file_repository.env)
    primary.start()
    primary.pgbench_init(1)
    backup = pg.basebackup(primary)
    primary.stop()

    secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
    if where == "file-missing":  # an unmounted share, a typo: never "not found"
        env = {"WALSHIP_REPO": f"file://{pg.path}/no-such-repository"}
    else:
        env = {"WALSHIP_REPO": "azure://archive/cluster1",
               "AZURE_STORAGE_CONNECTION_STRING":
                   "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                   f"AccountKey={secret};"
                   f"BlobEndpoint=http://127.0.0.1:{closed_port()}/devstoreaccount1;",
               "WALSHIP_STORAGE_RETRIES": "1", "WALSHIP_STORAGE_TIMEOUT": "2"}
    restored = pg.restore(backup, "restored", env=env)
    started = time.monotonic()
    result = restored.start(check=False, timeout=90)
    assert result.returncode != 0, f"the server came up\n{restored.log_tail()}"
    assert_aborted_without_promoting(restored)
    assert time.monotonic() - started < 60, "the retry budget was not bounded"
    assert secret not in restored.log_text()
