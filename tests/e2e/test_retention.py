"""End to end: ``walship delete --confirm`` in a loop beside a real PostgreSQL 15 archiving
under pgbench load and ``walship backup-push`` running, all as the server's OS user.

Pruning as hard as the policy allows (``--retain-full 1``) must never remove anything archiving
or a backup needs: afterwards the final backup is listed usable, ``wal-verify`` and
``backup-verify`` pass, ``status`` reads the server's archiver statistics, and a restore of it
replaying all archived WAL ends with exactly the primary's data. On a ``file://`` repository and
on Azurite.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from tests.backup.test_backup_e2e import (archive_everything, backup_list, start_restored,
                                          walship)
from tests.fixtures.postgres import repository_names

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(240)
def test_delete_in_a_loop_beside_archiving_and_backups(pg, repository):
    started = time.monotonic()
    primary = pg.initdb("primary", env=repository.env)
    primary.start()
    primary.pgbench_init(scale=2)
    walship(pg, primary, "backup-push", "--part-size", "8")
    first = backup_list(pg, primary)[0]["name"]

    runs: list[tuple[int, str]] = []
    stop = threading.Event()

    def prune() -> None:
        while not stop.is_set():
            proc = walship(pg, primary, "delete", "--retain-full", "1", "--confirm", "--json",
                           check=False)
            runs.append((proc.returncode, proc.stderr))
            time.sleep(0.2)

    deleter = threading.Thread(target=prune, name="prune-loop")
    load = primary.pgbench(seconds=60, clients=2, background=True)
    deleter.start()
    try:
        time.sleep(2)
        for _ in range(2):  # two more backups while WAL flows and old ones are pruned
            primary.switch_wal()
            walship(pg, primary, "backup-push", "--part-size", "8")
            time.sleep(1.5)
        assert load.poll() is None, "pgbench must still be writing"
    finally:
        load.send_signal(signal.SIGTERM)  # (a background job ignores SIGINT)
        load.wait(timeout=60)
        archive_everything(primary)
        time.sleep(0.5)  # one more pass of the deleter over the final state
        stop.set()
        deleter.join(timeout=120)
    assert runs and all(status == 0 for status, _ in runs), runs[-1]
    deleted = [line for _, err in runs for line in err.splitlines()
               if line.startswith("walship: delete backup ")]
    assert any(first in line for line in deleted), "the first backup should have been pruned"
    assert any("delete WAL" in err for _, err in runs), "old WAL should have been pruned"

    rows = backup_list(pg, primary)
    assert len(rows) == 1 and rows[0]["usable"], rows
    final = rows[0]
    remaining = [n for n in repository_names(repository) if not n.endswith(".history")]
    assert min(n[8:24] for n in remaining) == final["start_wal"][8:24]

    # status reads pg_stat_archiver through libpq's PG* environment (env_for sets PGHOST).
    prom = pg.make_dir(pg.path / "textfile") / "walship.prom"
    status = json.loads(walship(pg, primary, "status", "--json", "--prometheus",
                                str(prom)).stdout)
    assert status["archiver"]["known"] and status["archiver"]["failed_count"] == 0
    assert status["archiver"]["last_archived_wal"] == status["last_archived"]
    assert status["newest_backup"] == final["name"] and status["backups"]["complete"] == 1
    assert 0 <= status["last_archived_age_seconds"] < 60
    assert "walship_archiver_failed_count 0\n" in prom.read_text()

    verify = walship(pg, primary, "wal-verify", "--deep", "--json")
    assert json.loads(verify.stdout)["ok"]
    walship(pg, primary, "backup-verify", "LATEST")

    expected = primary.table_checksums()
    walship(pg, primary, "restore", str(pg.path / "copy"), "--archive-mode", "off")
    copy = start_restored(pg, primary, "copy")
    assert copy.table_checksums() == expected
    print(f"{len(runs)} delete runs, {len(deleted)} backups deleted, "
          f"{time.monotonic() - started:.1f} s")
