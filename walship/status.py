"""``walship status``: how healthy is archiving and backing up, right now?

It reports the last archived WAL file (the greatest name other than a timeline history file:
the newest timeline's newest segment, or the ``.backup``/``.partial`` file after it, as
PostgreSQL's archiver orders them; push-ahead may store segment N+1 a moment before N, so the
newest object by time can be an older name) and its age (the live recovery point objective:
the newest WAL object's ``modified`` time, by the storage's clock), the newest complete backup and
its age (since it stopped), the repository's size (WAL and backup bytes and counts), and the
archiver's failures as PostgreSQL's ``pg_stat_archiver`` records them, when a server is given
(``--dbname`` or libpq's ``PG*`` environment); otherwise that part is "unknown", never zero.

:func:`prometheus_text` renders the same facts for node_exporter's textfile collector and
:func:`write_textfile` writes them atomically (a temporary file in the same directory, fsynced,
then renamed), so the collector never reads half a file.

Costs: one LIST of ``wal/``, one of ``backups/`` and the manifests of the newest backup's chain
(one read for a full backup; more only for its parents and for broken newer ones); psycopg is imported
only when a server is queried.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from walship import layout as wal_layout
from walship.archive import Archive
from walship.backup import catalog
from walship.backup.manifest import Manifest
from walship.errors import StorageError
from walship.reposync import MirrorLag, mirror_lags

PG_ENVIRONMENT = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


@dataclass(frozen=True)
class ArchiverStats:
    """``pg_stat_archiver`` of the server, or why it is unknown."""

    known: bool
    reason: str = ""
    archived_count: int | None = None
    last_archived_wal: str | None = None
    last_archived_time: datetime | None = None
    failed_count: int | None = None
    last_failed_wal: str | None = None
    last_failed_time: datetime | None = None


@dataclass(frozen=True)
class BrokenBackup:
    """A complete backup, newer than the newest usable one, whose chain is not complete."""

    name: str
    backup_type: str
    problem: str


@dataclass(frozen=True)
class Status:
    now: datetime
    repository: str
    wal_files: int
    wal_bytes: int
    last_archived: str | None
    last_archived_at: datetime | None
    backups_complete: int
    backups_incomplete: int
    backup_bytes: int
    newest_backup: str | None
    newest_backup_stop: datetime | None
    archiver: ArchiverStats
    mirrors: tuple[MirrorLag, ...] = ()  # with [[mirrors]]: how far behind each one is
    broken_backups: tuple[BrokenBackup, ...] = ()  # newer than newest_backup, chain broken

    @property
    def last_archived_age(self) -> float | None:
        if self.last_archived_at is None:
            return None
        return max(0.0, (self.now - self.last_archived_at).total_seconds())

    @property
    def newest_backup_age(self) -> float | None:
        if self.newest_backup_stop is None:
            return None
        return max(0.0, (self.now - self.newest_backup_stop).total_seconds())


def server_given(dbname: str | None, environ: Mapping[str, str]) -> bool:
    return bool(dbname) or any(environ.get(name) for name in PG_ENVIRONMENT)


def read_archiver(dbname: str | None, timeout: int = 10) -> ArchiverStats:
    """Query ``pg_stat_archiver``; a failure to connect is reported as unknown, not raised."""
    try:
        import psycopg
    except ImportError:
        return ArchiverStats(False, "psycopg is not installed")
    from walship.pgconn import connection_args

    conninfo, kwargs = connection_args(dbname, "walship status")
    kwargs["connect_timeout"] = timeout
    try:
        with psycopg.connect(conninfo, **kwargs) as conn:
            row = conn.execute(
                "SELECT archived_count, last_archived_wal::text, last_archived_time, "
                "failed_count, last_failed_wal::text, last_failed_time "
                "FROM pg_stat_archiver").fetchone()
    except psycopg.Error as error:
        text = str(error).strip()
        message = text.splitlines()[0] if text else type(error).__name__
        from walship.pgconn import connection_secrets
        from walship.redact import redact

        message = redact(message, hide=connection_secrets(dbname))
        return ArchiverStats(False, f"cannot query the server: {message}")
    assert row is not None
    return ArchiverStats(True, "", int(row[0]), row[1], row[2], int(row[3]), row[4], row[5])


def gather(archive: Archive, *, dbname: str | None = None,
           environ: Mapping[str, str] | None = None, now: datetime | None = None,
           query_server: bool | None = None) -> Status:
    """Collect the status (see the module docstring)."""
    environ = os.environ if environ is None else environ
    wal_files = wal_bytes = 0
    last: str | None = None
    stored: float | None = None
    for info in archive.storage.list(wal_layout.WAL_PREFIX):
        wal_files += 1
        wal_bytes += info.size
        name = wal_layout.wal_name(info.key)
        if not name.endswith(".history") and (last is None or name > last):
            last = name
        if info.modified is not None and (stored is None or info.modified > stored):
            stored = info.modified
    groups = catalog.backup_objects(archive)
    complete = [name for name, objects in groups.items() if catalog.has_manifest(objects)]
    backup_bytes = sum(o.size for objects in groups.values() for o in objects)
    newest_backup, stop, broken = _newest_usable(archive, complete)
    if query_server is None:
        query_server = server_given(dbname, environ)
    archiver = read_archiver(dbname) if query_server else ArchiverStats(
        False, "no server given (--dbname or PGHOST/PG* environment)")
    return Status(
        now or datetime.now(timezone.utc), archive.storage.url, wal_files, wal_bytes,
        last, datetime.fromtimestamp(stored, timezone.utc) if stored is not None else None,
        len(complete), len(groups) - len(complete), backup_bytes, newest_backup, stop,
        archiver, tuple(mirror_lags(archive.storage)), broken)


def _newest_usable(archive: Archive, complete: list[str]) -> tuple[
        str | None, datetime | None, tuple[BrokenBackup, ...]]:
    """The newest of the ``complete`` backups (names, oldest first: they sort by start time)
    whose chain is complete, its stop time, and the newer ones whose chain is broken."""
    loaded: dict[str, Manifest] = {}
    names = set(complete)

    def find(name: str) -> Manifest | None:
        if name not in names:
            return None
        if name not in loaded:
            loaded[name] = catalog.load_manifest(archive, name)
        return loaded[name]

    broken: list[BrokenBackup] = []
    for name in reversed(complete):
        manifest = find(name)
        assert manifest is not None
        problem = catalog.chain_problem(manifest, find)
        if problem is None:
            return manifest.name, manifest.stop_time, tuple(broken)
        broken.append(BrokenBackup(manifest.name, manifest.backup_type, problem))
    return None, None, tuple(broken)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value is not None else None


def status_dict(status: Status) -> dict[str, object]:
    """The status as plain values (``--json``)."""
    a = status.archiver
    return {
        "now": _iso(status.now), "repository": status.repository,
        "last_archived": status.last_archived, "last_archived_at": _iso(status.last_archived_at),
        "last_archived_age_seconds": status.last_archived_age,
        "newest_backup": status.newest_backup,
        "newest_backup_stop": _iso(status.newest_backup_stop),
        "newest_backup_age_seconds": status.newest_backup_age,
        "broken_backups": [{"name": b.name, "type": b.backup_type, "problem": b.problem}
                           for b in status.broken_backups],
        "wal": {"files": status.wal_files, "bytes": status.wal_bytes},
        "backups": {"complete": status.backups_complete,
                    "incomplete": status.backups_incomplete, "bytes": status.backup_bytes},
        "archiver": {"known": a.known, "reason": a.reason or None,
                     "archived_count": a.archived_count,
                     "last_archived_wal": a.last_archived_wal,
                     "last_archived_time": _iso(a.last_archived_time),
                     "failed_count": a.failed_count, "last_failed_wal": a.last_failed_wal,
                     "last_failed_time": _iso(a.last_failed_time)},
        "mirrors": [{"name": m.name, "mode": m.mode, "reachable": m.reachable,
                     "lag_files": m.files, "lag_bytes": m.bytes, "lag_seconds": m.seconds,
                     "reason": m.reason or None} for m in status.mirrors],
    }


def _metric(lines: list[str], name: str, help_text: str,
            samples: list[tuple[str, float | None]]) -> None:
    present = [(labels, value) for labels, value in samples if value is not None]
    if not present:
        return
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} gauge")
    for labels, value in present:
        lines.append(f"{name}{labels} {float(value):.3f}".rstrip("0").rstrip("."))


def prometheus_text(status: Status) -> str:
    """The status in Prometheus' text exposition format (textfile collector). A value that is
    unknown is left out rather than written as 0."""
    lines: list[str] = []
    a = status.archiver
    _metric(lines, "walship_last_archived_age_seconds",
            "Seconds since the newest WAL file was stored in the repository.",
            [("", status.last_archived_age)])
    _metric(lines, "walship_last_archived_timestamp_seconds",
            "When the newest WAL file was stored (POSIX time).",
            [("", status.last_archived_at.timestamp() if status.last_archived_at else None)])
    _metric(lines, "walship_newest_backup_age_seconds",
            "Seconds since the newest complete backup stopped.",
            [("", status.newest_backup_age)])
    _metric(lines, "walship_newest_backup_timestamp_seconds",
            "When the newest complete backup stopped (POSIX time).",
            [("", status.newest_backup_stop.timestamp() if status.newest_backup_stop
              else None)])
    _metric(lines, "walship_newest_backup_chain_broken",
            "1 if the newest complete backup cannot be restored (its chain is broken), else 0.",
            [("", (1 if status.broken_backups else 0)
              if status.newest_backup or status.broken_backups else None)])
    _metric(lines, "walship_archive_bytes", "Bytes stored in the repository, by kind.",
            [('{kind="wal"}', status.wal_bytes), ('{kind="backup"}', status.backup_bytes)])
    _metric(lines, "walship_wal_files", "WAL files stored in the repository.",
            [("", status.wal_files)])
    _metric(lines, "walship_backups", "Backups in the repository, by state.",
            [('{state="complete"}', status.backups_complete),
             ('{state="incomplete"}', status.backups_incomplete)])
    _metric(lines, "walship_archiver_stats_known",
            "1 if pg_stat_archiver could be read, else 0.", [("", 1 if a.known else 0)])
    _metric(lines, "walship_archiver_failed_count",
            "pg_stat_archiver.failed_count of the server.", [("", a.failed_count)])
    _metric(lines, "walship_archiver_archived_count",
            "pg_stat_archiver.archived_count of the server.", [("", a.archived_count)])
    _metric(lines, "walship_archiver_last_failed_timestamp_seconds",
            "pg_stat_archiver.last_failed_time (POSIX time).",
            [("", a.last_failed_time.timestamp() if a.last_failed_time else None)])
    lags = [(f'{{mirror="{m.name}",mode="{m.mode}"}}', m) for m in status.mirrors]
    _metric(lines, "walship_mirror_reachable", "1 if the mirror could be listed, else 0.",
            [(labels, 1 if m.reachable else 0) for labels, m in lags])
    _metric(lines, "walship_mirror_lag_files", "Objects the primary holds and the mirror "
            "lacks.", [(labels, m.files) for labels, m in lags])
    _metric(lines, "walship_mirror_lag_seconds", "Age of the oldest object the mirror lacks "
            "(0 when it is current).", [(labels, m.seconds) for labels, m in lags])
    _metric(lines, "walship_status_timestamp_seconds", "When this status was taken.",
            [("", status.now.timestamp())])
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file, fsync, rename), mode 0644."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except OSError as error:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise StorageError(f"cannot write {target}", os.strerror(error.errno or 0),
                           "check that the directory exists and is writable") from None
    try:
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass
