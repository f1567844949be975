"""``walship drill`` without a server: durations, the ``[drill]`` table, results and exit
statuses, the stored history that ``walship status`` reads, port and scratch refusals.
(End to end with PostgreSQL: tests/e2e/test_drill.py.)"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone

import pytest

from walship import drill
from walship.archive import Archive
from walship.codec import Codec
from walship.config import load_settings
from walship.entry import main
from walship.errors import ExitStatus, UsageError
from walship.storage import open_storage

NOW = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15min", 900), ("2h", 7200),
                                               ("1d", 86400), ("1.5 h", 5400), ("5m", 300),
                                               ("1w", 604800)])
def test_durations(text, seconds):
    assert drill.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "h", "2 fortnights", "-1h", "nan s", "1e3s"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="invalid"):
        drill.parse_duration(text)


def test_plan_from_the_config_file(tmp_path):
    config = tmp_path / "walship.toml"
    config.write_text('''repo = "file:///nowhere"
[drill]
rto = "1h"
rpo = "5min"
amcheck = ["postgres", "app"]
interval = "8d"

[[drill.check]]
name = "orders"
database = "app"
sql = "SELECT count(*) FROM orders"
value = "42"

[[drill.check]]
sql = "SELECT 1 FROM orders WHERE total < 0"
no_rows = true
''')
    settings = load_settings(environ={}, config_file=str(config))
    plan = drill.parse_plan(settings.drill)
    assert (plan.rto, plan.rpo, plan.interval) == (3600, 300, 8 * 86400)
    assert plan.amcheck == ("postgres", "app")
    assert plan.checks == (
        drill.SqlCheck("orders", "SELECT count(*) FROM orders", "app", None, "42", False),
        drill.SqlCheck("check 2", "SELECT 1 FROM orders WHERE total < 0", "postgres", None,
                       None, True))


def test_a_bad_drill_table_never_stops_archiving(tmp_path):
    """Only the drill (and check, status) read the table: wal-push and wal-fetch load it."""
    config = tmp_path / "walship.toml"
    config.write_text('repo = "file:///nowhere"\n')
    assert load_settings(environ={}, config_file=str(config)).drill == {}
    config.write_text('repo = "file:///nowhere"\ndrill = 3\n')
    settings = load_settings(environ={}, config_file=str(config))
    with pytest.raises(UsageError, match=r"\[drill\] in the config file must be a table"):
        drill.parse_plan(settings.drill)
    config.write_text('repo = "file:///nowhere"\n[drill]\nrto = 5\n')
    assert load_settings(environ={}, config_file=str(config)).drill == {"rto": 5}


@pytest.mark.parametrize(("table", "message"), [
    ({"rto": 3600}, "invalid drill.rto"),
    ({"rto": "soon"}, "invalid drill.rto"),
    ({"colour": "red"}, "unknown settings: colour"),
    ({"amcheck": "postgres"}, "invalid drill.amcheck"),
    ({"checksums": "yes"}, "invalid drill.checksums"),
    ({"check": [{"sql": "SELECT 1", "min_rows": 1, "no_rows": True}]}, "give one"),
    ({"check": [{"sql": "SELECT 1", "min_rows": 1.5}]}, "invalid min_rows"),
    ({"check": [{"sql": "SELECT 1", "value": 42}]}, "invalid value"),
    ({"check": [{"name": "x"}]}, "invalid drill.check.sql"),
    ({"check": [{"sql": "SELECT 1", "dbname": "x"}]}, "unknown settings: dbname"),
])
def test_bad_plans_are_refused(table, message):
    with pytest.raises(UsageError, match=message):
        drill.parse_plan(table)


def test_flag_checks():
    check = drill.flag_check("app:SELECT 1 FROM t", no_rows=False, number=1)
    assert (check.database, check.sql, check.min_rows) == ("app", "SELECT 1 FROM t", 1)
    with pytest.raises(UsageError, match="DATABASE:SQL"):
        drill.flag_check("SELECT 1", no_rows=True, number=1)


def _report(**changes) -> drill.DrillReport:
    report = drill.DrillReport(NOW, drill.DrillPlan(rto=60, rpo=300), "latest", "B")
    report.phases = {"backup_fetch": 10.0, "wal_replay_until_consistent": 5.0,
                     "until_recovery_end": 4.0, "first_query": 1.0}
    report.rto_seconds, report.rpo_seconds = 20.0, 30.0
    report.checks = [drill.CheckResult("c", "sql", True, 0.1, "1 rows", "postgres")]
    report.finished = NOW + timedelta(seconds=25)
    for name, value in changes.items():
        setattr(report, name, value)
    return report


def test_results_and_exit_statuses():
    assert _report().result == "passed" and drill.exit_for(_report()) == ExitStatus.OK
    missed = _report(rto_seconds=61.0)
    assert missed.result == "missed" and drill.exit_for(missed) == ExitStatus.TARGET_MISSED
    assert missed.cause() == "RTO 61.0 s > target 1 min"
    bad = _report(checks=[drill.CheckResult("c", "sql", False, 0.1, "0 rows", "postgres")],
                  rto_seconds=61.0)
    assert bad.result == "failed" and drill.exit_for(bad) == ExitStatus.DRILL_FAILED
    assert "check 'c' failed: 0 rows" in bad.cause()
    broken = _report(error="the restore failed: x", rto_seconds=None)
    assert broken.result == "failed" and broken.cause() == "the restore failed: x"
    assert {ExitStatus.DRILL_FAILED, ExitStatus.TARGET_MISSED} == {8, 9}


def test_json_and_prometheus():
    data = _report().to_dict()
    assert data["phases"]["backup_fetch"] == 10.0 and data["rto_seconds"] == 20.0
    assert data["targets"] == {"rto_seconds": 60, "rpo_seconds": 300, "rto_met": True,
                               "rpo_met": True}
    assert data["passed"] is True and data["next_drill_due"].startswith("2026-12-13")
    text = drill.prometheus_text(_report())
    assert "walship_drill_passed 1\n" in text and "walship_drill_rto_seconds 20\n" in text
    assert 'walship_drill_phase_seconds{phase="backup_fetch"} 10\n' in text
    assert "walship_drill_last_success_timestamp_seconds" in text
    text = drill.prometheus_text(_report(rto_seconds=None, error="x"))
    assert "walship_drill_passed 0\n" in text and "walship_drill_rto_seconds" not in text
    assert "walship_drill_last_success_timestamp_seconds" not in text


def test_html_report_is_escaped():
    page = drill.html_report(_report(checks=[drill.CheckResult(
        "<script>", "sql", False, 0.1, "0 rows & <b>", "db")], rto_seconds=61.0))
    assert page.startswith("<!DOCTYPE html>") and "walship drill: FAILED" in page
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; &lt;b&gt;" in page
    assert ('<tr data-objective="rto"><th>RTO</th><td data-seconds="61.0">61.0 s</td>'
            '<td data-seconds="60">1 min</td><td class="missed">MISSED</td></tr>') in page
    assert ('<tr data-phase="backup_fetch"><td>backup fetch</td><td data-seconds="0.0">0.00'
            '</td><td data-seconds="10.0">10.00</td></tr>') in page


def test_history_and_status(file_repo_env, capsys):
    archive = Archive(open_storage(f"file://{file_repo_env}"), Codec())
    status = drill.drill_status(archive, now=NOW)
    assert status.overdue and status.history.last_time is None
    ok = _report(started=NOW - timedelta(days=9))
    assert drill.store_result(archive, ok) == "drills/20261127T030000Z.passed.json"
    assert drill.store_result(archive, ok) == "drills/20261127T030000Z-2.passed.json"
    failed = _report(started=NOW - timedelta(days=1), error="boom", rto_seconds=None)
    drill.store_result(archive, failed)
    status = drill.drill_status(archive, 7 * 86400, now=NOW)
    assert status.history.last_result == "failed" and status.history.drills == 3
    assert status.history.last_success_time == NOW - timedelta(days=9)
    assert status.overdue and status.history.last["cause"] == "boom"
    assert "OVERDUE" in status.line() and "(boom)" in status.line()
    assert "walship_drill_overdue 1\n" in status.prometheus()
    assert main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["last_drill"]["result"] == "failed" and doc["last_drill"]["overdue"] is True
    assert main(["status"]) == 0
    assert "last drill     2026-12-05 03:00:00 UTC" in capsys.readouterr().out


def test_a_port_in_use_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "in use" in (drill.port_in_use(port) or "")
        with pytest.raises(UsageError, match=f"port {port} is in use"):
            drill.choose_port(port)
    assert drill.port_in_use(drill.choose_port(None)) is None


def test_a_scratch_directory_in_use_is_refused(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "PG_VERSION").write_text("15\n")
    runner = drill.Runner(None)
    with pytest.raises(UsageError, match="is not empty"):
        drill.make_scratch(str(busy), runner)
    with pytest.raises(UsageError, match="does not exist"):
        drill.make_scratch(str(tmp_path / "no" / "such"), runner)
    (busy / "drill").mkdir()
    with pytest.raises(UsageError, match="inside the PostgreSQL data directory"):
        drill.make_scratch(str(busy / "drill" / "scratch"), runner)
    assert not (busy / "drill" / "scratch").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    scratch = drill.make_scratch(str(empty), runner)
    assert not scratch.created and scratch.data.is_dir()
    drill.remove_scratch(scratch)
    assert empty.is_dir() and list(empty.iterdir()) == []
    scratch = drill.make_scratch(str(tmp_path / "new"), runner)
    assert scratch.created
    drill.remove_scratch(scratch)
    assert not (tmp_path / "new").exists()


def test_check_validates_the_drill_table(file_repo_env, tmp_path, monkeypatch, capsys):
    config = tmp_path / "walship.toml"
    config.write_text('[drill]\nrto = "1h"\nrpo = "5min"\namcheck = ["postgres"]\n')
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    assert main(["check"]) == 0
    assert ("drill: RTO 1 h, RPO 5 min, 0 SQL checks, pg_amcheck on postgres, data checksums "
            "checked, due every 7 days") in capsys.readouterr().out
    config.write_text('[drill]\nrto = "one hour"\n')
    assert main(["check"]) == ExitStatus.USAGE
    assert "invalid drill.rto 'one hour'" in capsys.readouterr().err
    assert main(["wal-verify"]) != ExitStatus.USAGE  # other commands ignore the table
