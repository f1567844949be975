"""Change detection from the WAL itself (walship.backup.walscan over walship.walrecords) against
a real server (``pg_versions``: Debian's PostgreSQL 15, and PostgreSQL 18).

A checkpoint's redo LSN and a byte copy of every relation file; then pgbench, a table cut by
VACUUM and grown again, a table in a tablespace, TRUNCATE, DROP TABLE, a CREATE TABLE rolled
back, CREATE DATABASE by both strategies and DROP DATABASE, on 1 MB WAL segments; the WAL read
up to the server's flush position BEFORE the backup starts (as backup-push does, while the
segments are still in pg_wal), a backup's start, the rest read, and a second byte copy. Every
8 kB page that differs between the copies must be among the blocks reported for its file (or
the file left uncovered). On 18 with ``summarize_wal = on`` the answer must EQUAL the server's
own WAL summaries for the same range (both ends are checkpoint redo pointers, where the
summarizer cuts its summaries): every rule of walsummarizer.c kept, not one block more."""

from __future__ import annotations

import pytest

from tests.backup.test_walsummary_e2e import (
    assert_never_misses,
    make_changes,
    prepare_changes,
    redo_lsn,
    relation_files,
    source_for,
)
from walship.backup import walscan
from walship.backup.walsummary import (
    BlockChanges,
)
from walship.backup.walsummary import (
    changed_blocks as summary_changes,
)

pytestmark = pytest.mark.e2e
SEGMENT = 1 << 20


@pytest.mark.pg_versions
@pytest.mark.timeout(600)
def test_the_wal_never_misses_a_changed_block_and_equals_the_summaries(pg, pg_install):
    primary = pg.initdb("primary", archive=False, wal_segsize=1)  # --data-checksums
    # CREATE/DROP DATABASE checkpoint, recycling the segments since the first copy; without a
    # repository to fetch them from here, pg_wal keeps them
    primary.configure(wal_keep_size="1GB")
    if pg_install.major >= 17:
        primary.configure(summarize_wal=True)
    primary.start()
    prepare_changes(pg, primary,
                    "CREATE TABLE dropped AS SELECT g AS id FROM generate_series(1, 1000) g",
                    "CREATE DATABASE old_db")
    since = redo_lsn(primary)
    before = relation_files(primary.data)
    make_changes(primary)
    primary.psql("DROP TABLE dropped")  # a commit record listing its files
    primary.psql("BEGIN; CREATE TABLE never AS SELECT 1 AS id; ROLLBACK")  # an abort record
    primary.psql("CREATE DATABASE copied STRATEGY FILE_COPY")
    primary.psql("CREATE DATABASE logged STRATEGY WAL_LOG")
    primary.psql("DROP DATABASE old_db")
    primary.pgbench(transactions=100, clients=2)

    source = source_for(primary)
    lines: list[str] = []
    try:
        info = source.describe()
        scanner = walscan.WalScanner(
            source._conn, pg_wal=str(primary.data / "pg_wal"), fetch=None, timeline=1,
            since_lsn=since, wal_segment_size=info.wal_segment_size,
            parent_timeline=1, system_identifier=info.system_identifier)
        scanner.read(source.flush_lsn(), complete_only=True)  # before the checkpoint
        assert scanner.failed is None, scanner.failed
        read_before = scanner.stats.local
        until = source.start("walscan e2e", fast=True)
        after = relation_files(primary.data)
        found = walscan.changed_blocks(source._conn, until_lsn=until, scanner=scanner,
                                       log=lines.append)
        summaries = (summary_changes(source._conn, timeline=1, since_lsn=since,
                                     until_lsn=until, system_identifier=info.system_identifier)
                     if pg_install.major >= 17 else None)
        source.stop(wait_for_archive=False)
    finally:
        source.close()
    assert info.wal_segment_size == SEGMENT
    assert isinstance(found, BlockChanges), lines
    assert len(lines) == 1 and "WAL read for changes" in lines[0], lines
    assert read_before >= 3, read_before  # the pgbench WAL spans several 1 MB segments
    assert scanner.stats.fetched == 0

    assert_never_misses(found, before, after)

    def main_file(table: str) -> str:
        return primary.psql(f"SELECT pg_relation_filepath('{table}')")

    cut = main_file("cut")
    assert found.file_changes(cut, len(after[cut])).limit is not None  # VACUUM's truncation
    elsewhere = main_file("elsewhere")
    assert elsewhere.startswith("pg_tblspc/") and found.file_changes(
        elsewhere, len(after[elsewhere])).blocks
    gone = main_file("gone")
    assert found.file_changes(gone, len(after[gone])) is None  # created in the range
    copied = primary.psql("SELECT oid FROM pg_database WHERE datname = 'copied'")
    logged = primary.psql("SELECT oid FROM pg_database WHERE datname = 'logged'")
    assert found.limit_block(f"base/{copied}/1259") == 0  # every file of a new database
    assert found.limit_block(f"base/{logged}/1259") == 0

    if summaries is None:
        return
    assert isinstance(summaries, BlockChanges)
    assert dict(found._forks) == dict(summaries._forks)  # the same forks, limits and blocks
    assert found._new_databases == summaries._new_databases


@pytest.mark.pg_versions
@pytest.mark.timeout(300)
def test_why_the_wal_is_not_read(pg, pg_install):
    """One reason each, from a real server: more WAL than the budget, a segment recycled
    before it was read and no repository to fetch it from, another system's parent."""
    primary = pg.initdb("primary", archive=False, wal_segsize=1)
    primary.start()
    primary.pgbench_init(scale=2)
    since = redo_lsn(primary)
    primary.pgbench(transactions=200, clients=2)
    recent = redo_lsn(primary)  # the segments before it are recycled
    primary.pgbench(transactions=50, clients=2)
    source = source_for(primary)
    reasons = []
    try:
        info = source.describe()
        common = {"pg_wal": str(primary.data / "pg_wal"), "timeline": 1, "since_lsn": since,
                  "wal_segment_size": info.wal_segment_size}
        lines: list[str] = []  # (before the backup's checkpoint recycles recent's segment)
        assert walscan.changed_blocks(source._conn, until_lsn=source.flush_lsn(),
                                      log=lines.append, **{**common, "fetch": None,
                                                          "budget": 1000,
                                                          "since_lsn": recent}) is None
        reasons.append(lines[0])
        until = source.start("walscan reasons", fast=True)
        for extra in ({"fetch": None},
                      {"fetch": None, "system_identifier": "123"},
                      {"fetch": None, "parent_timeline": 2}):
            lines: list[str] = []
            assert walscan.changed_blocks(source._conn, until_lsn=until, log=lines.append,
                                          **{**common, **extra}) is None
            assert len(lines) == 1 and "reading and comparing every file" in lines[0], lines
            reasons.append(lines[0])
        source.stop(wait_for_archive=False)
    finally:
        source.close()
    assert "costs less" in reasons[0]
    assert "is not in" in reasons[1] or "says it is page" in reasons[1], reasons[1]
    assert "another system" in reasons[2]
    assert "timeline changed" in reasons[3]
