"""The PostgreSQL side of a base backup: one session that starts and stops it (psycopg 3).

:class:`PostgresSource` keeps one connection open from start to stop, as the non-exclusive
backup API requires (the backup is aborted if the session ends). PostgreSQL 15 and later:
``pg_backup_start(label, fast)`` / ``pg_backup_stop(wait_for_archive)``; 12 to 14:
``pg_start_backup(label, fast, false)`` / ``pg_stop_backup(false, wait_for_archive)``. An older
server is refused (:data:`MIN_VERSION`, the supported range). psycopg is imported here only, so
that nothing else in walship pays for it.

:class:`BackupSource` is the protocol the backup core needs; tests substitute a fake.
"""

from __future__ import annotations

import os

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from walship import wal
from walship.errors import StorageError, UsageError, WalshipError
from walship.pgconn import connection_args, connection_secrets
from walship.redact import redact

MIN_VERSION = 120000  # server_version_num of the oldest PostgreSQL supported


@dataclass(frozen=True)
class ServerInfo:
    """What the backup needs to know of the server, read before it starts."""

    version: int  # server_version_num
    data_directory: str
    system_identifier: str
    wal_segment_size: int
    in_recovery: bool
    archive_mode: str
    tablespace_names: dict[int, str] = field(default_factory=dict)
    timeline: int = 0  # of the latest checkpoint (0: unknown; no incremental backup then)
    block_size: int = 8192  # the server's block_size (BLCKSZ)

    @property
    def major(self) -> int:
        return self.version // 10000


@dataclass(frozen=True)
class StopResult:
    """What ``pg_backup_stop`` returned, and when."""

    lsn: wal.Lsn
    backup_label: str
    tablespace_map: str
    time: datetime


class BackupSource(Protocol):
    """A server being backed up: describe it, start and stop its backup, read its clock."""

    def describe(self) -> ServerInfo: ...

    def now(self) -> datetime: ...

    def start(self, label: str, fast: bool) -> wal.Lsn: ...

    def stop(self, wait_for_archive: bool) -> StopResult: ...

    def close(self) -> None: ...


class PostgresSource:
    """A live server reached with psycopg (libpq's PG* environment, or ``dbname``)."""

    def __init__(self, dbname: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        try:
            import psycopg
        except ImportError:
            raise UsageError("backup-push needs psycopg", "it is not installed",
                             'pip install "psycopg[binary]"') from None
        self._psycopg = psycopg
        conninfo, kwargs = connection_args(dbname, "walship backup-push")
        try:
            self._conn = psycopg.connect(conninfo, **kwargs)
        except psycopg.Error as error:
            raise StorageError("cannot connect to PostgreSQL", redact(
                _pg_message(error), hide=connection_secrets(dbname)),
                               "set PGHOST/PGPORT/PGUSER or pass --dbname") from None
        if log is not None:  # warnings only (e.g. "still waiting for ... to be archived")
            self._conn.add_notice_handler(
                lambda notice: log(f"backup-push: server {notice.severity}: "
                                   f"{notice.message_primary}")
                if notice.severity_nonlocalized not in ("NOTICE", "INFO", "LOG", "DEBUG")
                else None)
        self._version = self._conn.info.server_version
        # The session idles while the files are copied and waits for the archiver at the
        # stop: no timeout of the role or database may end it (that would abort the backup).
        self._one("SELECT set_config('statement_timeout', '0', false)")
        if self._version >= 140000:
            self._one("SELECT set_config('idle_session_timeout', '0', false)")

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> tuple:  # type: ignore[type-arg]
        try:
            row = self._conn.execute(sql, params).fetchone()
        except self._psycopg.Error as error:
            raise WalshipError("PostgreSQL refused a backup query", _pg_message(error),
                               "backup-push needs a superuser or a role granted "
                               "pg_backup_start/stop, pg_read_all_settings") from None
        assert row is not None
        return _decoded(row)

    def describe(self) -> ServerInfo:
        if self._version < MIN_VERSION:
            raise UsageError(f"PostgreSQL {version_text(self._version)} is too old for "
                             "walship", f"walship supports PostgreSQL {MIN_VERSION // 10000} "
                             "and newer", "upgrade the server, or back it up with "
                             "pg_basebackup")
        data_directory = self._one("SELECT current_setting('data_directory')")[0]
        system_identifier = str(self._one(
            "SELECT system_identifier FROM pg_control_system()")[0])
        setting, unit = self._one(
            "SELECT setting, unit FROM pg_settings WHERE name = 'wal_segment_size'")
        segment_size = int(setting) * {"B": 1, "8kB": 8192, "MB": 1 << 20}.get(unit or "B", 1)
        in_recovery = bool(self._one("SELECT pg_is_in_recovery()")[0])
        block_size = int(self._one("SELECT current_setting('block_size')")[0])
        archive_mode = str(self._one("SELECT current_setting('archive_mode')")[0])
        try:
            rows = self._conn.execute(
                "SELECT oid::bigint, spcname::text FROM pg_tablespace "
                "WHERE spcname NOT IN ('pg_default', 'pg_global')").fetchall()
        except self._psycopg.Error:
            rows = []
        try:  # (a role without access to it gets full backups only)
            row = self._conn.execute(
                "SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
            timeline = int(row[0]) if row and row[0] else 0
        except self._psycopg.Error:
            timeline = 0
        return ServerInfo(self._version, data_directory, system_identifier,
                          wal.check_segment_size(segment_size), in_recovery, archive_mode,
                          {int(oid): name for oid, name in map(_decoded, rows)}, timeline,
                          block_size)

    def now(self) -> datetime:
        return self._one("SELECT clock_timestamp()")[0]

    def start(self, label: str, fast: bool) -> wal.Lsn:
        if self._version >= 150000:
            row = self._one("SELECT pg_backup_start(%s, %s)::text", (label, fast))
        else:
            row = self._one("SELECT pg_start_backup(%s, %s, false)::text", (label, fast))
        return wal.Lsn.parse(row[0])

    def stop(self, wait_for_archive: bool) -> StopResult:
        if self._version >= 150000:
            sql = ("SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() "
                   "FROM pg_backup_stop(wait_for_archive => %s)")
        else:
            sql = ("SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() "
                   "FROM pg_stop_backup(false, %s)")
        lsn, label, spcmap, when = self._one(sql, (wait_for_archive,))
        return StopResult(wal.Lsn.parse(lsn), label or "", spcmap or "", when)

    def wal_summary_changes(self, **kwargs: object) -> object:
        """:func:`walship.backup.walsummary.changed_blocks` on this session's connection (the
        backup's own: the summaries are read after ``pg_backup_start``). Optional for a
        :class:`BackupSource`: push looks for it with ``getattr``."""
        from walship.backup.walsummary import changed_blocks

        return changed_blocks(self._conn, **kwargs)  # type: ignore[arg-type]

    def summarizes_wal(self) -> bool:
        """Whether the server keeps WAL summaries (``summarize_wal``, PostgreSQL 17+)."""
        return self._one("SELECT current_setting('summarize_wal', true)")[0] == "on"

    def flush_lsn(self) -> wal.Lsn:
        """How far the server has written and flushed its WAL (a primary)."""
        return wal.Lsn.parse(self._one("SELECT pg_current_wal_flush_lsn()::text")[0])

    def wal_scanner(self, **kwargs: object) -> object:
        """A :class:`walship.backup.walscan.WalScanner` on this session's connection."""
        from walship.backup.walscan import WalScanner

        return WalScanner(self._conn, **kwargs)  # type: ignore[arg-type]

    def wal_scan_changes(self, **kwargs: object) -> object:
        """:func:`walship.backup.walscan.changed_blocks` on this session's connection (the WAL
        read for the blocks changed, where there are no summaries). Optional, as above."""
        from walship.backup.walscan import changed_blocks

        return changed_blocks(self._conn, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing aborts the backup anyway
            pass


def version_text(version_num: int) -> str:
    """``server_version_num`` as people write it: 150004 -> "15.4", 90624 -> "9.6.24"."""
    if version_num >= 100000:
        return f"{version_num // 10000}.{version_num % 10000}"
    return f"{version_num // 10000}.{version_num // 100 % 100}.{version_num % 100}"


def _decoded(row: tuple) -> tuple:  # type: ignore[type-arg]
    """``row`` with text as ``str``. On a SQL_ASCII database (initdb under the C locale)
    psycopg returns text as bytes; paths are decoded the way the OS does (os.fsdecode)."""
    return tuple(os.fsdecode(value) if isinstance(value, bytes) else value for value in row)


def _pg_message(error: Exception) -> str:
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag else None
    return " ".join(str(primary or error).split())
