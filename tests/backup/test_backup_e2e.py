"""Base backups and point-in-time restore end to end: real PostgreSQL servers (15; 18 too in
the tests marked ``pg_versions``) archiving with ``walship wal-push``, ``walship backup-push``
taking online backups, ``walship restore`` and restored servers recovering with
``walship wal-fetch``.

Every walship command runs as a subprocess, as the server's OS user unless a test says
otherwise (running as root exercises the ownership rules of the restore).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.postgres import PgCluster, PgWorkspace

pytestmark = pytest.mark.e2e

TABLE = {"t": "id"}


@pytest.fixture(params=["file", "azure"])
def repo(request):
    if request.param == "file":
        return request.getfixturevalue("file_repository")
    return request.getfixturevalue("azure_repository")


def env_for(cluster: PgCluster) -> dict[str, str]:
    """The server's environment (repository, key) plus libpq's, to reach it over its socket."""
    return {**cluster.env, "PGHOST": str(cluster.sockdir), "PGUSER": "postgres",
            "PGDATABASE": "postgres"}


def walship(pg: PgWorkspace, cluster: PgCluster, *args: str, check: bool = True,
            as_root: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [pg.walship, *args]
    if as_root:
        proc = subprocess.run(cmd, env=env_for(cluster), capture_output=True, text=True,
                              cwd=pg.path, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}: {proc.stderr}")
        return proc
    return pg.run_pg(cmd, env=env_for(cluster), check=check, timeout=timeout,
                     describe=f"walship {args[0]}")


def backup_list(pg: PgWorkspace, cluster: PgCluster) -> list[dict]:
    return json.loads(walship(pg, cluster, "backup-list", "--json").stdout)


def archive_everything(cluster: PgCluster) -> None:
    cluster.wait_archived(cluster.switch_wal())


def start_restored(pg: PgWorkspace, primary: PgCluster, name: str) -> PgCluster:
    """Start the server on a directory ``walship restore`` prepared; wait for promotion."""
    cluster = PgCluster(pg, name, pg.path / name, primary.env)
    pg.clusters.append(cluster)
    cluster.base_settings()  # its own socket directory (later lines win)
    cluster.start()
    cluster.wait_promoted(timeout=180)
    return cluster


def summary_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"walship: {command} ")
             and " in=" in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.pg_versions(pg18_with={"repo": "file"})
def test_point_in_time_restore(pg, repo, pg_install):
    primary = pg.initdb("primary", env=repo.env)
    summaries = pg_install.major >= 17  # WAL summaries in pg_wal/summaries: never backed up
    if summaries:
        primary.configure(summarize_wal=True)
    primary.start()
    primary.psql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    primary.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    if summaries:
        primary.switch_wal()
        pg.wait_for(lambda: any((primary.data / "pg_wal" / "summaries").glob("*.summary")),
                    60, "a WAL summary file", primary)
    push = walship(pg, primary, "backup-push", "--part-size", "1")
    line = summary_line(push.stderr, "backup-push")
    assert " stored in=" in line and " parts=" in line and " files=" in line
    [backup] = backup_list(pg, primary)
    assert backup["complete"] and backup["usable"] and backup["parts"] > 2

    primary.psql("INSERT INTO t SELECT g, 'a' || g FROM generate_series(20001, 25000) g")
    state_a = primary.table_checksums(TABLE)
    time.sleep(1)
    t1 = primary.psql("SELECT clock_timestamp()")
    time.sleep(1)
    primary.psql("UPDATE t SET v = 'b' WHERE id % 3 = 0")
    primary.psql("DELETE FROM t WHERE id % 7 = 0")
    state_b = primary.table_checksums(TABLE)
    assert state_a != state_b
    archive_everything(primary)

    walship(pg, primary, "restore", str(pg.path / "pitr"), "--target-time", t1,
            "--target-action", "promote", "--archive-mode", "off")
    wal_dirs = ["archive_status"] + (["summaries"] if summaries else [])  # as pg_basebackup
    assert sorted(p.name for p in (pg.path / "pitr" / "pg_wal").iterdir()) == wal_dirs
    assert not any(p.is_file() for p in (pg.path / "pitr" / "pg_wal").rglob("*"))
    conf = (pg.path / "pitr" / "postgresql.auto.conf").read_text()
    assert f"restore_command = '{pg.walship} wal-fetch %f %p'" in conf
    assert (pg.path / "pitr" / "recovery.signal").exists()
    at_t1 = start_restored(pg, primary, "pitr")
    assert at_t1.table_checksums(TABLE) == state_a
    at_t1.stop()

    walship(pg, primary, "restore", str(pg.path / "latest"), "--archive-mode", "off")
    latest = start_restored(pg, primary, "latest")
    assert latest.table_checksums(TABLE) == state_b


@pytest.mark.timeout(300)
def test_objects_above_17_mib_on_a_strict_azurite(pg, azure_repository):
    """A backup part and 64 MiB WAL segments whose stored form exceeds 17 MiB (so they go up as
    staged blocks through the SDK, and come back in ranged GETs) on Azurite in strict mode,
    which refuses the service versions it does not serve: stored, restored, identical."""
    from walship.storage import azure

    repo = azure_repository
    primary = pg.initdb("primary", env=repo.env, wal_segsize=64)
    primary.start()
    primary.psql("CREATE TABLE big (id int PRIMARY KEY, b bytea)")
    primary.psql("ALTER TABLE big ALTER COLUMN b SET STORAGE EXTERNAL")  # stored uncompressed

    def fill(first: int) -> None:  # 24 MiB that no compression shrinks, in 1 MiB values
        primary.psql(f"INSERT INTO big SELECT i, (SELECT decode(string_agg(md5(random()::text "
                     f"|| i || g), ''), 'hex') FROM generate_series(1, 65536) g) "
                     f"FROM generate_series({first}, {first + 23}) i")

    fill(1)
    archive_everything(primary)
    walship(pg, primary, "backup-push")  # one 64 MiB part holds the whole 24 MiB table
    fill(25)  # and WAL after the backup, which the restore replays
    expected = primary.psql("SELECT md5(string_agg(b, ''::bytea ORDER BY id)) FROM big")
    archive_everything(primary)

    [backup] = backup_list(pg, primary)
    storage = repo.open()
    try:
        stored = {info.key: info.size for prefix in ("wal/", "backups/")
                  for info in storage.list(prefix)}
    finally:
        storage.close()
    large = sorted(key.split("/")[0] for key, size in stored.items()
                   if size > azure.SINGLE_PUT_MAX)
    assert "backups" in large and large.count("wal") >= 2, stored

    walship(pg, primary, "restore", str(pg.path / "restored"), "--archive-mode", "off")
    restored = start_restored(pg, primary, "restored")
    assert restored.psql("SELECT md5(string_agg(b, ''::bytea ORDER BY id)) FROM big") == expected
    assert backup["usable"]


def test_backup_under_pgbench_load_restores_consistent(pg, file_repository):
    primary = pg.initdb("primary", env=file_repository.env)  # initdb --data-checksums
    primary.start()
    primary.pgbench_init(scale=3)
    load = primary.pgbench(seconds=120, clients=2, background=True)
    time.sleep(2)
    try:
        push = walship(pg, primary, "backup-push", "--part-size", "8")
        assert load.poll() is None, "pgbench must still be writing when the backup ends"
        time.sleep(1)
    finally:
        load.send_signal(signal.SIGTERM)  # (a background job ignores SIGINT)
        load.wait(timeout=60)
    summary_line(push.stderr, "backup-push")
    archive_everything(primary)

    walship(pg, primary, "restore", str(pg.path / "copy"), "--target", "immediate",
            "--target-action", "promote", "--archive-mode", "off")
    copy = start_restored(pg, primary, "copy")
    copy.psql("CREATE EXTENSION amcheck")
    pg.run_client([str(pg.bindir / "pg_amcheck"), "-h", str(copy.sockdir), "-U", "postgres",
                   "-d", "postgres", "--heapallindexed"], describe="pg_amcheck", log=copy.log)
    totals = copy.psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || "
                       "(SELECT sum(bbalance) FROM pgbench_branches) || ' ' || "
                       "(SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || "
                       "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
    assert len(set(totals.split())) == 1, f"pgbench balances disagree: {totals}"
    history = int(copy.psql("SELECT count(*) FROM pgbench_history"))
    assert history > 0, "the backup should contain transactions run during it"
    copy.stop()
    copy.wait_stopped()
    pg.run_pg([str(pg.bindir / "pg_checksums"), "--check", "-D", str(copy.data)],
              describe="pg_checksums --check")


def _stored_parts(repo, name: str) -> list[str]:
    storage = repo.open()
    try:
        return sorted((info.size, info.key) for info in storage.list(f"backups/{name}/")
                      if "/part." in info.key)
    finally:
        storage.close()


def _flip(repo, key: str) -> None:
    if hasattr(repo, "flip_byte"):
        size = len(repo.read_raw(key))
        repo.flip_byte(key, size // 2)
    else:
        path = repo.path / key
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3] ^= 0x01
        path.write_bytes(bytes(raw))


def _startable(pg: PgWorkspace, directory: Path) -> bool:
    """Whether pg_ctl can start a server on ``directory`` (stopped again if so)."""
    if not directory.exists():
        return False
    probe = PgCluster(pg, "probe", directory, pg.server_env())
    if (directory / "postgresql.auto.conf").exists():
        probe.base_settings()
    result = probe.start(check=False, timeout=20)
    if result.returncode == 0 or probe.is_running():
        pg.clusters.append(probe)
        probe.stop("immediate")
        return True
    return False


def test_killed_push_is_never_usable_and_tampering_fails_loudly(pg, repo):
    primary = pg.initdb("primary", env=repo.env)
    primary.start()
    primary.pgbench_init(scale=3)
    env = {**env_for(primary), "WALSHIP_PARALLEL": "1"}
    proc = subprocess.Popen([pg.walship, "backup-push", "--part-size", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=pg.path, user=pg.user.pw_uid if pg.user else None,
                            group=pg.user.pw_gid if pg.user else None,
                            extra_groups=[] if pg.user else None)
    storage = repo.open()
    deadline = time.monotonic() + 60
    while not any("/part." in info.key for info in storage.list("backups/")):
        assert proc.poll() is None, f"backup-push ended before it could be killed: " \
                                    f"{proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    storage.close()

    [killed] = backup_list(pg, primary)
    assert not killed["complete"] and not killed["usable"]
    listing = walship(pg, primary, "backup-list").stdout
    assert "INCOMPLETE" in listing
    fetch = walship(pg, primary, "backup-fetch", "LATEST", str(pg.path / "none"), check=False)
    assert fetch.returncode != 0 and "no complete backup" in fetch.stderr
    bad = walship(pg, primary, "backup-fetch", killed["name"], str(pg.path / "none"),
                  check=False)
    assert bad.returncode != 0 and "incomplete" in bad.stderr
    assert not (pg.path / "none").exists()

    # The killed session aborted its backup on the server: another one starts at once.
    walship(pg, primary, "backup-push", "--part-size", "4")
    archive_everything(primary)
    rows = backup_list(pg, primary)
    usable = [r for r in rows if r["usable"]]
    assert len(rows) == 2 and len(usable) == 1
    name = usable[0]["name"]
    _, biggest = _stored_parts(repo, name)[-1]
    _flip(repo, biggest)

    target = pg.make_dir(pg.path / "fetched", 0o700)
    fetch = walship(pg, primary, "backup-fetch", name, str(target), check=False)
    assert fetch.returncode == 5, fetch.stderr
    errors = [line for line in fetch.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "damaged" in errors[0], fetch.stderr
    assert not (target / "PG_VERSION").exists() and not (target / "backup_label").exists()
    assert not (target / "global" / "pg_control").exists()
    assert not _startable(pg, target)

    restored = walship(pg, primary, "restore", str(pg.path / "restored"), check=False)
    assert restored.returncode == 5, restored.stderr
    assert not (pg.path / "restored").exists()
    assert not _startable(pg, pg.path / "restored")


def tablespace_table(pg, primary) -> tuple[Path, int]:
    """Tablespace ``fast`` (its location, its oid) holding table ``tt`` (6 MB, 30,000 rows)
    and its primary key."""
    location = pg.make_dir(pg.path / "ts-original", 0o700)
    primary.psql(f"CREATE TABLESPACE fast LOCATION '{location}'")
    primary.psql("CREATE TABLE tt (id int PRIMARY KEY USING INDEX TABLESPACE fast, v text) "
                 "TABLESPACE fast")
    primary.psql("INSERT INTO tt SELECT g, repeat(md5(g::text), 5) FROM "
                 "generate_series(1, 30000) g")
    return location, int(primary.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'fast'"))


def test_tablespaces_round_trip_with_a_remap(pg, file_repository):
    primary = pg.initdb("primary", env=file_repository.env)
    primary.start()
    location, oid = tablespace_table(pg, primary)
    walship(pg, primary, "backup-push")
    [backup] = backup_list(pg, primary)
    assert backup["tablespaces"] == [{"oid": oid, "name": "fast", "location": str(location)}]
    primary.psql("INSERT INTO tt SELECT g, 'later' FROM generate_series(30001, 31000) g")
    expected = primary.table_checksums({"tt": "id"})
    archive_everything(primary)
    before = set(location.rglob("*"))

    refused = walship(pg, primary, "restore", str(pg.path / "copy"), check=False)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert not (pg.path / "copy").exists()

    moved = pg.path / "ts-moved"
    # As root this time: the files are given to the cluster's original owner.
    walship(pg, primary, "restore", str(pg.path / "copy"), "--tablespace-map",
            f"{oid}={moved}", "--archive-mode", "off", as_root=True)
    assert os.readlink(pg.path / "copy" / "pg_tblspc" / str(oid)) == str(moved)
    if pg.user is not None:
        assert os.stat(moved).st_uid == pg.user.pw_uid
        assert os.stat(pg.path / "copy" / "base").st_uid == pg.user.pw_uid
    copy = start_restored(pg, primary, "copy")
    assert copy.table_checksums({"tt": "id"}) == expected
    assert copy.psql(f"SELECT pg_tablespace_location({oid})") == str(moved)
    assert copy.psql("SELECT count(*) FROM tt WHERE v = 'later'") == "1000"
    assert set(location.rglob("*")) >= before  # the primary's own tablespace is intact


@pytest.mark.pg_versions
def test_backup_taken_on_a_standby(pg, file_repository):
    primary = pg.initdb("primary", env=file_repository.env)
    primary.start()
    primary.psql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    primary.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    standby = PgCluster(pg, "standby", pg.basebackup(primary, "standby", wal_method="stream"),
                        primary.env)
    pg.clusters.append(standby)
    standby.base_settings()
    standby.configure(primary_conninfo=f"host={primary.sockdir} user=postgres")
    (standby.data / "standby.signal").touch()
    os.chown(standby.data / "standby.signal", *((pg.user.pw_uid, pg.user.pw_gid)
                                                 if pg.user else (-1, -1)))
    standby.start()
    standby.wait_ready()
    assert standby.in_recovery()

    primary.psql("INSERT INTO t SELECT g, 'during' FROM generate_series(20001, 21000) g")
    push = walship(pg, standby, "backup-push", "--part-size", "2")
    summary_line(push.stderr, "backup-push")
    assert "not all archived yet" in push.stderr  # the stop segment is not complete yet
    [backup] = backup_list(pg, primary)
    assert backup["complete"] and backup["from_standby"]
    primary.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(21001, 22000) g")
    expected = primary.table_checksums(TABLE)
    archive_everything(primary)  # the primary archives the WAL the standby's backup needs
    [backup] = backup_list(pg, primary)
    assert backup["usable"], backup

    walship(pg, primary, "restore", str(pg.path / "copy"), "--archive-mode", "off")
    copy = start_restored(pg, primary, "copy")
    assert copy.table_checksums(TABLE) == expected
