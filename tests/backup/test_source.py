"""The PostgreSQL side of ``backup-push`` across server versions, on a fake psycopg connection:
12 to 14 use ``pg_start_backup``/``pg_stop_backup``, 15 and later ``pg_backup_start``/
``pg_backup_stop``; a server older than 12 is refused with one clear line and exit 2 before any
backup starts. (The real servers, 15 and 18, are run by the end-to-end tests.)"""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
import pytest

from walship import cli
from walship.backup.source import PostgresSource, version_text
from walship.errors import UsageError


class FakeConnection:
    """Answers the queries PostgresSource sends; records them."""

    def __init__(self, version: int) -> None:
        self.info = SimpleNamespace(server_version=version)
        self.queries: list[str] = []
        self.closed = False

    def add_notice_handler(self, handler: object) -> None:
        pass

    def execute(self, sql: str, params: tuple = ()) -> SimpleNamespace:
        self.queries.append(sql)
        if "wal_segment_size" in sql:
            rows = [("16777216", "B")]
        elif "pg_backup_start" in sql or "pg_start_backup" in sql:
            rows = [("0/2000028",)]
        elif "pg_backup_stop" in sql or "pg_stop_backup" in sql:
            rows = [("0/2000100", "START WAL LOCATION: 0/2000028\n", "", None)]
        elif "pg_is_in_recovery" in sql:
            rows = [(False,)]
        elif "system_identifier" in sql:
            rows = [(7000000000000000001,)]
        elif "pg_tablespace" in sql:
            rows = []
        elif "pg_control_checkpoint" in sql:
            rows = [(1,)]
        elif "block_size" in sql:
            rows = [("8192",)]
        else:  # set_config, current_setting
            rows = [("/var/lib/postgresql/data",)]
        return SimpleNamespace(fetchone=lambda: rows[0] if rows else None,
                               fetchall=lambda: rows)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def server(monkeypatch):
    """``server(version)``: psycopg.connect now reaches a fake server of that version."""
    made: list[FakeConnection] = []

    def make(version: int) -> FakeConnection:
        conn = FakeConnection(version)
        made.append(conn)
        monkeypatch.setattr(psycopg, "connect", lambda *args, **kwargs: conn)
        return conn

    return make


@pytest.mark.parametrize("version, start, stop", [
    (120022, "pg_start_backup", "pg_stop_backup"),
    (140019, "pg_start_backup", "pg_stop_backup"),
    (150014, "pg_backup_start", "pg_backup_stop"),
    (180001, "pg_backup_start", "pg_backup_stop"),
])
def test_supported_versions_use_their_backup_functions(server, version, start, stop):
    conn = server(version)
    source = PostgresSource()
    info = source.describe()
    assert info.major == version // 10000 and info.block_size == 8192
    source.start("label", True)
    source.stop(True)
    source.close()
    backup_calls = [q for q in conn.queries if "backup" in q]
    assert len(backup_calls) == 2
    assert start in backup_calls[0] and stop in backup_calls[1], backup_calls


@pytest.mark.parametrize("version, shown", [(110022, "11.22"), (100023, "10.23"),
                                            (90624, "9.6.24")])
def test_a_server_older_than_12_is_refused(server, version, shown):
    conn = server(version)
    with pytest.raises(UsageError) as refused:
        PostgresSource().describe()
    line = refused.value.one_line()
    assert f"PostgreSQL {shown} is too old" in line and "12 and newer" in line, line
    assert not any("backup" in q for q in conn.queries)


def test_backup_push_refuses_an_old_server_with_exit_2(server, file_repo_env, capsys):
    conn = server(110022)
    assert cli.run(["backup-push"]) == 2
    err = capsys.readouterr().err
    assert "PostgreSQL 11.22 is too old for walship" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not any("backup" in q for q in conn.queries)
    assert not any(file_repo_env.rglob("*.json"))  # nothing stored


def test_version_text():
    assert [version_text(v) for v in (180001, 150004, 120000, 90624)] == \
        ["18.1", "15.4", "12.0", "9.6.24"]
