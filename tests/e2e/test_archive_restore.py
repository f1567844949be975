"""End to end: PostgreSQL archives with ``walship wal-push`` while pgbench writes, a base backup
is restored with ``walship wal-fetch`` to a point in time (state A) and to the end of the
archive (state B), and the restored tables equal the source's, row for row."""

from __future__ import annotations

import re
import subprocess

import pytest

pytestmark = [pytest.mark.e2e]


@pytest.fixture(params=["file", "azure", "azure-sdk"])
def repository(request):
    """``azure`` reaches Azurite through walship's REST transport (a connection string with a
    key), ``azure-sdk`` through the Azure SDK, which token credentials and proxies use."""
    if request.param == "file":
        return request.getfixturevalue("file_repository")
    repo = request.getfixturevalue("azure_repository")
    if request.param == "azure-sdk":
        repo.transport = "sdk"
    return repo


def archive_then_restore(pg, repo_env, *, target: str, wal_segsize: int | None = None,
                         scale: int = 2, seconds: int = 3):
    """Archive while writing, back up, restore to state A and to the end of the archive
    (state B), compare; return the two restored clusters (still running)."""
    primary = pg.initdb("primary", env=repo_env, wal_segsize=wal_segsize)
    primary.start()
    primary.pgbench_init(scale)
    load = primary.pgbench(seconds=seconds, background=True)  # writes during the backup
    backup = pg.basebackup(primary)
    assert load.wait(timeout=120) == 0, load.stdout.read()
    primary.pgbench(transactions=200)

    state_a = primary.table_checksums()
    if target == "name":
        primary.create_restore_point("state_a")
        recovery_target = {"target_name": "state_a"}
    else:  # stop just before the first record written after state A
        recovery_target = {"target_lsn": primary.current_lsn(), "target_inclusive": False}

    primary.pgbench(seconds=seconds)
    state_b = primary.table_checksums()
    assert state_b != state_a
    primary.wait_archived(primary.switch_wal())

    # To state A: recovery stops at the target and promotes.
    at_a = pg.restore(backup, "restored_a", env=repo_env, **recovery_target)
    at_a.start()
    at_a.wait_promoted()
    assert at_a.table_checksums() == state_a, at_a.log_tail()
    assert at_a.timeline() == 2
    log = at_a.log_text()
    assert "restored log file" in log and "recovery stopping" in log, at_a.log_tail()

    # To the end of the archive: recovery replays until wal-fetch says "not found".
    at_b = pg.restore(backup, "restored_b", env=repo_env)
    at_b.start()
    at_b.wait_promoted()
    assert at_b.table_checksums() == state_b, at_b.log_tail()
    assert "FATAL" not in at_b.log_text(), at_b.log_tail()
    return at_a, at_b


@pytest.mark.timeout(240)
@pytest.mark.pg_versions(pg18_with={"repository": "file"})
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_archive_and_point_in_time_restore(pg, repository, encrypted):
    env = dict(repository.env)
    if encrypted:
        env["WALSHIP_ENCRYPTION_KEY_FILE"] = str(pg.key_file())
    archive_then_restore(pg, env, target="lsn" if encrypted else "name")
    names = [n for n in _listed(repository) if len(n) == 24]
    assert len(names) >= 3, names
    if encrypted:  # what PostgreSQL restored was encrypted: no key, no WAL
        fetch = [pg.walship, "wal-fetch", names[-1], str(pg.path / "fetched")]
        without_key = {k: v for k, v in env.items() if k != "WALSHIP_ENCRYPTION_KEY_FILE"}
        run = subprocess.run(fetch, env=pg.server_env({**without_key, "WALSHIP_PREFETCH": "0"}),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode >= 126, (run.returncode, run.stderr)
        assert not (pg.path / "fetched").exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("wal_segsize", [1, 64])
def test_non_default_wal_segment_size(pg, file_repository, wal_segsize):
    _, at_b = archive_then_restore(pg, file_repository.env, target="name",
                                   wal_segsize=wal_segsize)
    names = [n for n in _listed(file_repository) if len(n) == 24]
    if wal_segsize == 1:
        assert len(names) >= 8, names
    # What walship delivered to PostgreSQL was whole segments of the cluster's size.
    delivered = re.findall(r"walship: wal-fetch ([0-9A-F]{24}) delivered.* out=(\d+)",
                           at_b.log_text())
    assert delivered and {int(size) for _, size in delivered} == {wal_segsize << 20}, delivered


def _listed(repository) -> list[str]:
    from tests.fixtures.postgres import repository_names

    return repository_names(repository)
