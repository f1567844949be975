"""A read-only mirror end to end (issue 14, Azure read-access geo-redundant storage): the
repository's account is reached through its primary endpoint and, as a ``[[mirrors]]`` entry
with no mode, through its secondary endpoint (``<account>-secondary``, which Azurite serves
path-style from the same data, as Azure's replication would), with a ``file://`` sync mirror
after it. PostgreSQL archives, a backup is pushed, retention and repo-sync run: not one request
that writes reaches the secondary. Then the primary endpoint goes away and ``walship restore``
plus the server's ``wal-fetch`` recover to a restore point, reading through the secondary
(asked before the sync mirror; the sync mirror's "not found" proves the absence of the history
files recovery probes for, which the lagging secondary's cannot); the data equals the
original's, and still nothing was written to the secondary.

Last, a DR site configured with the secondary endpoint alone as its ``repo`` (a read-only
primary) restores and recovers to the same point, and its ``wal-push`` is refused (exit 2).

Every request to the secondary goes through a recording proxy; Azurite itself accepts writes
on a ``-secondary`` path (the real service refuses them), so "nothing written" is checked on
the wire, not left to the emulator.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from tests.backup.test_backup_e2e import start_restored, walship
from tests.e2e.test_standby_outage import Proxy
from tests.fixtures.postgres import chown_to, repository_names

pytestmark = [pytest.mark.e2e]

REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE|PATCH|OPTIONS) (/\S*) HTTP/1\.[01]\r\n")


class RecordingProxy(Proxy):
    """A :class:`Proxy` that records the method and path of every HTTP request sent through
    it (scanned from the client's byte stream: a write's request line is always in it)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.requests: list[tuple[str, str]] = []
        super().__init__(target)

    def _request(self, source: socket.socket, sink: socket.socket) -> None:
        tail = b""
        try:
            while data := source.recv(65536):
                window = tail + data
                for match in REQUEST_LINE.finditer(window):
                    if match.end() > len(tail):  # (not one already seen in the tail)
                        with self.lock:
                            self.requests.append((match.group(1).decode(),
                                                  match.group(2).decode()))
                tail = window[-512:]
                sink.sendall(data)
        except OSError:
            pass
        self._shut(source, sink)

    def writes(self) -> list[tuple[str, str]]:
        with self.lock:
            return [r for r in self.requests if r[0] not in ("GET", "HEAD")]

    def reads(self, part: str) -> int:
        with self.lock:
            return sum(1 for method, path in self.requests if method == "GET" and part in path)


@pytest.mark.timeout(420)
def test_a_restore_reads_from_the_secondary_endpoint_which_is_never_written(pg,
                                                                             azure_repository):
    azurite = azure_repository.azurite
    primary_endpoint = Proxy((azurite.host, azurite.port))
    secondary = RecordingProxy((azurite.host, azurite.port))

    def via(port: int, account: str) -> str:
        return azurite.connection_string.replace(
            f"BlobEndpoint={azurite.blob_endpoint}",
            f"BlobEndpoint={azurite.scheme}://127.0.0.1:{port}/{account}")

    nas = pg.make_dir(pg.path / "nas", 0o750)
    config = pg.path / "walship.toml"
    config.write_text(
        f'repo = "{azure_repository.url}"\n'
        f'[azure]\nconnection_string = "{via(primary_endpoint.port, azurite.account)}"\n'
        # no mode: a secondary endpoint is a read mirror by default
        f'[[mirrors]]\nname = "paired"\nrepo = "{azure_repository.url}"\n'
        f'[mirrors.azure]\nconnection_string = '
        f'"{via(secondary.port, azurite.account + "-secondary")}"\n'
        f'[[mirrors]]\nname = "nas"\nrepo = "file://{nas}"\nmode = "sync"\n')
    os.chmod(config, 0o600)
    chown_to(config, pg.user)
    env = {"WALSHIP_CONFIG": str(config), "WALSHIP_STORAGE_RETRIES": "1",
           "WALSHIP_STORAGE_TIMEOUT": "3", "WALSHIP_CALL_TIMEOUT": "10"}
    try:
        primary = pg.initdb("primary", env=env, archive_timeout="2s")
        primary.start()
        primary.pgbench_init(1)
        load = primary.pgbench(seconds=20, clients=2, background=True)
        try:
            time.sleep(1)
            walship(pg, primary, "backup-push", "--part-size", "8")
        finally:
            load.send_signal(signal.SIGTERM)
            load.wait(timeout=60)
        primary.pgbench(transactions=200)
        primary.create_restore_point("state_a")
        state_a = primary.table_checksums()
        primary.wait_archived(primary.switch_wal(), timeout=120)
        primary.pgbench(transactions=100)  # (after the target: not to be replayed)
        primary.wait_archived(primary.switch_wal(), timeout=120)

        check = walship(pg, primary, "check")
        assert "repository paired (read)" in check.stdout, check.stdout
        assert "repository nas (sync)" in check.stdout, check.stdout
        walship(pg, primary, "delete", "--retain-full", "1", "--confirm")
        sync = walship(pg, primary, "repo-sync")
        assert 'repo-sync primary -> paired: skipped, it is read-only' in sync.stderr
        assert sorted(p.name for p in (nas / "wal").iterdir()) == \
            repository_names(azure_repository)
        refused = walship(pg, primary, "repo-sync", "--to", "paired", check=False)
        assert refused.returncode == 2 and "it is read-only" in refused.stderr
        assert secondary.writes() == []
        primary.stop()

        # The primary endpoint is lost: everything is read through the secondary.
        primary_endpoint.down()
        before = len(secondary.requests)
        restore = walship(pg, primary, "restore", str(pg.path / "restored"),
                          "--target-name", "state_a", "--target-action", "promote",
                          "--archive-mode", "off")
        assert "WARNING: repository primary could not" in restore.stderr, restore.stderr
        restored = start_restored(pg, primary, "restored")
        assert restored.table_checksums() == state_a, restored.log_tail()
        assert "FATAL" not in restored.log_text(), restored.log_tail()
        assert secondary.reads("/backups/") > 0 and secondary.reads("/wal/") > 0, \
            secondary.requests[before:]
        assert secondary.writes() == [], secondary.writes()
        restored.stop()

        # A DR site with only the secondary configured, as the primary repo: the restore and
        # the recovery read from it (alone, its "not found" ends the history probes, as any
        # single repository's does); a wal-push there is refused before any request.
        config.write_text(
            f'repo = "{azure_repository.url}"\n[azure]\nconnection_string = '
            f'"{via(secondary.port, azurite.account + "-secondary")}"\n')
        before = len(secondary.requests)
        walship(pg, primary, "restore", str(pg.path / "dr"), "--target-name", "state_a",
                "--target-action", "promote", "--archive-mode", "off")
        segment = min(p for p in (primary.data / "pg_wal").iterdir() if len(p.name) == 24)
        refused = walship(pg, primary, "wal-push", str(segment), check=False)
        assert refused.returncode == 2, refused.stderr
        assert "cannot push WAL into repository primary: its endpoint" in refused.stderr
        dr = start_restored(pg, primary, "dr")
        assert dr.table_checksums() == state_a, dr.log_tail()
        assert "FATAL" not in dr.log_text(), dr.log_tail()
        assert secondary.reads("/wal/") > 0 and secondary.requests[before:]
        assert secondary.writes() == [], secondary.writes()
    finally:
        primary_endpoint.down()
        secondary.down()
