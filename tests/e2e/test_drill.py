"""``walship drill`` end to end: a cluster under pgbench archives through walship into a
``file://`` repository (and Azurite, for the main test) and takes a backup; the drill restores it into a scratch directory,
starts a scratch server, validates, measures and reports; nothing is left behind.

Every drill runs as a subprocess as the server's OS user (``postgres`` when the tests run as
root), like a drill from cron would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.fixtures.postgres import PgCluster, PgWorkspace, chown_to
from tests.test_drill_html import assert_self_contained, html_figures, json_figures

pytestmark = pytest.mark.e2e


def env_for(cluster: PgCluster) -> dict[str, str]:
    return {**cluster.env, "PGHOST": str(cluster.sockdir), "PGUSER": "postgres",
            "PGDATABASE": "postgres"}


def walship(pg: PgWorkspace, env: dict[str, str], *args: str,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return pg.run_pg([pg.walship, *args], env=env, check=False, timeout=timeout)


@pytest.fixture(params=["file", "azure"])
def repo(request):
    if request.param == "file":
        return request.getfixturevalue("file_repository")
    return request.getfixturevalue("azure_repository")


def repository_keys(repo) -> dict[str, int]:
    """Every object of the repository and its size, through walship's storage API."""
    storage = repo.open()
    try:
        return {info.key: info.size for info in storage.list("")}
    finally:
        storage.close()


def processes_in(path: Path) -> list[str]:
    """Processes whose command line or working directory is inside ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(path) in cmdline or cwd.startswith(str(path)):
            found.append(f"{entry.name}: {cmdline}")
    return found


def primary_with_backup(pg: PgWorkspace, repo) -> tuple[PgCluster, dict[str, str]]:
    """A primary archiving through walship, a backup taken under pgbench, then more pgbench,
    everything archived and the primary stopped (the "disaster")."""
    primary = pg.initdb("primary", env=repo.env)
    primary.start()
    primary.pgbench_init(scale=1)
    env = env_for(primary)
    load = primary.pgbench(seconds=30, clients=2, background=True)
    try:
        time.sleep(1)
        push = pg.run_pg([pg.walship, "backup-push"], env=env, describe="backup-push")
        assert "backup-push" in push.stderr
    finally:
        load.send_signal(signal.SIGTERM)
        load.wait(timeout=60)
    primary.pgbench(transactions=200, clients=2)
    primary.wait_archived(primary.switch_wal())
    return primary, env


def test_drill_restores_validates_measures_and_leaves_nothing(pg, repo):
    primary, env = primary_with_backup(pg, repo)
    last_commit = datetime.fromisoformat(primary.psql(
        "SELECT to_char(max(mtime) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US+00:00') "
        "FROM pgbench_history"))
    accounts = primary.psql("SELECT count(*) FROM pgbench_accounts")
    # The human summary, with the primary reachable: the newest archived WAL's age is
    # compared with its archive_timeout.
    primary.psql("ALTER SYSTEM SET archive_timeout = '60s'")
    primary.psql("SELECT pg_reload_conf()")
    proc = walship(pg, env, "drill", "--rto", "1h", "--rpo", "15min", "--amcheck", "postgres")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    for text in ("backup fetch", "WAL replay until consistent", "until recovery ended",
                 "first query answered", "RTO ", "(target 1 h: met)", "RPO ",
                 "(target 15 min: met)", "pg_last_xact_replay_timestamp()",
                 "archive_timeout is 60 s", "pg_amcheck postgres", "PASSED"):
        assert text in proc.stdout, proc.stdout
    primary.stop()
    primary.wait_stopped()
    before = repository_keys(repo)
    config = pg.path / "walship.toml"
    config.write_text(f'''
[drill]
rto = "1h"
rpo = "1d"
amcheck = ["postgres"]

[[drill.check]]
name = "accounts"
sql = "SELECT count(*) FROM pgbench_accounts"
value = "{accounts}"

[[drill.check]]
name = "no negative branch ids"
sql = "SELECT 1 FROM pgbench_branches WHERE bid < 0"
no_rows = true
''')
    chown_to(config, pg.user)
    scratch = pg.path / "scratch"
    prom = pg.make_dir(pg.path / "metrics") / "drill.prom"
    env = {**primary.env, "WALSHIP_CONFIG": str(config)}
    proc = walship(pg, env, "drill", "--json", "--scratch", str(scratch),
                   "--expect-rows", "postgres:SELECT 1 FROM pgbench_tellers",
                   "--prometheus", str(prom), "--html", str(prom.with_name("drill.html")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["result"] == "passed"
    assert report["target"] == "latest" and report["backup"]
    phases = report["phases"]
    assert list(phases) == ["backup_fetch", "wal_replay_until_consistent",
                            "until_recovery_end", "first_query"]
    assert abs(sum(phases.values()) - report["rto_seconds"]) < 0.01
    assert 0 < report["rto_seconds"] < 120
    # RPO: the last transaction recovered is the workload's last commit.
    recovered = datetime.fromisoformat(report["last_replayed_transaction"])
    assert 0 <= (recovered - last_commit).total_seconds() < 2
    started = datetime.fromisoformat(report["started"])
    assert abs((started - recovered).total_seconds() - report["rpo_seconds"]) < 0.01
    assert "pg_last_xact_replay_timestamp()" in report["rpo_derivation"]
    assert report["targets"] == {"rto_seconds": 3600.0, "rpo_seconds": 86400.0,
                                 "rto_met": True, "rpo_met": True}
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"accounts", "no negative branch ids", "--expect-rows 1",
                           "pg_amcheck postgres", "data checksums"}
    assert all(c["passed"] and c["seconds"] >= 0 for c in checks.values()), checks
    assert report["stored_as"].startswith("drills/") and report["stored_as"].endswith(
        ".passed.json")
    # Nothing left running nor on disk; the repository gained only the drill's result.
    assert not scratch.exists()
    assert processes_in(scratch) == []
    after = repository_keys(repo)
    assert {k: v for k, v in after.items() if k not in before} == {
        report["stored_as"]: after[report["stored_as"]]}
    assert {k: v for k, v in after.items() if k in before} == before
    # The HTML page shows the JSON's figures, and the repository's window: the backup and
    # the WAL of timeline 1, without a gap.
    page = prom.with_name("drill.html").read_text()
    assert "walship drill: PASSED" in page
    figures = html_figures(page)
    assert figures.pop("charts") == ["objectives-chart", "phases-chart", "window-chart"]
    assert figures == json_figures(report)
    window = report["recoverable_window"]
    assert [b["name"] for b in window["backups"]] == [report["backup"]]
    assert [r["timeline"] for r in window["wal"]] == [1], window["wal"]
    assert window["wal"][0]["first"] <= window["backups"][0]["start_wal"]
    assert_self_contained(page)
    text = prom.read_text()
    assert "walship_drill_passed 1\n" in text
    # (the exporter writes 3.000 as "3", 2.500 as "2.5": the whole line must match)
    rto = f"{report['rto_seconds']:.3f}".rstrip("0").rstrip(".")
    assert f"\nwalship_drill_rto_seconds {rto}\n" in text
    assert "walship_drill_rpo_seconds" in text
    assert "walship_drill_last_run_timestamp_seconds" in text
    # walship status shows the last drill.
    status = walship(pg, env, "status")
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith("last drill"))
    assert ": passed, RTO" in line and "OVERDUE" not in line
    status = walship(pg, env, "status", "--json")
    assert json.loads(status.stdout)["last_drill"]["overdue"] is False


def test_drill_missed_failed_and_refused(pg, file_repository):
    primary, env = primary_with_backup(pg, file_repository)
    config = pg.path / "walship.toml"
    # An impossible RTO (a tiny cluster restores in well under 1 s on a fast machine).
    config.write_text('[drill]\nrto = "0.01s"\nrpo = "1d"\n')
    chown_to(config, pg.user)
    env = {**env, "WALSHIP_CONFIG": str(config)}
    scratch = pg.path / "scratch"

    # A drill to a point in time, with restore's target options.
    point = primary.psql("SELECT clock_timestamp()")
    time.sleep(0.2)
    primary.pgbench(transactions=50, clients=1)
    primary.wait_archived(primary.switch_wal())
    proc = walship(pg, env, "drill", "--json", "--rto", "1h", "--target-time", point,
                   "--scratch", str(scratch))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["target"].startswith("time:") and report["passed"]
    recovered = datetime.fromisoformat(report["last_replayed_transaction"])
    assert recovered <= datetime.fromisoformat(point.replace(" ", "T"))
    assert not scratch.exists() and processes_in(scratch) == []

    # An impossible target: the 'missed' status, naming the target. Run by root: the scratch
    # server runs as postgres (PostgreSQL refuses root), its directory given to that user.
    proc = subprocess.run([pg.walship, "drill", "--scratch", str(scratch)], env=env,
                          capture_output=True, text=True, cwd=pg.path, timeout=180,
                          check=False)
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert "RTO" in proc.stderr and "target" in proc.stderr and "TARGET MISSED" in proc.stdout
    assert not scratch.exists() and processes_in(scratch) == []

    # A failing validation query: the 'failed' status, naming the check.
    proc = walship(pg, env, "drill", "--rto", "1h", "--scratch", str(scratch),
                   "--expect-no-rows", "postgres:SELECT 1 FROM pgbench_branches")
    assert proc.returncode == 8, proc.stdout + proc.stderr
    assert "--expect-no-rows 1" in proc.stderr and "1 rows (expected none)" in proc.stderr
    assert "not stored" not in proc.stderr  # root's drill left drills/ to the repo's owner
    assert not scratch.exists() and processes_in(scratch) == []

    # A port in use, a scratch directory in use: refused before anything is done.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = walship(pg, env, "drill", "--port", str(port), "--scratch", str(scratch))
    assert proc.returncode == 2 and "in use" in proc.stderr, proc.stderr
    assert not scratch.exists()
    primary_port = primary.sockdir / ".s.PGSQL.5432"
    assert primary_port.exists()
    proc = walship(pg, env, "drill", "--scratch", str(primary.data))
    assert proc.returncode == 2 and "not empty" in proc.stderr, proc.stderr
    assert primary.is_running()

    # SIGTERM during the drill: the server is stopped and the scratch directory removed.
    drill = subprocess.Popen([pg.walship, "drill", "--rto", "1h", "--scratch", str(scratch)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=pg.path, user=pg.user.pw_uid if pg.user else None,
                             group=pg.user.pw_gid if pg.user else None,
                             extra_groups=[] if pg.user else None)
    deadline = time.monotonic() + 60
    while not (scratch / "data" / "postmaster.pid").exists():
        assert drill.poll() is None, drill.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    drill.send_signal(signal.SIGTERM)
    out, err = drill.communicate(timeout=90)
    assert drill.returncode == 8, out + err
    assert "interrupted by SIGTERM" in err
    assert not scratch.exists()
    assert processes_in(scratch) == []


def test_drill_fails_on_a_wal_gap(pg, file_repository):
    primary, env = primary_with_backup(pg, file_repository)
    primary.pgbench(transactions=100, clients=1)
    primary.wait_archived(primary.switch_wal())
    primary.pgbench(transactions=100, clients=1)
    primary.wait_archived(primary.switch_wal())
    [backup] = json.loads(walship(pg, env, "backup-list", "--json").stdout)
    segments = sorted(p.name for p in (file_repository.path / "wal").iterdir()
                      if len(p.name) == 24 and p.name > backup["stop_wal"])
    assert len(segments) >= 3, segments
    gap = segments[len(segments) // 2]
    (file_repository.path / "wal" / gap).unlink()
    scratch = pg.path / "scratch"
    proc = walship(pg, env, "drill", "--json", "--scratch", str(scratch))
    assert proc.returncode == 8, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["result"] == "failed" and f"segment {gap} is missing" in report["error"]
    assert gap in proc.stderr
    assert not scratch.exists() and processes_in(scratch) == []
