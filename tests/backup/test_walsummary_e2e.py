"""WAL-summary change detection against a real server (tests marked ``pg_versions``: Debian's
PostgreSQL, where the summaries do not exist, and PostgreSQL 18, where they do).

On 18, with ``summarize_wal = on``: a checkpoint's redo LSN, a byte copy of every relation file,
pgbench and a table cut by VACUUM and grown again, a table in a tablespace, then a backup's
start (``pg_backup_start`` on :class:`walship.backup.source.PostgresSource`'s own connection)
and a second byte copy. Every 8 kB page that differs between the copies, in a file both copies
have, must be among the blocks :func:`changed_blocks` reports for that file (or the file must
be left uncovered, None): the summaries never miss a changed block. Then the reasons for None a
real server gives: a role whose EXECUTE was revoked, and (on the system PostgreSQL, before 17) a
server without summaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from walship import wal
from walship.backup.source import PostgresSource
from walship.backup.walsummary import MAIN_FORK, BlockChanges, changed_blocks, parse_relation_path

pytestmark = pytest.mark.e2e
BLOCK = 8192


def relation_files(data: Path) -> dict[str, bytes]:
    """Every file under base/, global/ and pg_tblspc/ (tablespaces followed), by path."""
    found: dict[str, bytes] = {}
    for top in ("base", "global", "pg_tblspc"):
        for root, _dirs, files in os.walk(data / top, followlinks=True):
            for name in files:
                full = Path(root) / name
                found[str(full.relative_to(data))] = full.read_bytes()
    return found


def differing_blocks(before: bytes, after: bytes) -> list[int]:
    """The blocks (below both lengths) whose bytes differ."""
    count = min(len(before), len(after)) // BLOCK
    return [n for n in range(count)
            if before[n * BLOCK:(n + 1) * BLOCK] != after[n * BLOCK:(n + 1) * BLOCK]]


def prepare_changes(pg, primary, *more: str) -> None:
    """The tables :func:`make_changes` changes (pgbench's, one in a tablespace, one to cut,
    one to truncate), then ``more`` statements; hint bits and visibility maps settled."""
    space = pg.make_dir(pg.path / "space1", 0o700)
    primary.pgbench_init(scale=3)
    primary.psql(f"CREATE TABLESPACE space1 LOCATION '{space}'")
    primary.psql("CREATE TABLE elsewhere TABLESPACE space1 AS "
                 "SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g")
    primary.psql("CREATE TABLE cut AS SELECT g AS id, repeat('y', 200) AS pad "
                 "FROM generate_series(1, 20000) g")
    primary.psql("CREATE TABLE gone AS SELECT g AS id FROM generate_series(1, 1000) g")
    for statement in more:
        primary.psql(statement)
    primary.psql("VACUUM (FREEZE)")  # settled before the first copy


def make_changes(primary) -> None:
    """pgbench, a table in a tablespace updated, a table cut by VACUUM and grown again, a
    table truncated (a new relfilenode) and refilled."""
    primary.pgbench(transactions=300, clients=2)
    primary.psql("UPDATE elsewhere SET pad = 'z' WHERE id % 500 = 0")
    primary.psql("DELETE FROM cut WHERE id > 12000")
    primary.psql("VACUUM cut")  # truncates its tail: a limit block
    primary.psql("INSERT INTO cut SELECT g, 'w' FROM generate_series(1, 3000) g")
    primary.psql("TRUNCATE gone")  # a new relfilenode
    primary.psql("INSERT INTO gone SELECT g FROM generate_series(1, 1000) g")


def assert_never_misses(found: BlockChanges, before: dict[str, bytes],
                        after: dict[str, bytes]) -> set[str]:
    """Every page that differs between the copies, in a file both have, is among the blocks
    ``found`` reports for it (or the file is left uncovered, and then a relation's main fork
    only with a limit); at least 100 such pages. Returns the covered files."""
    checked = missed = 0
    covered: set[str] = set()
    for path, now in sorted(after.items()):
        if path not in before:
            continue  # a new file: read whole (the caller's rule 6)
        changes = found.file_changes(path, len(now))
        relation = parse_relation_path(path, found.version_directory)
        if relation is not None and relation.fork == MAIN_FORK and len(now) % BLOCK == 0:
            assert changes is not None or found.limit_block(path) is not None, path
        if changes is None:
            continue
        covered.add(path)
        reported = set(changes.blocks)
        for block in differing_blocks(before[path], now):
            checked += 1
            if block not in reported:
                missed += 1
                print(f"MISSED {path} block {block}")
    assert missed == 0, f"{missed} of {checked} changed blocks missed"
    assert checked >= 100, checked  # pgbench really changed pages we checked
    return covered


def redo_lsn(cluster) -> wal.Lsn:
    cluster.psql("CHECKPOINT")
    return wal.Lsn.parse(cluster.psql("SELECT redo_lsn FROM pg_control_checkpoint()"))


def source_for(cluster, user: str = "postgres") -> PostgresSource:
    return PostgresSource(f"host={cluster.sockdir} port=5432 user={user} dbname=postgres")


@pytest.mark.pg_versions
@pytest.mark.timeout(600)
def test_the_summaries_never_miss_a_changed_block(pg, pg_install):
    primary = pg.initdb("primary", archive=False)  # --data-checksums
    if pg_install.major >= 17:
        primary.configure(summarize_wal=True)
    primary.start()
    if pg_install.major < 17:
        source = source_for(primary)
        lines: list[str] = []
        try:
            assert changed_blocks(source._conn, timeline=1, since_lsn=wal.Lsn(0),
                                  until_lsn=wal.Lsn(1), log=lines.append) is None
        finally:
            source.close()
        assert len(lines) == 1, lines
        assert f"PostgreSQL {pg_install.major} has no WAL summaries" in lines[0], lines
        return

    primary.psql("CREATE ROLE plain LOGIN")
    prepare_changes(pg, primary)
    since = redo_lsn(primary)
    before = relation_files(primary.data)
    make_changes(primary)

    source = source_for(primary)
    lines = []
    try:
        info = source.describe()
        until = source.start("walsummary e2e", fast=True)  # a backup's start: a checkpoint
        after = relation_files(primary.data)
        found = changed_blocks(source._conn, timeline=1, since_lsn=since, until_lsn=until,
                               system_identifier=info.system_identifier, log=lines.append)
        source.stop(wait_for_archive=False)
    finally:
        source.close()
    assert lines == [] and isinstance(found, BlockChanges), lines
    assert found.summaries >= 1 and found.block_count > 0

    version_directory = found.version_directory
    covered_paths = assert_never_misses(found, before, after)

    def main_file(table: str) -> str:
        return primary.psql(f"SELECT pg_relation_filepath('{table}')")

    accounts = main_file("pgbench_accounts")
    assert accounts in covered_paths
    assert differing_blocks(before[accounts], after[accounts])
    elsewhere = main_file("elsewhere")
    assert elsewhere.startswith("pg_tblspc/") and f"/{version_directory}/" in elsewhere
    assert elsewhere in covered_paths and differing_blocks(before[elsewhere], after[elsewhere])
    cut = found.file_changes(main_file("cut"), len(after[main_file("cut")]))
    assert cut is not None and cut.limit is not None, cut  # VACUUM's truncation seen
    assert found.file_changes(main_file("cut") + "_vm", BLOCK) is None  # maps read whole
    gone = main_file("gone")
    assert gone not in before or found.file_changes(gone, len(after[gone])) is None

    # Any role may read the summaries by default (EXECUTE to PUBLIC); once an administrator
    # revokes it, None, one line saying why, and the session (a backup's, in walship) still
    # usable.
    source = source_for(primary, "plain")
    try:
        assert isinstance(changed_blocks(source._conn, timeline=1, since_lsn=since,
                                         until_lsn=until), BlockChanges)
    finally:
        source.close()
    primary.psql("REVOKE EXECUTE ON FUNCTION pg_wal_summary_contents(bigint, pg_lsn, pg_lsn) "
                 "FROM PUBLIC")
    source = source_for(primary, "plain")
    lines = []
    try:
        assert changed_blocks(source._conn, timeline=1, since_lsn=since, until_lsn=until,
                              log=lines.append) is None
        assert source._conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        source.close()
    assert len(lines) == 1 and "permission denied" in lines[0], lines


@pytest.mark.pg_versions
@pytest.mark.timeout(600)
def test_a_timeline_switch_is_followed_through_the_history(pg, pg_install):
    """The parent on timeline 1, the server promoted (timeline 2) since: the summaries of both
    timelines, cut at the switch point the history file (read by the server) gives."""
    primary = pg.initdb("primary", archive=False)
    if pg_install.major >= 17:
        primary.configure(summarize_wal=True)
    primary.start()
    if pg_install.major < 17:  # the version is checked before anything else
        source = source_for(primary)
        try:
            assert changed_blocks(source._conn, timeline=2, since_lsn=wal.Lsn(0),
                                  until_lsn=wal.Lsn(1), parent_timeline=1,
                                  parent_stop_lsn=wal.Lsn(0)) is None
        finally:
            source.close()
        return
    primary.pgbench_init(scale=2)
    primary.psql("VACUUM (FREEZE)")
    since = redo_lsn(primary)  # the parent's start
    before = relation_files(primary.data)
    primary.pgbench(transactions=100, clients=2)  # on timeline 1, while the parent "ran"
    parent_stop = wal.Lsn.parse(primary.psql("SELECT pg_current_wal_lsn()"))
    primary.pgbench(transactions=100, clients=2)  # on timeline 1, after the parent
    primary.stop()  # then a promotion: timeline 2
    (primary.data / "standby.signal").touch()
    os.chown(primary.data / "standby.signal", primary.data.stat().st_uid,
             primary.data.stat().st_gid)
    primary.start()
    primary.promote()
    primary.wait_promoted()
    assert primary.timeline() == 2
    primary.pgbench(transactions=100, clients=2)  # on timeline 2

    source = source_for(primary)
    lines: list[str] = []
    try:
        until = source.start("walsummary e2e", fast=True)
        after = relation_files(primary.data)
        found = changed_blocks(source._conn, timeline=2, since_lsn=since, until_lsn=until,
                               parent_timeline=1, parent_stop_lsn=parent_stop,
                               log=lines.append)
        # a parent that stopped after the switch point saw WAL this history does not have
        switch = wal.parse_history((primary.data / "pg_wal" / "00000002.history").read_text())
        late = changed_blocks(source._conn, timeline=2, since_lsn=since, until_lsn=until,
                              parent_timeline=1,
                              parent_stop_lsn=wal.Lsn(switch[0].switchpoint.value + 1),
                              log=lines.append)
        source.stop(wait_for_archive=False)
    finally:
        source.close()
    assert isinstance(found, BlockChanges), lines
    assert found.summaries >= 2  # both timelines
    assert late is None and len(lines) == 1 and "after its switch point" in lines[0], lines
    checked = missed = 0
    for path, now in sorted(after.items()):
        changes = found.file_changes(path, len(now)) if path in before else None
        if changes is None:
            continue
        reported = set(changes.blocks)
        for block in differing_blocks(before[path], now):
            checked += 1
            missed += block not in reported
    assert missed == 0 and checked >= 50, (missed, checked)


@pytest.mark.pg_versions
@pytest.mark.timeout(600)
def test_an_incr_backup_uses_the_summaries_and_restores_equal(pg, file_repository, pg_install):
    """backup-push --type incr on 18 with summarize_wal: the log says the summaries were used;
    the backup restores to data equal to the source's. On 15: no summaries, no such line."""
    from tests.backup.test_backup_e2e import (
        archive_everything,
        start_restored,
        summary_line,
        walship,
    )

    primary = pg.initdb("primary", env=file_repository.env)
    if pg_install.major >= 17:
        primary.configure(summarize_wal=True)
    primary.start()
    primary.pgbench_init(scale=3)  # pgbench_accounts: 2.5 MB, a large relation file
    walship(pg, primary, "backup-push", "--type", "full")
    primary.pgbench(transactions=200, clients=2)
    push = walship(pg, primary, "backup-push", "--type", "incr")
    line = summary_line(push.stderr, "backup-push")
    assert " type=incr " in line, push.stderr
    used = [x for x in push.stderr.splitlines() if "WAL summaries used" in x]
    if pg_install.major >= 17:
        assert len(used) == 1, push.stderr
        assert "not used" not in push.stderr, push.stderr
    else:  # no summaries before 17: the WAL itself is read (walship.backup.walscan)
        assert used == [] and "summar" not in push.stderr.lower(), push.stderr
        assert "WAL read for changes" in push.stderr, push.stderr
    name = line.split()[2]
    primary.create_restore_point("after_incr")
    state = primary.table_checksums()
    archive_everything(primary)
    walship(pg, primary, "restore", str(pg.path / "copy"), "--backup", name, "--target-name",
            "after_incr", "--target-action", "promote", "--archive-mode", "off")
    copy = start_restored(pg, primary, "copy")
    assert copy.table_checksums() == state
    copy.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
    pg.run_client([str(pg.bindir / "pg_amcheck"), "-h", str(copy.sockdir), "-U", "postgres",
                   "-d", "postgres", "--heapallindexed"], describe="pg_amcheck", log=copy.log)
