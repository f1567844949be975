"""End to end: one repository, one key. A second cluster archiving into a repository with
another encryption key is refused (exit 3, said in PostgreSQL's log) before it stores anything,
so the repository keeps only the first cluster's WAL, all readable with the first key."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.postgres import repository_names

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(240)
def test_a_second_server_with_another_key_is_refused(pg, file_repository):
    first_env = dict(file_repository.env, WALSHIP_ENCRYPTION_KEY_FILE=str(pg.key_file("a.key")))
    first = pg.initdb("first", env=first_env)
    first.start()
    first.wait_archived(first.switch_wal())
    first.stop()
    stored = repository_names(file_repository)
    assert stored, "the first cluster archived nothing"
    storage = file_repository.open()
    try:
        with storage.get("walship.json") as download:
            marker = json.loads(download.read())
    finally:
        storage.close()
    assert marker["encryption"] == "aes-256-gcm" and marker["wal_segment_size"] == 16 << 20

    second_env = dict(file_repository.env,
                      WALSHIP_ENCRYPTION_KEY_FILE=str(pg.key_file("b.key")))
    second = pg.initdb("second", env=second_env)
    second.start()
    for n in range(3):  # segments the first cluster never archived: nothing to collide with
        second.psql(f"CREATE TABLE t{n} AS SELECT generate_series(1, 1000) AS x")
        second.switch_wal()

    def refused() -> bool:
        failed = second.try_psql("SELECT failed_count FROM pg_stat_archiver")
        return failed is not None and int(failed) >= 1

    pg.wait_for(refused, 60, "the second cluster's archiver to fail", second)
    log = second.log_text()
    assert "archive command failed with exit code 3" in log, second.log_tail()
    assert f"encrypted with another key: key id {marker['key_id']}" in log, second.log_tail()
    assert second.try_psql("SELECT archived_count FROM pg_stat_archiver") == "0"
    assert repository_names(file_repository) == stored  # nothing of the second cluster's
