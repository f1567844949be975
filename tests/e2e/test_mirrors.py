"""Mirrors end to end (issue 14): two Azurite instances as two regions and a ``file://``
directory. PostgreSQL archives under pgbench into the primary, a sync mirror (the second
Azurite, behind a proxy that takes it down for a while) and an async one (the directory): the
archiver retries while the sync mirror is down, nothing is lost, and everything is in both when
it returns; the async mirror's lag shows in ``status --json`` and falls to zero with
``repo-sync``. Then the primary's container is deleted and a point-in-time restore completes
from the mirror, with the data equal to the original's.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.e2e.test_standby_outage import Proxy
from tests.fixtures.postgres import chown_to, repository_names

pytestmark = [pytest.mark.e2e]

OUTAGE_SECONDS = 12


def _walship_json(pg, env, *args):
    run = pg.run_pg([pg.walship, *args, "--json"], env=pg.server_env(env), check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.timeout(300)
def test_mirrors_survive_an_outage_and_restore_fails_over(pg, azure_repository,
                                                          azure_west_repository):
    west = azure_west_repository
    proxy = Proxy((west.azurite.host, west.azurite.port))
    nas = pg.make_dir(pg.path / "nas", 0o750)
    via_proxy = west.azurite.connection_string.replace(
        f":{west.azurite.port}/", f":{proxy.port}/")
    config = pg.path / "walship.toml"
    config.write_text(
        f'repo = "{azure_repository.url}"\n'
        f'[azure]\nconnection_string = "{azure_repository.azurite.connection_string}"\n'
        f'[[mirrors]]\nname = "west"\nrepo = "{west.url}"\nmode = "sync"\n'
        f'[mirrors.azure]\nconnection_string = "{via_proxy}"\n'
        f'[[mirrors]]\nname = "nas"\nrepo = "file://{nas}"\nmode = "async"\n')
    os.chmod(config, 0o600)
    chown_to(config, pg.user)
    env = {"WALSHIP_CONFIG": str(config), "WALSHIP_STORAGE_RETRIES": "1",
           "WALSHIP_STORAGE_TIMEOUT": "3", "WALSHIP_CALL_TIMEOUT": "10"}
    try:
        primary = pg.initdb("primary", env=env, archive_timeout="2s")
        primary.start()
        primary.pgbench_init(1)
        backup = pg.basebackup(primary)
        primary.pgbench(seconds=2)

        # The sync mirror's region goes away: archiving fails and PostgreSQL retries.
        proxy.down()
        primary.pgbench(seconds=2)
        stuck = primary.switch_wal()
        pg.wait_for(lambda: int(primary.psql(
            "SELECT failed_count FROM pg_stat_archiver")) > 0, 60, "a failed archive attempt",
            primary)
        time.sleep(OUTAGE_SECONDS)
        assert not primary.is_archived(stuck)
        proxy.up()
        primary.wait_archived(stuck, timeout=120)
        primary.pgbench(transactions=100)
        primary.create_restore_point("state_a")
        state_a = primary.table_checksums()
        primary.wait_archived(primary.switch_wal(), timeout=120)
        primary.pgbench(seconds=1)
        primary.wait_archived(primary.switch_wal(), timeout=120)

        wal_primary = repository_names(azure_repository)
        assert wal_primary == repository_names(west), "the sync mirror lacks WAL"
        assert len(wal_primary) >= 4

        # The async mirror lags, visibly, until repo-sync copies what it lacks.
        status = _walship_json(pg, env, "status")
        mirrors = {m["name"]: m for m in status["mirrors"]}
        assert mirrors["west"]["lag_files"] == 0
        assert mirrors["nas"]["lag_files"] > 0 and mirrors["nas"]["lag_seconds"] > 0
        pg.run_pg([pg.walship, "repo-sync"], env=pg.server_env(env), describe="repo-sync")
        status = _walship_json(pg, env, "status")
        assert {m["name"]: (m["lag_files"], m["lag_seconds"]) for m in status["mirrors"]} \
            == {"west": (0, 0), "nas": (0, 0)}
        assert sorted(p.name for p in (nas / "wal").iterdir()) == wal_primary
        primary.stop()

        # The primary region is lost: the restore reads from the mirror, restore_command as is.
        azure_repository.container_client().delete_container()
        restored = pg.restore(backup, "restored", env=env, target_name="state_a")
        restored.start()
        restored.wait_promoted()
        assert restored.table_checksums() == state_a, restored.log_tail()
        log = restored.log_text()
        assert "FATAL" not in log, restored.log_tail()
        # (segments came through the prefetch worker: its fall-over is in its own log)
        worker = restored.data / "pg_wal" / "walship" / "prefetch" / "worker.log"
        told = log + (worker.read_text() if worker.exists() else "")
        assert "WARNING: repository primary could not answer" in told, told[-3000:]
    finally:
        proxy.down()
