"""The prefetch cache never takes the space PostgreSQL needs in pg_wal.

A recovery of 36 segments of 16 MiB into a cluster whose pg_wal is a 100 MiB filesystem (a
tmpfs mounted by the test), with prefetch on: it completes with identical data, and the cache
never pushes the filesystem's free space under its floor (only PostgreSQL's own segments and
the one file a call is restoring may go below it).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.fixtures.postgres import _stop_prefetch_worker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MIB = 1 << 20
SEGMENT = 16 * MIB


def _mount_small_pg_wal(cluster, user, size_mb: int = 100) -> Path:
    """Mount a tmpfs of ``size_mb`` on the cluster's (empty but for archive_status) pg_wal."""
    pg_wal = cluster.data / "pg_wal"
    assert not [p for p in pg_wal.iterdir() if p.name != "archive_status"], list(pg_wal.iterdir())
    owner = f",uid={user.pw_uid},gid={user.pw_gid}" if user else ""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700{owner}", "tmpfs",
                    str(pg_wal)], check=True)
    (pg_wal / "archive_status").mkdir(mode=0o700)
    if user:
        os.chown(pg_wal / "archive_status", user.pw_uid, user.pw_gid)
    return pg_wal


class _Sampler(threading.Thread):
    """Samples the free space of pg_wal's filesystem and the bytes in the cache."""

    def __init__(self, pg_wal: Path) -> None:
        super().__init__(daemon=True)
        self.pg_wal = pg_wal
        self.cache = pg_wal / "walship" / "prefetch"
        self.samples: list[tuple[int, int]] = []  # (free bytes, segment bytes in the cache)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            try:
                st = os.statvfs(self.pg_wal)
                cached = 0
                for entry in os.scandir(self.cache) if self.cache.exists() else ():
                    if len(entry.name) == 24 or ".walship-" in entry.name:  # (not seals)
                        try:
                            cached += entry.stat().st_blocks * 512
                        except OSError:
                            pass
            except OSError:
                continue
            self.samples.append((st.f_bavail * st.f_frsize, cached))


SETTINGS = {"max_wal_size": "32MB", "min_wal_size": "32MB", "checkpoint_timeout": "1h"}


def _archive_segments(pg, repository, count: int):
    """A base backup, then ``count`` segments archived; (backup, md5 of the table's rows)."""
    primary = pg.initdb(env=repository.env, **SETTINGS)
    primary.start()
    primary.psql("CREATE TABLE t (id int, v text)")
    backup = pg.basebackup(primary)
    for i in range(count):  # a checkpoint every second segment: restartpoints in recovery
        primary.psql(f"INSERT INTO t SELECT g, md5(g::text) FROM generate_series({i * 500}, "
                     f"{i * 500 + 499}) g")
        if i % 2 == 1:
            primary.psql("CHECKPOINT")
        last = primary.switch_wal()
    expected = primary.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id, v)) FROM t")
    primary.wait_archived(last)
    primary.stop()
    return backup, expected


def test_recovery_into_a_100_mib_pg_wal_with_prefetch_on(pg, file_repository):
    backup, expected = _archive_segments(pg, file_repository, 36)
    restored = pg.restore(backup, "restored", env=file_repository.env, **SETTINGS)
    pg_wal = _mount_small_pg_wal(restored, pg.user)
    sampler = _Sampler(pg_wal)
    try:
        sampler.start()
        restored.start()
        restored.wait_promoted(timeout=300)
        sampler.done.set()
        sampler.join()
        assert restored.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id, v)) FROM t") \
            == expected
        log = restored.log_text()
        assert "No space left on device" not in log, restored.log_tail()
        lines = [line for line in log.splitlines() if "walship: wal-fetch " in line]
        assert len(lines) >= 36 and not [line for line in lines if "ERROR" in line], lines
        # The floor: max_wal_size (32 MiB, read from postgresql.auto.conf) and two segments.
        floor = 32 * MIB + 2 * SEGMENT
        # The cache adds a segment only while free space stays above the floor; below it
        # only PostgreSQL's own files and the one file a call restores (a segment) may take
        # space, so wherever the cache holds more than that one file, free space is at least
        # the floor less the segment being restored.
        bad = [(free // MIB, cached // MIB) for free, cached in sampler.samples
               if cached > SEGMENT and free < floor - SEGMENT]
        assert not bad, bad[:20]
        assert sampler.samples and min(free for free, _ in sampler.samples) > 0
        worker_log = (pg_wal / "walship" / "prefetch" / "worker.log").read_text()
        assert "under the floor of 64 MiB and a segment: not caching ahead" in worker_log
        print(f"min free {min(f for f, _ in sampler.samples) // MIB} MiB, most cached "
              f"{max(c for _, c in sampler.samples) // MIB} MiB, {len(sampler.samples)} samples")
    finally:
        sampler.done.set()
        restored.stop("immediate")
        _stop_prefetch_worker(pg_wal / "walship" / "prefetch")
        subprocess.run(["umount", "-l", str(pg_wal)], check=False)


def test_recovery_with_the_cache_on_another_filesystem(pg, file_repository):
    """cache_dir on a filesystem of its own (a tmpfs here): nothing of the cache under pg_wal
    (out of pg_rewind's way), segments delivered from it by a copy, identical data."""
    backup, expected = _archive_segments(pg, file_repository, 20)
    home = pg.make_dir(pg.path / "cachehome", 0o700)
    owner = f",uid={pg.user.pw_uid},gid={pg.user.pw_gid}" if pg.user else ""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=512m,mode=0700{owner}", "tmpfs",
                    str(home)], check=True)
    env = {**file_repository.env, "WALSHIP_CACHE_DIR": str(home)}
    restored = pg.restore(backup, "restored", env=env, **SETTINGS)
    try:
        restored.start()
        restored.wait_promoted(timeout=300)
        assert restored.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id, v)) FROM t") \
            == expected
        lines = [line for line in restored.log_text().splitlines()
                 if "walship: wal-fetch " in line]
        assert len(lines) >= 20 and not [line for line in lines if "ERROR" in line], lines
        assert len([line for line in lines if "prefetch cache" in line]) >= 15, lines
        pg_wal = restored.data / "pg_wal"
        assert not (pg_wal / "walship").exists()
        assert not [p for p in pg_wal.iterdir() if ".walship-" in p.name]
        st = pg_wal.stat()
        assert [p.name for p in home.iterdir()] == [f"pg_wal-{st.st_dev:x}-{st.st_ino:x}"]
    finally:
        restored.stop("immediate")
        for cache in home.iterdir():
            _stop_prefetch_worker(cache)
        subprocess.run(["umount", "-l", str(home)], check=False)
