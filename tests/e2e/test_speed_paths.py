"""Push-ahead and the prefetch cache with PostgreSQL itself calling walship.

* A backlog of ``.ready`` files is archived completely, each file uploaded once, while another
  process pushes some of the same files concurrently and wal-push is killed with SIGKILL (a
  walship process, proven alive when signalled and dead after; nothing else is signalled), on
  a ``file://`` repository and on Azurite.
* A recovery of 30+ segments is fed from the prefetch cache and ends with identical data.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.postgres import repository_names

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def make_segments(cluster, count: int) -> list[str]:
    """Write a little and switch WAL ``count`` times; return the files that were closed."""
    closed = []
    for i in range(count):
        cluster.psql(f"INSERT INTO t SELECT g, md5(g::text) FROM generate_series({i * 500}, "
                     f"{i * 500 + 499}) g")
        closed.append(cluster.current_walfile())
        cluster.switch_wal()
    return closed


def walship_lines(cluster, action: str) -> list[str]:
    return [line for line in cluster.log_text().splitlines() if f"walship: {action} " in line]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") \
            .split("\0")[:-1]
    except OSError:
        return []


def _is_wal_push(argv: list[str], walship: str) -> bool:
    """``walship wal-push pg_wal/0...``: the native launcher, or ``walship-py`` (which the
    launcher execs, same pid) under its interpreter; never a shell running such a command."""
    programs = {walship, str(Path(walship).with_name("walship-py"))}
    for i in (0, 1):
        if len(argv) >= i + 3 and argv[i] in programs and argv[i + 1] == "wal-push" \
                and argv[i + 2].startswith("pg_wal/0"):
            return i == 0 or os.path.basename(argv[0]).startswith("python")
    return False


def _alive(pid: int) -> bool:
    """Running (not a zombie: one waiting for its parent to read its exit status is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_one_wal_push(walship: str, data: Path) -> list[str] | None:
    """SIGKILL one running ``walship wal-push`` of the cluster in ``data`` (its working
    directory: the machine may run other clusters, other tests, other walships), checked to be
    that through a pidfd (so that a reused pid cannot be hit) and to be alive when signalled,
    then waited for until it is dead; its command line, or None if none was running."""
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            argv = _cmdline(pid)  # read after pidfd_open: the pidfd names this very process
            if not _is_wal_push(argv, walship) or not _alive(pid):
                continue
            try:
                if os.readlink(f"/proc/{pid}/cwd") != str(data):
                    continue
            except OSError:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:  # ended (and reaped) meanwhile
                continue
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)  # readable once the process has ended
            assert poller.poll(10_000), f"pid {pid} {argv} survived SIGKILL for 10 s"
            assert not _alive(pid), (pid, argv)
            return argv
        finally:
            os.close(pidfd)
    return None


def test_backlog_is_archived_once_each_despite_concurrency_and_kill_9(pg, repository):
    primary = pg.initdb(env=repository.env, wal_keep_size="2GB", max_wal_size="2GB")
    primary.configure(archive_mode=True, archive_command="false")  # let .ready files pile up
    primary.start()
    primary.psql("CREATE TABLE t (id int, v text)")
    backlog = make_segments(primary, 40)
    status = primary.data / "pg_wal" / "archive_status"
    pg.wait_for(lambda: len(list(status.glob("*.ready"))) >= 40, 60, "40 .ready files")

    primary.archive_to_walship()  # now archive with walship: the backlog drains
    primary.psql("SELECT pg_reload_conf()")
    # Meanwhile another process pushes some of the same files, and wal-push gets killed.
    rival_log = open(pg.path / "rival.log", "w")
    rival_names = backlog[5:40:3]
    rival = subprocess.Popen(
        ["sh", "-c", " ".join(f"{pg.walship} wal-push pg_wal/{name};" for name in rival_names)],
        cwd=primary.data, env=primary.env, stdout=subprocess.DEVNULL, stderr=rival_log,
        **({"user": pg.user.pw_uid, "group": pg.user.pw_gid} if pg.user else {}))
    pg.processes.append(rival)
    killed: list[list[str]] = []
    deadline = time.monotonic() + 30
    while len(killed) < 2 and time.monotonic() < deadline:
        argv = kill_one_wal_push(pg.walship, primary.data)
        if argv is not None:
            killed.append(argv)
        time.sleep(0.02)
    kills = len(killed)
    print("killed:", killed)
    assert kills >= 1, "no walship wal-push was caught running to be killed"
    # Only walship was signalled: never the shell PostgreSQL runs archive_command in, nor the
    # rival's shell (both have "wal-push pg_wal/0..." in their command lines).
    assert all(_is_wal_push(argv, pg.walship) for argv in killed), killed
    assert rival.poll() is None or rival.returncode == 0, "the rival's shell was hit"
    pg.wait_for(lambda: primary.is_archived(backlog[-1]), 180, "the backlog to be archived",
                cluster=primary)
    rival.wait(timeout=120)

    stored = set(repository_names(repository))
    assert set(backlog) <= stored, sorted(set(backlog) - stored)
    # Every archived file holds exactly what PostgreSQL wrote.
    out = pg.path / "fetched"
    for name in backlog:
        pg.run_pg([pg.walship, "wal-fetch", name, str(out)], env=primary.env)
        assert out.read_bytes() == (primary.data / "pg_wal" / name).read_bytes(), name
        out.unlink()
    rival_log.close()
    ours = walship_lines(primary, "wal-push")
    lines = ours + [line for line in (pg.path / "rival.log").read_text().splitlines()
                    if "walship: wal-push " in line]
    ahead = sum(int(m[1]) for line in lines if (m := re.search(r"\(\+(\d+) ahead\)", line)))
    handed = sum("pushed by the background pusher" in line for line in lines)
    assert ahead + handed > 0, lines[:10]
    assert sum("already pushed ahead" in line for line in ours) > 0, ours[:10]
    # Storage is create-only, so every object was written once; an upload that found its
    # object already stored (a rival's or a killed call's) says "already stored, identical".
    # Those redundant uploads only come from the concurrency this test creates.
    redundant = sum("already stored, identical" in line for line in lines)
    assert redundant <= len(rival_names) + kills, (redundant, kills, lines)


def test_recovery_of_30_segments_is_fed_from_the_prefetch_cache(pg, file_repository):
    primary = pg.initdb(env=file_repository.env)
    primary.start()
    primary.psql("CREATE TABLE t (id int, v text)")
    backup = pg.basebackup(primary)
    segments = make_segments(primary, 34)
    primary.pgbench_init(scale=2)
    expected = primary.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id, v)) FROM t")
    accounts = primary.psql("SELECT sum(abalance) || ':' || count(*) FROM pgbench_accounts")
    last = primary.switch_wal()
    primary.wait_archived(primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())"))
    primary.stop()

    restored = pg.restore(backup, "restored", env=file_repository.env)
    restored.start()
    restored.wait_promoted(timeout=300)
    assert restored.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id, v)) FROM t") == expected
    assert restored.psql("SELECT sum(abalance) || ':' || count(*) FROM pgbench_accounts") == \
        accounts
    lines = walship_lines(restored, "wal-fetch")
    cached = [line for line in lines if "prefetch cache" in line]
    assert len(segments) >= 30 and len(cached) >= 25, lines
    cache = restored.data / "pg_wal" / "walship" / "prefetch"
    assert sum(p.stat().st_size for p in cache.glob("0*")) <= 1024 << 20
    del last
