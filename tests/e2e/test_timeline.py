"""End to end: timelines through walship.

A standby restored from the base backup catches up from the archive (``walship wal-fetch``),
then streams from the primary; it stops at a restore point and promotes onto timeline 2, while
the primary goes on writing on timeline 1 (a branch that is abandoned). The promoted server
archives ``00000002.history``, the old timeline's last, streamed segment as ``.partial`` (what
PostgreSQL does on promotion) and its timeline 2 segments. The archive then holds both
branches: restoring the original base backup with recovery_target_timeline = 'latest' must
follow the history file onto timeline 2 and end with the data written there, and with 'current'
it must stay on timeline 1 and end with that branch's data. On a ``file://`` repository and on
Azurite.
"""

from __future__ import annotations

import pytest

from tests.fixtures.postgres import repository_names

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(240)
@pytest.mark.pg_versions(pg18_with={"repository": "file"})
def test_promotion_and_restore_follow_the_latest_timeline(pg, repository):
    env = repository.env
    primary = pg.initdb("primary", env=env)
    primary.start()
    primary.pgbench_init(2)
    backup = pg.basebackup(primary)
    primary.pgbench(seconds=2)
    primary.wait_archived(primary.switch_wal())  # the standby's first WAL is in the archive

    standby = pg.restore(backup, "standby", env=env, archive=True, standby=True,
                         target_name="fork",
                         primary_conninfo=f"host={primary.sockdir} user=postgres")
    standby.start()
    pg.wait_for(lambda: standby.try_psql("SELECT status FROM pg_stat_wal_receiver")
                == "streaming", 90, "the standby to stream from the primary", standby)
    assert "restored log file" in standby.log_text(), standby.log_tail()

    primary.pgbench(transactions=200)
    state_fork = primary.table_checksums()
    primary.create_restore_point("fork")
    # Timeline 1 goes on: a branch the standby leaves. Little WAL, so that the segment with the
    # fork stays incomplete: the standby then has it streamed, not archived, and promotion
    # archives it as .partial.
    primary.pgbench(transactions=100)
    state_tl1 = primary.table_checksums()

    standby.wait_promoted()  # it stops at "fork" and promotes
    assert standby.timeline() == 2
    assert standby.table_checksums() == state_fork
    standby.pgbench(seconds=2)
    state_tl2 = standby.table_checksums()
    assert len({str(s) for s in (state_fork, state_tl1, state_tl2)}) == 3
    last_tl2 = standby.switch_wal()
    assert last_tl2.startswith("00000002"), last_tl2
    standby.wait_archived(last_tl2)
    standby.stop()
    primary.wait_archived(primary.switch_wal())  # timeline 1's branch, complete, archived too
    primary.stop()

    archived = repository_names(repository)
    assert "00000002.history" in archived, archived
    assert last_tl2 in archived, archived
    partial = [n for n in archived if n.endswith(".partial")]
    assert len(partial) == 1 and partial[0].startswith("00000001"), archived
    # The old timeline's segment that holds the fork exists as a complete segment as well
    # (archived by the primary), and the new timeline starts in that same segment.
    forked = partial[0][:24]
    assert forked in archived and "00000002" + forked[8:] in archived, archived

    # The original backup again, no target: it must follow the archive onto timeline 2.
    latest = pg.restore(backup, "latest", env=env, target_timeline="latest")
    latest.start()
    latest.wait_promoted()
    assert latest.table_checksums() == state_tl2, latest.log_tail()
    assert latest.timeline() == 3
    log = latest.log_text()
    assert 'restored log file "00000002.history" from archive' in log, latest.log_tail()
    assert f'restored log file "{last_tl2}" from archive' in log, latest.log_tail()
    latest.stop()

    # And with 'current' it stays on timeline 1, to the end of the abandoned branch.
    current = pg.restore(backup, "current", env=env, target_timeline="current")
    current.start()
    current.wait_promoted()
    assert current.table_checksums() == state_tl1, current.log_tail()
    assert current.timeline() == 3  # 00000002.history is taken: the next free one
